"""Write a backbone's frozen features of every image of a dataset or a folder to .npy files (the features of the
paper's Sec. 4.1 evaluations: the CLS token of k-NN, the linear probe's concatenation; the patch tokens).

    python extract_features.py                         # output/checkpoint.pth, Fashion-MNIST -> features/{train,test}/
    python extract_features.py --data_path ~/photos --output_dir features/photos     # every image under the folder
    python extract_features.py --pretrained_weights dino_deitsmall16_pretrain.pth --arch vit_small --patch_size 16 \
        --data_path /data/imagenet --split test --patch_tokens --linear_features --batch_size 128

What is written, with the images in dataset order:
- a named dataset (fashion_mnist, cifar10...) or a folder with train/<class>/ (and val/<class>/): one sub-folder of
  --output_dir per split, train/ and test/ (the test set, or val/), as --split asks (default: both);
- any other folder (unlabelled images): its images, all of them, in --output_dir itself.
In each: `cls.npy` (N, D) float32, the CLS token after the final norm (what eval_knn.py uses; a convnet's pooled
features); `patch_tokens.npy` (N, P, D) with --patch_tokens, the last block's normed patch tokens;
`linear.npy` (N, F) with --linear_features, the linear probe's feature (eval_linear.py's --n_last_blocks CLS tokens,
with --avgpool_patchtokens the mean patch token); `labels.npy` (N,) int64 where there are labels; `names.txt`, one
line per row: the file's path relative to the folder (train/ or val/ for class folders), or the dataset index;
`settings.json`: the weights, the model, the image size, the data, the shapes. Arrays are written batch by batch into
.tmp files, renamed at the end (an earlier run's files in the folder replaced, settings.json written last): a stopped
run leaves no files that look complete.

Reading them back (numpy and torch alone; mmap_mode reads only the rows you index):

    import json, numpy as np, torch
    cls = np.load("features/train/cls.npy", mmap_mode="r")        # (N, D) float32
    labels = np.load("features/train/labels.npy")                  # (N,) int64
    names = open("features/train/names.txt").read().splitlines()   # N names
    settings = json.load(open("features/train/settings.json"))
    feats = torch.from_numpy(np.load("features/train/cls.npy"))    # (N, D) torch.float32

Shape letters: B images in a batch, N images, P patches, D backbone width, F = D * (n_last_blocks + avgpool).
"""
import datetime
import json
import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from numpy.lib.format import open_memmap
from tqdm import tqdm

import backbone
import checkpoint
import cli
import data

FILES = ("cls.npy", "patch_tokens.npy", "linear.npy", "labels.npy", "names.txt", "settings.json")


