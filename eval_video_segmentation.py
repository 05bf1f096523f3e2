"""Video object segmentation by propagating the first frame's mask with frozen patch features (paper Sec. 4.2.2,
Table 5: DAVIS-2017 val J&F-mean 61.8 for ViT-S/16, 71.4 for ViT-B/8), with no training at all.

The protocol of the paper (from Jabri et al. 2020, as the official eval_video_segmentation.py):
  - every frame goes through the frozen ViT; its last-layer patch tokens, L2-normalized, are the features;
  - the context of frame t is the first frame (its ground-truth mask, one-hot on the patch grid) and the
    --n_last_frames previous frames (their propagated soft label maps);
  - each patch of frame t takes the labels of its --topk most similar context patches, weighted by
    exp(cos / 0.1), among those within --size_mask_neighborhood patches of its position;
  - the soft labels are upsampled by the patch size (bilinear), min-max normalized per label, and the argmax
    is the predicted mask, written as an indexed PNG with the first mask's palette.
The scores are those of the DAVIS-2017 semi-supervised benchmark, computed here: region similarity J (IoU) and
contour accuracy F (boundary F-measure, tolerance 0.008 of the image diagonal), per object over the frames
but the first and the last, J&F-mean per video and over all objects.

    python eval_video_segmentation.py --data_path /path/to/davis-2017/DAVIS \\
        --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16
    python eval_video_segmentation.py --data_path my_frames/ --first_mask my_mask.png --pretrained_weights ...

--data_path is a DAVIS root (JPEGImages/480p/<video>/*.jpg, Annotations/480p/<video>/*.png,
ImageSets/2017/val.txt), or one folder of frames with --first_mask. Writes --output_dir/<video>/<frame>.png,
--output_dir/<video>/strip.png (frames with the masks over them), and scores.json when the frames have
ground-truth masks.

Shape letters: C labels (background and objects), M context frames, N = h * w patches of an h x w grid,
D feature width, H x W frame in pixels, k top-k neighbours.
"""
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import checkpoint
import data
from cli import ArgumentParser, ConfigError, nonneg_int, positive_float, positive_int, run_cli

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
OVERLAY_COLORS = [(0, 0, 0), (255, 40, 40), (40, 200, 40), (40, 90, 255), (255, 200, 0), (200, 0, 200)]


