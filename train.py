"""DINO self-supervised training (paper Alg. 1 and Sec. 3): a student matches an EMA teacher across crops.

    python train.py                                   # Fashion-MNIST preset, CPU or one GPU
    torchrun --nproc_per_node=8 train.py --data_path /data/imagenet --arch vit_small --patch_size 16

Read top to bottom: args, distributed and precision, data, student and teacher, optimizer and schedules,
resume, training loop. Shape letters: B images per process, V crops, K out_dim.
"""
import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from tqdm import tqdm

import vit
from augment import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, EpochSampler, MultiCropDataset, photometric
from eval_knn import extract_features, knn_classifier
from head import DINOHead, MultiCropWrapper
from loss import DINOLoss

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist

# Each named dataset brings a preset; flags given on the command line override it.
PRESETS = {
    "fashion_mnist": dict(arch="vit_tiny", depth=4, patch_size=7, out_dim=1024, global_crop_size=28,
                          local_crop_size=14, local_crops_number=4, global_crops_scale=(0.4, 1.0),
                          local_crops_scale=(0.1, 0.4), batch_size_per_gpu=128, epochs=2, warmup_epochs=0,
                          lr=0.0005, warmup_teacher_temp=0.04, teacher_temp=0.04, momentum_teacher=0.99,
                          drop_path_rate=0.0, freeze_last_layer=0, num_workers=1, knn_every=1, saveckp_freq=0),
    "cifar10": dict(arch="vit_tiny", patch_size=4, out_dim=8192, global_crop_size=32, local_crop_size=16,
                    local_crops_number=6, local_crops_scale=(0.1, 0.4), batch_size_per_gpu=256, epochs=200,
                    knn_every=10),
    "stl10": dict(arch="vit_small", patch_size=8, out_dim=16384, global_crop_size=96, local_crop_size=48,
                  batch_size_per_gpu=128, epochs=100, knn_every=10),
}
PRESETS["cifar100"] = PRESETS["cifar10"]


class ConfigError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


def run_cli(main):
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def get_args_parser():
    p = argparse.ArgumentParser("DINO", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="dataset presets (explicit flags win): " + json.dumps(PRESETS))
    # Model architecture
    p.add_argument("--arch", default="vit_small", choices=["vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--patch_size", type=int, default=16, help="patch side in pixels; 8 is better and slower")
    p.add_argument("--depth", type=int, default=None, help="number of blocks (default: the arch's 12)")
    p.add_argument("--out_dim", type=int, default=65536, help="K, the width of the DINO head output")
    p.add_argument("--norm_last_layer", type=bool_flag, default=True,
                   help="fix the weight-norm magnitude of the head's last layer at 1 (more stable)")
    p.add_argument("--momentum_teacher", type=float, default=0.996,
                   help="base EMA momentum of the teacher, raised to 1 on a cosine schedule (Sec. 3.1)")
    p.add_argument("--use_bn_in_head", type=bool_flag, default=False)
    # Temperature teacher
    p.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="initial teacher temperature")
    p.add_argument("--teacher_temp", type=float, default=0.04, help="teacher temperature after warm-up")
    p.add_argument("--warmup_teacher_temp_epochs", type=int, default=0)
    # Optimization
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU")
    p.add_argument("--weight_decay", type=float, default=0.04, help="initial weight decay (cosine schedule)")
    p.add_argument("--weight_decay_end", type=float, default=0.4, help="final weight decay")
    p.add_argument("--clip_grad", type=float, default=3.0, help="max norm of each parameter's gradient; 0: off")
    p.add_argument("--batch_size_per_gpu", type=int, default=64, help="images per process")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--freeze_last_layer", type=int, default=1, help="epochs during which the last layer is fixed")
    p.add_argument("--lr", type=float, default=0.0005, help="peak lr for a total batch of 256 (linear scaling)")
    p.add_argument("--warmup_epochs", type=int, default=10, help="epochs of linear lr warm-up")
    p.add_argument("--min_lr", type=float, default=1e-6, help="lr at the end of the cosine schedule")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth of the student")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    # Multi-crop
    p.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0))
    p.add_argument("--local_crops_number", type=int, default=8, help="number of small local views")
    p.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4))
    p.add_argument("--global_crop_size", type=int, default=224)
    p.add_argument("--local_crop_size", type=int, default=96)
    # Data, logging, checkpoints
    p.add_argument("--data_path", default="fashion_mnist",
                   help="fashion_mnist, cifar10, cifar100, stl10, or an ImageFolder (with train/ and val/)")
    p.add_argument("--data_root", default="data", help="where named datasets are looked for / downloaded")
    p.add_argument("--output_dir", default="output")
    p.add_argument("--saveckp_freq", type=int, default=20, help="keep checkpointXXXX.pth every N epochs; 0: off")
    p.add_argument("--knn_every", type=int, default=10, help="k-NN top-1 every N epochs (and before/after); 0: off")
    p.add_argument("--log_every", type=int, default=10, help="steps between progress-bar updates")
    p.add_argument("--subset", type=int, default=0, help="use only the first N images of each split (quick trials)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=10, help="DataLoader workers per process")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p


def bool_flag(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_args(argv=None):
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS.get(known.data_path, {}))
    args = parser.parse_args(argv)
    for name in ("global_crop_size", "local_crop_size"):
        if getattr(args, name) % args.patch_size:
            raise ConfigError(f"--{name} {getattr(args, name)} is not a multiple of --patch_size "
                              f"{args.patch_size}: pick a crop size divisible by the patch size")
    return args


# --- data ------------------------------------------------------------------------------------------------
class Datasets(NamedTuple):
    train: torch.utils.data.Dataset  # items (image, label): images for self-supervised training
    knn_train: torch.utils.data.Dataset  # labelled memory bank for k-NN (None if there is no labelled split)
    knn_test: torch.utils.data.Dataset
    num_classes: int
    image_size: int  # the dataset's native (or evaluation) image side


class TensorImages(torch.utils.data.Dataset):
    """uint8 images (N, H, W) with labels; items are ((1, H, W) tensor, int)."""

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


def read_image(path):
    """Decode a file to a uint8 (3, H, W) RGB tensor with torchvision.io (fast), PIL for rarer formats."""
    try:
        return torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError:
        from PIL import Image
        with Image.open(path) as img:
            return torchvision.transforms.v2.functional.pil_to_tensor(img.convert("RGB"))


def image_folder(path):
    try:
        return torchvision.datasets.ImageFolder(path, loader=read_image)
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"no images found in {path} ({e}): --data_path must be a folder of class folders "
                          f"holding images, or a dataset name ({', '.join(PRESETS)})") from None


