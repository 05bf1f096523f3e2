"""DINO self-supervised training (paper Alg. 1 and Sec. 3): a student matches an EMA teacher across crops.

    python train.py                                   # Fashion-MNIST preset, CPU or one GPU
    torchrun --nproc_per_node=8 train.py --data_path /data/imagenet --arch vit_small --patch_size 16
    srun python train.py --data_path /data/imagenet    # under SLURM, one task per GPU

Read top to bottom: args, distributed and precision, student and teacher, optimizer and schedules, the step,
the epoch, resume and save, main (data, resume, training loop). Datasets live in data.py, backbones in
backbone.py, checkpoints in checkpoint.py, and the loop's bookkeeping (running sums, bad images, saves, signals,
log rows) in run_control.py.
Shape letters: B images per process, V crops, K out_dim.
"""
import argparse
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import backbone
import checkpoint
import cli
import data
import run_control
import vit
from augment import photometric_views
from cli import ConfigError
from eval_knn import knn_top1
from head import DINOHead, MultiCropWrapper
from loss import DINOLoss
from run_control import EpochTotals

# Each named dataset brings a preset; flags given on the command line override it.
PRESETS = {
    # NOTE: tuned so that `python train.py` on a 2-core CPU takes < 10 minutes (1 epoch) and improves k-NN: a
    # sharper teacher (0.02) than the paper's 0.04, which left the targets near uniform in such short runs, a faster
    # teacher (momentum 0.99), blur sigma scaled down for 28 px images, batch 32 (lr 0.004 per 256, i.e. 5e-4 per
    # step): twice the steps of batch 64 for the same compute, and a head MLP of width 1024 (paper: 2048), which
    # takes a sixth off the step. See docs/tuning.md.
    "fashion_mnist": dict(arch="vit_tiny", depth=4, patch_size=7, out_dim=1024, head_hidden_dim=1024,
                          global_crop_size=28, local_crop_size=14, local_crops_number=4, global_crops_scale=(0.4, 1.0),
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


def get_args_parser():
    p = cli.ArgumentParser(description="DINO self-supervised training (Caron et al. 2021)",
                           epilog="dataset presets (explicit flags win): " + json.dumps(PRESETS))
    add_model_args(p.add_argument_group("model and loss (paper Sec. 3.1, 3.2)"))
    pos, nonneg, nonnegf, unit = cli.positive_int, cli.nonneg_int, cli.nonneg_float, cli.unit_float
    g = p.add_argument_group("optimization (Sec. 3.2 'Implementation details')")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU")
    g.add_argument("--weight_decay", type=nonnegf, default=0.04, help="initial weight decay (Sec. 3.2: 0.04 to 0.4)")
    g.add_argument("--weight_decay_end", type=nonnegf, default=0.4, help="final weight decay")
    g.add_argument("--clip_grad", type=nonnegf, default=3.0, help="max norm of each parameter's gradient; 0: off")
    g.add_argument("--batch_size_per_gpu", type=pos, default=64, help="images per process and micro-batch "
                   "(Sec. 3.2: 1024 in all)")
    g.add_argument("--grad_accum_steps", type=pos, default=1, help="micro-batches per optimizer step: a step on "
                   "batch_size_per_gpu x processes x N images with the memory of one micro-batch")
    g.add_argument("--epochs", type=pos, default=100, help="training epochs (paper: 100 to 800)")
    g.add_argument("--freeze_last_layer", type=nonneg, default=1, help="epochs with the head's last layer fixed "
                   "(official: fixing it in the first epoch helps training)")
    g.add_argument("--lr", type=nonnegf, default=0.0005, help="peak lr for a total batch of 256, scaled linearly "
                   "with the total batch (Sec. 3.2: lr = 0.0005 * batchsize / 256)")
    g.add_argument("--warmup_epochs", type=nonnegf, default=10, help="epochs of linear lr warm-up (Sec. 3.2: 10)")
    g.add_argument("--min_lr", type=nonnegf, default=1e-6, help="lr at the end of the cosine schedule (Sec. 3.2)")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="Sec. 3.2: AdamW")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    g = p.add_argument_group("multi-crop (Sec. 3.1 and 3.2, BYOL's augmentations)")
    g.add_argument("--global_crops_scale", type=unit, nargs=2, default=(0.4, 1.0), help="area range of the 2 "
                   "global crops, a share of the image (a wider range such as 0.14 1 without local crops)")
    g.add_argument("--local_crops_number", type=nonneg, default=8, help="number of local crops; 0: no multi-crop")
    g.add_argument("--local_crops_scale", type=unit, nargs=2, default=(0.05, 0.4), help="area range of local crops")
    g.add_argument("--global_crop_size", type=pos, default=224, help="side of the global crops (paper: 224)")
    g.add_argument("--local_crop_size", type=pos, default=96, help="side of the local crops (paper: 96)")
    g.add_argument("--blur_sigma", type=cli.positive_float, nargs=2, default=(0.1, 2.0),
                   help="range of the Gaussian blur's sigma in pixels (BYOL's, for 224 px crops)")
    g = p.add_argument_group("data, logging, checkpoints")
    g.add_argument("--data_path", default="fashion_mnist", help=f"{', '.join(data.DATASET_NAMES)} or a folder")
    g.add_argument("--data_root", default="data", help="where named datasets are looked for / downloaded")
    g.add_argument("--output_dir", default="output")
    g.add_argument("--saveckp_freq", type=nonneg, default=20, help="keep checkpointXXXX.pth every N epochs; 0: off")
    g.add_argument("--saveckp_steps", type=nonneg, default=0,
                   help="also write checkpoint.pth every N optimizer steps (resumed inside the epoch); 0: off")
    g.add_argument("--max_bad_fraction", type=unit, default=0.01, help="stop when more of an epoch's images are "
                   "unreadable (fewer are skipped with a warning)")
    g.add_argument("--knn_every", type=nonneg, default=10, help="k-NN (Sec. 4.1) every N epochs, first, last; 0: off")
    g.add_argument("--log_every", type=pos, default=10, help="steps between progress-bar updates")
    g.add_argument("--subset", type=nonneg, default=0, help="use only the first N images of each split")
    g.add_argument("--seed", type=nonneg, default=0)
    g.add_argument("--num_workers", type=nonneg, default=10, help="DataLoader workers per process")
    g.add_argument("--device", type=cli.device, default=None, help="cuda or cpu (default: cuda when available)")
    return p


def add_model_args(g):
    pos, posf = cli.positive_int, cli.positive_float
    g.add_argument("--arch", type=backbone.arch_name, default="vit_small", help="the backbone (Sec. 3.2): vit_tiny, "
                   "vit_small, vit_base, or a torchvision model such as resnet50 (its classifier removed)")
    g.add_argument("--patch_size", type=pos, default=16, help="patch side in pixels (Sec. 5.1: 8 is better, slower)")
    g.add_argument("--depth", type=pos, default=None, help="number of blocks (default: the arch's 12)")
    g.add_argument("--out_dim", type=pos, default=65536, help="K, the head's output width (65536 for ImageNet)")
    g.add_argument("--head_hidden_dim", type=pos, default=2048, help="width of the head's MLP (paper: 2048)")
    g.add_argument("--norm_last_layer", type=cli.bool_flag, default=True, help="fix the norm of the head's last "
                   "layer at 1: more stable; false can be better (official: false for vit_small, true for vit_base)")
    g.add_argument("--use_bn_in_head", type=cli.bool_flag, default=False, help="BatchNorm in the head (paper: none)")
    g.add_argument("--momentum_teacher", type=cli.unit_float, default=0.996, help="base EMA momentum lambda of "
                   "the teacher, raised to 1 on a cosine schedule (Sec. 3.1 'Teacher network')")
    g.add_argument("--drop_path_rate", type=cli.unit_float, default=0.1, help="stochastic depth of the student")
    g.add_argument("--warmup_teacher_temp", type=posf, default=0.04, help="tau_t at the start of its linear "
                   "warm-up (Sec. 3.1 'Avoiding collapse': sharpening); lower it if the loss does not fall")
    g.add_argument("--teacher_temp", type=posf, default=0.04, help="tau_t after the warm-up (Sec. 3.2: 0.04 to "
                   "0.07 over the first 30 epochs; above 0.07 training is unstable). Both temperatures at the "
                   "student's 0.1 switch sharpening off: the output collapses to uniform (Sec. 5.3, Fig. 7)")
    g.add_argument("--center_momentum", type=cli.unit_float, default=0.9, help="m of the center's EMA (Eq. 4); "
                   "1 switches centering off, the center stays 0: one dimension dominates (Sec. 5.3, Fig. 7)")
    g.add_argument("--warmup_teacher_temp_epochs", type=cli.nonneg_int, default=0, help="tau_t warm-up (paper: 30)")


def parse_args(argv=None):
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS.get(known.data_path, {}))
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        if name.endswith("crop_size") and args.arch in vit.ARCHS and value % args.patch_size:
            raise ConfigError(f"--{name} {value} is not a multiple of --patch_size {args.patch_size}: pick a crop "
                              f"size divisible by the patch size")
        if name in ("global_crops_scale", "local_crops_scale", "blur_sigma") and not 0 < value[0] <= value[1]:
            raise ConfigError(f"--{name} {value[0]} {value[1]}: expected 0 < low <= high")
    return args


