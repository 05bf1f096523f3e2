"""Self-attention of the CLS token in the last block (paper Fig. 1 and 3; Sec. 4.2.2 and Fig. 4 for the masks).

DINO's CLS token learns, without labels, to attend to the object in the image. For each image this writes
into --output_dir/<image name>/:
  img.png                     the input: short side resized to --image_size, cropped to a multiple of the patch
  attn-head{j}.png            the CLS-to-patch attention of head j (one patch = patch x patch pixels, nearest)
  attn-mean.png               the mean over the heads
  mask-head{j}.png, mask-mean.png   the smallest set of patches holding --threshold of that map's mass, over the image
  grid.png                    all of them, titled: heat maps on the first row, masks on the second, a caption
The images: --image_path, else the first test images of the dataset one of our checkpoints was trained on
(fashion_mnist, cifar10, ...) at its crop size, else the photos in assets/ at 480 px.

    python visualize_attention.py                                # output/checkpoint.pth, the default
    python visualize_attention.py --pretrained_weights dino_deitsmall8_pretrain.pth --arch vit_small --patch_size 8
    python visualize_attention.py --pretrained_weights random    # the architecture at random init: nothing learned
    python visualize_attention.py --foreground_share

--foreground_share measures the property on Fashion-MNIST, whose background is black: the share of the
CLS attention that falls on the garment, for the model and for the same architecture at random init.

Shape letters: B images, H heads, h x w patch grid, p patch size, S image side.
"""
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import backbone
import cli
import data
import draw

SAMPLE_PHOTOS = sorted((Path(__file__).resolve().parent / "assets").glob("*.jpg"))  # see assets/README.md
# viridis at 0, 1/4, 1/2, 3/4, 1 (dark purple, blue, teal, green, yellow); heat maps interpolate linearly
VIRIDIS = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]).float()
MASK_COLOR = (255, 40, 40)
FOREGROUND_MIN_MEAN = 0.1  # a patch is foreground when its mean pixel value exceeds 10% of the full range


@torch.no_grad()
def attention_maps(model, images):
    """CLS-to-patch attention of every head of the last block: (B, H, h, w) for normalized images (B, 3, S, S'),
    or (H, h, w) for one image (3, S, S'). Each head's map sums to 1 over the patches.

    The CLS row of the softmax also holds the CLS-to-CLS weight; it is dropped and the row renormalized over
    the patches. (The official script shows the row unnormalized; its heat maps and masks are the same.)
    """
    batch = images if images.ndim == 4 else images[None]
    h, w = batch.shape[-2] // model.patch_size, batch.shape[-1] // model.patch_size
    attn = model.get_last_selfattention(batch)  # (B, H, 1+N, 1+N)
    cls = attn[:, :, 0, 1:].float()  # (B, H, N): what the CLS query attends to, without itself
    cls = cls / cls.sum(dim=-1, keepdim=True)
    maps = cls.reshape(len(batch), -1, h, w)  # (B, H, h, w)
    return maps if images.ndim == 4 else maps[0]


def threshold_masks(maps, threshold):
    """Boolean (..., h, w): per map, the smallest set of patches holding at least `threshold` of its mass.

    Patches sorted by weight, largest first, are kept while the mass of those before them is < threshold.
    """
    flat = maps.flatten(-2)  # (..., N)
    values, order = flat.sort(dim=-1, descending=True)
    before = values.cumsum(dim=-1) - values  # (..., N): mass of the larger patches
    keep = before < threshold * flat.sum(dim=-1, keepdim=True)
    return torch.zeros_like(keep).scatter(-1, order, keep).reshape(maps.shape)


def colorize(maps):
    """(..., h, w) -> (..., 3, h, w) uint8 heat maps, each map stretched to its own min..max (as plt.imsave)."""
    lo, hi = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
    t = (maps - lo) / (hi - lo).clamp_min(1e-12) * (len(VIRIDIS) - 1)  # position along the stops
    i = t.floor().long().clamp(max=len(VIRIDIS) - 2)
    frac = (t - i)[..., None]
    rgb = VIRIDIS[i] * (1 - frac) + VIRIDIS[i + 1] * frac  # (..., h, w, 3)
    return rgb.round().to(torch.uint8).movedim(-1, -3)


