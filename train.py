"""DINO self-supervised training (paper Alg. 1 and Sec. 3): a student matches an EMA teacher across crops.

    python train.py                                   # Fashion-MNIST preset, CPU or one GPU
    torchrun --nproc_per_node=8 train.py --data_path /data/imagenet --arch vit_small --patch_size 16
    srun python train.py --data_path /data/imagenet    # under SLURM, one task per GPU

Read top to bottom: args, precision, student and teacher, optimizer and schedules, the step (Alg. 1 in its
order), the epoch, main (set up, start or resume, for each epoch train and evaluate). Datasets live in data.py,
the training loader in training_data.py, processes in distributed.py, backbones in backbone.py, weights on disk
in checkpoint.py, the loop's bookkeeping (resume, sums, saves, signals, log rows) in run_control.py.
Shape letters: B images per process, V crops, K out_dim.
"""
import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import backbone
import checkpoint
import cli
import data
import distributed
import run_control
import training_data
import vit
from augment import photometric_views
from cli import ConfigError
from eval_knn import knn_top1
from head import DINOHead, MultiCropWrapper
from loss import DINOLoss

PRESETS = {  # a named --data_path brings its preset; flags given on the command line override it
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
    p = cli.ArgumentParser(description="DINO training (Caron et al. 2021); a named --data_path brings a preset.")
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
    add_run_args(p.add_argument_group("data, logging, checkpoints"))
    cli.show_presets(p, PRESETS, rename={"fashion_mnist": "fashion_mnist (the no-flag run)"})
    return p


def add_run_args(g):
    pos, nonneg, unit = cli.positive_int, cli.nonneg_int, cli.unit_float
    g.add_argument("--data_path", default="fashion_mnist", help=f"{', '.join(data.DATASET_NAMES)}, or a folder: "
                   "train/<class>/ (and val/<class>/ for the k-NN), or any folder of images (all under it, no labels)")
    g.add_argument("--data_root", default="data", help="where named datasets are looked for / downloaded")
    g.add_argument("--output_dir", default="output", help="checkpoint.pth, log.txt, steps.txt, curves.png; a "
                   "checkpoint.pth there is resumed")
    g.add_argument("--init_weights", type=cli.existing_file, default=None, help="start a new run from weights: a "
                   "training checkpoint (ours, or an official *_full_checkpoint.pth: student, teacher, heads, center) "
                   "or a backbone file (dino_deitsmall16_pretrain.pth, exported weights: the heads start fresh); not "
                   "a resume: epochs, schedules and optimizer start anew")
    g.add_argument("--fresh_head", action="store_true", help="with --init_weights: take only the backbones, the "
                   "heads start at random init (for another --out_dim)")
    g.add_argument("--saveckp_freq", type=nonneg, default=20, help="keep checkpointXXXX.pth every N epochs; 0: off")
    g.add_argument("--saveckp_steps", type=nonneg, default=0,
                   help="also write checkpoint.pth every N optimizer steps (resumed inside the epoch); 0: off")
    g.add_argument("--max_bad_fraction", type=unit, default=0.01, help="stop when more of an epoch's images are "
                   "unreadable (fewer are skipped with a warning)")
    g.add_argument("--knn_every", type=nonneg, default=10, help="k-NN (Sec. 4.1) every N epochs, first, last; 0: off")
    g.add_argument("--log_every", type=pos, default=10, help="steps between progress-bar updates")
    g.add_argument("--subset", type=nonneg, default=0, help="use only the first N images of each split")
    g.add_argument("--seed", type=nonneg, default=0, help="of the init, the crops and the data order")
    g.add_argument("--num_workers", type=nonneg, default=10, help="DataLoader workers per process")
    g.add_argument("--device", type=cli.device, default=None, help="cuda or cpu (default: cuda when available)")


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
                   "warm-up (sharpening: Sec. 3.1 'Avoiding collapse'); lower it if the loss does not fall")
    g.add_argument("--teacher_temp", type=posf, default=0.04, help="tau_t after the warm-up (Sec. 3.2: 0.04 to "
                   "0.07 over the first 30 epochs; official code: above 0.07 training is unstable). Both temperatures "
                   "at the student's 0.1 switch sharpening off: the output collapses to uniform (Sec. 5.3, Fig. 7)")
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
            raise ConfigError(f"--{name} {value} is not a multiple of --patch_size {args.patch_size}")
        if name in ("global_crops_scale", "local_crops_scale", "blur_sigma") and not 0 < value[0] <= value[1]:
            raise ConfigError(f"--{name} {value[0]} {value[1]}: expected 0 < low <= high")
    if args.fresh_head and not args.init_weights:
        raise ConfigError("--fresh_head goes with --init_weights (the file whose backbones it keeps)")
    return args