# --- distributed and precision ---------------------------------------------------------------------------
def setup_distributed(args):
    """(device, rank, world_size, cpu_group). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; srun sets the SLURM_*
    variables (run_control.slurm_environment); with neither: one process, no process group. cpu_group: a gloo group for small
    CPU messages that must not wait for the GPU."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        os.environ.update(run_control.slurm_environment(os.environ))
    if "RANK" not in os.environ:
        return device, 0, 1, None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size(), dist.new_group(backend="gloo")


def setup_precision(args, device):
    """(autocast, GradScaler): one code path for fp32, bf16 and fp16 (the scaler does nothing but for fp16)."""
    if args.precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        args.precision = "bf16" if bf16_ok else "fp16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# --- student and teacher, optimizer and schedules ----------------------------------------------------------
@dataclass
class Training:
    """Everything a step of Alg. 1 uses; the schedules hold one value per iteration of the whole run."""
    args: argparse.Namespace
    student: nn.Module  # MultiCropWrapper(ViT, DINOHead), wrapped in DDP when distributed
    teacher: nn.Module  # the same architecture: no drop path, no gradient, updated by EMA only
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    device: torch.device
    warned: set = field(default_factory=set)  # unreadable files already reported


def build_training(args, device, world_size=1, distributed=False, niter=1):
    """The student and the teacher (starting equal), the loss, the optimizer and the per-iteration schedules."""
    student = backbone.build(args.arch, args.patch_size, args.depth, args.drop_path_rate)  # drop path: ViTs only
    teacher = backbone.build(args.arch, args.patch_size, args.depth, 0.0)
    head = lambda norm_last_layer: DINOHead(width, args.out_dim, args.use_bn_in_head, norm_last_layer,
                                            hidden_dim=args.head_hidden_dim)
    width = student.embed_dim
    student = MultiCropWrapper(student, head(args.norm_last_layer)).to(device)
    teacher = MultiCropWrapper(teacher, head(True)).to(device)  # no gradient reaches it anyway
    if distributed and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
        student, teacher = map(nn.SyncBatchNorm.convert_sync_batchnorm, (student, teacher))
    student_ddp = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                      else None) if distributed else student  # broadcasts rank 0
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if args.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs, center_momentum=args.center_momentum).to(device)
    # fused AdamW: one kernel for all parameters, on the GPU and on the CPU (torch >= 2.4)
    optimizer = (torch.optim.AdamW(param_groups(student), fused=True) if args.optimizer == "adamw"
                 else torch.optim.SGD(param_groups(student), lr=0, momentum=0.9))
    # linear scaling rule (Sec. 3.2): lr = base lr * total batch / 256, the batch of one optimizer step
    lr = cosine_scheduler(args.lr * args.batch_size_per_gpu * world_size * args.grad_accum_steps / 256, args.min_lr, args.epochs, niter,
                          args.warmup_epochs)
    wd = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter)
    momentum = cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter)
    return Training(args, student_ddp, teacher, dino_loss, optimizer, lr, wd, momentum, *setup_precision(args, device),
                    device)


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
    if grads:
        norms = torch.stack(torch._foreach_norm(grads))  # one norm per parameter
        torch._foreach_mul_(grads, (clip / (norms + 1e-6)).clamp(max=1.0).unbind())


@torch.no_grad()
def ema_update(teacher, student, m):
    """theta_t <- m theta_t + (1 - m) theta_s over all parameters (paper Eq. 2), as one lerp over the list."""
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1 - float(m))


# --- the step (Alg. 1) and the epoch ------------------------------------------------------------------------
def train_step(t, micro_batches, epoch, step):
    """One optimizer step of Alg. 1 on N micro-batches [(crops, params), ...]: exactly one step on their union.

    The gradient is the mean of the micro-batches' (DDP averages it over processes on the last one only); the
    teacher and the center stay fixed until the step is taken, then the EMA moves once and the center once, from
    the teacher outputs of all micro-batches of all processes. Returns (loss, teacher entropy), micro-batch means.
    """
    for i, group in enumerate(t.optimizer.param_groups):  # the schedules, per optimizer step
        group["lr"] = float(t.lr[step])
        if i == 0:  # only the regularized group
            group["weight_decay"] = float(t.wd[step])
    t.optimizer.zero_grad(set_to_none=True)
    n, loss_sum, entropy_sum, teacher_sum, count = len(micro_batches), 0.0, 0.0, 0.0, 0
    for i, (crops, params) in enumerate(micro_batches):
        views = photometric_views(crops, params, t.device)  # V x (B, 3, S, S), normalized
        sync = i == n - 1 or not hasattr(t.student, "no_sync")  # DDP: all-reduce the gradients once, at the end
        with contextlib.nullcontext() if sync else t.student.no_sync():
            with t.autocast:
                teacher_output = t.teacher(views[:2])  # (2B, K): the teacher sees only the global crops
                student_output = t.student(views)  # (VB, K)
                loss, entropy = t.dino_loss(student_output, teacher_output, epoch, update_center=False)
            t.scaler.scale(loss / n).backward()
        teacher_sum = teacher_sum + teacher_output.detach().float().sum(dim=0, keepdim=True)  # (1, K)
        count += len(teacher_output)
        loss_sum, entropy_sum = loss_sum + loss.detach(), entropy_sum + entropy
    if t.args.clip_grad:
        t.scaler.unscale_(t.optimizer)
        clip_gradients(t.student, t.args.clip_grad)
    if epoch < t.args.freeze_last_layer:  # the last layer gets no update in the first epochs (Appendix)
        for name, p in t.student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.dino_loss.update_center(teacher_sum, count)  # c <- m c + (1 - m) mean of the step's teacher outputs
    ema_update(t.teacher, getattr(t.student, "module", t.student), t.momentum[step])  # DDP unwrapped
    return loss_sum / n, entropy_sum / n


def train_one_epoch(t, loader, epoch, run):
    """The epoch's optimizer steps from run.start_it, each on --grad_accum_steps micro-batches of the loader: its
    stats for log.txt, or None when a signal stopped it (after a checkpoint). run: a RunControl."""
    n = t.args.grad_accum_steps
    for it, micro_batches in run.steps(zip(*[iter(loader)] * n)):  # n consecutive batches, the rest dropped
        step = epoch * run.niter + it  # index into the per-step schedules
        loss, entropy = train_step(t, [(crops, params) for crops, params, _, _ in micro_batches], epoch, step)
        if run.after_step(it, loss, entropy, [u for *_, unreadable in micro_batches for u in unreadable]):
            return None
    return run.epoch_stats(t.wd)


# --- resume and save -----------------------------------------------------------------------------------------
def resume(state, args, out, rank, world_size, device, steps_per_epoch):
    """(epoch, step, running sums) where training continues: at an epoch's end, or inside one (its first steps done,
    their sums saved); None when the checkpoint has finished training (a run of the same command again)."""
    start_epoch, start_it, saved = checkpoint.resume(out / "checkpoint.pth", state, args, rank, world_size, device)
    totals = saved and EpochTotals(*(saved[k].to(device) for k in ("loss", "teacher_entropy", "nonfinite")),
                                   saved["skipped"])
    if start_epoch >= args.epochs:
        if rank == 0:
            print(f"{out / 'checkpoint.pth'} has finished training: epoch {start_epoch} of {args.epochs}. To train "
                  f"longer, run again with a larger --epochs; to start afresh, give another --output_dir")
        return None
    if rank == 0 and (start_epoch or start_it):
        print(f"resumed from {out / 'checkpoint.pth'} at epoch {start_epoch}, step {start_it}")
        run_control.trim_log(out, start_epoch, start_epoch * steps_per_epoch + start_it)
    return start_epoch, start_it, totals


def save_checkpoint(state, args, epoch, iteration, totals, device, group, keep=False):
    """checkpoint.pth continuing at step `iteration` of `epoch`; keep: also checkpointXXXX.pth. Every rank calls it
    (the RNG states are gathered); rank 0 writes."""
    ckpt = checkpoint.checkpoint_dict(state, args, epoch, iteration, totals and asdict(totals), device, group)
    if group is None or dist.get_rank() == 0:
        out = Path(args.output_dir)
        checkpoint.save_atomic(ckpt, out / "checkpoint.pth")
        if keep:  # NOTE: named for the epochs done (checkpoint0020.pth after 20); the official names a checkpoint
            # for the epoch index that wrote it (checkpoint0000.pth, 0020, ... when epoch % saveckp_freq == 0)
            checkpoint.save_atomic(ckpt, out / f"checkpoint{epoch:04}.pth")


# --- the training script: Alg. 1 ----------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device, rank, world_size, cpu_group = setup_distributed(args)
    main_process, out = rank == 0, Path(args.output_dir)
    torch.manual_seed(args.seed + rank)  # init is overwritten by DDP's broadcast; drop path differs per rank
    if main_process:
        checkpoint.check_writable(out)
    datasets = data.build_datasets(args.data_path, args.data_root, args.subset)
    loader, sampler = data.training_loader(datasets.train, args, rank, world_size, device)
    steps_per_epoch = len(loader) // args.grad_accum_steps  # optimizer steps
    t = build_training(args, device, world_size, cpu_group is not None, steps_per_epoch)

    state = dict(student=getattr(t.student, "module", t.student), teacher=t.teacher, optimizer=t.optimizer,
                 scaler=t.scaler, dino_loss=t.dino_loss)
    start = resume(state, args, out, rank, world_size, device, steps_per_epoch)
    if start is None:
        return
    start_epoch, start_it, totals = start
    save = lambda epoch, it, sums, keep=False: save_checkpoint(state, args, epoch, it, sums, device, cpu_group, keep)
    knn = (lambda: knn_top1(t.teacher.backbone, datasets, args.global_crop_size, device)) \
        if datasets.labelled_test is not None and args.knn_every else None
    if knn and start_epoch == start_it == 0:
        top1 = knn()
        if main_process:
            run_control.log(out, {"epoch": -1, "step": 0, "knn_top1": top1}, f"k-NN top-1 before training: {top1:.2f}%")
    with run_control.StopFlag(cpu_group) as stop:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch, start=start_it * args.batch_size_per_gpu * args.grad_accum_steps)
            t0 = time.time()
            run = run_control.RunControl(args, epoch, steps_per_epoch, start_it, totals, stop,
                                         lambda it, sums: save(epoch, it, sums), device, t.warned, t.lr,
                                         out if main_process else None)
            stats = train_one_epoch(t, loader, epoch, run)
            start_it, totals, last = 0, None, epoch == args.epochs - 1
            if stats is None:  # stopped by SIGTERM / SIGINT, after a checkpoint at that step
                stop.report(out, epoch, run.stopped_at, main_process)
                break
            if knn and ((epoch + 1) % args.knn_every == 0 or last):
                stats["knn_top1"] = knn()
            if main_process:  # the log row, then the checkpoint: a run killed in between drops the row on resume
                stats = dict(stats, epoch=epoch, epoch_time_s=round(time.time() - t0, 1))
                run_control.log(out, stats, run_control.epoch_message(stats, args.out_dim))
            save(epoch + 1, 0, None, keep=args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0)
            if main_process:
                run_control.draw_curves(out, args.out_dim)
            if stop.stopped and not last:
                stop.report(out, epoch + 1, 0, main_process)
                break
    if cpu_group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run_cli(main)
