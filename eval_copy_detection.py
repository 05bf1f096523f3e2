"""Copy detection with frozen DINO features (paper Sec. 4.2.1, Table 5: Copydays "strong").

Each image is described by the CLS token of the last block concatenated with the GeM (p = 4) pooling of its patch
tokens, (2D); the descriptors are optionally PCA-whitened with an operator learned on other images (--whitening:
the official operator by default, see retrieval.Whitening), L2-normalized, and each query ranks the database by
cosine similarity. A query's positives are the database images it copies; its AP is computed over the top --topk
results (the Holidays/Copydays trapezoid AP), and the mean over queries is mAP.

Two sets:
- Copydays (`--data_path` a folder with original/ and strong/, and jpegqual/<q>/, crops/<c>/ when present): every
  block present queries the database = original/ + the images of --distractors_path; whitening is learned on the
  images of --whitening_path. Images are resized to --imsize x --imsize (official: 320, PIL bicubic).
- otherwise (a dataset name, default fashion_mnist, or an ImageFolder with val/): a set generated from the test
  split. --num_queries test images are edited strongly (crops, rotations, blur, JPEG, brightness/contrast/inversion,
  overlays of another image or of text-like strokes, three of these per copy); the database is the whole test split,
  the originals hidden among the other test images; whitening is learned on --num_whitening training images.

    python eval_copy_detection.py --pretrained_weights output/checkpoint.pth --baselines true
    python eval_copy_detection.py --pretrained_weights dino_vitbase8_pretrain.pth --arch vit_base --patch_size 8 \
        --data_path /path/to/copydays --whitening_path /path/to/20k_yfcc --distractors_path /path/to/10k_yfcc

Shape letters: Q queries, N database images, D feature width, S image side.
"""
import io
import math
import os

import torch
import PIL.Image
from torchvision.transforms.v2 import functional as TF

import backbone
import data
import draw
from cli import ArgumentParser, ConfigError, existing_dir, nonneg_int, positive_int, run_cli
from retrieval import (WHITENINGS, Whitening, add_evaluation_args, average_precision, cls_gem_descriptor,
                       compared_backbones, global_descriptors, pixel_descriptor, rank_database, report)