# --- frames and masks -------------------------------------------------------------------------------------
def list_frames(video_dir):
    frames = sorted(p for p in Path(video_dir).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise ConfigError(f"no frames ({', '.join(FRAME_SUFFIXES)}) in {video_dir}")
    return frames


def resized_size(height, width, image_size, patch_size):
    """The short side becomes image_size, the long one keeps the aspect ratio; both rounded down to a multiple
    of the patch size.

    NOTE: the official code rounds the long side down to a multiple of 64 (DAVIS 854 x 480 -> 832 x 480) and
    not the short one; here both sides go to the patch grid (854 x 480 -> 848 x 480 for patch 8 or 16).
    """
    scale = image_size / min(height, width)
    return (max(patch_size, int(height * scale) // patch_size * patch_size),
            max(patch_size, int(width * scale) // patch_size * patch_size))


def read_frame(path, size):
    """ImageNet-normalized float (3, *size) frame, and its original uint8 (3, H, W).

    NOTE: bilinear without antialiasing, as the official cv2.resize; the official std of red is 0.228, here
    the ImageNet 0.229 of data.normalize.
    """
    image = data.read_image(path)  # uint8 (3, H, W)
    resized = TF.resize(image, list(size), antialias=False) if tuple(image.shape[-2:]) != tuple(size) else image
    return data.normalize(resized), image


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


def to_one_hot(labels, num_labels):
    """Integer labels (h, w) -> float (C, h, w) with a 1 in the channel of each pixel's label."""
    return F.one_hot(labels.long(), num_labels).permute(2, 0, 1).float()  # (h, w, C) -> (C, h, w)


def mask_to_grid(labels, h, w):
    """The first mask at one label per patch: nearest-neighbour resize of (H, W) labels to (h, w), as the official
    read_seg (PIL NEAREST samples the source pixel under each output pixel's centre)."""
    return torch.from_numpy(np.array(Image.fromarray(labels).resize((w, h), Image.NEAREST)))


def resize_labels(labels, height, width):
    """(h', w') integer labels -> uint8 numpy (height, width), nearest neighbour (as the official script)."""
    return np.array(Image.fromarray(labels.to(torch.uint8).numpy()).resize((width, height), Image.NEAREST))


# --- propagation ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def neighborhood_mask(h, w, size):
    """Bool (N, N): patch (i, j) may take labels from patch (i', j') iff |i - i'| <= size and |j - j'| <= size
    ("local attention" of the official restrict_neighborhood, built with broadcasting instead of 4 loops)."""
    rows = (torch.arange(h)[:, None] - torch.arange(h)[None, :]).abs() <= size  # (h, h)
    cols = (torch.arange(w)[:, None] - torch.arange(w)[None, :]).abs() <= size  # (w, w)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, h * w)  # (h, w, h, w) -> (N, N)


@torch.no_grad()
def extract_feature(model, frame):
    """L2-normalized last-layer patch tokens of one normalized frame (3, H, W): (N, D), CLS dropped."""
    tokens = model.get_intermediate_layers(frame[None], n=1)[0]  # (1, 1+N, D)
    return F.normalize(tokens[0, 1:].float(), dim=-1)  # (N, D)


def label_propagation(feat_tar, context_feats, context_segs, topk, neighborhood=None, temperature=0.1,
                      chunk=1024):
    """Soft labels (C, N) of a frame from its features (N, D) and the context: features (M, N, D) and soft
    labels (M, C, N). `neighborhood` (N, N) bool, or None for no restriction.

        aff[n, m, n'] = exp(cos(f_tar[n], f_m[n']) / temperature)   over the allowed n', top-k over (m, n')
        seg_tar[:, n] = sum over the top k of aff * seg_m[:, n'] / sum over the top k of aff

    NOTE: the official code zeroes every affinity below the k-th largest and keeps ties with it; this keeps
    exactly k (torch.topk). The two differ only where similarities tie exactly.
    """
    M, N, _ = context_feats.shape
    segs = context_segs.permute(1, 0, 2).reshape(context_segs.shape[1], M * N)  # (C, M*N)
    keys = context_feats.reshape(M * N, -1)  # (M*N, D)
    out = []
    for start in range(0, len(feat_tar), chunk):  # a chunk of queries at a time bounds the memory
        cos = feat_tar[start:start + chunk] @ keys.T  # (n, M*N)
        if neighborhood is not None:
            allowed = neighborhood[start:start + chunk].repeat(1, M)  # (n, M*N): same window in each frame
            cos = cos.masked_fill(~allowed, -math.inf)
        values, index = cos.topk(min(topk, M * N), dim=1)  # (n, k)
        weights = (values / temperature).softmax(dim=1)  # exp(cos / T) normalized over the top k
        out.append((segs[:, index] * weights).sum(dim=-1))  # (C, n, k) -> (C, n)
    return torch.cat(out, dim=1)  # (C, N)


def upsample_labels(seg, h, w, patch_size):
    """Soft labels (C, N) -> predicted labels (h * p, w * p): bilinear upsampling by the patch size, each label's
    map min-max normalized to [0, 1] (the official norm_mask), argmax.

    NOTE: a label map that is constant but not 0 is left as it is (the official divides 0 by 0 there).
    """
    up = F.interpolate(seg.reshape(1, -1, h, w), scale_factor=patch_size, mode="bilinear", align_corners=False)[0]
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)  # (C, 1, 1)
    normed = torch.where((hi > 0) & (hi > lo), (up - lo) / (hi - lo).clamp_min(1e-12), up)
    return normed.argmax(dim=0)  # (h * p, w * p)


@torch.no_grad()
def propagate_video(model, frames, first_labels, n_last_frames=7, size_mask_neighborhood=12, topk=5,
                    temperature=0.1):
    """Soft labels (C, N) of frames 1, 2... (a generator), from normalized frames (3, h * p, w * p), the first one
    included, and the first frame's labels on the patch grid (h, w)."""
    frames = iter(frames)
    p = model.patch_size
    first = next(frames)
    h, w = first.shape[-2] // p, first.shape[-1] // p
    num_labels = int(first_labels.max()) + 1
    neighborhood = neighborhood_mask(h, w, size_mask_neighborhood) if size_mask_neighborhood > 0 else None
    neighborhood = None if neighborhood is None else neighborhood.to(first.device)
    first_feat = extract_feature(model, first)  # (N, D)
    first_seg = to_one_hot(first_labels.to(first.device), num_labels).flatten(1)  # (C, N)
    queue = []  # (features, soft labels) of the last n_last_frames frames, oldest first
    for frame in frames:
        feat = extract_feature(model, frame)
        context_feats = torch.stack([first_feat] + [f for f, _ in queue])  # (M, N, D)
        context_segs = torch.stack([first_seg] + [s for _, s in queue])  # (M, C, N)
        seg = label_propagation(feat, context_feats, context_segs, topk, neighborhood, temperature)  # (C, N)
        queue = (queue + [(feat, seg)])[-n_last_frames:] if n_last_frames > 0 else []
        yield seg


# --- scores (DAVIS-2017 semi-supervised: davis2017-evaluation's db_eval_iou and db_eval_boundary) -------------
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
    return hits.reshape(mask.shape) > 0.5


def db_eval_boundary(gt, pred, bound_th=0.008):
    """Contour accuracy F of bool masks (..., H, W), per mask: precision = share of the predicted boundary within
    the tolerance of the true one, recall the converse, F their harmonic mean. The tolerance is bound_th pixels
    when bound_th >= 1, else ceil(bound_th * image diagonal) (DAVIS: 0.008, so 8 px at 854 x 480)."""
    bound_pix = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape[-2:])))
    gt_b, pred_b = seg2bmap(gt), seg2bmap(pred)
    n_gt, n_pred = gt_b.sum(dim=(-2, -1)).float(), pred_b.sum(dim=(-2, -1)).float()
    precision = (pred_b & dilate_disk(gt_b, bound_pix)).sum(dim=(-2, -1)) / n_pred.clamp_min(1)
    recall = (gt_b & dilate_disk(pred_b, bound_pix)).sum(dim=(-2, -1)) / n_gt.clamp_min(1)
    # an empty boundary: precision 1 when nothing is predicted, recall 1 when there is nothing to find; so F is
    # 1 when both are empty and 0 when only one is (the DAVIS special cases)
    precision, recall = torch.where(n_pred > 0, precision, 1.0), torch.where(n_gt > 0, recall, 1.0)
    return 2 * precision * recall / (precision + recall).clamp_min(1e-12)