def build_datasets(data_path, data_root):
    if data_path == "fashion_mnist":
        train, test = fashion_mnist(data_root)
        return Datasets(train, train, test, 10, 28)
    if data_path in ("cifar10", "cifar100", "stl10"):
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
                          f"({', '.join(PRESETS)})")
    train_dir, val_dir = os.path.join(data_path, "train"), os.path.join(data_path, "val")
    if os.path.isdir(train_dir):
        train = image_folder(train_dir)
        test = image_folder(val_dir) if os.path.isdir(val_dir) else None
        return Datasets(train, train if test else None, test, len(train.classes), 224)
    train = image_folder(data_path)
    return Datasets(train, None, None, len(train.classes), 224)


# --- model and weights -----------------------------------------------------------------------------------
def build_vit(arch, patch_size, depth=None, drop_path_rate=0.0):
    if arch not in ("vit_tiny", "vit_small", "vit_base"):
        raise ConfigError(f"unknown arch {arch!r}: this code has vit_tiny, vit_small and vit_base")
    kw = {"drop_path_rate": drop_path_rate} | ({"depth": depth} if depth else {})
    return getattr(vit, arch)(patch_size=patch_size, **kw)


def load_state_dict(path):
    """What `path` holds, read with weights_only=True: a checkpoint can never run code from a pickle.

    Official training checkpoints store their `args` as an argparse.Namespace: that one class is allowed.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path} does not exist")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = " ".join(str(e).split())[:300]  # one line
        raise ConfigError(f"cannot read {path} as a safe torch checkpoint ({type(e).__name__}: {reason})") from None


def backbone_state_dict(ckpt, key="teacher"):
    """The ViT state dict in an official pretrained backbone file (a plain ViT state dict, taken as it is), an
    official training checkpoint (ckpt[key] with keys `module.backbone.*` for the DDP-wrapped student,
    `backbone.*` for the teacher) or one of ours (`backbone.*`). The head's keys (`head.*`, whether its weight
    norm is saved as weight_g / weight_v or as parametrizations.weight.original0 / 1) are left out."""
    if not isinstance(ckpt, dict):
        raise ConfigError(f"expected a state dict or a checkpoint dict, found a {type(ckpt).__name__}")
    if isinstance(ckpt.get(key), dict):
        sd = ckpt[key]
    elif all(torch.is_tensor(v) for v in ckpt.values()):
        sd = ckpt  # a plain state dict
    else:
        raise ConfigError(f"the checkpoint has no {key!r} entry (it has {', '.join(sorted(ckpt))}): "
                          f"choose another --checkpoint_key")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def load_strict(model, state_dict, what):
    """model.load_state_dict(strict=True), shapes included, or one line naming what does not fit."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        listed = lambda items: f"{len(items)}" + (f" ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})"
                                                  if items else "")
        found = ""
        if "patch_embed.proj.weight" in state_dict:  # (D, 3, p, p): say what the file holds
            width, _, patch, _ = state_dict["patch_embed.proj.weight"].shape
            depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
            found = f"; the file holds a ViT of width {width}, patch {patch}, {depth} blocks"
        raise ConfigError(f"{what} does not fit the model: missing keys {listed(missing)}, unexpected keys "
                          f"{listed(unexpected)}, wrong shapes (file vs model) {listed(wrong)}{found}; "
                          f"check --arch, --patch_size and --checkpoint_key")
    model.load_state_dict(state_dict)


