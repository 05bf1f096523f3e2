"""The DAVIS-2017 benchmark of semi-supervised video object segmentation (paper Table 5): its measures J and F,
and its videos and masks read from disk.

The layout: a DAVIS root holds JPEGImages/480p/<video>/00000.jpg..., Annotations/480p/<video>/00000.png...
(indexed PNGs: label k is object k, 0 the background, 255 'void') and ImageSets/2017/<subset>.txt (a video
name per line). One video can also be a folder of frames with the first frame's mask beside them.

What the DAVIS evaluation code (davis2017-evaluation, semi-supervised task) computes for a video whose first
true mask holds the objects 1..K, given the true and the predicted label maps of every frame:
  - it drops the first frame (its mask is given) and the last one; the frames left are the scored frames;
  - per object k and scored frame, on the bool masks (true label == k) and (predicted label == k):
      J, region similarity: the IoU |true & pred| / |true | pred|, 1 when both masks are empty;
      F, contour accuracy: the F-measure of the two masks' one-pixel boundaries (seg2bmap), a boundary pixel
         counting as matched when one of the other mask's is within the tolerance (a dilation by a disk):
         ceil(0.008 x the image diagonal) pixels, 8 px at 854 x 480;
  - per object, J-mean and F-mean: the means over the scored frames;
  - the benchmark's J-mean and F-mean: the means over all the objects of all the videos, and
    J&F-mean = (J-mean + F-mean) / 2.
The functions below compute those numbers with torch (the DAVIS code uses numpy, OpenCV's dilate and
scikit-image's disk); with the default tolerance they were checked to give the DAVIS code's values.

Shape letters: T frames, H x W pixels; `...` any leading dimensions.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cli import ConfigError

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


# --- videos and masks in the DAVIS-2017 layout --------------------------------------------------------------
def list_frames(video_dir):
    """The frames of a folder (FRAME_SUFFIXES), sorted by name."""
    frames = sorted(p for p in Path(video_dir).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise ConfigError(f"no frames ({', '.join(FRAME_SUFFIXES)}) in {video_dir}")
    return frames


def read_mask(path):
    """(labels uint8 numpy (H, W), palette as a flat list or None) of an indexed (or grayscale) PNG. The DAVIS
    'void' label 255 counts as background, as in the DAVIS evaluation."""
    if not Path(path).is_file():
        raise ConfigError(f"no first-frame mask {path}: the first frame's object masks are needed as an "
                          f"indexed PNG (DAVIS: Annotations/480p/<video>/00000.png; else give --first_mask)")
    with Image.open(path) as mask:
        if mask.mode not in ("P", "L"):
            raise ConfigError(f"{path} is a {mask.mode} image: a mask must be an indexed (P) or grayscale (L) PNG "
                              f"whose pixel values are the object labels 0, 1, 2...")
        labels, palette = np.array(mask), mask.getpalette() if mask.mode == "P" else None
    labels[labels == 255] = 0
    return labels, palette


def find_videos(data_path, subset="val", videos=None, first_mask=None):
    """[(name, frame paths, first mask path, folder of the true masks)]: the videos of ImageSets/2017/<subset>.txt
    (only those in `videos` when given) of a DAVIS root, else the one folder of frames data_path with first_mask."""
    root = Path(data_path)
    video_list = root / "ImageSets" / "2017" / f"{subset}.txt"
    if video_list.is_file():  # a DAVIS root
        names = [line.strip() for line in video_list.read_text().splitlines() if line.strip()]
        names = [n for n in names if not videos or n in videos]
        if not names:
            raise ConfigError(f"no video of {video_list} to evaluate" + (" among --videos" if videos else ""))
        found = []
        for name in names:
            frames, masks = list_frames(root / "JPEGImages/480p" / name), root / "Annotations/480p" / name
            found.append((name, frames, masks / f"{frames[0].stem}.png", masks))
        return found
    if not first_mask:
        raise ConfigError(f"{root} is not a DAVIS root (it has no {video_list.relative_to(root)}): for a folder of "
                          f"frames, give the first frame's mask with --first_mask")
    # a plain folder: the masks next to --first_mask are the ground truth when there is one for every frame
    first_mask = Path(first_mask)
    frames = [f for f in list_frames(root) if f.resolve() != first_mask.resolve()]  # the mask is no frame
    if not frames:
        raise ConfigError(f"no frames in {root} besides the mask {first_mask}")
    return [(root.name, frames, first_mask, first_mask.parent)]


# --- the measures J and F -----------------------------------------------------------------------------------


def db_eval_iou(gt, pred):
    """Region similarity J = |gt & pred| / |gt | pred| of bool masks (..., H, W); 1 where both are empty."""
    inter, union = (gt & pred).sum(dim=(-2, -1)), (gt | pred).sum(dim=(-2, -1))
    return torch.where(union > 0, inter / union.clamp_min(1), 1.0)


def seg2bmap(mask):
    """One-pixel boundaries of bool masks (..., H, W): a pixel whose right, lower or lower-right neighbour differs
    (the boundary sits half a pixel towards the origin); on the last row only the right neighbour counts, on the
    last column only the lower one, the last pixel is never a boundary (D. Martin's seg2bmap, as the DAVIS
    evaluation). Written with slices of the mask, no shifted copies."""
    m, b = mask, torch.zeros_like(mask)
    inner = m[..., :-1, :-1]  # (..., H - 1, W - 1): the pixels with all three neighbours
    b[..., :-1, :-1] = (inner ^ m[..., :-1, 1:]) | (inner ^ m[..., 1:, :-1]) | (inner ^ m[..., 1:, 1:])
    b[..., -1, :-1] = m[..., -1, :-1] ^ m[..., -1, 1:]
    b[..., :-1, -1] = m[..., :-1, -1] ^ m[..., 1:, -1]
    return b


def davis_disk(radius):
    """(n, n) bool numpy: the structuring element of the DAVIS code, scikit-image's disk(radius): the points (y, x)
    of arange(-radius, radius + 1) squared with y^2 + x^2 <= radius^2. A whole radius r gives the n = 2r + 1 disk;
    any other radius an even n, with the ones off the centre of the grid (2.5: a 6 x 6 grid, its central 4 x 4)."""
    r = np.arange(-radius, radius + 1)  # (n,): the same floats as skimage's
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius ** 2  # (n, n)


def dilate_disk(mask, radius):
    """Binary dilation of bool masks (..., H, W) by davis_disk(radius) as OpenCV's dilate (the DAVIS code) does it:
    with the anchor at (n // 2, n // 2), pixel (y, x) is set when a pixel (y + i - n // 2, x + j - n // 2) is, for
    a one (i, j) of the element; pixels outside the image count as unset. For a whole radius that is the disk
    around each pixel; for an even n the disk sits half a pixel off (2.5: a set pixel sets the 4 x 4 square from
    one pixel above and left of it to two below and right).
    How: each row of the element is one run of ones, columns lo..hi - 1; a run is found along the rows of the
    (padded) mask by a cumulative sum and one difference, then moved by the row's offset and OR-ed in: a few
    passes over the masks for any radius, where a convolution makes n^2 of them."""
    disk = davis_disk(radius)
    n, height, width = disk.shape[0], *mask.shape[-2:]
    a = n // 2
    padded = F.pad(mask.to(torch.uint8), (a, n - 1 - a, a, n - 1 - a))  # (..., H + n - 1, W + n - 1)
    sums = F.pad(padded.cumsum(-1, dtype=torch.int32), (1, 0))  # (..., H + n - 1, W + n): ones left of a column
    rows_of_run = {}
    for i in range(n):
        cols = np.flatnonzero(disk[i])
        if cols.size:
            rows_of_run.setdefault((int(cols[0]), int(cols[-1]) + 1), []).append(i)
    out = torch.zeros_like(mask)
    for (lo, hi), rows in rows_of_run.items():
        hit = sums[..., hi:hi + width] > sums[..., lo:lo + width]  # (..., H + n - 1, W): a one in columns lo..hi - 1
        for i in rows:
            out |= hit[..., i:i + height, :]
    return out


def boundary_tolerance(bound_th, height, width):
    """F's tolerance in pixels, the DAVIS code's bound_pix: bound_th when bound_th >= 1 (kept as it is: 2.5 stays
    2.5), else ceil(bound_th * image diagonal), the diagonal computed as numpy's norm does."""
    return bound_th if bound_th >= 1 else math.ceil(bound_th * math.sqrt(height * height + width * width))


def db_eval_boundary(gt, pred, bound_th=0.008):
    """Contour accuracy F of bool masks (..., H, W), per mask: precision = share of the predicted boundary within
    the tolerance of the true one, recall the converse, F their harmonic mean (tolerance: boundary_tolerance)."""
    bound_pix = boundary_tolerance(bound_th, *gt.shape[-2:])
    gt_b, pred_b = seg2bmap(gt), seg2bmap(pred)
    n_gt, n_pred = gt_b.sum(dim=(-2, -1)).float(), pred_b.sum(dim=(-2, -1)).float()
    precision = (pred_b & dilate_disk(gt_b, bound_pix)).sum(dim=(-2, -1)) / n_pred.clamp_min(1)
    recall = (gt_b & dilate_disk(pred_b, bound_pix)).sum(dim=(-2, -1)) / n_gt.clamp_min(1)
    # an empty boundary: precision 1 when nothing is predicted, recall 1 when there is nothing to find; so F is
    # 1 when both are empty and 0 when only one is (the DAVIS special cases)
    precision, recall = torch.where(n_pred > 0, precision, 1.0), torch.where(n_gt > 0, recall, 1.0)
    return 2 * precision * recall / (precision + recall).clamp_min(1e-12)


def score_video(gt, pred, num_objects, bound_th=0.008):
    """{"J": .., "F": .., "J&F": .., "objects": {k: {"J": .., "F": ..}}} in percent, for uint8 numpy labels
    (T, H, W) of the scored frames. Object k is label k in both; J and F are averaged over the frames per object,
    then over the objects (DAVIS: the objects are the labels 1..max of the first true mask)."""
    gt, pred = torch.from_numpy(gt), torch.from_numpy(pred)
    objects = {}
    for k in range(1, num_objects + 1):
        j = db_eval_iou(gt == k, pred == k).mean().item()
        f = db_eval_boundary(gt == k, pred == k, bound_th).mean().item()
        objects[k] = {"J": 100 * j, "F": 100 * f}
    j = float(np.mean([o["J"] for o in objects.values()]))
    f = float(np.mean([o["F"] for o in objects.values()]))
    return {"J&F": (j + f) / 2, "J": j, "F": f, "objects": objects}


def global_scores(scores):
    """The benchmark's figures for {video: score_video(...)}: J and F averaged over all the objects of all the
    videos (not over the videos), and their mean."""
    objects = [o for s in scores.values() for o in s["objects"].values()]
    j, f = float(np.mean([o["J"] for o in objects])), float(np.mean([o["F"] for o in objects]))
    return {"J&F-mean": (j + f) / 2, "J-mean": j, "F-mean": f, "num_objects": len(objects)}
