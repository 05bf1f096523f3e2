"""Where is this point in the other images? The cosine similarity of one patch's dense DINO descriptor to every
patch of a set of images, as heat maps, no training (Amir, Gandelsman, Bagon, Dekel 2021, "Deep ViT Features as
Dense Visual Descriptors", Sec. 3; reference code ShirAmir/dino-vit-features, inspect_similarity.py, where the
point is clicked in a matplotlib window and one other image is shown: here the point is given on the command
line and every image is shown).

--point X Y (pixels of the first image, after resizing to --load_size) picks the patch whose centre is nearest;
its descriptor is compared with every patch of every image, the first one included. Writes
--output_dir/similarity.png: row "image", the images, the point green on the first, the --num_sim_patches most
similar patches of each image boxed in white (in the first image the first of them is the point's own patch);
row "similarity", the heat maps over the images, from blue (the lowest similarity over all the images) to red
(1, the point's own patch); titles with each image's highest similarity, and a caption.

    python similarity.py --pretrained_weights dino_deitsmall8_pretrain.pth --arch vit_small --patch_size 8 \\
        --stride 4 --image_path assets/chelsea.jpg assets/astronaut.jpg assets/coffee.jpg --point 160 110
    python similarity.py --pretrained_weights output/checkpoint.pth --data_path fashion_mnist --class_index 7 \\
        --point 12 40

Shape letters: N patches of one image (h x w grid), D descriptor width, M marked patches, S image side.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import draw_bounding_boxes, draw_keypoints

import backbone
import data
import dense
import draw
from cli import ArgumentParser, ConfigError, nonneg_int, positive_int, run_cli


def patch_at(point, grid, size, patch_size, stride):
    """The index of the patch of an (h, w) grid whose centre is nearest to the pixel point (x, y) of an image of
    size (S, S'): the patch whose value colours that pixel in the pictures.
    NOTE: the reference takes patch int(y h / S) (and likewise for x), which can differ by one near the borders."""
    index = torch.arange(grid[0] * grid[1])
    return int(dense.patches_to_pixels(index, grid, size, patch_size, stride)[point[1], point[0]])


@torch.no_grad()
def similarity_maps(model, images, point, args):
    """Cosine similarities of the descriptor of the patch at `point` (x, y) of images[0] to every patch of each
    uint8 image (3, S, S'): (list of (N_i,), the point's patch index in images[0], grids (h_i, w_i))."""
    described = [dense.descriptors(model, data.normalize(im.to(args.device))[None], args.layer, args.facet,
                                   args.stride, args.bin) for im in images]
    units = [F.normalize(desc[0], dim=-1) for desc, _, _ in described]  # (N_i, D), unit length
    grids = [grid for _, _, grid in described]
    query = patch_at(point, grids[0], images[0].shape[-2:], model.patch_size, args.stride)
    return [(u @ units[0][query]).cpu() for u in units], query, grids


def jet(t):
    """Values t in [0, 1] (...) -> colours (3, ...) in [0, 1]: dark blue, blue, cyan, yellow, red, dark red (the
    classic piecewise-linear 'jet' colour map, as the reference's heat map)."""
    return torch.stack([(1.5 - (4 * t - c).abs()).clamp(0, 1) for c in (3, 2, 1)])


def enlarge(x, k):
    """Each pixel of x (..., S, S') as a k x k block: tiny images (Fashion-MNIST) made big enough to see."""
    return x.repeat_interleave(k, -2).repeat_interleave(k, -1)


def patch_boxes(index, grid, patch_size, stride, k):
    """Pixel boxes (x0, y0, x1, y1) (M, 4) of patches `index` (M,) of an (h, w) grid, in an image enlarged k times."""
    x0, y0 = index % grid[1] * stride * k, index // grid[1] * stride * k
    return torch.stack([x0, y0, x0 + patch_size * k - 1, y0 + patch_size * k - 1], dim=1)  # (M, 4)


def panels(image, sim, best, grid, k, args, patch_size, point=None):
    """[image, heat map over the image], uint8 (3, kS, kS'), with the patches `best` (M,) boxed in white (black
    edged) and, given, the point (x, y) as a green dot; sim (N,) in [0, 1] from the lowest similarity to 1."""
    heat = jet(dense.patches_to_pixels(sim, grid, image.shape[-2:], patch_size, args.stride))  # (3, S, S')
    image, heat = enlarge(image, k), enlarge(heat, k)
    gray = image.float().mean(dim=0) / 255  # (kS, kS')
    shown = [image, (255 * (0.7 * heat + 0.3 * gray)).round().to(torch.uint8)]
    boxes = patch_boxes(best, grid, patch_size, args.stride, k)
    out = []
    for picture in shown:
        picture = draw_bounding_boxes(picture, boxes, colors="black", width=3)
        picture = draw_bounding_boxes(picture, boxes, colors="white", width=1)
        if point is not None:
            xy = torch.tensor([[[point[0] * k + k // 2, point[1] * k + k // 2]]], dtype=torch.float)  # (1, 1, 2)
            picture = draw_keypoints(picture, xy, colors="lime", radius=max(3, k))
        out.append(picture)
    return out


def pad_to_one_size(images):
    """uint8 images (3, S_i, S'_i), each padded with white, centred, to the largest height and width."""
    H, W = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    pad = lambda im: ((W - im.shape[2]) // 2, (W - im.shape[2] + 1) // 2, (H - im.shape[1]) // 2,
                      (H - im.shape[1] + 1) // 2)
    return [F.pad(im, pad(im), value=255) for im in images]


def save_picture(images, maps, best, grids, names, point, patch_size, args):
    """similarity.png: the rows "image" and "similarity", a column per image, titled, with a caption."""
    lo = min(m.min().item() for m in maps)
    k = max(1, 224 // min(min(im.shape[-2:]) for im in images))  # tiny images (Fashion-MNIST) made visible
    columns = [panels(im, (m - lo) / max(1 - lo, 1e-12), b.indices, g, k, args, patch_size, point if i == 0 else None)
               for i, (im, m, b, g) in enumerate(zip(images, maps, best, grids))]
    rows = [pad_to_one_size([c[r] for c in columns]) for r in range(2)]
    titles = [f"{name} (point)" if i == 0 else f"{name}: {b.values[0]:.2f}" for i, (name, b) in
              enumerate(zip(names, best))]
    n = args.num_sim_patches
    caption = (f"Cosine similarity (Amir et al. 2021) of the descriptor of the patch at the green point "
               f"(x {point[0]}, y {point[1]}) of {names[0]} to every patch of each image: blue = {lo:.2f} (the "
               f"lowest over all the images) to red = 1 (the point's own patch). White boxes: the "
               f"{f'{n} most similar patches' if n > 1 else 'most similar patch'} of each image, the highest "
               f"similarity in the titles. Weights {Path(args.pretrained_weights).name}, {args.arch}/{patch_size}, "
               f"layer {args.layer} {args.facet}{', log-binned' if args.bin else ''}, stride {args.stride}.")
    grid = draw.labelled_grid(rows, col_titles=titles, row_titles=["image", "similarity"], caption=caption)
    return draw.save(grid, Path(args.output_dir) / "similarity.png")


def get_args_parser():
    p = ArgumentParser(description="Cosine similarity of one point's dense DINO descriptor to every patch of a set "
                                   "of images (Amir et al. 2021; reference inspect_similarity.py)")
    backbone.add_args(p)
    backbone.add_descriptor_args(p, layer_default="the last block (reference: 11 of ViT-S)")
    data.add_image_args(p)
    g = p.add_argument_group("similarity (reference defaults)")
    g.add_argument("--point", nargs=2, type=nonneg_int, default=None, metavar=("X", "Y"), help="pixel of the first "
                   "image (after resizing to --load_size) whose patch is compared; default: its centre")
    g.add_argument("--num_images", type=positive_int, default=6, help="images of --data_path compared (the first "
                   "holds the point)")
    g.add_argument("--num_sim_patches", type=positive_int, default=1, help="most similar patches boxed per image")
    g.add_argument("--output_dir", default="dense_output", help="where the picture goes")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    model, _ = backbone.from_args(args, needs_vit="similarity.py")
    backbone.resolve_descriptor_args(model, args, layer=len(model.blocks) - 1)
    images, names = data.images_from_args(args, args.num_images)
    H, W = images[0].shape[-2:]
    point = args.point or [W // 2, H // 2]
    if point[0] >= W or point[1] >= H:
        raise ConfigError(f"--point {point[0]} {point[1]} is outside {names[0]}: x < {W} and y < {H} (pixels "
                          f"after resizing to --load_size)")
    maps, _, grids = similarity_maps(model, images, point, args)
    best = [m.topk(min(args.num_sim_patches, len(m))) for m in maps]
    path = save_picture(images, maps, best, grids, names, point, model.patch_size, args)
    for name, b, grid in zip(names, best, grids):
        y, x = dense.patch_centers(b.indices[:1], grid, model.patch_size, args.stride)[0].tolist()
        print(f"{name}: most similar patch centred at x {x}, y {y} (similarity {b.values[0]:.3f})")
    print(f"picture in {path}")
    return best


if __name__ == "__main__":
    run_cli(main)