COPYDAYS_BLOCKS = (["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
                   + [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])


# --- strong edits: a copy-detection set generated from any test split --------------------------------------------
def uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def crop_or_rotate(image, other, g):
    """A random crop of 40-80% of the area resized back, or a rotation by 15-45 degrees either way, or both."""
    S = image.shape[-1]
    kind = torch.randint(3, (), generator=g).item()  # 0 crop, 1 rotate, 2 both
    if kind != 1:
        side_h, side_w = (max(2, round(S * math.sqrt(uniform(g, 0.4, 0.8)))) for _ in range(2))
        top, left = (torch.randint(S - s + 1, (), generator=g).item() for s in (side_h, side_w))
        image = TF.resized_crop(image, top, left, side_h, side_w, [S, S], antialias=True)
    if kind != 0:
        image = TF.rotate(image, uniform(g, 15, 45) * (1 if torch.rand((), generator=g) < 0.5 else -1))
    return image


def blend_or_strokes(image, other, g):
    """Blend another image over it (30-50%), or draw 2-4 lines of text-like strokes (short bright/dark dashes)."""
    if torch.rand((), generator=g) < 0.5:
        alpha = uniform(g, 0.3, 0.5)
        return (image.float() * (1 - alpha) + other.float() * alpha).round().to(torch.uint8)
    image, S = image.clone(), image.shape[-1]
    unit = max(1, S // 28)  # stroke thickness: 1 px at 28 px
    for _ in range(torch.randint(2, 5, (), generator=g).item()):
        y, x = torch.randint(S - 2 * unit, (), generator=g).item(), torch.randint(S // 2, (), generator=g).item()
        value = 255 if torch.rand((), generator=g) < 0.5 else 0
        while x < S:  # one "word" after another along the line
            width = torch.randint(2, 6, (), generator=g).item() * unit
            image[:, y:y + 2 * unit, x:x + width] = value
            x += width + 2 * unit
    return image


def brightness_contrast_or_invert(image, other, g):
    """Brightness x0.5-1.5 and contrast x0.4-1.6, or an inversion of the grey levels."""
    if torch.rand((), generator=g) < 0.25:
        return TF.invert(image)
    image = TF.adjust_brightness(image, uniform(g, 0.5, 1.5))
    return TF.adjust_contrast(image, uniform(g, 0.4, 1.6))


def blur(image, other, g):
    """Gaussian blur, sigma 0.6-1.2 pixels at 28 px (scaled with the image side)."""
    sigma = uniform(g, 0.6, 1.2) * image.shape[-1] / 28
    kernel = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])


def jpeg(image, other, g):
    """JPEG re-encoding at quality 10-40 (with PIL: torchvision.io's codecs are deprecated since torchvision 0.29)."""
    buffer = io.BytesIO()
    TF.to_pil_image(image).save(buffer, format="JPEG", quality=torch.randint(10, 41, (), generator=g).item())
    return TF.pil_to_tensor(PIL.Image.open(buffer))


EDITS = (crop_or_rotate, blend_or_strokes, brightness_contrast_or_invert, blur, jpeg)  # applied in this order


def strong_edit(image, other, g, num_edits=3):
    """Three of the five edits, chosen at random, on a uint8 (3, S, S) image; `other` is the image to overlay."""
    chosen = torch.randperm(len(EDITS), generator=g)[:num_edits].tolist()
    for i in sorted(chosen):
        image = EDITS[i](image, other, g)
    return image


class EditedCopies(torch.utils.data.Dataset):
    """Items (strong edit of images[originals[i]], i): image i of the query set, deterministic in (seed, i)."""

    def __init__(self, images, originals, seed=0):
        self.images, self.originals, self.seed = images, originals, seed

    def __len__(self):
        return len(self.originals)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        j = self.originals[i]
        other = (j + 1 + torch.randint(len(self.images) - 1, (), generator=g).item()) % len(self.images)
        return strong_edit(self.images[j][0], self.images[other][0], g), i


# --- Copydays and folders of images -------------------------------------------------------------------------------
class ImageList(torch.utils.data.Dataset):
    """Items (uint8 (3, imsize, imsize), i): image file i resized to a square with PIL's bicubic filter, as the
    official script (torchvision's Resize((imsize, imsize), interpolation=3) on a PIL image)."""

    def __init__(self, files, imsize):
        self.files, self.imsize = files, imsize

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = TF.to_pil_image(data.read_image(self.files[i]))  # decoded as (3, H, W), then PIL
        image = image.resize((self.imsize, self.imsize), PIL.Image.Resampling.BICUBIC)
        return TF.pil_to_tensor(image), i


def copydays_sets(args):
    """(query blocks [(name, dataset, positives per query)], database, whitening set or None) of Copydays.
    "strong" copies match the originals whose file names share their first 4 characters; the other blocks
    match original i to query i (both sorted by name), as the official evaluation."""
    present = [b for b in COPYDAYS_BLOCKS if os.path.isdir(os.path.join(args.data_path, b))]
    if "original" not in present:
        raise ConfigError(f"{args.data_path} has no original/ folder: --data_path must be the Copydays folder "
                          f"(original/, strong/, jpegqual/, crops/) or a dataset name")
    # NOTE: any image extension in any case; the official Copydays blocks take only "*.jpg" (all Copydays files are)
    originals = data.image_files(os.path.join(args.data_path, "original"), recursive=False)
    blocks = []
    for name in present:
        files = data.image_files(os.path.join(args.data_path, name), recursive=False)
        if name == "strong":
            key = lambda f: os.path.basename(f)[:4]
            positives = [[j for j, o in enumerate(originals) if key(o) == key(f)] for f in files]
        else:
            positives = [[i] for i in range(len(files))]
        blocks.append((name, ImageList(files, args.imsize), positives))
    database = originals + (data.image_files(args.distractors_path, recursive=False) if args.distractors_path else [])
    whitening = (ImageList(data.image_files(args.whitening_path, recursive=False), args.imsize)
                 if args.whitening_path else None)
    return blocks, ImageList(database, args.imsize), whitening


def generated_sets(args, datasets):
    """The same for a copy-detection set generated from the test split (see the module docstring)."""
    view = lambda ds: data.Transformed(ds, data.EvalTransform(args.imsize))
    test, train = view(datasets.labelled_test), view(datasets.labelled_train)
    if args.num_queries > len(test):
        raise ConfigError(f"--num_queries {args.num_queries} is more than the {len(test)} test images")
    g = torch.Generator().manual_seed(args.seed)
    originals = torch.randperm(len(test), generator=g)[:args.num_queries].tolist()
    queries = EditedCopies(test, originals, args.seed)
    whitening = None
    if args.num_whitening:
        chosen = torch.randperm(len(train), generator=g)[:args.num_whitening].tolist()
        whitening = torch.utils.data.Subset(train, chosen)
    return [("strong edits", queries, [[o] for o in originals])], test, whitening


# --- evaluation ---------------------------------------------------------------------------------------------------
def copy_detection_map(query_feats, db_feats, positives, topk):
    """(mAP, top-1 accuracy, ranking (Q, k)): AP of each query over its top-k database images, positives[q] = the
    indices of the database images it copies."""
    _, idx = rank_database(query_feats, db_feats, topk)  # (Q, k)
    is_positive = torch.zeros(len(query_feats), len(db_feats), dtype=torch.bool)
    for q, pos in enumerate(positives):
        is_positive[q, pos] = True
    hits = is_positive.gather(1, idx.cpu())  # (Q, k)
    ap = average_precision(hits, [max(1, len(p)) for p in positives])
    return ap.mean().item(), hits[:, 0].double().mean().item(), idx.cpu()


def evaluate(describe, blocks, database, whitening, device, args):
    """({"<block> mAP": ..., "<block> top-1": ..., and the same "whitened"}, {block: its ranking (Q, topk), whitened
    when there is whitening}) for one descriptor."""
    describe_all = lambda ds, desc: global_descriptors(describe, ds, device, args.batch_size, args.num_workers,
                                                       desc=desc)[0]
    db = describe_all(database, "database features")
    white = (Whitening(describe_all(whitening, "whitening features"), args.whitening) if whitening is not None
             else None)
    results, rankings = {}, {}
    for name, queries, positives in blocks:
        q = describe_all(queries, f"{name} features")
        results[f"{name} mAP"], results[f"{name} top-1"], rankings[name] = copy_detection_map(q, db, positives,
                                                                                              args.topk)
        if white is not None:
            scores = copy_detection_map(white(q), white(db), positives, args.topk)
            results[f"{name} mAP whitened"], results[f"{name} top-1 whitened"], rankings[name] = scores
    return results, rankings


def framed(image, color, cell):
    """uint8 (3, S, S) image resized to cell x cell inside a 3-pixel frame of `color`: (3, cell + 6, cell + 6)."""
    mode = TF.InterpolationMode.NEAREST if image.shape[-1] <= cell else TF.InterpolationMode.BILINEAR
    image = TF.resize(data.to_rgb(image), [cell, cell], mode, antialias=True)
    out = torch.tensor(color, dtype=torch.uint8)[:, None, None].repeat(1, cell + 6, cell + 6)  # (3, S+6, S+6)
    out[:, 3:-3, 3:-3] = image
    return out


def save_examples(path, block, database, ranking, where, rows=6, top=5, cell=56):
    """A picture that explains itself: per row an original, its edited copy (the query) and the copy's `top` first
    results, the original framed green wherever it appears; left of each row, the rank at which it was found.
    where: what the caption says the ranking is (the data and the features)."""
    name, queries, positives = block
    green, grey, dark = (40, 200, 40), (200, 200, 200), (60, 60, 60)
    grid, row_titles = [], []
    for q in [q for q in range(len(queries)) if positives[q]][:rows]:  # a query without an original: nothing to show
        ranked = ranking[q].tolist()
        found = [r + 1 for r, j in enumerate(ranked) if j in positives[q]]
        row_titles.append(f"original at rank {found[0]}" if found else f"original not in top {len(ranked)}")
        grid.append([framed(database[positives[q][0]][0], green, cell), framed(queries[q][0], dark, cell)]
                    + [framed(database[j][0], green if j in positives[q] else grey, cell) for j in ranked[:top]])
    caption = (f"Copy detection, {where}. Per row: an original (framed green), its {name} copy, which queries the "
               f"{len(database):,} database images, and the copy's top {top}, the original framed green where it "
               f"is found; left: the rank of the original.")
    titles = ["original", "copy", *(f"top {r}" for r in range(1, top + 1))]
    draw.save(draw.labelled_grid(grid, titles, row_titles, caption), path)
    print(f"wrote {path}")


def get_args(argv=None):
    p = ArgumentParser(description="Copy detection with frozen DINO features (paper Sec. 4.2.1)")
    p.add_argument("--data_path", default="fashion_mnist", help="the Copydays folder, or a dataset name or an "
                   "ImageFolder with train/ and val/ to generate a copy-detection set from")
    p.add_argument("--whitening_path", type=existing_dir, default=None, help="Copydays: images to learn the "
                   "whitening on (paper: 20k random YFCC100M images); default: no whitening")
    p.add_argument("--distractors_path", type=existing_dir, default=None,
                   help="Copydays: images added to the database (paper: 10k random YFCC100M images)")
    p.add_argument("--num_queries", type=positive_int, default=500, help="generated set: edited test images")
    p.add_argument("--num_whitening", type=nonneg_int, default=20000,
                   help="generated set: training images to learn the whitening on (0: no whitening)")
    p.add_argument("--whitening", default="official", choices=WHITENINGS, help="the matrix whose eigenvectors "
                   "whiten: 'official' the second moment of the uncentered whitening features, as the official code "
                   "(queries and database are centered with their mean); 'centered' their covariance "
                   "(default: official)")
    p.add_argument("--seed", type=int, default=0, help="generated set: which images, which edits")
    p.add_argument("--imsize", type=positive_int, default=None, help="square image side (default: 320 for "
                   "Copydays as the official script; for a generated set a multiple of the patch size, by default the "
                   "checkpoint's global crop size, else the dataset's)")
    p.add_argument("--topk", type=positive_int, default=20, help="AP over the top k results (official: 20)")
    p.add_argument("--save_examples", default=None, help="write a PNG: per row an original, its copy (the strong "
                   "block or the generated edits) and the copy's top 5 with the first features (DINO)")
    backbone.add_args(p)
    add_evaluation_args(p, batch_size=64)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    model, saved = backbone.from_args(args, needs_vit="eval_copy_detection.py")
    sources = [(name, cls_gem_descriptor(m)) for name, m in compared_backbones(model, args)]
    if os.path.isdir(os.path.join(args.data_path, "original")):
        args.imsize = args.imsize or 320
        blocks, database, whitening = copydays_sets(args)
    else:
        datasets = data.build_datasets(args.data_path, args.data_root)
        if datasets.labelled_test is None:
            raise ConfigError(f"{args.data_path} has no test split (val/) to generate copies from")
        args.imsize = backbone.eval_size(args.imsize, saved, datasets.image_size, model.patch_size, "--imsize")
        blocks, database, whitening = generated_sets(args, datasets)
        sources += [("raw pixels", pixel_descriptor)] if args.baselines else []
    results, rankings = {}, {}
    for name, describe in sources:
        results[name], rankings[name] = evaluate(describe, blocks, database, whitening, args.device, args)
    report(f"copy detection, {args.data_path}, {args.imsize} px, {len(database)} database images, AP over the top "
           f"{args.topk}" + (f", {args.whitening} whitening:" if whitening is not None else ":"), results, args)
    if args.save_examples:  # a block of copies, not the originals querying themselves (Copydays' first block)
        block = next((b for b in blocks if b[0] != "original"), blocks[0])
        features = sources[0][0] + (" features, whitened" if whitening is not None else " features")
        save_examples(args.save_examples, block, database, rankings[sources[0][0]][block[0]],
                      f"{args.data_path} at {args.imsize} px, {features}", cell=min(2 * args.imsize, 112))
    return results


if __name__ == "__main__":
    run_cli(main)
