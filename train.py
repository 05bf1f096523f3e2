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
import signal
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
    # NOTE: tuned so that `python train.py` on a 2-core CPU takes ~12 minutes (1 epoch) and improves k-NN:
    # a sharper teacher (0.02) than the paper's 0.04, which left the targets near uniform in such short runs,
    # a faster teacher (momentum 0.99), blur sigma scaled down for 28 px images, and batch 32 (lr 0.004 per 256,
    # i.e. 5e-4 per step): twice the steps of batch 64 for the same compute. See README "Tuning".
    "fashion_mnist": dict(arch="vit_tiny", depth=4, patch_size=7, out_dim=1024, global_crop_size=28,
                          local_crop_size=14, local_crops_number=4, global_crops_scale=(0.4, 1.0),
                          local_crops_scale=(0.1, 0.4), blur_sigma=(0.1, 0.5), batch_size_per_gpu=32, epochs=1,
                          warmup_epochs=0.15, lr=0.004, warmup_teacher_temp=0.02, teacher_temp=0.02,
                          momentum_teacher=0.99, drop_path_rate=0.0, freeze_last_layer=0, num_workers=1,
                          knn_every=1, saveckp_freq=0),
    "cifar10": dict(arch="vit_tiny", patch_size=4, out_dim=8192, global_crop_size=32, local_crop_size=16,
                    local_crops_number=6, local_crops_scale=(0.1, 0.4), batch_size_per_gpu=256, epochs=200,
                    knn_every=10),
    "stl10": dict(arch="vit_small", patch_size=8, out_dim=16384, global_crop_size=96, local_crop_size=48,
                  batch_size_per_gpu=128, epochs=100, knn_every=10),
}
PRESETS["cifar100"] = PRESETS["cifar10"]


class ConfigError(Exception):
    """A problem with the user's input or environment (flags, files, disk): reported as one line, exit code 2."""


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
    p.add_argument("--warmup_epochs", type=float, default=10, help="epochs of linear lr warm-up (may be a fraction)")
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
    p.add_argument("--blur_sigma", type=float, nargs=2, default=(0.1, 2.0),
                   help="range of the Gaussian blur's sigma in pixels (BYOL's for 224 px crops)")
    # Data, logging, checkpoints
    p.add_argument("--data_path", default="fashion_mnist",
                   help="fashion_mnist, cifar10, cifar100, stl10, or an ImageFolder (with train/ and val/)")
    p.add_argument("--data_root", default="data", help="where named datasets are looked for / downloaded")
    p.add_argument("--output_dir", default="output")
    p.add_argument("--saveckp_freq", type=int, default=20, help="keep checkpointXXXX.pth every N epochs; 0: off")
    p.add_argument("--saveckp_steps", type=int, default=0,
                   help="also write checkpoint.pth every N optimizer steps (resumed inside the epoch); 0: off")
    p.add_argument("--max_bad_fraction", type=float, default=0.01,
                   help="unreadable images are skipped with a warning; stop when more than this fraction of an "
                        "epoch's images are")
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
    """Decode a file to a uint8 (3, H, W) RGB tensor with torchvision.io (fast), PIL for rarer formats.
    Gray, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted; a file that neither can decode
    (empty, truncated, corrupt, not an image) raises OSError naming it."""
    try:
        image = torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
    except (RuntimeError, ValueError, AttributeError):  # AttributeError: a torchvision without io decoding
        from PIL import Image
        try:
            with Image.open(path) as img:
                image = torchvision.transforms.v2.functional.pil_to_tensor(img.convert("RGB"))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on files it cannot decode
            raise OSError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
    return torchvision.transforms.v2.functional.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNG: uint16


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


