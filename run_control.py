"""Run control for train.py's loop: everything a step does besides Algorithm 1.

    run = RunControl(args, epoch, steps_per_epoch, start_it, totals, stop, save, device)
    for it, batch in run.steps(micro_batches):      # the progress bar
        loss, entropy = train_step(...)              # Alg. 1
        if run.after_step(it, loss, entropy, unreadable):
            break                                    # stopped by a signal, after a checkpoint
    stats = run.epoch_stats()

After each optimizer step: the running sums of the epoch (kept on the device, read back every --log_every steps),
the unreadable-image budget, the non-finite-loss guard, the progress bar, the checkpoint every --saveckp_steps
steps, and SIGTERM / SIGINT turned into "checkpoint after this step and exit" (StopFlag). Also the log rows, the
epoch's line, and the launch under SLURM (srun's variables as torchrun's).
"""
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import draw
from cli import ConfigError
from loss import collapse_warning


@dataclass
class EpochTotals:
    """Running sums over an epoch's steps, kept on the device: read back every --log_every steps, not each step."""
    loss: torch.Tensor
    teacher_entropy: torch.Tensor
    nonfinite: torch.Tensor  # number of steps whose loss was NaN or infinite
    skipped: int = 0  # unreadable images replaced by readable ones


class RunControl:
    """The bookkeeping of one epoch (steps start_it, start_it + 1, ... of steps_per_epoch). save(it, totals)
    writes a checkpoint that continues at step `it`; stop: a StopFlag, or None."""

    def __init__(self, args, epoch, steps_per_epoch, start_it, totals, stop, save, device, warned, lr, out=None):
        self.args, self.epoch, self.niter, self.start_it = args, epoch, steps_per_epoch, start_it
        self.totals = totals or EpochTotals(*torch.zeros(3, device=device).unbind())
        self.out = out  # rank 0's output folder: every --log_every steps a row of out/steps.txt (curves.png)
        self.window = (start_it, self.totals.loss.clone(), self.totals.teacher_entropy.clone())
        self.stop, self.save, self.device, self.warned, self.lr = stop, save, device, warned, lr
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.images_per_step = args.batch_size_per_gpu * args.grad_accum_steps  # per process
        self.t0, self.seen, self.stopped_at = time.time(), 0, None

    def steps(self, batches):
        """(it, batch) for the epoch's remaining steps, with the progress bar (rank 0)."""
        # NOTE: under torchrun the bar's loss is rank 0's running mean; the epoch line and log.txt average all ranks
        label = f"epoch {self.epoch}/{self.args.epochs}" + (" (rank 0)" if self.world > 1 else "")
        self.bar = tqdm(batches, desc=label, initial=self.start_it, total=self.niter, dynamic_ncols=True,
                        disable=dist.is_initialized() and dist.get_rank() > 0)
        for it, batch in enumerate(self.bar, start=self.start_it):
            if self.stop:
                self.stop.begin_step()
            yield it, batch

    def after_step(self, it, loss, teacher_entropy, unreadable):
        """The bookkeeping of step `it`: True when the run stops here (a signal), after a checkpoint."""
        args, totals, step = self.args, self.totals, self.epoch * self.niter + it
        totals.skipped = data.count_unreadable(unreadable, totals.skipped, self.warned,
                                               self.niter * self.images_per_step, args.max_bad_fraction)
        totals.loss += loss.detach()
        totals.teacher_entropy += teacher_entropy
        totals.nonfinite += ~torch.isfinite(loss.detach())
        self.seen += self.images_per_step * self.world
        last = it == self.niter - 1
        if (it + 1) % args.log_every == 0 or last:
            self.check_finite(f"loss is {loss.item()} at epoch {self.epoch}, step {it}")  # one sync per log_every
            self.bar.set_postfix(loss=f"{totals.loss.item() / (it + 1):.4f}", lr=f"{self.lr[step]:.2e}",
                                 img_s=f"{self.images_per_s():.0f}")
            self.log_steps(it, step)
        # NOTE: the official code writes checkpoints only at the end of an epoch and does not catch signals.
        stopping = self.stop is not None and self.stop.end_step()
        if not last and (stopping or args.saveckp_steps and (step + 1) % args.saveckp_steps == 0):
            self.check_finite(f"non-finite loss in epoch {self.epoch}")  # never save weights after one
            self.save(it + 1, totals)  # the end of an epoch has its own checkpoint
        if stopping and not last:
            self.stopped_at = it + 1
        return self.stopped_at is not None

    def log_steps(self, it, step):
        """A row of out/steps.txt: the means over the steps since the last row (this process's)."""
        first, loss_sum, entropy_sum = self.window
        if self.out is None or it + 1 == first:
            return
        n = it + 1 - first
        loss, entropy = (self.totals.loss - loss_sum).item() / n, (self.totals.teacher_entropy - entropy_sum).item() / n
        with open(self.out / "steps.txt", "a") as f:
            f.write(json.dumps({"step": step + 1, "train_loss": loss, "teacher_entropy": entropy,
                                "kl_teacher_student": loss - entropy, "train_lr": float(self.lr[step])}) + "\n")
        self.window = (it + 1, self.totals.loss.clone(), self.totals.teacher_entropy.clone())

    def check_finite(self, what):
        if self.totals.nonfinite.item():
            raise SystemExit(f"{what}: stopping; the last good checkpoint is left as it was")

    def images_per_s(self):
        return self.seen / max(time.time() - self.t0, 1e-9)

    def epoch_stats(self, wd):
        """The log.txt figures of the epoch, the same on every rank: mean loss and entropy, unreadable images."""
        t, step = self.totals, (self.epoch + 1) * self.niter - 1
        figures = torch.stack([t.loss / self.niter, t.teacher_entropy / self.niter,
                               torch.tensor(float(t.skipped), device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(figures)
            figures[:2] /= dist.get_world_size()
        loss, entropy, skipped = figures.tolist()
        return {"step": step + 1, "train_loss": loss, "train_lr": float(self.lr[step]), "train_wd": float(wd[step]),
                "teacher_entropy": entropy, "kl_teacher_student": loss - entropy, "skipped_images": int(skipped),
                "images_per_s": round(self.images_per_s(), 1)}


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

    def report(self, out, epoch, iteration, main_process):
        if main_process:
            print(f"stopped by {self.signal or 'a signal to another process'}: {out / 'checkpoint.pth'} continues "
                  f"at epoch {epoch}, step {iteration}; to resume, run the same command again", flush=True)


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
    return f"epoch {stats['epoch']}: loss {stats['train_loss']:.4f}{knn}, {stats['epoch_time_s']} s" + (
        f"\nWARNING: {warning}" if warning else "")


def slurm_environment(env):
    """torchrun's variables from srun's, as the official code reads them: RANK = SLURM_PROCID, WORLD_SIZE =
    SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID; MASTER_ADDR: the first node of the job (scontrol), unless set."""
    master = env.get("MASTER_ADDR")
    if not master:
        nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        try:  # node[01-04] -> node01
            master = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                    check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            if "[" in nodes:
                raise ConfigError(f"cannot find the first node of {nodes} (no scontrol): set MASTER_ADDR") from None
            master = nodes.split(",")[0]
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"],
            "MASTER_ADDR": master, "MASTER_PORT": env.get("MASTER_PORT", "29500")}
