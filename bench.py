"""Throughput of DINO training: the training step alone, the multi-crop data pipeline alone,
and the whole training loop, printed as a markdown table (what, images/s, peak memory, conditions).

One image is 2 global + N local crops. Each figure is the median of --repeats timed windows after warm-up, with
the device synchronized before every clock reading. The step is train.train_step itself, the loop is
train.main itself; the models, loss and optimizer are built exactly as train.main builds them.

    python bench.py                    # GPU: ViT-S/16, 2x224 + 10x96, out_dim 65536, batch 64, bf16
    python bench.py --compile both --batch_size 128 --num_workers 16 --official_reference
    python bench.py --device cpu --arch vit_tiny --depth 1 --patch_size 8 --global_crop_size 32 \
        --local_crop_size 16 --batch_size 8 --out_dim 256 --num_images 20 --unique_jpegs 20 --num_workers 1
"""
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import cli
import data
import draw
import train
from augment import DataAugmentationDINO, photometric_views
from training_data import EpochSampler, MultiCropDataset

# The official code (facebookresearch/dino) measured on one H100 with 16 CPU cores, torch 2.11:
# (what, images/s, peak memory, conditions).
OFFICIAL = [
    ("official: step", 401, "12.1 GiB", "ViT-S/16, 2x224 + 10x96, out_dim 65536, batch 64, fp16, random crops"),
    ("official: step", 610, "23.2 GiB", "ViT-S/16, 2x224 + 10x96, out_dim 65536, batch 128, fp16, random crops"),
    ("official: pipeline", 168, "-", "PIL multi-crop 2x224 + 10x96, 500x375 JPEGs, 16 workers"),
    ("official: whole loop", 170, "-", "ViT-S/16 on an ImageNet-style folder, bound by its pipeline, 16 workers"),
]


def get_args_parser():
    p = cli.ArgumentParser(description="DINO benchmark")
    parts = ["step", "pipeline", "loop"]
    p.add_argument("--parts", nargs="+", default=parts, choices=parts, help="step: train_step on random "
                   "crops; pipeline: the DataLoader over JPEGs, then the photometric ops; loop: train.main")
    p.add_argument("--official_reference", action="store_true", help="also print the official code's figures")
    # Model and step, as in train.py
    p.add_argument("--arch", default="vit_small", choices=list(train.vit.ARCHS))
    p.add_argument("--patch_size", type=cli.positive_int, default=16)
    p.add_argument("--depth", type=cli.positive_int, default=None, help="number of blocks; None: the arch's 12")
    p.add_argument("--out_dim", type=cli.positive_int, default=65536)
    p.add_argument("--global_crop_size", type=cli.positive_int, default=224)
    p.add_argument("--local_crop_size", type=cli.positive_int, default=96)
    p.add_argument("--local_crops_number", type=cli.nonneg_int, default=10,
                   help="10 as the official figures (train.py: 8)")
    p.add_argument("--batch_size", type=cli.positive_int, default=64,
                   help="images per step (train.py's --batch_size_per_gpu)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="as train.py")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"], help="torch.compile the backbones")
    p.add_argument("--device", type=cli.device, default=None, help="cuda or cpu; None: cuda when available")
    # Data
    p.add_argument("--data_dir", default=None, help="an ImageFolder; synthetic JPEGs are written there when it "
                   "holds no images; None: a temporary folder, removed at the end")
    p.add_argument("--num_images", type=cli.positive_int, default=16384, help="images in the synthetic folder, "
                   "hard links to "
                   "--unique_jpegs files: an epoch lasts long enough for the workers' start not to count much")
    p.add_argument("--unique_jpegs", type=cli.positive_int, default=512, help="distinct synthetic 500x375 JPEGs")
    p.add_argument("--num_workers", type=cli.nonneg_int, nargs="+", default=[min(16, os.cpu_count())],
                   help="one or several")
    # Measurement
    p.add_argument("--warmup", type=cli.nonneg_int, default=5, help="untimed steps (or batches) before timing")
    p.add_argument("--iters", type=cli.positive_int, default=20, help="steps (or batches) per timed window")
    p.add_argument("--repeats", type=cli.positive_int, default=5,
                   help="timed windows (loop: epochs after the first); median")
    return p