def build_loader(dataset, args, rank, world_size, device):
    """Batches (crops, params, labels, errors) of this process: each sample's crops and photometric draws depend
    only on (seed, epoch, index) (MultiCropDataset), never on the rank, the batch or the worker that makes them.
    `sampler.set_epoch(epoch, start)` chooses the epoch and how many of its samples to skip (a resumed epoch)."""
    if len(dataset) < args.batch_size_per_gpu * world_size:
        raise ConfigError(f"{len(dataset)} images are fewer than one batch of "
                          f"{args.batch_size_per_gpu * world_size}: lower --batch_size_per_gpu")
    transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                     args.global_crop_size, args.local_crop_size, args.blur_sigma)
    # One permutation per epoch (seed + epoch), rank r takes perm[r::world_size]: batch k of all ranks together is
    # perm[k B W : (k + 1) B W], batch k of one process with batch B W: the same samples for any world size W.
    sampler = EpochSampler(torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True,
                                                               seed=args.seed))
    # NOTE: its own generator keeps the DataLoader from drawing the workers' base seed from the global RNG at each
    # epoch (drop path draws from it): a resumed run then draws the same drop path masks as a straight one.
    loader = torch.utils.data.DataLoader(
        MultiCropDataset(dataset, transform, args.seed, skip_unreadable=True), sampler=sampler,
        batch_size=args.batch_size_per_gpu, num_workers=args.num_workers, pin_memory=device.type == "cuda",
        drop_last=True, persistent_workers=args.num_workers > 0, prefetch_factor=4 if args.num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals, generator=torch.Generator())
    return loader, sampler


def ignore_stop_signals(worker_id):
    """Workers leave SIGINT (Ctrl-C reaches the whole process group) and SIGTERM to the main process, which stops
    after a step (StopFlag); a worker that died of them would make the DataLoader fail instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
        found = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes (file vs model)": wrong}
        problems = [f"{label} {len(items)} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})"
                    for label, items in found.items() if items]
        if "patch_embed.proj.weight" in state_dict:  # (D, 3, p, p): say what the file holds
            width, _, patch, _ = state_dict["patch_embed.proj.weight"].shape
            depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
            problems.append(f"the file holds a ViT of width {width}, patch {patch}, {depth} blocks")
        raise ConfigError(f"{what} does not fit the model: {'; '.join(problems)}; check --arch, --patch_size "
                          f"and --checkpoint_key")
    model.load_state_dict(state_dict)


def load_backbone(path, arch=None, patch_size=None, key="teacher"):
    """(ViT with the weights of `path`, the training args saved with them as a dict, {} for a backbone file).

    `path` is one of our checkpoints, an official training checkpoint or an official pretrained backbone file;
    arch, patch_size and depth default to the checkpoint's args, else the official vit_small with patch 16.
    """
    ckpt = load_state_dict(path)
    state_dict = backbone_state_dict(ckpt, key)
    saved = ckpt.get("args", {})
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)  # official: a Namespace
    model = build_vit(arch or saved.get("arch", "vit_small"), patch_size or saved.get("patch_size", 16),
                      saved.get("depth"))
    load_strict(model, state_dict, f"{path} ({key})" if isinstance(ckpt.get(key), dict) else str(path))
    return model, saved


# --- schedules, optimizer steps, EMA ---------------------------------------------------------------------
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """One value per iteration: linear warm-up, then final + (base - final) * (1 + cos(pi * t / T)) / 2."""
    warmup_iters = int(warmup_epochs * niter_per_ep)  # NOTE: a fraction of an epoch is allowed (short runs)
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


# --- distributed and stopping ---------------------------------------------------------------------------
def setup_distributed(args):
    """(device, rank, world_size, cpu_group). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; without them: one
    process, no process group. cpu_group: a gloo group for small CPU messages that must not wait for the GPU."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return device, 0, 1, None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size(), dist.new_group(backend="gloo")