def score_video(gt, pred, num_objects, bound_th=0.008):
    """{"J": .., "F": .., "J&F": .., "objects": {k: {"J": .., "F": ..}}} in percent, for uint8 labels (T, H, W)
    of the scored frames. Object k is label k in both; J and F are averaged over the frames per object, then
    over the objects (DAVIS: the objects are the labels 1..max of the first ground-truth mask)."""
    gt, pred = torch.from_numpy(gt), torch.from_numpy(pred)
    objects = {}
    for k in range(1, num_objects + 1):
        j = db_eval_iou(gt == k, pred == k).mean().item()
        f = db_eval_boundary(gt == k, pred == k, bound_th).mean().item()
        objects[k] = {"J": 100 * j, "F": 100 * f}
    j = float(np.mean([o["J"] for o in objects.values()]))
    f = float(np.mean([o["F"] for o in objects.values()]))
    return {"J&F": (j + f) / 2, "J": j, "F": f, "objects": objects}


# --- outputs ----------------------------------------------------------------------------------------------
def write_indexed(path, labels, palette):
    """uint8 labels (H, W) as a PNG: indexed with `palette` (the first mask's), grayscale when it has none."""
    image = Image.fromarray(labels)
    if palette is not None:
        image.putpalette(palette)  # the L image becomes P: the labels are the indices
    image.save(path)


