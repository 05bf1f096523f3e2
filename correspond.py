"""Point correspondences between two images with dense DINO descriptors, no training (Amir, Gandelsman, Bagon,
Dekel 2021, "Deep ViT Features as Dense Visual Descriptors", Sec. 4.3; reference code ShirAmir/dino-vit-features,
correspondences.py), even across different objects of one category.

Best buddies (mutual nearest neighbours) of log-binned descriptors, on the salient patches of both images;
k-means of the pairs' joined descriptors picks --num_pairs diverse ones, each cluster its most salient pair.
Writes --output_dir/correspondences.png (the two images side by side, numbered points joined by lines, titled)
and correspondences.txt (one pair a line: y1 x1 y2 x2 in pixels of the resized images).

    python correspond.py --pretrained_weights dino_deitsmall8_pretrain.pth --arch vit_small --patch_size 8 \\
        --stride 4 --layer 9 --facet key --bin true --image_path cat.jpg dog.jpg
    python correspond.py --pretrained_weights output/checkpoint.pth --data_path fashion_mnist --class_index 7
    python correspond.py --pretrained_weights output/checkpoint.pth --measure 100

--measure N matches N Fashion-MNIST test images against a shifted, a scaled and a flipped copy of themselves
and prints the share of best-buddy pairs that land within one stride of the true position, for the model
and the same architecture at random init.

Shape letters: N patches, M pairs, S image side.
"""
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_keypoints

import backbone
import data
import dense
import draw
from cli import ArgumentParser, ConfigError, positive_int, run_cli, unit_float

# one colour a pair, bright: they are drawn on dark images
PAIR_COLORS = ["red", "yellow", "lime", "magenta", "cyan", "orange", "deepskyblue", "white", "pink", "gold",
               "springgreen", "violet", "coral", "aquamarine", "khaki"]


def match(model, image1, image2, args):
    """(points1 (M, 2), points2 (M, 2)): (y, x) pixels of the chosen pairs of two uint8 images (3, S, S')."""
    descriptors_of = lambda im: dense.image_descriptors(model, data.normalize(im.to(args.device)), args.layer,
                                                        args.facet, args.stride, args.bin)
    (desc1, sal1, grid1), (desc2, sal2, grid2) = descriptors_of(image1), descriptors_of(image2)
    (i, j), _ = dense.correspondences(desc1, desc2, sal1, sal2, args.num_pairs, args.thresh)
    centers = lambda index, grid: dense.patch_centers(index.cpu(), grid, model.patch_size, args.stride)
    return centers(i, grid1), centers(j, grid2)