def get_args_parser():
    p = cli.ArgumentParser(description="Write a backbone's features of every image of a dataset or a folder to .npy "
                           "files that numpy and torch open alone")
    backbone.add_args(p)
    g = p.add_argument_group("images")
    g.add_argument("--data_path", default="fashion_mnist", help="dataset name (fashion_mnist, cifar10, cifar100, "
                   "stl10), a folder with train/<class>/ (and val/<class>/), or any folder of images (all of them)")
    g.add_argument("--data_root", default="data", help="where named datasets are looked for and downloaded to")
    g.add_argument("--split", default="both", choices=["train", "test", "both"], help="which split of a dataset or "
                   "of class folders (test: the test set, or val/); a folder of unlabelled images has one: all images")
    g.add_argument("--subset", type=cli.nonneg_int, default=0, help="only the first N images of each split (0: all)")
    g.add_argument("--image_size", type=cli.positive_int, default=None,
                   help="eval crop size (default: the checkpoint's global crop size, else the dataset's)")
    g = p.add_argument_group("features")
    g.add_argument("--output_dir", default="features", help="where the files go: train/ and test/ sub-folders for a "
                   "dataset or class folders, the folder itself for unlabelled images")
    g.add_argument("--patch_tokens", action="store_true", help="also patch_tokens.npy (N, P, D): the last block's "
                   "normed patch tokens (a ViT only; N * P * D * 4 bytes on disk)")
    g.add_argument("--linear_features", action="store_true", help="also linear.npy (N, F): the linear probe's "
                   "feature, as eval_linear.py (a ViT only)")
    g.add_argument("--n_last_blocks", type=cli.positive_int, default=4, help="with --linear_features: the CLS "
                   "tokens of the last n blocks (official code: 4 for ViT-S, 1 for ViT-B)")
    g.add_argument("--avgpool_patchtokens", type=cli.bool_flag, default=False, help="with --linear_features: also "
                   "the average of the last block's patch tokens (official code: false for ViT-S, true for ViT-B)")
    g.add_argument("--batch_size", type=cli.positive_int, default=256, help="images per forward pass")
    g.add_argument("--num_workers", type=cli.nonneg_int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes that read the images")
    return p


def splits(datasets, args):
    """[(split, dataset, names, folder)]: what --split asks for (its first --subset images), and where it goes."""
    out = Path(args.output_dir)
    if isinstance(datasets.train, data.ImageFiles):  # a folder of unlabelled images: one split, all of them
        if args.split == "test":
            raise cli.ConfigError(f"{args.data_path} holds unlabelled images, no test split: leave out --split test "
                                  f"(all its images are written)")
        chosen = [("all", datasets.train, out)]
    else:
        found = {"train": datasets.labelled_train or datasets.train, "test": datasets.labelled_test}
        if found["test"] is None:  # class folders without val/
            if args.split == "test":
                raise cli.ConfigError(f"{args.data_path} has no val/<class>/ folders: no test split")
            if args.split == "both":
                print(f"{args.data_path} has no val/<class>/ folders: the train split only")
        chosen = [(split, found[split], out / split) for split in ("train", "test")
                  if args.split in (split, "both") and found[split] is not None]
    subsets = []
    for split, dataset, folder in chosen:
        n = min(args.subset or len(dataset), len(dataset))
        subsets.append((split, torch.utils.data.Subset(dataset, range(n)), image_names(dataset)[:n], folder))
    return subsets


def image_names(dataset):
    """One name per image: its file's path relative to the folder, or its index in a named dataset."""
    if isinstance(dataset, data.ImageFiles):
        return dataset.names()
    if isinstance(dataset, torchvision.datasets.DatasetFolder):  # class folders: relative to train/ or val/
        return [os.path.relpath(path, dataset.root) for path, _ in dataset.samples]
    return [str(i) for i in range(len(dataset))]


@torch.no_grad()
def batch_features(model, x, probe, patch_tokens):
    """{file stem: (B, ...) float32} of normalized images x (B, 3, S, S), from one pass through the backbone."""
    if not backbone.is_vit(model):
        return {"cls": model(x).float()}  # a convnet's pooled features, (B, D)
    blocks = model.get_intermediate_layers(x, probe.n_last_blocks if probe else 1)  # n x (B, 1+P, D), normed
    feats = {"cls": blocks[-1][:, 0]}  # (B, D): the same ops as model(x), the CLS token after the final norm
    if patch_tokens:
        feats["patch_tokens"] = blocks[-1][:, 1:]  # (B, P, D)
    if probe:
        feats["linear"] = probe.from_blocks(blocks)  # (B, F)
    return {name: f.float() for name, f in feats.items()}


def open_arrays(folder, feats, n):
    """One (n, ...) array per entry of a batch's `feats`, each a .npy.tmp file mapped in memory: rows go to disk."""
    return {name: open_memmap(folder / f"{name}.npy.tmp", mode="w+", shape=(n, *f.shape[1:]),
                              dtype=np.int64 if name == "labels" else np.float32) for name, f in feats.items()}


def write_split(model, probe, dataset, names, folder, size, args):
    """The features of every image of `dataset` (a Subset from splits()) into `folder`/<file>.tmp, batch by batch:
    one batch in memory. Returns {file: shape}. An unreadable image ends the run with one line naming it."""
    checkpoint.check_writable(folder)
    views = data.Transformed(dataset, data.EvalTransform(size))
    loader = torch.utils.data.DataLoader(views, args.batch_size, num_workers=args.num_workers,
                                         pin_memory=args.device.type == "cuda")
    labelled, arrays, start = not isinstance(dataset.dataset, data.ImageFiles), {}, 0
    with open(folder / "names.txt.tmp", "w") as names_file:
        try:
            for images, labels in tqdm(loader, desc=str(folder), leave=False):
                with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.device.type == "cuda"):
                    x = data.normalize(images.to(args.device, non_blocking=True))  # (B, 3, S, S)
                    feats = batch_features(model, x, probe, args.patch_tokens)
                if labelled:
                    feats["labels"] = labels
                arrays = arrays or open_arrays(folder, feats, len(dataset))  # shapes: those of the first batch
                end = start + len(images)
                for name, f in feats.items():
                    arrays[name][start:end] = f.cpu().numpy()
                names_file.write("".join(f"{image}\n" for image in names[start:end]))
                start = end
        except data.UnreadableImage:  # from a worker its message is a traceback: read the batch here for one line
            for i in range(start, min(start + args.batch_size, len(views))):
                views[i]
            raise
    for array in arrays.values():
        array.flush()
    return {f"{name}.npy": array.shape for name, array in arrays.items()} | {"names.txt": (len(names),)}