def gather(obj, group):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] for one process."""
    if group is None:
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj, group=group)
    return objs


class StopFlag:
    """`with StopFlag(group) as stop:` turns SIGTERM and SIGINT (a cluster's preemption notice, Ctrl-C) into a
    request to stop after the current step with a checkpoint; a second signal acts as usual (stops at once).

    Under torchrun every rank must stop after the same step (the others would wait forever in the next
    all-reduce), so the ranks agree with all_reduce(MAX) of their flags. It runs over the gloo group on a CPU
    tensor, started when a step begins and waited for when it ends: it never waits for the GPU, and its latency
    hides behind the step. So under torchrun a signal that arrives during step k stops the run after step k + 1.
    """
    def __init__(self, group=None):
        self.group, self.signal, self.stopped = group, None, False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc_info):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):  # runs between two bytecodes of the main thread: no printing here
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def begin_step(self):
        if self.group is not None:
            self.flag = torch.tensor([float(self.signal is not None)])
            self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def end_step(self):
        """True when the run stops after this step: the same answer on every rank."""
        if self.group is None:
            self.stopped = self.signal is not None
        else:
            self.work.wait()
            self.stopped = bool(self.flag.item())
        return self.stopped


# --- checkpoints -----------------------------------------------------------------------------------------
def save_atomic(obj, path):
    """Write `path`.tmp, push it to the disk, then rename it to `path`: a process killed at any moment leaves at
    `path` the previous file or the new one, whole. A failed write (disk full) removes the .tmp: ConfigError."""
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the rename makes them the checkpoint
        os.replace(tmp, path)
        folder = os.open(Path(path).parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # and the rename itself
        finally:
            os.close(folder)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"could not write the checkpoint {path} ({e}); the previous one, if any, is intact: "
                          f"free disk space or choose another --output_dir, then run the same command") from None


def rng_state(device):
    """The random generators that training draws from (drop path): the CPU's, and the GPU's of this process."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def checkpoint_dict(state, args, epoch, iteration, totals, device, group):
    """What a resumed run needs to continue bit for bit: the state dicts of `state` (models, optimizer, scaler,
    center), where to continue (epoch, step `iteration` of it) and, per rank, the RNG states and the running
    totals of the epoch. `args` is a plain dict: the file loads with weights_only=True. Called by every rank."""
    totals = totals and {"sums": totals["sums"].cpu(), "skipped": totals["skipped"]}
    return {**{name: obj.state_dict() for name, obj in state.items()}, "epoch": epoch, "iteration": iteration,
            "args": vars(args), "world_size": dist.get_world_size() if group else 1,
            "per_rank": gather({"rng": rng_state(device), "totals": totals}, group)}


def resume(path, state, args, rank, world_size, device):
    """Load `path` into `state` and this rank's RNGs: (epoch, iteration, totals) where training continues."""
    if not path.exists():
        return 0, 0, None
    ckpt = load_state_dict(path)
    check_resumable(ckpt, args, world_size)
    for name, obj in state.items():
        obj.load_state_dict(ckpt[name])
    epoch, iteration, per_rank = ckpt["epoch"], ckpt.get("iteration", 0), ckpt.get("per_rank", [])
    if rank >= len(per_rank):  # more processes than saved: the new ones keep their seed
        return epoch, iteration, None
    mine = per_rank[rank]
    torch.set_rng_state(mine["rng"]["cpu"])
    if device.type == "cuda" and mine["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(mine["rng"]["cuda"], device)
    totals = mine["totals"] and {"sums": mine["totals"]["sums"].to(device), "skipped": mine["totals"]["skipped"]}
    return epoch, iteration, totals


def check_resumable(ckpt, args, world_size):
    """ConfigError listing every difference that forbids resuming: the model, the head, the crops and, inside an
    epoch, the batch per process and the number of processes (the steps already done are counted in batches)."""
    saved = dict(ckpt.get("args", {}), world_size=ckpt.get("world_size", 1))
    now = dict(vars(args), world_size=world_size)
    keys = ["arch", "patch_size", "depth", "out_dim", "use_bn_in_head", "local_crops_number"]
    keys += ["batch_size_per_gpu", "world_size"] if ckpt.get("iteration") else []
    diff = [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in keys if k in saved and saved[k] != now[k]]
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
    device, rank, world_size, cpu_group = setup_distributed(args)
    main_process = rank == 0
    autocast, scaler = setup_precision(args, device)
    torch.manual_seed(args.seed + rank)  # init is overwritten by the broadcast below; drop path differs per rank
    out = Path(args.output_dir)
    if main_process:
        check_writable(out)

    # --- data
    data = build_datasets(args.data_path, args.data_root)
    if args.subset:
        cut = lambda ds: ds and torch.utils.data.Subset(ds, range(min(args.subset, len(ds))))
        data = data._replace(train=cut(data.train), knn_train=cut(data.knn_train), knn_test=cut(data.knn_test))
    loader, sampler = build_loader(data.train, args, rank, world_size, device)

    # --- student and teacher: same architecture, the teacher without drop path and without gradients
    student, teacher, student_ddp = build_student_teacher(args, device, distributed=cpu_group is not None)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs).to(device)

    # --- optimizer and schedules (per iteration)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = (torch.optim.AdamW(param_groups(student), **fused) if args.optimizer == "adamw"
                 else torch.optim.SGD(param_groups(student), lr=0, momentum=0.9))
    niter = len(loader)
    schedules = (cosine_scheduler(args.lr * args.batch_size_per_gpu * world_size / 256, args.min_lr, args.epochs,
                                  niter, args.warmup_epochs),
                 cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter),
                 cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter))

    # --- resume: at an epoch's end, or inside an epoch (its first `start_it` steps done, their sums in `totals`)
    state = dict(student=student, teacher=teacher, optimizer=optimizer, scaler=scaler, dino_loss=dino_loss)
    start_epoch, start_it, totals = resume(out / "checkpoint.pth", state, args, rank, world_size, device)
    if main_process and (start_epoch or start_it):
        print(f"resumed from {out / 'checkpoint.pth'} at epoch {start_epoch}, step {start_it}")
        trim_log(out, start_epoch)

    def save(epoch, iteration, totals, keep=False):  # every rank calls it (RNG states are gathered); rank 0 writes
        ckpt = checkpoint_dict(state, args, epoch, iteration, totals, device, cpu_group)
        if main_process:
            save_atomic(ckpt, out / "checkpoint.pth")
            if keep:  # as the official code: checkpoint0019.pth after the 20th epoch
                save_atomic(ckpt, out / f"checkpoint{epoch - 1:04}.pth")

    # --- training loop
    run = dict(args=args, device=device, autocast=autocast, scaler=scaler, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               main=main_process)
    knn = lambda: knn_top1(teacher.backbone, data, args, device)
    if args.knn_every and start_epoch == start_it == 0 and data.knn_test is not None:
        top1 = knn()
        if main_process:
            print(f"k-NN top-1 before training: {top1:.2f}%")
            log(out, {"epoch": -1, "knn_top1": top1})
    with StopFlag(cpu_group) as stop:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch, start=start_it * args.batch_size_per_gpu)
            t0 = time.time()
            stats = train_one_epoch(student_ddp, teacher, dino_loss, loader, optimizer, epoch, schedules, run,
                                    start_it, totals, stop, save=lambda it, totals: save(epoch, it, totals))
            start_it, totals = 0, None
            if "stopped_at" in stats:  # by SIGTERM / SIGINT, after a checkpoint at that step
                stop_message(stop, out, epoch, stats["stopped_at"], main_process)
                break
            last = epoch == args.epochs - 1
            if args.knn_every and data.knn_test is not None and ((epoch + 1) % args.knn_every == 0 or last):
                stats["knn_top1"] = knn()
            if main_process:  # the log row, then the checkpoint: a run killed in between drops the row on resume
                report_epoch(out, dict(stats, epoch=epoch, epoch_time_s=round(time.time() - t0, 1)), args.out_dim)
            save(epoch + 1, 0, None, keep=args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0)
            if stop.stopped and not last:
                stop_message(stop, out, epoch + 1, 0, main_process)
                break
    if cpu_group is not None:
        dist.destroy_process_group()


