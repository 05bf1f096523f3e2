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
         ceil(0.008 x the image diagonal) pixels, 8 px at 854 x 480 (or a given number of pixels, whole or not);
  - per object, J-mean and F-mean: the means over the scored frames;
  - the benchmark's J-mean and F-mean: the means over all the objects of all the videos, and
    J&F-mean = (J-mean + F-mean) / 2.
The functions below compute those numbers with torch and numpy, without OpenCV and scikit-image (which the DAVIS
code uses for its dilation: cv2.dilate by skimage's disk): the same disk, the same anchoring of OpenCV (which
matters for a disk of even side, from a tolerance that is not a whole number of pixels). Checked against that
code (OpenCV 4.14 and 5.0, scikit-image 0.26) on a synthetic 480p clip: the same dilations, and F within 1e-7
(float32 against float64) for tolerances 0.008, 0.002, 2.5 and 3.

Shape letters: T frames, H x W pixels; `...` any leading dimensions.
"""
import functools
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


def count(mask):
    """The set pixels of bool masks (..., H, W), per mask, int64 (...): numpy's count_nonzero of each mask, which is
    tens of times faster than a torch sum of bools on the CPU."""
    masks = mask.cpu().reshape(-1, *mask.shape[-2:]).numpy()  # (B, H, W)
    return torch.tensor([np.count_nonzero(m) for m in masks], dtype=torch.int64).reshape(mask.shape[:-2])


def db_eval_iou(gt, pred):
    """Region similarity J = |gt & pred| / |gt | pred| of bool masks (..., H, W); 1 where both are empty."""
    inter, union = count(gt & pred), count(gt | pred)
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


@functools.lru_cache(maxsize=8)
def disk_runs(radius):
    """(n, ((lo, hi, rows), ...)) for davis_disk(radius): every row of a disk is one run of ones, columns
    lo..hi - 1; the rows that share a run are listed with it."""
    disk = davis_disk(radius)
    runs = {}
    for i, row in enumerate(disk):
        cols = np.flatnonzero(row)
        if cols.size:
            runs.setdefault((int(cols[0]), int(cols[-1]) + 1), []).append(i)
    return disk.shape[0], tuple((lo, hi, tuple(rows)) for (lo, hi), rows in runs.items())


def dilate_disk(mask, radius):
    """Binary dilation of bool masks (..., H, W) by davis_disk(radius) as OpenCV's dilate (the DAVIS code) does it:
    with the anchor at (n // 2, n // 2), pixel (y, x) is set when a pixel (y + i - n // 2, x + j - n // 2) is, for
    a one (i, j) of the element; pixels outside the image count as unset. For a whole radius that is the disk
    around each pixel; for an even n the disk sits half a pixel off (2.5: a set pixel sets the 4 x 4 square from
    one pixel above and left of it to two below and right).
    How, with ORs of shifted slices only: spans[k] says whether one of 2^k consecutive columns is set (each from
    the one before, doubling); a run of L columns is the OR of two spans of the largest 2^k <= L, its start and
    its end; each row of the element ORs its run in, moved by the row."""
    n, runs = disk_runs(radius)
    height, width = mask.shape[-2:]
    a = n // 2
    padded = F.pad(mask, (a, n - 1 - a, a, n - 1 - a))  # (..., H + n - 1, W + n - 1): every read inside
    spans = [padded]  # spans[k][..., y, x]: a set pixel in columns x .. x + 2^k - 1 of padded
    while 2 ** len(spans) <= n:
        step = 2 ** (len(spans) - 1)
        spans.append(spans[-1][..., :-step] | spans[-1][..., step:])  # (..., H + n - 1, W + n - 2^k)
    out = torch.zeros_like(mask)
    for lo, hi, rows in runs:
        k = (hi - lo).bit_length() - 1
        run = spans[k][..., lo:lo + width] | spans[k][..., hi - 2 ** k:hi - 2 ** k + width]  # (..., H + n - 1, W)
        for i in rows:
            out |= run[..., i:i + height, :]
    return out


def boundary_tolerance(bound_th, height, width):
    """F's tolerance in pixels, the DAVIS code's bound_pix: bound_th when bound_th >= 1 (kept as it is: 2.5 stays
    2.5), else ceil(bound_th * image diagonal), the diagonal computed as numpy's norm does."""
    return bound_th if bound_th >= 1 else math.ceil(bound_th * math.sqrt(height * height + width * width))


def mask_box(union):
    """(top, bottom, left, right): the rows top..bottom - 1 and columns left..right - 1 that hold the set pixels of
    a bool frame (H, W), one more on each side where the frame has one; None when no pixel is set."""
    rows = union.view(torch.uint8).amax(1).nonzero()[:, 0]  # (r,): the rows with a set pixel
    cols = union.view(torch.uint8).amax(0).nonzero()[:, 0]  # (c,)
    if not len(rows):
        return None
    height, width = union.shape
    top, bottom, left, right = int(rows[0]) - 1, int(rows[-1]) + 2, int(cols[0]) - 1, int(cols[-1]) + 2
    return max(top, 0), min(bottom, height), max(left, 0), min(right, width)


def boundary_counts(gt, pred, radius):
    """(true boundary pixels, predicted ones, true ones near a predicted one, predicted ones near a true one) for
    bool frames (H, W), int64 (4,). Computed on the box of the two masks only (mask_box): the boundary pixels
    outside it are none (a boundary pixel has a set pixel at most one row and column after it), those inside it
    are the same as in the whole frame (at the box's last row and column the frame has no set pixel after them
    either), and the dilations are read only at boundary pixels, where they depend only on boundary pixels."""
    box = mask_box(gt | pred)
    if box is None:
        return torch.zeros(4, dtype=torch.int64)
    top, bottom, left, right = box
    gt_b, pred_b = seg2bmap(gt[top:bottom, left:right]), seg2bmap(pred[top:bottom, left:right])
    return torch.stack([count(gt_b), count(pred_b), count(gt_b & dilate_disk(pred_b, radius)),
                        count(pred_b & dilate_disk(gt_b, radius))])


def db_eval_boundary(gt, pred, bound_th=0.008):
    """Contour accuracy F of bool masks (..., H, W), per mask: precision = share of the predicted boundary within
    the tolerance of the true one, recall the converse, F their harmonic mean (tolerance: boundary_tolerance)."""
    height, width = gt.shape[-2:]
    radius = boundary_tolerance(bound_th, height, width)
    shape = gt.shape[:-2]
    gt, pred = gt.reshape(-1, height, width), pred.reshape(-1, height, width)  # (B, H, W)
    counts = torch.zeros(len(gt), 4, dtype=torch.int64)  # (B, 4): one frame at a time, each cut to its masks' box
    for i in range(len(gt)):
        counts[i] = boundary_counts(gt[i], pred[i], radius)
    n_gt, n_pred, gt_matched, pred_matched = counts.reshape(*shape, 4).float().unbind(-1)  # each (...)
    precision, recall = pred_matched / n_pred.clamp_min(1), gt_matched / n_gt.clamp_min(1)
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
        gt_k, pred_k = gt == k, pred == k
        j, f = db_eval_iou(gt_k, pred_k).mean().item(), db_eval_boundary(gt_k, pred_k, bound_th).mean().item()
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
