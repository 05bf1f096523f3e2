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
davis.py reads the videos and masks and computes the DAVIS-2017 benchmark's scores J (IoU) and F (boundary
F-measure).

    python eval_video_segmentation.py --data_path /path/to/davis-2017/DAVIS \\
        --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16
    python eval_video_segmentation.py --data_path my_frames/ --first_mask my_mask.png --pretrained_weights ...

--data_path is a DAVIS root (JPEGImages/480p/<video>/*.jpg, Annotations/480p/<video>/*.png,
ImageSets/2017/val.txt), or one folder of frames with --first_mask. Writes --output_dir/<video>/<frame>.png,
--output_dir/<video>/strip.png (the masks over six frames, rows and columns titled), and scores.json when
the frames have ground-truth masks.

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
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import backbone
import data
import davis
import draw
from cli import ArgumentParser, ConfigError, nonneg_int, positive_float, positive_int, run_cli

MASK_COLORS = [(0, 0, 0), (255, 40, 40), (40, 200, 40), (40, 90, 255), (255, 200, 0), (200, 0, 200)]


# --- frames and masks -------------------------------------------------------------------------------------
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


def to_one_hot(labels, num_labels):
    """Integer labels (h, w) -> float (C, h, w) with a 1 in the channel of each pixel's label."""
    return F.one_hot(labels.long(), num_labels).permute(2, 0, 1).float()  # (h, w, C) -> (C, h, w)


def resize_labels(labels, height, width):
    """uint8 numpy labels -> uint8 numpy (height, width), nearest neighbour as the official script (PIL NEAREST
    samples the source pixel under each output pixel's centre): the first mask to the patch grid, the predicted
    masks back to the frame size."""
    return np.array(Image.fromarray(labels).resize((width, height), Image.NEAREST))


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


# --- outputs ----------------------------------------------------------------------------------------------
def write_indexed(path, labels, palette):
    """uint8 labels (H, W) as a PNG: indexed with `palette` (the first mask's), grayscale when it has none."""
    image = Image.fromarray(labels)
    if palette is not None:
        image.putpalette(palette)  # the L image becomes P: the labels are the indices
    image.save(path)


def draw_masks(frame, labels, palette, alpha=0.45):
    """uint8 frame (3, H, W) with each object's mask blended over it in the object's colour (the palette's,
    brightened, else MASK_COLORS) and the mask's outline drawn opaque in that colour."""
    out = frame.float()
    for k in np.unique(labels[labels > 0]):
        color = torch.tensor(palette[3 * k:3 * k + 3] if palette else MASK_COLORS[k % len(MASK_COLORS)])
        color = (color.float() * 255 / color.max().clamp_min(1)).view(3, 1, 1)  # DAVIS' (128, 0, 0) -> (255, 0, 0)
        mask = torch.from_numpy(labels == k)  # (H, W)
        m = torch.where(davis.seg2bmap(mask), 1.0, alpha * mask.float())  # (H, W): opaque outline, translucent inside
        out = out * (1 - m) + color * m
    return out.round().to(torch.uint8)


def write_strip(path, name, frame_paths, rows, palette, note="", num_shown=6):
    """A picture of num_shown frames spread over the video `name`, one column per frame (titled with its number,
    from 0), one row per item {title: uint8 labels (H, W) of every frame} of `rows`, each mask over its frame;
    `note` ends the caption."""
    shown = np.linspace(0, len(frame_paths) - 1, min(num_shown, len(frame_paths))).round().astype(int)
    frames = [data.read_image(frame_paths[t]) for t in shown]  # uint8 (3, H, W)
    zoom = max(1, 160 // min(frames[0].shape[-2:]))  # small synthetic frames are enlarged to be seen
    enlarge = lambda tile: tile.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1)  # (3, zoom H, zoom W)
    tiles = [[enlarge(draw_masks(frame, labels[t], palette)) for frame, t in zip(frames, shown)]
             for labels in rows.values()]
    caption = (f"{name}, {len(shown)} of its {len(frame_paths)} frames: each object's mask in its colour (outline "
               f"opaque, inside translucent); frame 0 shows the given first mask. {note}").strip()
    grid = draw.labelled_grid(tiles, [f"frame {t}" for t in shown], list(rows), caption)
    return draw.save(grid, path)


# --- one video --------------------------------------------------------------------------------------------
def read_video(frame_paths, size, mask_shape):
    """Normalized frames (3, *size), lazily; every frame must have the first mask's size mask_shape (H, W)."""
    for path in frame_paths:
        frame, original = read_frame(path, size)
        if tuple(original.shape[-2:]) != tuple(mask_shape):
            raise ConfigError(f"{path} is {original.shape[2]} x {original.shape[1]} px but the first mask is "
                              f"{mask_shape[1]} x {mask_shape[0]}: the frames and masks of a video must have one size")
        yield frame


def predict_video(model, frame_paths, first_labels, args):
    """uint8 labels (H, W) of every frame: the first mask, then the masks propagated from it by the model."""
    height, width = first_labels.shape
    device, p = next(model.parameters()).device, model.patch_size
    size = resized_size(height, width, args.image_size, p)
    grid = torch.from_numpy(resize_labels(first_labels, size[0] // p, size[1] // p))  # (h, w): a label per patch
    frames = (frame.to(device) for frame in read_video(frame_paths, size, first_labels.shape))
    segs = propagate_video(model, frames, grid, args.n_last_frames, args.size_mask_neighborhood, args.topk,
                           args.temperature)  # soft labels (C, N) of each frame after the first
    labels = (upsample_labels(seg, *grid.shape, p).to(torch.uint8).cpu().numpy() for seg in segs)  # (h p, w p)
    return [first_labels] + [resize_labels(x, height, width) for x in labels]


def copy_first_mask(frame_paths, first_labels):
    """The trivial baseline of --copy_first_mask, with no model: the first mask for every frame."""
    for _ in read_video(frame_paths, first_labels.shape, first_labels.shape):  # still checks the frame sizes
        pass
    return [first_labels] * len(frame_paths)


def method_title(args):
    """How the masks were predicted, in a few words: the strip's row title."""
    if args.copy_first_mask:
        return "first mask copied"
    return "random init" if args.pretrained_weights == backbone.RANDOM else Path(args.pretrained_weights).name


def evaluate_video(predict, name, frame_paths, first_mask, gt_dir, args):
    """Predicts the masks of one video with predict(frame paths, first labels), writes the PNGs and the strip;
    returns the scores, or None without ground truth."""
    first_labels, palette = davis.read_mask(first_mask)
    predicted = predict(frame_paths, first_labels)
    out_dir = Path(args.output_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, labels in zip(frame_paths, predicted):
        write_indexed(out_dir / f"{path.stem}.png", labels, palette)
    gt_paths = [gt_dir / f"{path.stem}.png" for path in frame_paths]
    scores, rows = None, {method_title(args): predicted}
    if len(frame_paths) >= 3 and all(p.is_file() for p in gt_paths):
        gt = [davis.read_mask(p)[0] for p in gt_paths]
        # DAVIS semi-supervised: the first frame is given and the last one is not scored
        scores = davis.score_video(np.stack(gt[1:-1]), np.stack(predicted[1:-1]), int(first_labels.max()),
                                   args.bound_th)
        rows = {"true masks": gt, f"{method_title(args)}, J&F {scores['J&F']:.1f}": predicted}
    note = f"J&F: the DAVIS score in % over frames 1 to {len(frame_paths) - 2}." if scores else ""
    write_strip(out_dir / "strip.png", name, frame_paths, rows, palette, note)
    return scores


def print_table(scores):
    """The per-video table and the overall line (davis.global_scores); returns the overall scores."""
    overall = davis.global_scores(scores)
    width = max(len("overall"), *(len(name) for name in scores))
    print(f"{'video':<{width}}  objects  J&F-mean  J-mean  F-mean")
    for name, s in scores.items():
        print(f"{name:<{width}}  {len(s['objects']):>7}  {s['J&F']:>8.1f}  {s['J']:>6.1f}  {s['F']:>6.1f}")
    print(f"{'overall':<{width}}  {overall['num_objects']:>7}  {overall['J&F-mean']:>8.1f}  "
          f"{overall['J-mean']:>6.1f}  {overall['F-mean']:>6.1f}")
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
    p.add_argument("--copy_first_mask", action="store_true", help="no model (the backbone flags are unused): the "
                   "trivial baseline that predicts the first mask for every frame")
    backbone.add_args(p)
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
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not Path(args.data_path).is_dir():
        raise ConfigError(f"--data_path {args.data_path} is not a folder")
    videos = davis.find_videos(args.data_path, args.subset, args.videos, args.first_mask)
    if args.copy_first_mask:
        predict = copy_first_mask
    else:
        model, _ = backbone.from_args(args, needs_vit="eval_video_segmentation.py")
        predict = functools.partial(predict_video, model, args=args)
    scores = {}
    for i, (name, frame_paths, first_mask, gt_dir) in enumerate(videos):
        start = time.perf_counter()
        result = evaluate_video(predict, name, frame_paths, first_mask, gt_dir, args)
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
    (Path(args.output_dir) / "scores.json").write_text(json.dumps(report, indent=1, default=str))  # device: str
    print(f"masks, strips and scores.json in {args.output_dir}")
    return report


if __name__ == "__main__":
    run_cli(main)
