"""Synthetic video clips with known masks, written in the DAVIS-2017 layout, to measure the label propagation of
eval_video_segmentation.py (paper Sec. 4.2.2) where no video dataset can be downloaded.

A clip: a textured background that pans slowly, and `num_objects` textured ellipses that move along smooth
closed paths, turn, and stretch (their axes breathe in opposite phase). Each object's texture is painted in
its own coordinates, so it turns and stretches with the object; later objects occlude earlier ones. The masks
are exact: label 0 is the background, label k the k-th object where it is visible.

    python synthetic_video.py --output_dir synthetic_davis --num_videos 10 --num_frames 24 --size 112 [--gray]
    python eval_video_segmentation.py --data_path synthetic_davis --image_size 112 ...

writes synthetic_davis/JPEGImages/480p/<video>/00000.jpg..., Annotations/480p/<video>/00000.png... (every
frame annotated, indexed PNGs with the DAVIS palette) and ImageSets/2017/val.txt.

Shape letters: T frames, S side in pixels, K objects.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from cli import ArgumentParser, positive_int, run_cli


def davis_palette():
    """The 256-colour palette of the DAVIS (PASCAL VOC) annotations: label 1 dark red, 2 green, 3 olive..., as a
    flat list [r0, g0, b0, r1, ...]. The bits of the label are spread over the high bits of r, g and b."""
    palette = []
    for label in range(256):
        rgb, c = [0, 0, 0], label
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - bit)
            c >>= 3
        palette += rgb
    return palette


def smooth_noise(gen, cells, size, low=0.0, high=1.0):
    """(3, size, size) colours: uniform noise on a cells x cells grid, upsampled bicubically (blobs of colour)."""
    noise = torch.rand(1, 3, cells, cells, generator=gen) * (high - low) + low
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def object_texture(gen, size=64):
    """(3, size, size): a saturated random colour, a checkerboard of 4-8 squares across, and fine noise."""
    color = torch.rand(3, 1, 1, generator=gen)
    color = (color - color.min()) / (color.max() - color.min() + 1e-6)  # saturate: one channel 0, one 1
    cells = int(torch.randint(4, 9, (1,), generator=gen))
    ramp = torch.arange(size) * cells // size
    checker = ((ramp[:, None] + ramp[None, :]) % 2).float()  # (size, size)
    texture = color * (0.55 + 0.45 * checker) + 0.25 * smooth_noise(gen, 16, size) - 0.12
    return texture.clamp(0, 1)


def sample(image, x, y):
    """Bilinear samples of image (3, h, w) at the points x, y (S, S) in [-1, 1] (its corners) -> (3, S, S)."""
    grid = torch.stack([x, y], dim=-1)[None]  # (1, S, S, 2)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def random_motion(gen, size, num_frames):
    """One object's path, turn and stretch: centre (T, 2), angle (T,) and semi-axes (T, 2), in pixels."""
    r = lambda *shape: torch.rand(*shape, generator=gen)
    t = torch.arange(num_frames, dtype=torch.float32)[:, None]  # (T, 1)
    period = num_frames * (1.5 + r(1, 2))  # slow enough that each frame moves a few pixels at most
    center = size * (0.5 + (0.1 + 0.15 * r(1, 2)) * torch.sin(2 * math.pi * t / period + 2 * math.pi * r(1, 2)))
    angle = 2 * math.pi * r(1) + (r(1) - 0.5) * 0.12 * t[:, 0]  # (T,): up to 0.06 rad per frame
    axes0 = size * (0.12 + 0.1 * r(1, 2))
    breathe = 0.2 * torch.sin(2 * math.pi * t / (num_frames * (0.7 + r(1))))  # (T, 1)
    axes = axes0 * torch.cat([1 + breathe, 1 - breathe], dim=1)  # (T, 2): one axis grows while the other shrinks
    return center, angle, axes