def load_backbone(path, arch=None, patch_size=None, key="teacher"):
    """(ViT with the weights of `path`, the training args saved with them as a dict, {} for a backbone file).

    `path` is one of our checkpoints, an official training checkpoint or an official pretrained backbone file;
    arch, patch_size and depth default to the checkpoint's args, else the official vit_small with patch 16.
    """
    ckpt = load_state_dict(path)
    saved = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)  # official: a Namespace
    model = build_vit(arch or saved.get("arch", "vit_small"), patch_size or saved.get("patch_size", 16),
                      saved.get("depth"))
    load_strict(model, backbone_state_dict(ckpt, key), f"{path} ({key})")
    return model, saved


# --- schedules, optimizer steps, EMA ---------------------------------------------------------------------
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """One value per iteration: linear warm-up, then final + (base - final) * (1 + cos(pi * t / T)) / 2."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    t = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate((warmup, cosine))


def param_groups(model):
    """No weight decay on biases and norm weights (all 1-d parameters), as the official code."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(model, clip):
    """Scale each parameter's gradient to norm <= clip separately (the official per-parameter clipping)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))  # one norm per parameter
    torch._foreach_mul_(grads, (clip / (norms + 1e-6)).clamp(max=1.0).unbind())


@torch.no_grad()
def ema_update(teacher, student, m):
    """theta_t <- m theta_t + (1 - m) theta_s over all parameters in two foreach calls (paper Eq. 2)."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, s_params, alpha=1 - m)


def to_device_views(crops, params, device, mean, std):
    """uint8 crops from the workers -> normalized float crops, photometric ops batched per resolution."""
    views, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape == crops[start].shape:
            end += 1
        x = torch.cat([c.to(device, non_blocking=True) for c in crops[start:end]])  # (B * n, 3, S, S)
        p = params[:, start:end].transpose(0, 1).flatten(0, 1).to(device, non_blocking=True)  # (B * n, P)
        views += list(photometric(x, p, mean, std).chunk(end - start))
        start = end
    return views


# --- checkpoints -----------------------------------------------------------------------------------------
def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint at `path`."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_resumable(ckpt, args):
    keys = ("arch", "patch_size", "depth", "out_dim", "use_bn_in_head", "local_crops_number")
    saved = ckpt.get("args", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(args, k)!r}" for k in keys
            if k in saved and saved[k] != getattr(args, k)]
    if diff:
        raise ConfigError(f"{args.output_dir}/checkpoint.pth was trained with other settings ({'; '.join(diff)}): "
                          f"use another --output_dir or the same flags")


# --- k-NN and collapse diagnostics -----------------------------------------------------------------------
def knn_top1(backbone, data, args, device):
    was_training = backbone.training
    backbone.eval()
    bank = extract_features(backbone, data.knn_train, args.global_crop_size, device, desc="k-NN train")
    test = extract_features(backbone, data.knn_test, args.global_crop_size, device, desc="k-NN test")
    backbone.train(was_training)
    return knn_classifier(*bank, *test, k=20, T=0.07, num_classes=data.num_classes)[0]


