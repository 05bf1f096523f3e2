"""Run control for train.py: everything the training loop does besides Algorithm 1.

    run = RunControl(args, training, steps_per_epoch, group)   # training: train.Training; group: gloo or None
    start_epoch = run.start()                                   # resume, --init_weights or random init
    with run:                                                   # SIGTERM / SIGINT: checkpoint, then stop
        for epoch in range(start_epoch, args.epochs):
            for epoch_step, batch in run.steps(epoch, batches):    # the progress bar
                loss, entropy = train_step(...)                     # Alg. 1
                if run.after_step(epoch_step, loss, entropy, unreadable):
                    break                                           # stopped by a signal, after a checkpoint
            run.end_epoch(run.epoch_stats())                    # log row, checkpoint, curves

It owns: where the run starts (resume, --init_weights), the running sums of the epoch (kept on the device, read back
every --log_every steps), the unreadable-image budget (training_data.UnreadableImages), the non-finite-loss guard,
the checkpoints (every --saveckp_steps steps, at each epoch's end, on a signal), the rows of log.txt and steps.txt,
curves.png, and the settings block every run starts with. Counters: `step` counts optimizer steps from the start of
training (the schedules' index), `epoch_step` inside the epoch (0 .. steps_per_epoch - 1).
"""
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import training_data
import draw
import vit
from loss import collapse_warning


@dataclass
class EpochTotals:
    """Running sums over an epoch's steps, kept on the device: read back every --log_every steps, not each step."""
    loss: torch.Tensor
    teacher_entropy: torch.Tensor
    nonfinite: torch.Tensor  # number of steps whose loss was NaN or infinite
    skipped: int = 0  # unreadable images replaced by readable ones