def side_by_side(image1, image2, points1, points2):
    """Both images side by side (tiny ones enlarged), pair n numbered n and joined by a line of its colour."""
    k = max(1, 224 // min(*image1.shape[-2:], *image2.shape[-2:]))  # tiny images (Fashion-MNIST) made visible
    image1, image2 = (im.repeat_interleave(k, -2).repeat_interleave(k, -1) for im in (image1, image2))
    height = max(image1.shape[1], image2.shape[1])
    pad = lambda im: torch.nn.functional.pad(im, (0, 0, 0, height - im.shape[1]))
    canvas = torch.cat([pad(image1), torch.full((3, height, 8), 255, dtype=torch.uint8), pad(image2)], dim=2)
    xy1 = (points1.flip(-1) * k + k // 2).float()  # (M, 2) as (x, y)
    xy2 = (points2.flip(-1) * k + k // 2).float() + torch.tensor([image1.shape[2] + 8, 0])
    colors = [PAIR_COLORS[n % len(PAIR_COLORS)] for n in range(len(xy1))]
    for n, color in enumerate(colors):
        pair = torch.stack([xy1[n], xy2[n]])[None]  # (1, 2, 2): one instance, two keypoints
        canvas = draw_keypoints(canvas, pair, connectivity=[(0, 1)], colors=color, radius=3, width=1)
    # the number of each pair just above-right of its points (a box of width 0 carries the label)
    boxes = torch.cat([torch.cat([xy + torch.tensor([3, -14]), xy + torch.tensor([12, -3])], dim=1)
                       for xy in (xy1, xy2)])  # (2M, 4)
    return draw_bounding_boxes(canvas, boxes, labels=[str(n + 1) for n in range(len(xy1))] * 2,
                               colors=colors * 2, width=0)


def save_picture(canvas, names, pairs, args):
    """correspondences.png: the side_by_side canvas titled with the two names and a caption of the method."""
    caption = (f"Correspondences (Amir et al. 2021): {pairs} pairs of best buddies (mutual nearest neighbours), "
               f"both patches salient, one per k-means cluster. Weights {Path(args.pretrained_weights).name}, "
               f"{args.arch}/{args.patch_size}, layer {args.layer} {args.facet}"
               f"{', log-binned' if args.bin else ''}, stride {args.stride}.")
    picture = draw.labelled_grid([[canvas]], col_titles=[f"{names[0]}  <->  {names[1]}"], caption=caption)
    return draw.save(picture, Path(args.output_dir) / "correspondences.png")


# --- measured: known warps of Fashion-MNIST images -------------------------------------------------------
def warps(size):
    """(name, warp of uint8 images (B, 3, S, S), map of (y, x) index coordinates (M, 2) to the warped image)."""
    c = (size - 1) / 2
    dy, dx = size // 8, size // 5  # shift down by 1/8 and right by 1/5 of the side, black comes in
    return [
        ("shift", lambda x: TF.affine(x, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0]),
         lambda p: p + torch.tensor([dy, dx])),
        ("scale x1.25", lambda x: TF.affine(x, angle=0.0, translate=[0, 0], scale=1.25, shear=[0.0, 0.0],
                                            interpolation=TF.InterpolationMode.BILINEAR),
         lambda p: c + 1.25 * (p - c)),
        ("flip", TF.horizontal_flip, lambda p: torch.stack([p[:, 0], size - 1 - p[:, 1]], dim=1)),
    ]


@torch.no_grad()
def warp_accuracy(model, images, warp, to_warped, args):
    """(share of salient best-buddy pairs within one stride of the true position, pairs per image) of uint8
    images (B, 3, S, S) against their warped copies."""
    hits, total = 0, 0
    for batch in images.split(50):
        x = data.normalize(torch.cat([batch, warp(batch)]).to(args.device))
        desc, sal, grid = dense.descriptors(model, x, args.layer, args.facet, args.stride, args.bin, saliency=True)
        for b in range(len(batch)):
            a, w = b, b + len(batch)
            i, j = dense.best_buddies(desc[a], desc[w])
            keep = (sal[a][i] > args.thresh) & (sal[w][j] > args.thresh)
            p = lambda index: dense.patch_centers(index[keep].cpu(), grid, model.patch_size, args.stride).float()
            error = (p(j) - to_warped(p(i))).norm(dim=1)
            hits += (error <= args.stride).sum().item()
            total += len(error)
    return hits / max(total, 1), total / len(images)


def measure(model, args):
    size = args.load_size or 56
    test = data.fashion_mnist(args.data_root)[1]
    images = TF.resize(test.images[:args.measure, None].expand(-1, 3, -1, -1), size, antialias=True)
    for name, m in (("trained", model), ("random init", backbone.random_like(model))):
        results = []
        for warp_name, warp, to_warped in warps(size):
            share, pairs = warp_accuracy(m, images, warp, to_warped, args)
            results.append(f"{warp_name} {share:.3f} ({pairs:.1f} pairs/image)")
        print(f"{name}: best buddies within one stride ({args.stride} px) of the truth, {len(images)} Fashion-MNIST "
              f"test images at {size} px: " + ", ".join(results))


def get_args_parser():
    p = ArgumentParser(description="Point correspondences with dense DINO descriptors (Amir et al. 2021, Sec. 4.3)")
    backbone.add_args(p)
    backbone.add_descriptor_args(p, layer_default="3 blocks before the last (reference: 9 of ViT-S)",
                                 bin_default=True)  # the reference matches log-binned descriptors
    data.add_image_args(p)
    g = p.add_argument_group("correspondences (reference defaults)")
    g.add_argument("--num_pairs", type=positive_int, default=10, help="pairs to show")
    g.add_argument("--thresh", type=unit_float, default=0.05, help="saliency above which a patch is foreground")
    g.add_argument("--measure", type=positive_int, default=None, help="measure the accuracy under known warps on "
                   "this many Fashion-MNIST test images instead")
    g.add_argument("--output_dir", default="dense_output", help="where the picture and the points go")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    model, _ = backbone.from_args(args, needs_vit="correspond.py")
    backbone.resolve_descriptor_args(model, args, layer=max(len(model.blocks) - 3, 0))  # the reference's 9 of 12
    if args.measure:
        return measure(model, args)
    images, names = data.images_from_args(args, 2)
    if len(images) != 2:
        raise ConfigError(f"correspondences need two images, got {len(images)}")
    points1, points2 = match(model, images[0], images[1], args)
    path = save_picture(side_by_side(images[0], images[1], points1, points2), names, len(points1), args)
    lines = [" ".join(str(int(v)) for v in (*a, *b)) for a, b in zip(points1.tolist(), points2.tolist())]
    (path.parent / "correspondences.txt").write_text("".join(line + "\n" for line in lines))
    print(f"{names[0]} <-> {names[1]}: {len(points1)} pairs; pictures in {path}")


if __name__ == "__main__":
    run_cli(main)
