"""PCA of dense DINO descriptors: the first principal components of all the patches of a set of images, shown as
red, green and blue, no training (Amir, Gandelsman, Bagon, Dekel 2021, "Deep ViT Features as Dense Visual
Descriptors", Sec. 3 and the PCA visualization of their project page; reference code
ShirAmir/dino-vit-features, pca.py).

One PCA is fitted to the descriptors of the patches of all the images together, so a colour means the same in
every image: patches of one colour have similar descriptors. Their observation: early layers colour the patches
by position, the last ones by semantic parts, the same parts in the same colours across images. Writes to
--output_dir:
  pca.png         the images (row "image"), components 1-3 as RGB (row "PCA 1-3") and, with --n_components C of
                  4 or more, the last three (row "PCA C-2..C": the reference's picture), titled, with a caption
  <name>_pca1-3.png, <name>_pca<C-2>-<C>.png   the same, one image at a time

    python pca.py --pretrained_weights dino_deitsmall8_pretrain.pth --arch vit_small --patch_size 8 --stride 4 \\
        --image_path assets/astronaut.jpg assets/chelsea.jpg assets/coffee.jpg assets/rocket.jpg
    python pca.py --pretrained_weights output/checkpoint.pth --data_path fashion_mnist --class_index 9

Shape letters: M descriptors (the patches of all the images), D descriptor width, C components, N patches of
one image (h x w grid), S image side.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

import backbone
import data
import dense
import draw
from cli import ArgumentParser, ConfigError, bool_flag, positive_int, run_cli, unit_float


def joint_pca(x, n_components):
    """PCA of the rows of x (M, D): (projections (M, C), components (C, D), explained variance ratios (C,)).

    Exact, from the SVD of the centred rows, x - mean = U S V^T: the components are the first C rows of V^T, the
    projections (x - mean) V_C = U_C S_C, the variance ratios S_c^2 / sum S^2. An SVD fixes each component up to
    its sign only: here it is the one that makes the projection of largest magnitude positive.
    NOTE: the reference fits sklearn's PCA (whose solver may be randomized for large inputs): the same components
    up to that solver's approximation and the sign.
    """
    if not 1 <= n_components <= min(x.shape):
        raise ValueError(f"{n_components} components need at least as many descriptors and dimensions: "
                         f"there are {x.shape[0]} descriptors of {x.shape[1]} dimensions")
    centred = x - x.mean(dim=0)
    U, S, Vh = torch.linalg.svd(centred, full_matrices=False)  # (M, R), (R,), (R, D) with R = min(M, D)
    proj = U[:, :n_components] * S[:n_components]  # (M, C)
    largest = proj.gather(0, proj.abs().argmax(dim=0, keepdim=True))  # (1, C)
    sign = torch.where(largest < 0, -1.0, 1.0).to(x.dtype)
    variance = S ** 2
    return proj * sign, Vh[:n_components] * sign.T, variance[:n_components] / variance.sum()


def unit_scale(x):
    """Each column of x (M, C) min-max scaled to [0, 1] over its rows (a constant column becomes 0)."""
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def pca_colours(descs, sals, n_components, thresh=None, per_image=False):
    """The components of every patch, scaled to [0, 1]: lists of descriptors (N_i, D) and saliency maps (N_i,)
    (or Nones) -> (list of (N_i, C), explained variance ratios (C,)).

    One PCA of all the images' descriptors; each component min-max scaled over all the images (per_image: over
    each image alone, as the reference). With thresh, the PCA is fitted to the salient patches (saliency above
    thresh) only, and the other patches get 0 (black).
    NOTE: the reference scales each image alone, so one colour can mean different values in two images.
    """
    keep = [s > thresh if thresh is not None else torch.ones(len(d), dtype=torch.bool, device=d.device)
            for d, s in zip(descs, sals)]
    x = torch.cat([d[k] for d, k in zip(descs, keep)])  # (M, D)
    proj, _, ratios = joint_pca(x, n_components)
    sizes = [int(k.sum()) for k in keep]
    parts = proj.split(sizes)
    scaled = [unit_scale(p) if len(p) else p for p in parts] if per_image else unit_scale(proj).split(sizes)
    colours = []
    for d, k, c in zip(descs, keep, scaled):
        full = c.new_zeros(len(d), n_components)  # (N_i, C): black where not kept
        full[k] = c
        colours.append(full)
    return colours, ratios


def describe(model, images, args):
    """(descriptors (N_i, D), saliency (N_i,) or None, grid (h, w)) of each uint8 image (3, S, S')."""
    out = []
    for im in images:
        desc, sal, grid = dense.descriptors(model, data.normalize(im.to(args.device))[None], args.layer, args.facet,
                                            args.stride, args.bin, saliency=args.salient_only)
        out.append((desc[0], None if sal is None else sal[0], grid))
    return out


def enlarged(images, side=224):
    """(uint8 images (3, kS, kS') with k = side // the smallest short side (at least 1), nearest so that patches
    stay sharp, each padded with white, centred, to one size; k)."""
    k = max(1, side // min(min(im.shape[-2:]) for im in images))
    big = [im.repeat_interleave(k, -2).repeat_interleave(k, -1) for im in images]
    H, W = max(b.shape[1] for b in big), max(b.shape[2] for b in big)
    pad = lambda b: (((W - b.shape[2]) // 2, (W - b.shape[2] + 1) // 2, (H - b.shape[1]) // 2,
                      (H - b.shape[1] + 1) // 2))
    return [F.pad(b, pad(b), value=255) for b in big], k


def pictures(colours, grids, images, model, args):
    """{row title: uint8 pictures (3, S, S')}: components 1-3 as RGB and, from 4 components on, the last three;
    each pixel takes the colours of the patch whose centre is nearest."""
    C = args.n_components
    shown = {"PCA 1-3": slice(0, 3)} | ({f"PCA {C - 2}-{C}": slice(C - 3, C)} if C > 3 else {})
    to_pixels = lambda c, g, im: dense.patches_to_pixels(c.T.cpu(), g, im.shape[-2:], model.patch_size, args.stride)
    return {title: [(255 * to_pixels(c[:, part], g, im)).round().to(torch.uint8)  # (3, S, S')
                    for c, g, im in zip(colours, grids, images)] for title, part in shown.items()}


def caption(args, num_images, rows, ratios):
    """What pca.png shows, in words."""
    over = "each image alone" if args.scale == "per_image" else "all the images"
    last = (f" Row '{list(rows)[-1]}': the last three of the {args.n_components} components, the reference's "
            f"picture." if len(rows) > 1 else "")
    salient = f" Salient patches only (saliency > {args.thresh:g}), the others black." if args.salient_only else ""
    variance = ", ".join(f"{100 * r:.1f}%" for r in ratios.tolist())
    return (f"Joint PCA (Amir et al. 2021) of the descriptors of the patches of all {num_images} images: red, green, "
            f"blue = components 1, 2, 3 (row 'PCA 1-3'), each scaled to [0, 1] over {over}; one colour = similar "
            f"descriptors.{last}{salient} Variance explained: {variance}. Weights {Path(args.pretrained_weights).name}"
            f", {args.arch}/{args.patch_size}, layer {args.layer} {args.facet}{', log-binned' if args.bin else ''}, "
            f"stride {args.stride}.")


def save_pictures(images, rows, names, ratios, args):
    """The PNGs listed at the top: uint8 images (3, S, S') and rows {title: uint8 pictures (3, S, S')}."""
    out_dir = Path(args.output_dir)
    shown, k = enlarged(images)
    for title, row in rows.items():
        for picture, name in zip(row, names):
            draw.save(picture.repeat_interleave(k, -2).repeat_interleave(k, -1),
                      out_dir / f"{name}_pca{title.split()[1]}.png")
    tiles = [shown] + [enlarged(row)[0] for row in rows.values()]
    grid = draw.labelled_grid(tiles, col_titles=names, row_titles=["image", *rows],
                              caption=caption(args, len(images), rows, ratios))
    return draw.save(grid, out_dir / "pca.png")


def get_args_parser():
    p = ArgumentParser(description="PCA of dense DINO descriptors of a set of images as colours (Amir et al. 2021; "
                                   "reference pca.py)")
    backbone.add_args(p)
    backbone.add_descriptor_args(p, layer_default="the last block (reference: 11 of ViT-S)")
    data.add_image_args(p)
    g = p.add_argument_group("PCA (reference defaults)")
    g.add_argument("--num_images", type=positive_int, default=10, help="images of --data_path fitted together")
    g.add_argument("--n_components", type=positive_int, default=4, help="components fitted; the picture shows the "
                   "first three and, from 4 on, the last three (the reference's picture: 2, 3, 4 of its 4)")
    g.add_argument("--scale", default="all", choices=["all", "per_image"], help="each component min-max scaled to "
                   "[0, 1] over all the images (one colour, one value) or over each image alone (the reference)")
    g.add_argument("--salient_only", type=bool_flag, default=False, help="fit the PCA to the salient patches only "
                   "(the last block's CLS attention above --thresh) and paint the others black; not in the reference")
    g.add_argument("--thresh", type=unit_float, default=0.05, help="saliency above which a patch is salient (the "
                   "reference's threshold for correspondences)")
    g.add_argument("--output_dir", default="dense_output", help="where the pictures go")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.n_components < 3:
        raise ConfigError(f"--n_components {args.n_components}: the picture needs 3 (red, green, blue)")
    model, _ = backbone.from_args(args, needs_vit="pca.py")
    backbone.resolve_descriptor_args(model, args, layer=len(model.blocks) - 1)
    images, names = data.images_from_args(args, args.num_images)
    descs, sals, grids = zip(*describe(model, images, args))
    try:
        colours, ratios = pca_colours(descs, sals, args.n_components, args.thresh if args.salient_only else None,
                                      args.scale == "per_image")
    except ValueError as e:
        raise ConfigError(f"--n_components {args.n_components}: {e}") from None
    rows = pictures(colours, grids, images, model, args)
    path = save_pictures(images, rows, names, ratios, args)
    variance = ", ".join(f"{100 * r:.1f}%" for r in ratios.tolist())
    print(f"{len(images)} images, {sum(len(d) for d in descs)} patches: variance explained by the "
          f"{args.n_components} components {variance}; pictures in {path.parent} (all together: {path})")


if __name__ == "__main__":
    run_cli(main)