class RunControl:
    """The bookkeeping of a whole run. training: what train.build_training returned (its models, optimizer, scaler,
    loss and schedules are what a checkpoint saves); group: the gloo group of a distributed run, or None."""

    def __init__(self, args, training, steps_per_epoch, group=None):
        self.args, self.training, self.steps_per_epoch, self.group = args, training, steps_per_epoch, group
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.out = Path(args.output_dir)
        self.unreadable = training_data.UnreadableImages(args.max_bad_fraction)
        self.stop = StopFlag(group)
        self.epoch, self.start_step, self.totals = 0, 0, None  # where the next epoch starts (set by resume)

    def __enter__(self):
        self.stop.__enter__()
        return self

    def __exit__(self, *exc_info):
        self.stop.__exit__(*exc_info)

    def start(self):
        """Where the run starts: output_dir/checkpoint.pth resumed when it exists, else --init_weights loaded (a new
        run from those weights), else the random init. The epoch to start at (inside it, self.start_step steps are
        done and their sums restored), or None when that checkpoint has finished training."""
        path, args = self.out / "checkpoint.pth", self.args
        if args.init_weights and path.exists():
            self.print(f"--init_weights {args.init_weights} is not used: {path} exists and training continues from it")
        elif args.init_weights:
            loaded = checkpoint.start_from(args.init_weights, self.training.state(), args.fresh_head)
            self.print(f"started from --init_weights {args.init_weights}: {loaded}")
        epoch, self.start_step, saved = checkpoint.resume(path, self.training.state(), args, self.rank, self.world,
                                                          self.training.device)
        self.totals = saved and EpochTotals(*(saved[k].to(self.training.device)
                                              for k in ("loss", "teacher_entropy", "nonfinite")), saved["skipped"])
        if epoch >= args.epochs:
            self.print(f"{path} has finished training: epoch {epoch} of {args.epochs}. To train longer, run again "
                       f"with a larger --epochs; to start afresh, give another --output_dir")
            return None
        if epoch or self.start_step:
            self.print(f"resumed from {path} at epoch {epoch}, step {self.start_step}")
            if self.rank == 0:
                trim_log(self.out, epoch, epoch * self.steps_per_epoch + self.start_step)
        return epoch

    def log_knn_before_training(self, top1):
        if self.rank == 0:
            log(self.out, {"epoch": -1, "step": 0, "knn_top1": top1}, f"k-NN top-1 before training: {top1:.2f}%")

    def steps(self, epoch, batches):
        """(epoch_step, batch) for the epoch's remaining steps, with the progress bar (rank 0)."""
        self.epoch, self.t0, self.seen, self.stopped_at = epoch, time.time(), 0, None
        self.totals = self.totals or EpochTotals(*torch.zeros(3, device=self.training.device).unbind())
        self.window = (self.start_step, self.totals.loss.clone(), self.totals.teacher_entropy.clone())
        # NOTE: under torchrun the bar's loss is rank 0's running mean; the epoch line and log.txt average all ranks
        label = f"epoch {epoch}/{self.args.epochs}" + (" (rank 0)" if self.world > 1 else "")
        self.bar = tqdm(batches, desc=label, initial=self.start_step, total=self.steps_per_epoch, dynamic_ncols=True,
                        disable=self.rank > 0)
        for epoch_step, batch in enumerate(self.bar, start=self.start_step):
            self.stop.begin_step()
            yield epoch_step, batch

    def after_step(self, epoch_step, loss, teacher_entropy, unreadable):
        """The bookkeeping of a step: True when the run stops here (a signal), after a checkpoint."""
        args, totals, step = self.args, self.totals, self.epoch * self.steps_per_epoch + epoch_step
        images_per_step = args.batch_size_per_gpu * args.grad_accum_steps  # per process
        totals.skipped = self.unreadable.count(unreadable, totals.skipped, self.steps_per_epoch * images_per_step)
        totals.loss += loss.detach()
        totals.teacher_entropy += teacher_entropy
        totals.nonfinite += ~torch.isfinite(loss.detach())
        self.seen += images_per_step * self.world
        last = epoch_step == self.steps_per_epoch - 1
        if (epoch_step + 1) % args.log_every == 0 or last:
            self.check_finite(f"loss is {loss.item()} at epoch {self.epoch}, step {epoch_step}")  # one sync per row
            self.bar.set_postfix(loss=f"{totals.loss.item() / (epoch_step + 1):.4f}",
                                 lr=f"{self.training.lr[step]:.2e}", img_s=f"{self.images_per_s():.0f}")
            self.log_steps(epoch_step, step)
        # NOTE: the official code writes checkpoints only at the end of an epoch and does not catch signals.
        stopping = self.stop.end_step()
        if not last and (stopping or args.saveckp_steps and (step + 1) % args.saveckp_steps == 0):
            self.check_finite(f"non-finite loss in epoch {self.epoch}")  # never save weights after one
            self.save(self.epoch, epoch_step + 1, totals)  # the end of an epoch has its own checkpoint
        if stopping and not last:
            self.stopped_at = epoch_step + 1
            self.report_stop(self.epoch, self.stopped_at)
        return self.stopped_at is not None

    def log_steps(self, epoch_step, step):
        """A row of steps.txt: the means over the steps since the last row (rank 0's)."""
        first, loss_sum, entropy_sum = self.window
        if self.rank > 0 or epoch_step + 1 == first:
            return
        n = epoch_step + 1 - first
        loss, entropy = (self.totals.loss - loss_sum).item() / n, (self.totals.teacher_entropy - entropy_sum).item() / n
        with open(self.out / "steps.txt", "a") as f:
            f.write(json.dumps({"step": step + 1, "train_loss": loss, "teacher_entropy": entropy,
                                "kl_teacher_student": loss - entropy,
                                "train_lr": float(self.training.lr[step])}) + "\n")
        self.window = (epoch_step + 1, self.totals.loss.clone(), self.totals.teacher_entropy.clone())

    def check_finite(self, what):
        if self.totals.nonfinite.item():
            raise SystemExit(f"{what}: stopping; the last good checkpoint is left as it was")

    def images_per_s(self):
        return self.seen / max(time.time() - self.t0, 1e-9)

    def epoch_stats(self):
        """The log.txt figures of the epoch, the same on every rank: mean loss and entropy, unreadable images."""
        totals, step = self.totals, (self.epoch + 1) * self.steps_per_epoch - 1
        figures = torch.stack([totals.loss / self.steps_per_epoch, totals.teacher_entropy / self.steps_per_epoch,
                               torch.tensor(float(totals.skipped), device=self.training.device)])
        if dist.is_initialized():
            dist.all_reduce(figures)
            figures[:2] /= self.world
        loss, entropy, skipped = figures.tolist()
        return {"epoch": self.epoch, "step": step + 1, "train_loss": loss, "train_lr": float(self.training.lr[step]),
                "train_wd": float(self.training.wd[step]), "teacher_entropy": entropy,
                "kl_teacher_student": loss - entropy, "skipped_images": int(skipped),
                "images_per_s": round(self.images_per_s(), 1)}

    def end_epoch(self, stats):
        """The log row and the epoch's line, then the checkpoint (a run killed in between drops the row on resume),
        then curves.png. True when a signal came during the epoch: the run stops here."""
        self.start_step, self.totals, epoch = 0, None, self.epoch + 1
        stats["epoch_time_s"] = round(time.time() - self.t0, 1)  # the k-NN included
        if self.rank == 0:
            log(self.out, stats, epoch_message(stats, self.args.out_dim))
        self.save(epoch, 0, keep=self.args.saveckp_freq and epoch % self.args.saveckp_freq == 0)
        if self.rank == 0:
            draw_curves(self.out, self.args.out_dim)
        if self.stop.stopped and epoch < self.args.epochs:
            self.report_stop(epoch, 0)
            return True
        return False

    def save(self, epoch, epoch_step, totals=None, keep=False):
        """checkpoint.pth continuing at `epoch_step` of `epoch`; keep: also checkpointXXXX.pth. Every rank calls it
        (the RNG states are gathered); rank 0 writes."""
        ckpt = checkpoint.checkpoint_dict(self.training.state(), self.args, epoch, epoch_step,
                                          totals and asdict(totals), self.training.device, self.group)
        if self.rank == 0:
            checkpoint.save_atomic(ckpt, self.out / "checkpoint.pth")
            if keep:  # NOTE: named for the epochs done (checkpoint0020.pth after 20); the official names a checkpoint
                # for the epoch index that wrote it (checkpoint0000.pth, 0020, ... when epoch % saveckp_freq == 0)
                checkpoint.save_atomic(ckpt, self.out / f"checkpoint{epoch:04}.pth")

    def report_stop(self, epoch, epoch_step):
        self.print(f"stopped by {self.stop.signal or 'a signal to another process'}: {self.out / 'checkpoint.pth'} "
                   f"continues at epoch {epoch}, step {epoch_step}; to resume, run the same command again")

    def print(self, message):
        if self.rank == 0:
            print(message, flush=True)


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