def publish(folder, shapes, settings):
    """Rename the .tmp files to their names, remove what an earlier run left that this one did not write, and
    write settings.json last: a folder with settings.json is complete."""
    (folder / "settings.json").unlink(missing_ok=True)
    for name in shapes:
        os.replace(folder / f"{name}.tmp", folder / name)
    for name in set(FILES) - set(shapes) - {"settings.json"}:
        (folder / name).unlink(missing_ok=True)
    (folder / "settings.json.tmp").write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(folder / "settings.json.tmp", folder / "settings.json")


def settings(args, split, size, shapes, probe):
    """What settings.json records: where the features come from and what they are."""
    return {"pretrained_weights": args.pretrained_weights if args.pretrained_weights == backbone.RANDOM
            else os.path.abspath(args.pretrained_weights), "checkpoint_key": args.checkpoint_key,
            "arch": args.arch, "patch_size": args.patch_size, "depth": args.depth, "image_size": size,
            "features": [name for name in shapes if name not in ("labels.npy", "names.txt")],
            "n_last_blocks": probe.n_last_blocks if probe else None,
            "avgpool_patchtokens": probe.avgpool_patchtokens if probe else None,
            "split": split, "data_path": args.data_path, "subset": args.subset, "N": shapes["cls.npy"][0],
            "D": shapes["cls.npy"][1], "shapes": shapes, "torch": torch.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    asked = [flag for flag in ("--patch_tokens", "--linear_features") if getattr(args, flag[2:])]
    model, saved = backbone.from_args(args, needs_vit=" and ".join(asked) or None)
    probe = None
    if args.linear_features:
        probe = backbone.ProbeFeatures(model, args.n_last_blocks, args.avgpool_patchtokens)
    datasets = data.build_datasets(args.data_path, args.data_root)
    size = backbone.eval_size(args.image_size, saved, datasets.image_size, args.patch_size)
    for split, dataset, names, folder in splits(datasets, args):
        shapes = write_split(model, probe, dataset, names, folder, size, args)
        publish(folder, shapes, settings(args, split, size, shapes, probe))
        print(f"{split}: {len(dataset)} images -> {folder}/ " + ", ".join(
            f"{name} {shape}" if name.endswith(".npy") else name for name, shape in shapes.items()) + ", settings.json")


if __name__ == "__main__":
    cli.run_cli(main)