def make_clip(seed, num_frames=24, size=112, num_objects=2, gray=False):
    """(frames uint8 (T, 3, S, S), labels uint8 (T, S, S)) of one clip, the same for the same arguments. With
    gray, the frames are the luma of the colour ones (objects and background then share one intensity range)."""
    gen = torch.Generator().manual_seed(seed)
    background = 0.15 + 0.7 * smooth_noise(gen, 10, 2 * size)  # (3, 2S, 2S): the frames show a panning window
    background = (background + 0.08 * smooth_noise(gen, 48, 2 * size) - 0.04).clamp(0, 1)
    pan = (torch.rand(2, generator=gen) - 0.5) * 1.2  # pixels per frame
    objects = [(object_texture(gen), *random_motion(gen, size, num_frames)) for _ in range(num_objects)]
    pixel = torch.arange(size, dtype=torch.float32) + 0.5
    py, px = torch.meshgrid(pixel, pixel, indexing="ij")  # (S, S) pixel centres
    frames, labels = [], []
    for t in range(num_frames):
        # the background window starts at (S/2, S/2) of the 2S x 2S texture and drifts by `pan` per frame
        bx, by = (px + size / 2 + pan[0] * t) / size - 1, (py + size / 2 + pan[1] * t) / size - 1
        frame, label = sample(background, bx, by), torch.zeros(size, size, dtype=torch.uint8)
        for k, (texture, center, angle, axes) in enumerate(objects, start=1):
            dx, dy = px - center[t, 0], py - center[t, 1]
            cos, sin = math.cos(angle[t]), math.sin(angle[t])
            # object coordinates: turned by -angle, divided by the semi-axes; the ellipse is u^2 + v^2 <= 1
            u, v = (cos * dx + sin * dy) / axes[t, 0], (-sin * dx + cos * dy) / axes[t, 1]
            inside = u ** 2 + v ** 2 <= 1
            frame = torch.where(inside, sample(texture, u, v), frame)
            label[inside] = k
        if gray:
            frame = (0.299 * frame[0] + 0.587 * frame[1] + 0.114 * frame[2]).expand(3, -1, -1)  # (3, S, S)
        frames.append((frame * 255).round().to(torch.uint8))
        labels.append(label)
    return torch.stack(frames), torch.stack(labels)


def write_davis(root, clips):
    """Writes {name: (frames, labels)} in the DAVIS-2017 layout under root (see the top of the file)."""
    root = Path(root)
    for name, (frames, labels) in clips.items():
        for sub in ("JPEGImages", "Annotations"):
            (root / sub / "480p" / name).mkdir(parents=True, exist_ok=True)
        for t, (frame, label) in enumerate(zip(frames, labels)):
            Image.fromarray(frame.permute(1, 2, 0).numpy()).save(root / "JPEGImages/480p" / name / f"{t:05d}.jpg",
                                                                 quality=90)
            mask = Image.fromarray(label.numpy())
            mask.putpalette(davis_palette())  # the L image becomes P: the labels are the indices
            mask.save(root / "Annotations/480p" / name / f"{t:05d}.png")
    (root / "ImageSets/2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/2017/val.txt").write_text("".join(f"{name}\n" for name in clips))


def main(argv=None):
    p = ArgumentParser(description="Write synthetic clips with exact masks in the DAVIS-2017 layout")
    p.add_argument("--output_dir", default="synthetic_davis")
    p.add_argument("--num_videos", type=positive_int, default=10)
    p.add_argument("--num_frames", type=positive_int, default=24)
    p.add_argument("--size", type=positive_int, default=112, help="side of the square frames in pixels")
    p.add_argument("--num_objects", type=positive_int, default=2)
    p.add_argument("--gray", action="store_true", help="grayscale frames: objects are told apart by texture, "
                   "not colour")
    p.add_argument("--seed", type=int, default=0, help="video i is drawn with seed + i")
    args = p.parse_args(argv)
    clips = {f"clip{i:02d}": make_clip(args.seed + i, args.num_frames, args.size, args.num_objects, args.gray)
             for i in range(args.num_videos)}
    write_davis(args.output_dir, clips)
    print(f"{len(clips)} clips of {args.num_frames} frames, {args.size} x {args.size} px, in {args.output_dir}")


if __name__ == "__main__":
    run_cli(main)
