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
    last column only the lower one (D. Martin's seg2bmap, as the DAVIS evaluation)."""
    e, s, se = torch.zeros_like(mask), torch.zeros_like(mask), torch.zeros_like(mask)
    e[..., :, :-1], s[..., :-1, :], se[..., :-1, :-1] = mask[..., :, 1:], mask[..., 1:, :], mask[..., 1:, 1:]
    b = (mask ^ e) | (mask ^ s) | (mask ^ se)
    b[..., -1, :] = mask[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = mask[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def dilate_disk(mask, radius):
    """Binary dilation of bool masks (..., H, W) by a disk {dx^2 + dy^2 <= radius^2} (skimage's disk(radius)): a
    convolution with the disk's indicator, > 0."""
    r = torch.arange(-radius, radius + 1)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()  # (2r+1, 2r+1)
    hits = F.conv2d(mask.reshape(-1, 1, *mask.shape[-2:]).float(), disk[None, None], padding=radius)  # (B, 1, H, W)
    return hits.reshape(mask.shape) > 0.5  # (B, 1, H, W) -> (..., H, W)


def boundary_tolerance(bound_th, height, width):
    """F's tolerance in pixels: bound_th pixels when bound_th >= 1, else ceil(bound_th * image diagonal)."""
    return int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(height, width)))


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