def setup_precision(args, device):
    """(autocast, GradScaler): one code path for fp32, bf16 and fp16 (the scaler does nothing but for fp16)."""
    if args.precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        args.precision = "bf16" if bf16_ok else "fp16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def check_writable(out):
    """Fail before training, not at the first checkpoint, when --output_dir cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").touch()
        (out / ".write_test").unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to --output_dir {out} ({e}): choose a writable folder") from None


def build_student_teacher(args, device, distributed):
    """(student, teacher, the student wrapped in DDP when distributed): the teacher starts as the student."""
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
    return student, teacher, student_ddp


def vit_width(arch):
    return {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}[arch]


def log(out, stats):
    with open(out / "log.txt", "a") as f:
        f.write(json.dumps(stats) + "\n")


def report_epoch(out, stats, out_dim):
    log(out, stats)
    knn_msg = f", k-NN top-1 {stats['knn_top1']:.2f}%" if "knn_top1" in stats else ""
    print(f"epoch {stats['epoch']}: loss {stats['train_loss']:.4f}{knn_msg}, {stats['epoch_time_s']} s")
    if warning := collapse_warning(stats, out_dim):
        print(f"WARNING: {warning}")


def trim_log(out, start_epoch):
    """Keep the rows of the epochs before start_epoch only: those after it (logged by a run killed before their
    checkpoint) are trained again; a row cut by a kill goes too."""
    rows = (out / "log.txt").read_text().splitlines() if (out / "log.txt").exists() else []
    kept = [row for row in rows if row.endswith("}") and json.loads(row)["epoch"] < start_epoch]
    if kept != rows:
        (out / "log.txt.tmp").write_text("".join(row + "\n" for row in kept))
        os.replace(out / "log.txt.tmp", out / "log.txt")


def stop_message(stop, out, epoch, iteration, main_process):
    if main_process:
        print(f"stopped by {stop.signal or 'a signal to another process'}: {out / 'checkpoint.pth'} continues at "
              f"epoch {epoch}, step {iteration}; to resume, run the same command again", flush=True)


def train_one_epoch(student, teacher, dino_loss, loader, optimizer, epoch, schedules, run, start_it=0, totals=None,
                    stop=None, save=None):
    """Steps start_it, start_it + 1, ... of an epoch, one per batch of `loader`: the epoch's stats, or
    {"stopped_at": step} when `stop` (a StopFlag) ends it early. totals: the epoch's running sums so far (a
    resumed epoch). save(step, totals) writes a checkpoint every --saveckp_steps steps and before an early stop."""
    args, device, main_process = run["args"], run["device"], run["main"]
    niter = start_it + len(loader)  # steps in a whole epoch
    # loss, teacher entropy, non-finite count summed on the device without host syncs; unreadable images counted
    totals = totals or {"sums": torch.zeros(3, device=device), "skipped": 0}
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", initial=start_it, total=niter, disable=not main_process,
               dynamic_ncols=True)
    t0, seen = time.time(), 0
    for it, (crops, params, _, *unreadable) in enumerate(bar, start=start_it):
        step = epoch * niter + it  # index into the per-iteration schedules
        if stop:
            stop.begin_step()
        loss = train_step(student, teacher, dino_loss, crops, params, optimizer, epoch, step, schedules, run)
        if unreadable:  # the messages of the unreadable images replaced in this batch (MultiCropDataset)
            count_unreadable(unreadable[0], totals, niter * len(crops[0]), run)
        totals["sums"] += torch.stack([loss.detach(), dino_loss.teacher_entropy, (~torch.isfinite(loss)).float()])
        seen += len(crops[0]) * (dist.get_world_size() if dist.is_initialized() else 1)
        if (it + 1) % args.log_every == 0 or it == niter - 1:
            loss_sum, _, bad = totals["sums"].tolist()  # one host sync per log_every steps
            if bad:
                raise SystemExit(f"loss is {loss.item()} at epoch {epoch}, step {it}: stopping; the last good "
                                 f"checkpoint is left as it was")
            bar.set_postfix(loss=f"{loss_sum / (it + 1):.4f}", lr=f"{schedules[0][step]:.2e}",
                            img_s=f"{seen / (time.time() - t0):.0f}")
        # NOTE: the official code writes checkpoints only at the end of an epoch and does not catch signals.
        stopping = stop is not None and stop.end_step()
        if save and it + 1 < niter and (stopping or args.saveckp_steps and (step + 1) % args.saveckp_steps == 0):
            if totals["sums"][2].item():  # never save weights after a non-finite loss
                raise SystemExit(f"non-finite loss in epoch {epoch}: stopping; the last good checkpoint is kept")
            save(it + 1, totals)  # the end of an epoch has its own checkpoint
        if stopping and it + 1 < niter:
            return {"stopped_at": it + 1}
    return epoch_stats(totals, niter, schedules, step, seen / (time.time() - t0), device)


def train_step(student, teacher, dino_loss, crops, params, optimizer, epoch, step, schedules, run):
    """One optimizer step of Alg. 1 on a batch (schedules, forward, loss, backward, clip, step, EMA): the loss."""
    args, scaler = run["args"], run["scaler"]
    lr_schedule, wd_schedule, momentum_schedule = schedules
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(lr_schedule[step])
        if i == 0:  # only the regularized group
            group["weight_decay"] = float(wd_schedule[step])
    views = to_device_views(crops, params, run["device"], run["mean"], run["std"])  # V x (B, 3, S, S)
    with run["autocast"]:
        teacher_output = teacher(views[:2])  # (2B, K): the teacher sees only the global crops
        student_output = student(views)  # (VB, K)
        loss = dino_loss(student_output, teacher_output, epoch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.clip_grad:
        scaler.unscale_(optimizer)
        clip_gradients(student, args.clip_grad)
    if epoch < args.freeze_last_layer:  # the last layer is fixed in the first epochs (official)
        for name, p in student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    scaler.step(optimizer)
    scaler.update()
    ema_update(teacher, unwrap(student), momentum_schedule[step])
    return loss


def count_unreadable(messages, totals, epoch_images, run):
    """Warn once per file about unreadable images (each replaced by the next readable one); ConfigError when more
    than --max_bad_fraction of this process's images of the epoch are unreadable."""
    args, warned = run["args"], run.setdefault("warned", set())
    for message in filter(None, messages):
        totals["skipped"] += 1
        if message not in warned:
            warned.add(message)
            tqdm.write(f"WARNING: skipped an unreadable image (replaced by the next one): {message}", file=sys.stderr)
    if totals["skipped"] > args.max_bad_fraction * epoch_images:
        raise ConfigError(f"{totals['skipped']} unreadable images so far in this epoch, more than --max_bad_fraction "
                          f"{args.max_bad_fraction} of its {epoch_images} images (per process): repair or remove "
                          f"the files named in the warnings, or raise --max_bad_fraction")


def epoch_stats(totals, niter, schedules, step, images_per_s, device):
    """The log.txt figures of an epoch, the same on every rank: mean loss and entropy, total unreadable images."""
    loss_avg, entropy_avg, _ = (totals["sums"] / niter).tolist()
    skipped = totals["skipped"]
    if dist.is_initialized():
        figures = torch.tensor([loss_avg, entropy_avg, skipped], device=device)
        dist.all_reduce(figures)
        loss_avg, entropy_avg = (figures[:2] / dist.get_world_size()).tolist()
        skipped = int(figures[2])
    return {"train_loss": loss_avg, "train_lr": float(schedules[0][step]), "train_wd": float(schedules[1][step]),
            "teacher_entropy": entropy_avg, "kl_teacher_student": loss_avg - entropy_avg,
            "skipped_images": skipped, "images_per_s": round(images_per_s, 1)}


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


if __name__ == "__main__":
    run_cli(main)