# --- data ------------------------------------------------------------------------------------------------
def write_jpegs(folder, num_images, unique, height=375, width=500):
    """An ImageFolder (folder/synthetic/*.jpg) of `unique` JPEGs at ImageNet's average size (500x375), quality 90,
    listed num_images times in all through hard links: noise smoothed at a few scales, plus grain, so that a
    file holds about 90 KB (ImageNet's JPEGs: about 110 KB on average) and costs a realistic decode."""
    (folder / "synthetic").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(num_images):
        path = folder / "synthetic" / f"{i:07}.jpg"
        if i >= unique:
            os.link(folder / "synthetic" / f"{i % unique:07}.jpg", path)
            continue
        noise = [(torch.rand(1, 3, height // s + 2, width // s + 2, generator=g), w)
                 for s, w in ((32, 0.4), (4, 0.3), (1, 0.3))]  # (cell size in pixels, weight)
        img = sum(w * F.interpolate(x, size=(height, width), mode="bilinear") for x, w in noise)  # (1, 3, H, W)
        img = (img[0].clamp(0, 1) * 255).to(torch.uint8)  # (3, H, W)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, quality=90)  # (H, W, 3)


# --- the step, built as train.main builds it ---------------------------------------------------------------
def train_args(args, data_dir, compile_):
    argv = ["--data_path", str(data_dir), "--arch", args.arch, "--patch_size", str(args.patch_size),
            "--out_dim", str(args.out_dim), "--global_crop_size", str(args.global_crop_size),
            "--local_crop_size", str(args.local_crop_size), "--local_crops_number", str(args.local_crops_number),
            "--batch_size_per_gpu", str(args.batch_size), "--precision", args.precision,
            "--freeze_last_layer", "0", "--knn_every", "0", "--saveckp_freq", "0"]  # the steady-state step
    argv += (["--depth", str(args.depth)] if args.depth else []) + (["--compile"] if compile_ else [])
    return argv + (["--device", args.device] if args.device else [])


# --- measurement -----------------------------------------------------------------------------------------
def median_seconds(fn, device, repeats):
    """Median wall time of fn() over `repeats` calls, the device synchronized before each clock reading."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak_memory(device):
    gc.collect()
    torch.compiler.reset()  # frees what compiled code of an earlier run holds; the next compiles afresh
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    import resource  # Unix; ru_maxrss is in KiB on Linux
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS (process peak so far)"


def bench_step(args, targs, device):
    """train.train_step over one batch of random uint8 crops already on the device, seen again and again."""
    reset_peak_memory(device)
    n = max(args.warmup, args.iters)
    training = train.build_training(targs, device, steps_per_epoch=n)  # as train.main builds it: one epoch of n steps
    sizes = [args.global_crop_size] * 2 + [args.local_crop_size] * args.local_crops_number
    crops = [torch.randint(0, 256, (args.batch_size, 3, s, s), dtype=torch.uint8, device=device) for s in sizes]
    draws = DataAugmentationDINO(local_crops_number=args.local_crops_number)
    params = torch.stack([draws.draw_params() for _ in range(args.batch_size)])  # (B, V, P) real photometric draws
    steps = lambda k: [train.train_step(training, [(crops, params)], 0, i) for i in range(k)]
    if args.warmup:
        steps(args.warmup)
    seconds = median_seconds(lambda: steps(args.iters), device, args.repeats)
    return args.iters * args.batch_size / seconds, peak_memory(device)


def bench_pipeline(args, targs, data_dir, workers, device):
    """Images/s of train.main's DataLoader (decode + multi-crop in the workers), then of the photometric half on the
    device over one of its batches (augment.photometric_views: host-to-device copy and batched photometric ops)."""
    transform = DataAugmentationDINO(targs.global_crops_scale, targs.local_crops_scale, targs.local_crops_number,
                                     targs.global_crop_size, targs.local_crop_size)
    dataset = MultiCropDataset(data.image_folder(data_dir), transform, targs.seed)
    # Workers deliver batches in rounds of `workers` (each builds a whole batch): warm up for at least one round
    # and time whole rounds. Sampling with replacement gives one endless epoch, so there is no epoch boundary.
    rounds = max(workers, 1)
    warm = -(-max(args.warmup, workers) // rounds) * rounds
    window = -(-args.iters // rounds) * rounds
    total = (warm + args.repeats * window + 4 * rounds) * args.batch_size
    sampler = EpochSampler(torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=total))
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         prefetch_factor=4 if workers > 0 else None)
    batches = iter(loader)
    for _ in range(warm):
        crops, params, _, _ = next(batches)

    def next_window():
        for _ in range(window):
            next(batches)
    loader_speed = window * args.batch_size / median_seconds(next_window, torch.device("cpu"), args.repeats)
    del batches  # stops the workers

    photometric = lambda: photometric_views(crops, params, device)
    for _ in range(max(args.warmup, 1)):
        photometric()
    photometric_speed = args.batch_size / median_seconds(photometric, device, args.repeats)
    return loader_speed, window, photometric_speed


def bench_loop(args, targs_argv, workers, device):
    """train.main for 1 + repeats epochs; images/s of each epoch from its log.txt, the first (warm-up) excluded."""
    reset_peak_memory(device)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):  # keep stdout for the table
        train.main(targs_argv + ["--epochs", str(1 + args.repeats), "--num_workers", str(workers),
                                 "--output_dir", out])
        log = draw.read_rows(Path(out) / "log.txt")
    return statistics.median(row["images_per_s"] for row in log if row["epoch"] >= 1), peak_memory(device)


# --- report ----------------------------------------------------------------------------------------------
def print_table(rows, device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (  # the load: other processes share it
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        "load average %.1f %.1f %.1f" % os.getloadavg())
    print(f"\ndevice: {name}; torch {torch.__version__}, torchvision {torchvision.__version__}\n")
    print("| what | images/s | peak memory | conditions |\n|---|---:|---|---|")
    for what, speed, memory, conditions in rows:
        print(f"| {what} | {speed:,.1f} | {memory} | {conditions} |")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train.setup_precision(args, device)  # resolves --precision auto as train.main does
    arch = f"{args.arch}/{args.patch_size}" + (f" depth {args.depth}" if args.depth else "")
    crops = f"2x{args.global_crop_size} + {args.local_crops_number}x{args.local_crop_size}"
    model = f"{arch}, {crops}, out_dim {args.out_dim}, batch {args.batch_size}, {args.precision}, compile"
    timing = f"median of {args.repeats}"
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    with contextlib.ExitStack() as stack:
        data_dir = Path(args.data_dir or stack.enter_context(tempfile.TemporaryDirectory()))
        if {"pipeline", "loop"} & set(args.parts) and not any(data_dir.glob("*/*")):
            print(f"writing {args.num_images} JPEGs ({args.unique_jpegs} distinct) to {data_dir}", file=sys.stderr)
            write_jpegs(data_dir, args.num_images, args.unique_jpegs)
        folder = f"{sum(1 for _ in data_dir.rglob('*.*'))} images in {data_dir}" if data_dir.is_dir() else ""
        for c in compiles if "step" in args.parts else []:
            speed, memory = bench_step(args, train.parse_args(train_args(args, data_dir, c)), device)
            rows.append(("step (train_step)", speed, memory, f"{model} {'on' if c else 'off'}, random uint8 "
                         f"crops on the device (photometric ops included), {timing} x {args.iters} steps"))
        targs = train.parse_args(train_args(args, data_dir, False))
        for workers in args.num_workers if "pipeline" in args.parts else []:
            loader_speed, window, photometric_speed = bench_pipeline(args, targs, data_dir, workers, device)
            rows.append(("pipeline: decode + multi-crop (DataLoader)", loader_speed, "-", f"{crops} uint8 crops, "
                         f"{workers} workers, batch {args.batch_size}, {folder}, {timing} x {window} batches"))
            rows.append(("pipeline: photometric ops on the device", photometric_speed, "-",
                         f"{crops}, batch {args.batch_size}, {device.type}, host-to-device copy included, {timing}"))
        for c, workers in [(c, w) for c in compiles for w in args.num_workers] if "loop" in args.parts else []:
            speed, memory = bench_loop(args, train_args(args, data_dir, c), workers, device)
            rows.append(("whole loop (train.main)", speed, memory, f"{model} {'on' if c else 'off'}, {workers} "
                         f"workers, {folder}, no k-NN, {timing} epochs after the first"))
    print_table(rows + (OFFICIAL if args.official_reference else []), device)
    return rows


if __name__ == "__main__":
    cli.run_cli(main)