def collapse_warning(stats, out_dim):
    """Paper Sec. 5.3: collapse shows as a loss stuck at ln K (uniform) or a teacher entropy of 0 (one-hot)."""
    if stats["teacher_entropy"] < 0.05:
        return "teacher output entropy is ~0: collapse to one dimension (lower teacher_temp warm-up, check centering)"
    if abs(stats["train_loss"] - math.log(out_dim)) < 0.01 * math.log(out_dim) and stats["kl_teacher_student"] < 0.01:
        return f"loss sits at ln(out_dim) = {math.log(out_dim):.2f}: uniform collapse (lower the teacher temperature)"
    return None


# --- the training script ---------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)

    # --- distributed and precision
    distributed = "RANK" in os.environ
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main_process = rank == 0
    if args.precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        args.precision = "bf16" if bf16_ok else "fp16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(args.seed + rank)  # init is overwritten by the broadcast below; drop path differs per rank
    out = Path(args.output_dir)
    if main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write_test").touch()
            (out / ".write_test").unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to --output_dir {out} ({e}): choose a writable folder") from None

    # --- data
    data = build_datasets(args.data_path, args.data_root)
    if args.subset:
        cut = lambda ds: ds and torch.utils.data.Subset(ds, range(min(args.subset, len(ds))))
        data = data._replace(train=cut(data.train), knn_train=cut(data.knn_train), knn_test=cut(data.knn_test))
    if len(data.train) < args.batch_size_per_gpu * world_size:
        raise ConfigError(f"{len(data.train)} images are fewer than one batch of "
                          f"{args.batch_size_per_gpu * world_size}: lower --batch_size_per_gpu")
    transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                     args.global_crop_size, args.local_crop_size)
    sampler = EpochSampler(torch.utils.data.DistributedSampler(
        data.train, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed))
    loader = torch.utils.data.DataLoader(
        MultiCropDataset(data.train, transform, args.seed), sampler=sampler, batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0, prefetch_factor=4 if args.num_workers > 0 else None)
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    # --- student and teacher: same architecture, the teacher without drop path and without gradients
    student = MultiCropWrapper(build_vit(args.arch, args.patch_size, args.depth, args.drop_path_rate),
                               DINOHead(vit_width(args.arch), args.out_dim, args.use_bn_in_head, args.norm_last_layer))
    teacher = MultiCropWrapper(build_vit(args.arch, args.patch_size, args.depth),
                               DINOHead(vit_width(args.arch), args.out_dim, args.use_bn_in_head))
    student, teacher = student.to(device), teacher.to(device)
    if distributed and args.use_bn_in_head:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student_ddp = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                      else None) if distributed else student  # broadcasts rank 0
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if args.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs).to(device)

    # --- optimizer and schedules (per iteration)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = (torch.optim.AdamW(param_groups(student), **fused) if args.optimizer == "adamw"
                 else torch.optim.SGD(param_groups(student), lr=0, momentum=0.9))
    niter = len(loader)
    lr_schedule = cosine_scheduler(args.lr * args.batch_size_per_gpu * world_size / 256, args.min_lr,
                                   args.epochs, niter, args.warmup_epochs)
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter)
    momentum_schedule = cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter)

    # --- resume
    start_epoch = 0
    if (out / "checkpoint.pth").exists():
        ckpt = load_state_dict(out / "checkpoint.pth")
        check_resumable(ckpt, args)
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        dino_loss.load_state_dict(ckpt["dino_loss"])
        torch.set_rng_state(ckpt["rng_cpu"][rank] if rank < len(ckpt["rng_cpu"]) else ckpt["rng_cpu"][0])
        start_epoch = ckpt["epoch"]
        if main_process:
            print(f"resumed from {out / 'checkpoint.pth'} at epoch {start_epoch}")

    # --- training loop
    run = dict(args=args, device=device, autocast=autocast, scaler=scaler, mean=mean, std=std, main=main_process)
    knn = lambda: knn_top1(teacher.backbone, data, args, device) if data.knn_test is not None else None
    if args.knn_every and start_epoch == 0 and data.knn_test is not None:
        top1 = knn()
        if main_process:
            print(f"k-NN top-1 before training: {top1:.2f}%")
            log(out, {"epoch": -1, "knn_top1": top1})
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        t0 = time.time()
        stats = train_one_epoch(student_ddp, teacher, dino_loss, loader, optimizer, epoch,
                                (lr_schedule, wd_schedule, momentum_schedule), run)
        last = epoch == args.epochs - 1
        if args.knn_every and data.knn_test is not None and ((epoch + 1) % args.knn_every == 0 or last):
            stats["knn_top1"] = knn()
        rng_cpu = [torch.get_rng_state()]
        if distributed:
            rng_cpu = [torch.empty_like(rng_cpu[0]) for _ in range(world_size)]
            dist.all_gather(rng_cpu, torch.get_rng_state())
        if main_process:
            ckpt = {"student": student.state_dict(), "teacher": teacher.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "dino_loss": dino_loss.state_dict(), "epoch": epoch + 1, "args": vars(args),
                    "rng_cpu": rng_cpu}
            save_atomic(ckpt, out / "checkpoint.pth")
            if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                save_atomic(ckpt, out / f"checkpoint{epoch:04}.pth")
            stats.update(epoch=epoch, epoch_time_s=round(time.time() - t0, 1))
            log(out, stats)
            knn_msg = f", k-NN top-1 {stats['knn_top1']:.2f}%" if "knn_top1" in stats else ""
            print(f"epoch {epoch}: loss {stats['train_loss']:.4f}{knn_msg}, {stats['epoch_time_s']} s")
            if warning := collapse_warning(stats, args.out_dim):
                print(f"WARNING: {warning}")
    if distributed:
        dist.destroy_process_group()