# --- precision ----------------------------------------------------------------------------------------------
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
    """Everything a step of Alg. 1 uses; the schedules hold one value per optimizer step of the whole run."""
    args: argparse.Namespace
    student: nn.Module  # MultiCropWrapper(backbone, DINOHead), wrapped in DDP when distributed
    teacher: nn.Module  # the same architecture: no drop path, no gradient, updated by EMA only
    dino_loss: DINOLoss  # holds the center
    optimizer: torch.optim.Optimizer
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    device: torch.device

    def state(self):
        """What a checkpoint saves and resume loads (the student unwrapped from DDP)."""
        return dict(student=getattr(self.student, "module", self.student), teacher=self.teacher,
                    optimizer=self.optimizer, scaler=self.scaler, dino_loss=self.dino_loss)


def build_training(args, device, world_size=1, distributed=False, steps_per_epoch=1):
    """The student and the teacher (starting equal), the loss, the optimizer and the per-step schedules."""
    student = backbone.build(args.arch, args.patch_size, args.depth, args.drop_path_rate)  # drop path: ViTs only
    teacher = backbone.build(args.arch, args.patch_size, args.depth, 0.0)
    heads = [DINOHead(student.embed_dim, args.out_dim, args.use_bn_in_head, norm_last_layer,
                      hidden_dim=args.head_hidden_dim) for norm_last_layer in (args.norm_last_layer, True)]
    student = MultiCropWrapper(student, heads[0]).to(device)
    teacher = MultiCropWrapper(teacher, heads[1]).to(device)  # the norm of its last layer: it gets no gradient
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
    total_batch = args.batch_size_per_gpu * world_size * args.grad_accum_steps
    lr = cosine_scheduler(args.lr * total_batch / 256, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs)
    wd = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    momentum = cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch)
    return Training(args, student_ddp, teacher, dino_loss, optimizer, lr, wd, momentum,
                    *setup_precision(args, device), device)


def cosine_scheduler(base_value, final_value, epochs, steps_per_epoch, warmup_epochs=0, start_warmup_value=0.0):
    """One value per optimizer step: linear warm-up, then final + (base - final) * (1 + cos(pi * i / I)) / 2."""
    warmup_steps = int(warmup_epochs * steps_per_epoch)  # NOTE: a fraction of an epoch is allowed (short runs)
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps)
    i = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / max(len(i), 1)))
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
    """theta_t <- m theta_t + (1 - m) theta_s over all parameters (Sec. 3.1 'Teacher network'), one lerp over all."""
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1 - float(m))