def overlay(frame, labels, palette, alpha=0.45):
    """uint8 frame (3, H, W) with each object blended in its colour (the palette's, brightened, else
    OVERLAY_COLORS) and its outline drawn in that colour."""
    out = frame.float()
    for k in np.unique(labels[labels > 0]):
        color = torch.tensor(palette[3 * k:3 * k + 3] if palette else OVERLAY_COLORS[k % len(OVERLAY_COLORS)])
        color = (color.float() * 255 / color.max().clamp_min(1)).view(3, 1, 1)  # DAVIS' (128, 0, 0) -> (255, 0, 0)
        mask = torch.from_numpy(labels == k)  # (H, W)
        m = torch.where(seg2bmap(mask), 1.0, alpha * mask.float())  # (H, W): opaque outline, translucent inside
        out = out * (1 - m) + color * m
    return out.round().to(torch.uint8)


def write_strip(path, frame_paths, rows, palette, num_shown=6):
    """A picture of num_shown frames spread over the video (columns), one row per list of uint8 labels in `rows`
    (the prediction, and the ground truth above it when there is one), each mask over its frame."""
    shown = np.linspace(0, len(frame_paths) - 1, min(num_shown, len(frame_paths))).round().astype(int)
    tiles = [overlay(data.read_image(frame_paths[t]), row[t], palette) for row in rows for t in shown]
    zoom = max(1, 160 // min(tiles[0].shape[-2:]))  # small synthetic frames are enlarged to be seen
    tiles = [tile.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1) for tile in tiles]
    grid = torchvision.utils.make_grid(torch.stack(tiles), nrow=len(shown), padding=2, pad_value=255)
    torchvision.utils.save_image(grid / 255, path)


# --- one video --------------------------------------------------------------------------------------------
def read_video(frame_paths, size):
    """Normalized frames (3, *size), lazily; every frame must have the size of the first."""
    first_shape = None
    for path in frame_paths:
        frame, original = read_frame(path, size)
        if first_shape is not None and original.shape != first_shape:
            raise ConfigError(f"{path} is {original.shape[2]} x {original.shape[1]} px but the first frame is "
                              f"{first_shape[2]} x {first_shape[1]}: the frames of a video must have one size")
        first_shape = original.shape
        yield frame


