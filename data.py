"""Datasets and images: what every script reads, and the training data loader (paper Sec. 3.1 multi-crop).

- Named datasets: `fashion_mnist` (read offline from the Debian package dataset-fashion-mnist, or its four .gz
  files in --data_root, else downloaded by torchvision), `cifar10`, `cifar100`, `stl10`; or an ImageFolder.
- A folder with train/<class>/ (and val/<class>/) is labelled (the k-NN's splits); any other folder is read
  recursively as unlabelled images (`ImageFiles`, every image file under it in a stable order).
- Images are decoded with PIL to uint8 (3, H, W) tensors; an unreadable file raises `UnreadableImage`, which
  training skips (training_data.py, with a limit) and every other script reports as one line.
- The evaluation view (resize + center crop) and feature extraction shared by the evaluation scripts.

Shape letters: B images, N dataset size, D feature width, S image side.
"""
import gzip
import os
from typing import NamedTuple

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
import torchvision
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from augment import IMAGENET_MEAN, IMAGENET_STD
from cli import ConfigError, existing_path, nonneg_int, positive_int

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "stl10")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


class Datasets(NamedTuple):
    train: torch.utils.data.Dataset  # items (image, label): images for self-supervised training
    # the labelled splits every evaluation uses (k-NN bank and queries, linear probe, retrieval); None without labels
    labelled_train: torch.utils.data.Dataset
    labelled_test: torch.utils.data.Dataset
    num_classes: int
    image_size: int  # the dataset's native (or evaluation) image side


class TensorImages(torch.utils.data.Dataset):
    """uint8 images (N, H, W) with labels (N,); items are ((1, H, W) tensor, int)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][None], int(self.labels[i])


def read_idx_gz(path):
    """The MNIST idx format: a big-endian header (magic, sizes) then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def fashion_mnist(root):
    """(train, test) TensorImages of Fashion-MNIST: 60,000 and 10,000 images of 28 x 28 pixels, 10 classes."""
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    for folder in (root, os.path.join(root, "FashionMNIST", "raw"), DEBIAN_FASHION_MNIST):
        if all(os.path.exists(os.path.join(folder, n)) for n in names):
            x, y, xt, yt = (read_idx_gz(os.path.join(folder, n)) for n in names)
            return TensorImages(x, y), TensorImages(xt, yt)
    try:  # not on disk: let torchvision download it into root
        train = torchvision.datasets.FashionMNIST(root, train=True, download=True)
        test = torchvision.datasets.FashionMNIST(root, train=False, download=True)
    except Exception as e:
        raise ConfigError(f"Fashion-MNIST is not on this machine and could not be downloaded ({e}): install "
                          f"the Debian package (apt-get install dataset-fashion-mnist) or put its four .gz "
                          f"files in --data_root {root}") from None
    return TensorImages(train.data, train.targets), TensorImages(test.data, test.targets)


class UnreadableImage(ConfigError, OSError):
    """A file that cannot be decoded: an OSError (training skips it) and a ConfigError (scripts print one line)."""


def read_image(path):
    """Decode a file to a uint8 (3, H, W) RGB tensor. Gray, palette, RGBA (alpha dropped), CMYK and 16-bit
    images are converted; a file that cannot be decoded (empty, truncated, not an image) raises UnreadableImage.

    NOTE: PIL, not torchvision.io, whose decoding is deprecated since torchvision 0.29 (it warns in every run).
    """
    try:
        with PIL.Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I"):  # 16/32-bit gray: keep the top 8 bits, not a clipped value
                img = PIL.Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
            return TF.pil_to_tensor(img.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on files it cannot decode
        raise UnreadableImage(f"cannot read image {path} ({type(e).__name__}: {e})") from None


def to_rgb(image):
    """A PIL image or a uint8 tensor (C, H, W) with C = 1, 3 or 4 -> uint8 (3, H, W)."""
    image = TF.to_image(image)  # PIL or tensor -> (C, H, W)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def normalize(images):
    """uint8 images (..., 3, H, W) -> float, scaled to [0, 1] and normalized with the ImageNet mean and std."""
    return TF.normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD)


def image_folder(path):
    """torchvision's ImageFolder (path/<class>/*.jpg, labels from the class folders), images read by read_image;
    hidden files and folders skipped, as in image_files."""
    def is_image(file):  # NOTE: hidden files are skipped; torchvision's ImageFolder (the official's) takes .name.jpg
        return file.lower().endswith(IMAGE_EXTENSIONS) and not any(
            part.startswith(".") for part in os.path.relpath(file, path).split(os.sep))
    try:
        return torchvision.datasets.ImageFolder(path, loader=read_image, is_valid_file=is_image)
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"no images found in {path} ({e}): its class folders must hold images with one of the "
                          f"extensions {' '.join(IMAGE_EXTENSIONS)}") from None