def log(out, stats, message=None):
    """Append one JSON row to out/log.txt (the figures of an epoch), and print `message`."""
    with open(out / "log.txt", "a") as f:
        f.write(json.dumps(stats) + "\n")
    if message:
        print(message, flush=True)


def trim_log(out, start_epoch, start_step):
    """Keep the rows of log.txt of the epochs before start_epoch, and those of steps.txt up to optimizer step
    start_step: the later ones (logged by a run killed before their checkpoint) are trained again; a row cut by a
    kill goes too."""
    for name, keep in (("log.txt", lambda row: row["epoch"] < start_epoch),
                       ("steps.txt", lambda row: row["step"] <= start_step)):
        rows = (out / name).read_text().splitlines() if (out / name).exists() else []
        kept = [row for row in rows if row.endswith("}") and keep(json.loads(row))]
        if kept != rows:
            (out / f"{name}.tmp").write_text("".join(row + "\n" for row in kept))
            os.replace(out / f"{name}.tmp", out / name)


def draw_curves(out, out_dim):
    """out/curves.png (draw.training_curves); a picture that cannot be drawn is a warning, never a lost run."""
    try:
        draw.training_curves(out, out_dim)
    except Exception as e:  # the checkpoint is already saved: training goes on whatever the drawing does
        print(f"WARNING: could not draw {out / 'curves.png'} ({type(e).__name__}: {e})", flush=True)


def epoch_message(stats, out_dim):
    """The epoch's line, and a warning when the loss and the teacher's entropy show a collapse (Sec. 5.3)."""
    knn = f", k-NN top-1 {stats['knn_top1']:.2f}%" if "knn_top1" in stats else ""
    warning = collapse_warning(stats["train_loss"], stats["teacher_entropy"], out_dim)
    return f"epoch {stats['epoch']}: loss {stats['train_loss']:.4f} (epoch mean){knn}, {stats['epoch_time_s']} s" + (
        f"\nWARNING: {warning}" if warning else "")


def settings_summary(args, datasets, steps_per_epoch, world_size, device):
    """The block every run starts with: what it trains on, with what, for how long (what a preset chose included)."""
    step_images = args.batch_size_per_gpu * world_size * args.grad_accum_steps
    n = len(datasets.train)
    if datasets.labelled_test is None:
        knn = (f"no k-NN: {args.data_path} has no labels (the k-NN needs train/<class>/ and val/<class>/ folders); "
               f"the curves show loss, teacher entropy and KL")
    elif args.knn_every:
        knn = (f"k-NN every {args.knn_every} epoch(s): {len(datasets.labelled_test):,} test images against "
               f"{len(datasets.labelled_train):,}")
    else:
        knn = "no k-NN: --knn_every 0"
    used = steps_per_epoch * step_images
    left = (f"{n - used:,} left out by the last partial step" if used <= n else
            f"{used - n:,} repeated so that every process gets as many")  # DistributedSampler pads the shards
    crops = f"2 x {args.global_crop_size} px + {args.local_crops_number} x {args.local_crop_size} px"
    arch = f"{args.arch}/{args.patch_size}" if args.arch in vit.ARCHS else args.arch
    depth = f", {args.depth} blocks" if args.depth else ""
    return "\n".join([
        f"data: {args.data_path}: {n:,} images; {steps_per_epoch:,} steps of {step_images} per epoch "
        f"({used:,} images, {left})", knn,
        f"model: {arch}{depth}, out_dim {args.out_dim}, head width {args.head_hidden_dim}; crops {crops}",
        f"run: {args.epochs} epoch(s), lr {args.lr * step_images / 256:.2e} (base {args.lr} per 256), "
        f"teacher temp {args.warmup_teacher_temp} -> {args.teacher_temp}, momentum {args.momentum_teacher}, "
        f"{args.precision} on {device}, {world_size} process(es); output: {args.output_dir}/"])