def predict_video(model, frame_paths, first_labels, args):
    """uint8 labels (H, W) of every frame: the first mask, then the propagated ones (or the first mask copied)."""
    height, width = first_labels.shape
    frame_h, frame_w = data.read_image(frame_paths[0]).shape[-2:]
    if (frame_h, frame_w) != (height, width):
        raise ConfigError(f"the first mask is {width} x {height} px but the first frame {frame_paths[0]} is "
                          f"{frame_w} x {frame_h}")
    if model is None:  # --copy_first_mask: the trivial baseline
        for _ in read_video(frame_paths, (height, width)):  # still checks the frame sizes
            pass
        return [first_labels] * len(frame_paths)
    device, p = next(model.parameters()).device, model.patch_size
    size = resized_size(height, width, args.image_size, p)
    grid = mask_to_grid(first_labels, size[0] // p, size[1] // p)  # (h, w)
    frames = (frame.to(device) for frame in read_video(frame_paths, size))
    segs = propagate_video(model, frames, grid, args.n_last_frames, args.size_mask_neighborhood, args.topk,
                           args.temperature)  # soft labels (C, N) of each frame after the first
    return [first_labels] + [resize_labels(upsample_labels(seg, *grid.shape, p).cpu(), height, width) for seg in segs]


def find_videos(args):
    """[(name, frame paths, first mask path, folder of ground-truth masks or None)] of --data_path."""
    root = Path(args.data_path)
    video_list = root / "ImageSets" / "2017" / f"{args.subset}.txt"
    if video_list.is_file():  # a DAVIS root
        names = [line.strip() for line in video_list.read_text().splitlines() if line.strip()]
        names = [n for n in names if not args.videos or n in args.videos]
        if not names:
            raise ConfigError(f"no video of {video_list} to evaluate" + (" among --videos" if args.videos else ""))
        videos = []
        for name in names:
            frames, masks = list_frames(root / "JPEGImages/480p" / name), root / "Annotations/480p" / name
            videos.append((name, frames, masks / f"{frames[0].stem}.png", masks))
        return videos
    if not args.first_mask:
        raise ConfigError(f"{root} is not a DAVIS root (it has no {video_list.relative_to(root)}): for a folder of "
                          f"frames, give the first frame's mask with --first_mask")
    # a plain folder: the masks next to --first_mask are the ground truth when there is one for every frame
    first_mask = Path(args.first_mask)
    frames = [f for f in list_frames(root) if f.resolve() != first_mask.resolve()]  # the mask is no frame
    if not frames:
        raise ConfigError(f"no frames in {root} besides the mask {first_mask}")
    return [(root.name, frames, first_mask, first_mask.parent)]


def evaluate_video(model, name, frame_paths, first_mask, gt_dir, args):
    """Propagates, writes the PNGs and the strip of one video; returns its scores, or None without ground truth."""
    first_labels, palette = read_mask(first_mask)
    predicted = predict_video(model, frame_paths, first_labels, args)
    out_dir = Path(args.output_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, labels in zip(frame_paths, predicted):
        write_indexed(out_dir / f"{path.stem}.png", labels, palette)
    gt_paths = [gt_dir / f"{path.stem}.png" for path in frame_paths]
    has_gt = len(frame_paths) >= 3 and all(p.is_file() for p in gt_paths)
    gt = [read_mask(p)[0] for p in gt_paths] if has_gt else None
    write_strip(out_dir / "strip.png", frame_paths, ([gt] if gt else []) + [predicted], palette)
    if not has_gt:
        return None
    # DAVIS semi-supervised: the first frame is given and the last one is not scored
    num_objects = int(first_labels.max())
    return score_video(np.stack(gt[1:-1]), np.stack(predicted[1:-1]), num_objects, args.bound_th)


def print_table(scores):
    """The per-video table and the overall line; returns the overall scores. The overall J and F average over all
    the objects of all the videos (the DAVIS "global" J&F-mean), not over the videos."""
    objects = [o for s in scores.values() for o in s["objects"].values()]
    j, f = float(np.mean([o["J"] for o in objects])), float(np.mean([o["F"] for o in objects]))
    overall = {"J&F-mean": (j + f) / 2, "J-mean": j, "F-mean": f, "num_objects": len(objects)}
    width = max(len("overall"), *(len(name) for name in scores))
    print(f"{'video':<{width}}  objects  J&F-mean  J-mean  F-mean")
    for name, s in scores.items():
        print(f"{name:<{width}}  {len(s['objects']):>7}  {s['J&F']:>8.1f}  {s['J']:>6.1f}  {s['F']:>6.1f}")
    print(f"{'overall':<{width}}  {len(objects):>7}  {overall['J&F-mean']:>8.1f}  {j:>6.1f}  {f:>6.1f}")
    return overall


def get_args_parser():
    p = ArgumentParser(description="Video object segmentation by label propagation with frozen features "
                       "(paper Sec. 4.2.2, DAVIS-2017)")
    p.add_argument("--data_path", required=True, help="a DAVIS-2017 root (JPEGImages/480p, Annotations/480p, "
                   "ImageSets/2017), or one folder of frames (then give --first_mask)")
    p.add_argument("--first_mask", default=None, help="the first frame's mask, an indexed PNG, for a folder of "
                   "frames; the PNGs next to it named like the frames are the ground truth, when all are there")
    p.add_argument("--subset", default="val", help="DAVIS: the videos of ImageSets/2017/<subset>.txt")
    p.add_argument("--videos", nargs="*", default=None, help="DAVIS: only these videos of the subset")
    p.add_argument("--output_dir", default="video_segmentation", help="where the PNGs and scores.json go")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_weights", default="", help="our checkpoint, an official backbone file or an "
                   "official full checkpoint; none: a randomly initialized model (seed 0)")
    g.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"])
    g.add_argument("--arch", default=None, choices=checkpoint.ARCHS, help="default: the checkpoint's, else vit_small")
    g.add_argument("--patch_size", type=positive_int, default=None, help="default: the checkpoint's, else 16")
    g.add_argument("--depth", type=positive_int, default=None, help="blocks of a randomly initialized model "
                   "(default: the arch's 12)")
    g.add_argument("--copy_first_mask", action="store_true", help="no model: the trivial baseline that predicts "
                   "the first mask for every frame")
    g = p.add_argument_group("propagation (official defaults)")
    g.add_argument("--image_size", type=positive_int, default=480, help="short side of the frames given to the "
                   "model, rounded down to a multiple of the patch size (DAVIS 480p: 480)")
    g.add_argument("--n_last_frames", type=nonneg_int, default=7, help="previous frames in the context, with the "
                   "first frame")
    g.add_argument("--size_mask_neighborhood", type=nonneg_int, default=12, help="labels come only from patches "
                   "at most this many rows and columns away (0: from anywhere)")
    g.add_argument("--topk", type=positive_int, default=5, help="labels are averaged over the k most similar "
                   "context patches")
    g.add_argument("--temperature", type=positive_float, default=0.1, help="affinity exp(cos / temperature)")
    g.add_argument("--bound_th", type=positive_float, default=0.008, help="F's boundary tolerance: a share of the "
                   "image diagonal (< 1), or pixels (>= 1); DAVIS: 0.008")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def load_model(args):
    """The frozen ViT of the flags (None for --copy_first_mask)."""
    if args.copy_first_mask:
        return None
    if args.pretrained_weights:
        model, _ = checkpoint.load_backbone(args.pretrained_weights, args.arch, args.patch_size, args.checkpoint_key)
    else:
        torch.manual_seed(0)
        model = checkpoint.build_vit(args.arch or "vit_small", args.patch_size or 16, args.depth)
        print(f"no --pretrained_weights: a randomly initialized {args.arch or 'vit_small'}/{model.patch_size} "
              f"(seed 0), a baseline that has learned nothing")
    return model.to(args.device).eval()


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not Path(args.data_path).is_dir():
        raise ConfigError(f"--data_path {args.data_path} is not a folder")
    videos = find_videos(args)
    model = load_model(args)
    scores = {}
    for i, (name, frame_paths, first_mask, gt_dir) in enumerate(videos):
        start = time.perf_counter()
        result = evaluate_video(model, name, frame_paths, first_mask, gt_dir, args)
        seconds = time.perf_counter() - start
        print(f"[{i + 1}/{len(videos)}] {name}: {len(frame_paths)} frames in {seconds:.1f} s "
              f"({len(frame_paths) / seconds:.1f} frames/s)" + (f", J&F-mean {result['J&F']:.1f}" if result else
                                                                 ", no ground truth to score"))
        if result:
            scores[name] = result
    if not scores:
        print(f"masks in {args.output_dir}; no scores (no ground-truth mask for every frame)")
        return None
    overall = print_table(scores)
    report = {**overall, "videos": scores, "args": vars(args)}
    (Path(args.output_dir) / "scores.json").write_text(json.dumps(report, indent=1))
    print(f"masks, strips and scores.json in {args.output_dir}")
    return report


if __name__ == "__main__":
    run_cli(main)