def paint_mask(image, mask, alpha=0.5):
    """The uint8 (3, S, S') image with MASK_COLOR blended over the pixels where mask (S, S') is set."""
    m = alpha * mask.float()  # (S, S')
    color = torch.tensor(MASK_COLOR).float().view(3, 1, 1)
    return (image.float() * (1 - m) + color * m).round().to(torch.uint8)


def load_photo(path, image_size, patch_size):
    """uint8 (3, S, S'): short side resized to image_size, center-cropped to multiples of the patch size.

    NOTE: the official script squashes every image to 480 x 480 and crops at the top left; this keeps the
    aspect ratio.
    """
    image = TF.resize(data.read_image(str(path)), image_size, antialias=True)
    return TF.center_crop(image, [s // patch_size * patch_size for s in image.shape[-2:]])


def attention_pictures(model, image, threshold):
    """For one uint8 (3, S, S') image: the names (head0, ..., mean), the CLS attention maps of the last block's
    heads and of their mean as heat maps, and the image with each map's threshold mask painted in MASK_COLOR,
    all uint8 (H+1, 3, S, S')."""
    device, p = next(model.parameters()).device, model.patch_size
    maps = attention_maps(model, data.normalize(image.to(device))).cpu()  # (H, h, w)
    maps = torch.cat([maps, maps.mean(dim=0, keepdim=True)])  # (H+1, h, w): the heads, then their mean
    names = [f"head{j}" for j in range(len(maps) - 1)] + ["mean"]
    up = lambda x: x.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)  # a patch -> p x p pixels
    heat = up(colorize(maps))  # (H+1, 3, S, S')
    masks = torch.stack([paint_mask(image, m) for m in up(threshold_masks(maps, threshold))])  # (H+1, 3, S, S')
    return names, heat, masks


def labelled_attention_grid(image, heat, masks, threshold, patch_size):
    """grid.png: the image, then a heat map per head and their mean, above the same with the masks; titled."""
    titles = ["image"] + [f"head {j}" for j in range(len(heat) - 1)] + ["mean of heads"]
    caption = (f"Top: the attention of the last block's CLS token on each {patch_size} x {patch_size} patch "
               f"(viridis, each map from its least to its most attended patch: yellow = most). Bottom, in red: the "
               f"fewest patches holding {threshold:.0%} of that map's attention mass (--threshold {threshold:g}).")
    rows = [[image, *heat], [image, *masks]]
    font_size = max(15, image.shape[-1] // 16)  # legible beside 480 px photos as beside 224 px zoomed digits
    return draw.labelled_grid(rows, titles, ["attention", f"{threshold:.0%} of mass"], caption, size=font_size)


def write_visualization(model, image, out_dir, threshold):
    """Writes the PNGs listed at the top for one uint8 (3, S, S') image; returns their paths, grid.png last."""
    names, heat, masks = attention_pictures(model, image, threshold)
    zoom = max(1, 240 // min(image.shape[-2:]))  # tiny images (Fashion-MNIST) are enlarged to be seen
    big = lambda x: x.repeat_interleave(zoom, dim=-2).repeat_interleave(zoom, dim=-1)  # (..., zoom S, zoom S')
    image, heat, masks = big(image), big(heat), big(masks)
    paths = [draw.save(image, out_dir / "img.png")]
    for name, h, m in zip(names, heat, masks):
        paths += [draw.save(h, out_dir / f"attn-{name}.png"), draw.save(m, out_dir / f"mask-{name}.png")]
    grid = labelled_attention_grid(image, heat, masks, threshold, model.patch_size)
    return paths + [draw.save(grid, out_dir / "grid.png")]


@torch.no_grad()
def foreground_share(model, images, min_mean=FOREGROUND_MIN_MEAN, batch_size=256):
    """(share of the CLS attention, mean over heads, on foreground patches; share of foreground patches), each
    averaged over the uint8 (B, 3, S, S) images, whose background is black. The second figure is what uniform
    attention would get: the chance level. A patch is foreground when its mean pixel value > min_mean * 255."""
    device, shares, fractions = next(model.parameters()).device, [], []
    for batch in images.split(batch_size):
        attn = attention_maps(model, data.normalize(batch.to(device))).mean(dim=1)  # (b, h, w): mean over heads
        patch_mean = F.avg_pool2d(batch.to(device).float().mean(1, keepdim=True), model.patch_size)[:, 0]  # (b, h, w)
        foreground = patch_mean > min_mean * 255
        shares.append((attn * foreground).sum(dim=(-2, -1)))
        fractions.append(foreground.float().mean(dim=(-2, -1)))
    return torch.cat(shares).mean().item(), torch.cat(fractions).mean().item()


def dataset_images(data_path, data_root, n, image_size, saved, patch_size):
    """The first n test images of a dataset, uint8 (n, 3, S, S), resized to S x S with S = backbone.eval_size
    (--image_size, else the checkpoint's global crop size, else the dataset's side), and their names."""
    datasets = data.build_datasets(data_path, data_root)
    test = datasets.labelled_test if datasets.labelled_test is not None else datasets.train
    size = backbone.eval_size(image_size, saved, datasets.image_size, patch_size)
    images = [TF.resize(data.to_rgb(test[i][0]), [size, size], antialias=True) for i in range(min(n, len(test)))]
    return torch.stack(images), [f"{Path(data_path).name}_test{i}" for i in range(len(images))]


def is_photo_folder(data_path):
    """A folder of images (not train/<class>/ and val/<class>/): shown as photos, each at its own aspect ratio."""
    return os.path.isdir(data_path) and not os.path.isdir(os.path.join(data_path, "val"))


def get_args_parser():
    p = cli.ArgumentParser(description="Visualize the last block's CLS self-attention (paper Fig. 1, 3)")
    backbone.add_args(p)
    p.add_argument("--image_path", type=cli.existing_path, nargs="*", default=None, help="image files or folders "
                   "(every image under them; default: the photos in assets/, or the test images of the dataset the "
                   "checkpoint was trained on, see --data_path)")
    p.add_argument("--data_path", default=None, help="use the first --num_images test images of this dataset, or "
                   "images of this folder (default: the checkpoint's dataset when it is a named one such as "
                   "fashion_mnist)")
    p.add_argument("--data_root", default="data")
    p.add_argument("--num_images", type=cli.positive_int, default=None,
                   help="dataset images: 4 to show, 1000 to measure")
    p.add_argument("--image_size", type=cli.positive_int, default=None,
                   help="short side of the input (default: 480 for photos; for dataset images the checkpoint's "
                   "global crop size, else the dataset's side, a multiple of the patch size)")
    p.add_argument("--threshold", type=cli.unit_float, default=0.6,
                   help="share of the attention mass the masks keep (paper Fig. 4: 0.6; official default: no masks)")
    p.add_argument("--output_dir", default="attention")
    p.add_argument("--foreground_share", action="store_true", help="measure instead the share of attention on "
                   "foreground patches of --num_images Fashion-MNIST test images, trained vs random init")
    return p


def report_foreground_share(model, saved, args):
    """Prints the foreground share of the model's attention and of the same architecture at random init."""
    data_path = args.data_path or "fashion_mnist"
    images, _ = dataset_images(data_path, args.data_root, args.num_images or 1000, args.image_size, saved,
                               model.patch_size)
    trained, chance = foreground_share(model, images)
    baseline, _ = foreground_share(backbone.random_like(model), images)
    print(f"foreground attention share over {len(images)} {data_path} test images at {images.shape[-1]} px: "
          f"trained {trained:.2f}, random init {baseline:.2f} (foreground patches are {chance:.2f} of all: "
          f"the share of uniform attention)")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    model, saved = backbone.from_args(args, needs_vit="visualize_attention.py")
    if args.foreground_share:
        return report_foreground_share(model, saved, args)
    data_path = args.data_path or (saved.get("data_path") if saved.get("data_path") in data.DATASET_NAMES else None)
    if args.image_path is None and data_path and not is_photo_folder(data_path):
        images, names = dataset_images(data_path, args.data_root, args.num_images or 4, args.image_size, saved,
                                       model.patch_size)
    else:  # photos keep their aspect ratio
        paths = data.image_paths(args.image_path or ([data_path] if data_path else SAMPLE_PHOTOS))
        paths = paths[:args.num_images] if args.num_images else paths
        images = [load_photo(path, args.image_size or 480, model.patch_size) for path in paths]
        names = [Path(path).stem for path in paths]
    for image, name in zip(images, names):
        paths = write_visualization(model, image, Path(args.output_dir) / name, args.threshold)
        print(f"{name}: {len(paths)} PNGs in {paths[0].parent} (grid: {paths[-1]})")


if __name__ == "__main__":
    cli.run_cli(main)