def vit_width(arch):
    return {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}[arch]


def log(out, stats):
    with open(out / "log.txt", "a") as f:
        f.write(json.dumps(stats) + "\n")


def train_one_epoch(student, teacher, dino_loss, loader, optimizer, epoch, schedules, run):
    args, device, main_process = run["args"], run["device"], run["main"]
    lr_schedule, wd_schedule, momentum_schedule = schedules
    niter = len(loader)
    sums = torch.zeros(3, device=device)  # loss, teacher entropy, non-finite count: summed without host syncs
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", disable=not main_process, dynamic_ncols=True)
    t0, seen = time.time(), 0
    for it, (crops, params, _) in enumerate(bar):
        step = epoch * niter + it
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = float(lr_schedule[step])
            if i == 0:  # only the regularized group
                group["weight_decay"] = float(wd_schedule[step])
        views = to_device_views(crops, params, device, run["mean"], run["std"])  # V x (B, 3, S, S)
        with run["autocast"]:
            teacher_output = teacher(views[:2])  # (2B, K): the teacher sees only the global crops
            student_output = student(views)  # (VB, K)
            loss = dino_loss(student_output, teacher_output, epoch)
        optimizer.zero_grad(set_to_none=True)
        run["scaler"].scale(loss).backward()
        if args.clip_grad:
            run["scaler"].unscale_(optimizer)
            clip_gradients(student, args.clip_grad)
        if epoch < args.freeze_last_layer:  # the last layer is fixed in the first epochs (official)
            for name, p in student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        run["scaler"].step(optimizer)
        run["scaler"].update()
        ema_update(teacher, unwrap(student), momentum_schedule[step])

        sums += torch.stack([loss.detach(), dino_loss.teacher_entropy, (~torch.isfinite(loss)).float()])
        seen += len(crops[0]) * (dist.get_world_size() if dist.is_initialized() else 1)
        if (it + 1) % args.log_every == 0 or it == niter - 1:
            loss_sum, _, bad = sums.tolist()  # one host sync per log_every steps
            if bad:
                raise SystemExit(f"loss is {loss.item()} at epoch {epoch}, step {it}: stopping; the last good "
                                 f"checkpoint is left as it was")
            bar.set_postfix(loss=f"{loss_sum / (it + 1):.4f}", lr=f"{lr_schedule[step]:.2e}",
                            img_s=f"{seen / (time.time() - t0):.0f}")
    loss_avg, entropy_avg, _ = (sums / niter).tolist()
    if dist.is_initialized():  # the same figures on every rank
        both = torch.tensor([loss_avg, entropy_avg], device=device)
        dist.all_reduce(both)
        loss_avg, entropy_avg = (both / dist.get_world_size()).tolist()
    return {"train_loss": loss_avg, "train_lr": float(lr_schedule[step]), "train_wd": float(wd_schedule[step]),
            "teacher_entropy": entropy_avg, "kl_teacher_student": loss_avg - entropy_avg,
            "images_per_s": round(seen / (time.time() - t0), 1)}


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


if __name__ == "__main__":
    run_cli(main)
