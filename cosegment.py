"""Co-segmentation and part co-segmentation of a set of images with dense DINO descriptors, no training
(Amir, Gandelsman, Bagon, Dekel 2021, "Deep ViT Features as Dense Visual Descriptors", Sec. 4.1 and 4.2;
reference code ShirAmir/dino-vit-features, cosegmentation.py and part_cosegmentation.py).

The descriptors of all the images are clustered together (k by the elbow rule); each image votes for the
clusters its saliency map (the last layer's CLS attention) marks salient; the clusters most images vote for are
the common foreground. Its descriptors are clustered again into --num_parts parts. Writes to --output_dir:
  cosegmentation.png      the images (row "image"), their masks (row "mask") and parts (row "parts"), titled
  <name>_mask.png, <name>_parts.png   the same, one image at a time

    python cosegment.py --pretrained_weights dino_deitsmall8_pretrain.pth --arch vit_small --patch_size 8 \\
        --stride 4 --layer 11 --facet key --image_path cat1.jpg cat2.jpg cat3.jpg
    python cosegment.py --pretrained_weights output/checkpoint.pth --data_path fashion_mnist --class_index 9 \\
        --num_images 8 --sample_interval 10
    python cosegment.py --pretrained_weights output/checkpoint.pth --measure 300

NOTE: images are resized so that their short side is --load_size (default 224, 56 for Fashion-MNIST); the
reference's cosegmentation.py command line keeps their original size unless given --load_size.

--measure N co-segments N Fashion-MNIST test images (N / 10 of each class, in sets of --num_images) and prints
the Jaccard index of the masks against the garment (pixels > 0), for the model and the same architecture at
random init.

Shape letters: B images, N patches (h x w grid), D descriptor width, P parts, S image side.
"""
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_segmentation_masks

import backbone
import data
import dense
import draw
from cli import ArgumentParser, nonneg_int, positive_float, positive_int, run_cli, unit_float

# the parts' colours, bright on dark images; red is the mask's
PART_COLORS = ["yellow", "lime", "magenta", "cyan", "orange", "deepskyblue", "white", "pink", "gold", "springgreen",
               "violet", "coral", "aquamarine", "khaki"]


def enlarge(x, k):
    """Each pixel of x (..., S, S') as a k x k block: tiny images (Fashion-MNIST) made big enough to see."""
    return x.repeat_interleave(k, -2).repeat_interleave(k, -1)