def image_files(folder, recursive=True):
    """The image files in `folder` (and in its sub-folders when recursive), sorted by their path under `folder`:
    the same order on every machine and in every run, which resume and the per-sample seeding rely on. Hidden files
    and folders (a name starting with '.') and files of other extensions are not images: skipped, not counted."""
    found = []
    for parent, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [f for f in folders if not f.startswith(".")] if recursive else []
        found += [os.path.join(parent, f) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise ConfigError(f"no image files in {folder}{' or its sub-folders' if recursive else ''} (looked for "
                          f"{' '.join(IMAGE_EXTENSIONS)}, in any case)")
    return sorted(found, key=lambda path: os.path.relpath(path, folder).split(os.sep))


class ImageFiles(torch.utils.data.Dataset):
    """Every image file under a folder, without labels (a folder of photos): items (uint8 (3, H, W), -1)."""

    def __init__(self, folder):
        self.folder, self.files = folder, image_files(folder)
        first_error = None
        for path in self.files:  # one readable image is enough to start; later bad files are skipped in training
            try:
                read_image(path)
                break
            except UnreadableImage as e:
                first_error = first_error or e
        else:
            raise ConfigError(f"none of the {len(self.files)} image files in {folder} can be read (the first: "
                              f"{first_error})")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return read_image(self.files[i]), -1

    def names(self):
        """The files' paths relative to the folder, in dataset order."""
        return [os.path.relpath(path, self.folder) for path in self.files]


def build_datasets(data_path, data_root, subset=0):
    """The Datasets of a name or of a folder (with train/ and val/ for k-NN; without: training only).
    subset: keep only the first `subset` images of each split (quick trials); 0 keeps all."""
    data = _build_datasets(data_path, data_root)
    if subset:
        cut = lambda ds: ds and torch.utils.data.Subset(ds, range(min(subset, len(ds))))
        data = data._replace(train=cut(data.train), labelled_train=cut(data.labelled_train),
                             labelled_test=cut(data.labelled_test))
    return data


def _build_datasets(data_path, data_root):
    if data_path == "fashion_mnist":
        train, test = fashion_mnist(data_root)
        return Datasets(train, train, test, 10, 28)
    if data_path in DATASET_NAMES:
        try:
            if data_path == "stl10":
                get = lambda split: torchvision.datasets.STL10(data_root, split=split, download=True)
                return Datasets(get("train+unlabeled"), get("train"), get("test"), 10, 96)
            cls = torchvision.datasets.CIFAR10 if data_path == "cifar10" else torchvision.datasets.CIFAR100
            train, test = cls(data_root, train=True, download=True), cls(data_root, train=False, download=True)
        except Exception as e:
            raise ConfigError(f"could not get {data_path} into {data_root} ({e}): connect to the internet or "
                              f"place the torchvision download there") from None
        return Datasets(train, train, test, len(train.classes), 32)
    if not os.path.isdir(data_path):
        raise ConfigError(f"--data_path {data_path!r} is neither a folder nor a known dataset name "
                          f"({', '.join(DATASET_NAMES)})")
    train_dir, val_dir = os.path.join(data_path, "train"), os.path.join(data_path, "val")
    if os.path.isdir(train_dir) and any(entry.is_dir() and not entry.name.startswith(".")
                                        for entry in os.scandir(train_dir)):  # train/<class>/: labelled
        train = image_folder(train_dir)
        test = image_folder(val_dir) if os.path.isdir(val_dir) else None
        return Datasets(train, train if test else None, test, len(train.classes), 224)
    # NOTE: the official code needs class folders (ImageFolder); any other folder is read here as unlabelled images
    return Datasets(ImageFiles(data_path), None, None, 0, 224)


# --- evaluation: a deterministic view and frozen features -------------------------------------------------------
class EvalTransform:
    """Resize the short side to size * 256 / 224 and center-crop `size` (the official evaluation view); images
    already `size` pixels wide (Fashion-MNIST, CIFAR at their native size) are left as they are. uint8 (3, S, S)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        image = to_rgb(image)
        if min(image.shape[-2:]) != self.size:
            image = TF.resize(image, self.size * 256 // 224, antialias=True)
        return TF.center_crop(image, self.size).contiguous()


class Transformed(torch.utils.data.Dataset):
    """(transform(image), label) for each (image, label) of `dataset`."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image), label


@torch.no_grad()
def extract_features(model, dataset, size, device, batch_size=256, num_workers=0, desc="features"):
    """model(normalized evaluation views) for every image: (N, D) on `device`, and the labels (N,). With a
    backbone as `model`: its CLS feature after the final norm. Under torch.distributed each rank computes a
    strided shard and the shards are all-gathered."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per_rank = -(-len(dataset) // world)
    indices = [min(i, len(dataset) - 1) for i in range(rank, per_rank * world, world)]  # pad the last shard
    shard = torch.utils.data.Subset(Transformed(dataset, EvalTransform(size)), indices)
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, targets in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(model(normalize(images.to(device, non_blocking=True))).float())
        labels.append(torch.as_tensor(targets, device=device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world > 1:
        feats, labels = _gather_interleaved(feats, world), _gather_interleaved(labels, world)
    return feats[:len(dataset)], labels[:len(dataset)]


def _gather_interleaved(x, world):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.stack(parts, dim=1).flatten(0, 1)  # (per_rank, world, ...) -> dataset order


# --- images named on the command line (cosegment.py, correspond.py) --------------------------------------------
def add_image_args(parser):
    """The flags of images_from_args(): files and folders, or the test images of one class of a dataset."""
    g = parser.add_argument_group("images")
    g.add_argument("--image_path", nargs="+", type=existing_path, default=None, help="image files, or folders (every "
                   "image under them, sorted)")
    g.add_argument("--data_path", default=None, help="instead: test images of a dataset (fashion_mnist, ...) or of a "
                   "folder with train/<class>/ and val/<class>/, those of --class_index; or any other folder: its "
                   "first images")
    g.add_argument("--data_root", default="data", help="where named datasets are looked for and downloaded to")
    g.add_argument("--class_index", type=nonneg_int, default=None, help="the class of --data_path's images "
                   "(default: 0; a folder without train/<class>/ has no classes)")
    g.add_argument("--load_size", type=positive_int, default=None, help="short side the images are resized to; "
                   "default: 224, 56 for Fashion-MNIST (its 28 px twice: 8 x 8 patches of 7 px)")
    return g


def image_paths(paths):
    """Files as they are, folders as every image file under them (image_files)."""
    return [found for path in paths for found in (image_files(path) if os.path.isdir(path) else [path])]


def class_images(data_path, data_root, class_index, count):
    """(uint8 (3, H, W) images, names): the first `count` test images of class `class_index` of a dataset (of
    train/ when there is no val/); for a folder without labels, its first `count` images."""
    datasets = build_datasets(data_path, data_root)
    if isinstance(datasets.train, ImageFiles):
        if class_index is not None:
            raise ConfigError(f"{data_path} has no classes (no train/<class>/ folders): leave out --class_index")
        files = datasets.train.files[:count]
        return [read_image(f) for f in files], [os.path.splitext(n)[0].replace(os.sep, "_")
                                                for n in datasets.train.names()[:count]]
    test, class_index = datasets.labelled_test or datasets.train, class_index or 0
    targets = getattr(test, "labels", getattr(test, "targets", None))  # TensorImages, torchvision datasets
    targets = torch.as_tensor(targets if targets is not None else [int(test[i][1]) for i in range(len(test))])
    index = torch.nonzero(targets == class_index).squeeze(1)[:count].tolist()
    if not index:
        raise ConfigError(f"no test image of class {class_index} in {data_path}")
    name = os.path.basename(os.path.normpath(data_path))
    return [to_rgb(test[i][0]) for i in index], [f"{name}_class{class_index}_test{i}" for i in index]


def images_from_args(args, count):
    """(uint8 (3, H, W) images with the short side resized to --load_size, names) of the add_image_args flags:
    the files of --image_path (folders: the images under them), else `count` images of --data_path."""
    if args.image_path:
        paths = image_paths(args.image_path)
        images = [read_image(p) for p in paths]
        names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    elif args.data_path:
        images, names = class_images(args.data_path, args.data_root, args.class_index, count)
    else:
        raise ConfigError("give images: --image_path a.jpg b.jpg ..., or --data_path fashion_mnist --class_index 0")
    size = args.load_size or (56 if args.data_path == "fashion_mnist" and not args.image_path else 224)
    # NOTE: bilinear with antialiasing; the reference resizes with PIL's Lanczos.
    return [TF.resize(im, size, antialias=True) for im in images], names