# --- the step (Alg. 1) and the epoch ------------------------------------------------------------------------
def train_step(training, micro_batches, epoch, step):
    """Alg. 1 for optimizer step `step` of the run, on N micro-batches [(crops, params), ...] (their union's step):
        t1, t2 = gt(x1), gt(x2); s1, s2, ... = gs(all crops)      the teacher sees the two global crops only
        loss = mean of H(t_i, s_v) over v != i; loss.backward()   N micro-batches: their mean (DDP: all-reduced once)
        update(gs); gt = l gt + (1 - l) gs                        the student, then the teacher's EMA
        C = m C + (1 - m) mean(t1, t2)                            once, from all micro-batches of all processes
    Returns (loss, teacher entropy), micro-batch means."""
    args, student, teacher, dino_loss = training.args, training.student, training.teacher, training.dino_loss
    set_schedules(training, step)
    training.optimizer.zero_grad(set_to_none=True)
    n, loss_sum, entropy_sum = len(micro_batches), 0.0, 0.0
    for i, (crops, params) in enumerate(micro_batches):
        views = photometric_views(crops, params, training.device)  # V x (B, 3, S, S): x1, x2 globals, then locals
        sync = i == n - 1 or not hasattr(student, "no_sync")  # DDP: all-reduce the gradients once, at the end
        with contextlib.nullcontext() if sync else student.no_sync():  # the backward too: DDP's rule
            with training.autocast:
                teacher_output = teacher(views[:2])  # (2B, K) t1, t2: the teacher sees only the global crops
                student_output = student(views)  # (VB, K) s1, s2, ...: the student sees all crops
                loss = dino_loss(student_output, teacher_output, epoch, update_center=False)  # H(t_i, s_v), v != i
            training.scaler.scale(loss / n).backward()  # back-propagate
        loss_sum, entropy_sum = loss_sum + loss.detach(), entropy_sum + dino_loss.teacher_entropy
    if args.clip_grad:
        training.scaler.unscale_(training.optimizer)
        clip_gradients(student, args.clip_grad)
    if epoch < args.freeze_last_layer:  # official code: the last layer gets no update in the first epochs
        for name, p in student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    training.scaler.step(training.optimizer)  # update(gs): the student
    training.scaler.update()
    ema_update(teacher, getattr(student, "module", student), training.momentum[step])  # gt = l gt + (1 - l) gs
    dino_loss.update_center()  # C = m C + (1 - m) mean of the step's teacher outputs
    return loss_sum / n, entropy_sum / n


def set_schedules(training, step):
    """The lr and weight decay of optimizer step `step` (weight decay only on the regularized group)."""
    for i, group in enumerate(training.optimizer.param_groups):
        group["lr"] = float(training.lr[step])
        if i == 0:
            group["weight_decay"] = float(training.wd[step])


def train_one_epoch(training, loader, epoch, run):
    """The epoch's optimizer steps from run.start_step, each on --grad_accum_steps micro-batches of the loader: its
    figures for log.txt, or None when a signal stopped it (after a checkpoint). run: a run_control.RunControl."""
    n, steps_per_epoch = training.args.grad_accum_steps, run.steps_per_epoch
    for epoch_step, micro_batches in run.steps(epoch, zip(*[iter(loader)] * n)):  # n consecutive batches
        loss, entropy = train_step(training, [(crops, params) for crops, params, _, _ in micro_batches], epoch,
                                   epoch * steps_per_epoch + epoch_step)
        if run.after_step(epoch_step, loss, entropy, [u for *_, unreadable in micro_batches for u in unreadable]):
            return None
    return run.epoch_stats()


# --- the training script: Alg. 1 ----------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device, rank, world_size, cpu_group = distributed.setup(args.device)
    torch.manual_seed(args.seed + rank)  # init is overwritten by DDP's broadcast; drop path differs per rank
    if rank == 0:
        checkpoint.check_writable(Path(args.output_dir))
    datasets = data.build_datasets(args.data_path, args.data_root, args.subset)
    loader, sampler = training_data.training_loader(datasets.train, args, rank, world_size, device)
    steps_per_epoch = len(loader) // args.grad_accum_steps
    training = build_training(args, device, world_size, cpu_group is not None, steps_per_epoch)
    run = run_control.RunControl(args, training, steps_per_epoch, cpu_group)
    run.print(run_control.settings_summary(args, datasets, steps_per_epoch, world_size, device))
    start_epoch = run.start()  # output_dir/checkpoint.pth resumed, else --init_weights, else the random init
    if start_epoch is None:  # that checkpoint has finished training
        return
    with_knn = datasets.labelled_test is not None and args.knn_every

    def knn():  # Sec. 4.1: weighted k-NN on the teacher's CLS features, k = 20, T = 0.07
        return knn_top1(training.teacher.backbone, datasets, args.global_crop_size, device)
    if with_knn and start_epoch == run.start_step == 0:
        run.log_knn_before_training(knn())
    with run:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch, start=run.start_step * args.batch_size_per_gpu * args.grad_accum_steps)
            stats = train_one_epoch(training, loader, epoch, run)
            if stats is None:  # stopped by SIGTERM / SIGINT, after a checkpoint at that step
                break
            if with_knn and ((epoch + 1) % args.knn_every == 0 or epoch == args.epochs - 1):
                stats["knn_top1"] = knn()
            if run.end_epoch(stats):  # log row, checkpoint, curves; True: stopped by a signal
                break
    if cpu_group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run_cli(main)