def pictures(image, mask, part, num_parts):
    """[image, image with its mask in red, image with its parts (if any)], uint8 (3, kS, kS'), enlarged k times
    when small: image uint8 (3, S, S'), mask bool (S, S'), part long (S, S') with the background = num_parts."""
    k = max(1, 224 // min(image.shape[-2:]))
    image = enlarge(image, k)
    shown = [image, draw_segmentation_masks(image, enlarge(mask, k)[None], alpha=0.6, colors="red")]
    if part is not None:
        onehot = enlarge(part, k)[None] == torch.arange(num_parts)[:, None, None]  # (P, kS, kS')
        colors = [PART_COLORS[n % len(PART_COLORS)] for n in range(num_parts)]
        shown.append(draw_segmentation_masks(image, onehot, alpha=0.6, colors=colors))
    return shown


def save_pictures(images, masks, parts, names, args):
    """The PNGs listed at the top: uint8 images (3, S, S'), bool masks (S, S'), long parts (S, S') or None."""
    out_dir = Path(args.output_dir)
    columns = [pictures(*x, args.num_parts) for x in zip(images, masks, parts)]
    for shown, name in zip(columns, names):
        draw.save(shown[1], out_dir / f"{name}_mask.png")
        if len(shown) > 2:
            draw.save(shown[2], out_dir / f"{name}_parts.png")
    side = min(min(shown[0].shape[-2:]) for shown in columns)
    square = lambda im: TF.center_crop(TF.resize(im, side, antialias=True), side)
    rows = [[square(shown[r]) for shown in columns] for r in range(len(columns[0]))]
    caption = (f"Co-segmentation (Amir et al. 2021): red = the clusters of descriptors salient in at least "
               f"{args.votes_percentage:g}% of these {len(images)} images"
               + (f"; parts: the red region clustered into {args.num_parts}, one colour each" if args.num_parts else "")
               + f". Weights {Path(args.pretrained_weights).name}, {args.arch}/{args.patch_size}, layer {args.layer} "
               f"{args.facet}, stride {args.stride}.")
    grid = draw.labelled_grid(rows, col_titles=names, row_titles=["image", "mask", "parts"][:len(rows)],
                              caption=caption)
    return draw.save(grid, out_dir / "cosegmentation.png")


def cosegment_images(model, images, args):
    """(bool masks (S, S'), long part maps (S, S') or Nones) of uint8 images (3, S, S')."""
    described = [dense.image_descriptors(model, data.normalize(im.to(args.device)), args.layer, args.facet,
                                         args.stride, args.bin) for im in images]
    descs, sals, grids = zip(*described)
    masks, _, _ = dense.cosegment(descs, sals, args.elbow, args.thresh, args.votes_percentage, args.sample_interval)
    parts = [None] * len(images)
    if args.num_parts:
        parts = dense.part_cosegment(descs, sals, args.num_parts, args.elbow, args.thresh, args.votes_percentage,
                                     args.sample_interval)
    to_pixels = lambda m, g, im: dense.patches_to_pixels(m.cpu(), g, im.shape[-2:], model.patch_size, args.stride)
    masks = [to_pixels(m, g, im) for m, g, im in zip(masks, grids, images)]
    parts = [p if p is None else to_pixels(p, g, im) for p, g, im in zip(parts, grids, images)]
    return masks, parts


@torch.no_grad()
def jaccard_on_fashion_mnist(model, images, labels, args, batch_size=100):
    """Mean Jaccard index, per class and over all, of the co-segmentation masks of uint8 Fashion-MNIST images
    (B, 28, 28) against their garment (pixels > 0), co-segmented by class in sets of --num_images."""
    size = args.load_size or 56
    x = TF.resize(images[:, None].expand(-1, 3, -1, -1), size, antialias=True)  # (B, 3, S, S)
    descs, sals = [], []
    for batch in x.split(batch_size):
        d, s, grid = dense.descriptors(model, data.normalize(batch.to(args.device)), args.layer, args.facet,
                                       args.stride, args.bin, saliency=True)
        descs += list(d)
        sals += list(s)
    truth = TF.resize(images[:, None] > 0, size, interpolation=TF.InterpolationMode.NEAREST_EXACT)[:, 0]
    scores = torch.zeros(len(images))
    for c in labels.unique().tolist():
        index = torch.nonzero(labels == c).squeeze(1)
        for group in index.split(args.num_images):
            masks, _, _ = dense.cosegment([descs[i] for i in group], [sals[i] for i in group], args.elbow,
                                          args.thresh, args.votes_percentage, args.sample_interval)
            for i, m in zip(group.tolist(), masks):
                m = dense.patches_to_pixels(m.cpu(), grid, (size, size), model.patch_size, args.stride)
                scores[i] = (m & truth[i]).sum() / (m | truth[i]).sum().clamp_min(1)
    per_class = {c: scores[labels == c].mean().item() for c in labels.unique().tolist()}
    return scores.mean().item(), per_class, grid


def measure(model, args):
    test = data.fashion_mnist(args.data_root)[1]
    per = args.measure // 10
    index = torch.cat([torch.nonzero(test.labels == c).squeeze(1)[:per] for c in range(10)])
    images, labels = test.images[index], test.labels[index]
    for name, m in (("trained", model), ("random init", backbone.random_like(model))):
        mean, per_class, grid = jaccard_on_fashion_mnist(m, images, labels, args)
        classes = " ".join(f"{c}:{v:.2f}" for c, v in per_class.items())
        print(f"{name}: Jaccard {mean:.3f} over {len(images)} Fashion-MNIST test images at {args.load_size or 56} px, "
              f"grid {grid[0]}x{grid[1]} (stride {args.stride}); per class {classes}")
    everything = (images > 0).float().mean(dim=(1, 2)).mean().item()
    print(f"a mask of the whole image: Jaccard {everything:.3f} (the garment's share of the pixels)")


def get_args_parser():
    p = ArgumentParser(description="Co-segmentation and part co-segmentation with dense DINO descriptors "
                                   "(Amir et al. 2021, Sec. 4.1-4.2). NOTE: images are resized to a short side of "
                                   "--load_size (default 224), where the reference's command line keeps their "
                                   "original size unless given --load_size.")
    backbone.add_args(p)
    backbone.add_descriptor_args(p, layer_default="the last block (reference: 11 of ViT-S)")
    data.add_image_args(p)
    g = p.add_argument_group("co-segmentation (reference defaults)")
    g.add_argument("--num_images", type=positive_int, default=10, help="images of --data_path co-segmented "
                   "together (also the set size of --measure)")
    g.add_argument("--elbow", type=unit_float, default=0.975, help="stop adding clusters when the mean squared "
                   "distance falls by less than 1 - elbow")
    g.add_argument("--thresh", type=unit_float, default=0.065, help="saliency above which an image votes")
    g.add_argument("--votes_percentage", type=positive_float, default=75, help="share of images (%%) that must "
                   "vote for a cluster to make it foreground")
    g.add_argument("--sample_interval", type=positive_int, default=100, help="k-means is fitted on every n-th "
                   "descriptor of each image, then assigns all")
    g.add_argument("--num_parts", type=nonneg_int, default=4, help="parts of the foreground (0: no parts)")
    g.add_argument("--measure", type=positive_int, default=None, help="measure the Jaccard index on this many "
                   "Fashion-MNIST test images instead")
    g.add_argument("--output_dir", default="dense_output", help="where the pictures go")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    model, _ = backbone.from_args(args, needs_vit="cosegment.py")
    backbone.resolve_descriptor_args(model, args, layer=len(model.blocks) - 1)
    if args.measure:
        return measure(model, args)
    images, names = data.images_from_args(args, args.num_images)
    masks, parts = cosegment_images(model, images, args)
    path = save_pictures(images, masks, parts, names, args)
    print(f"{len(images)} images co-segmented: foreground {sum(m.float().mean() for m in masks) / len(masks):.2f} "
          f"of the pixels on average; pictures in {path.parent} (all together: {path})")


if __name__ == "__main__":
    run_cli(main)
