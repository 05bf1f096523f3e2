"""Weights and training state on disk: safe reading, official layouts, strict loading, atomic saving, exact resume.

- Every file is read with `torch.load(weights_only=True)`: a checkpoint can never run code from a pickle.
- `load_backbone` takes one of our checkpoints, an official training checkpoint or an official pretrained
  backbone file (dino_deitsmall16_pretrain.pth...) and loads it with strict=True, or says in one line what does
  not fit (missing / unexpected keys, wrong shapes, which ViT the file holds).
- Training state (`checkpoint_dict`, `resume`) holds what a resumed run needs to continue bit for bit, inside an
  epoch too: models, optimizer, scaler, center, RNG states and running sums of every rank. It is written
  atomically (`save_atomic`), and `StopFlag` turns SIGTERM / SIGINT into "checkpoint after this step and exit".
"""
import argparse
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

import vit
from cli import ConfigError

ARCHS = ("vit_tiny", "vit_small", "vit_base")


# --- models and weights ----------------------------------------------------------------------------------
def build_vit(arch, patch_size, depth=None, drop_path_rate=0.0):
    """A randomly initialized ViT of the official family (vit.py) by name."""
    if arch not in ARCHS:
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


# --- stopping on a signal, and the ranks' states -----------------------------------------------------------
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

    def report(self, out, epoch, iteration, main_process):
        if main_process:
            print(f"stopped by {self.signal or 'a signal to another process'}: {out / 'checkpoint.pth'} continues "
                  f"at epoch {epoch}, step {iteration}; to resume, run the same command again", flush=True)


# --- training state ----------------------------------------------------------------------------------------
def check_writable(out):
    """Fail before training, not at the first checkpoint, when --output_dir cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").touch()
        (out / ".write_test").unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to --output_dir {out} ({e}): choose a writable folder") from None


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
    totals of the epoch (a dict of tensors and numbers, moved to the CPU). `args` is a plain dict: the file loads
    with weights_only=True. Called by every rank."""
    totals = totals and {k: v.cpu() if torch.is_tensor(v) else v for k, v in totals.items()}
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
    return epoch, iteration, mine["totals"]


def check_resumable(ckpt, args, world_size):
    """ConfigError listing every difference that forbids resuming: the model, the head, the crops and, inside an
    epoch, the batch per process and the number of processes (the steps already done are counted in batches)."""
    saved = dict(ckpt.get("args", {}), world_size=ckpt.get("world_size", 1))
    now = dict(vars(args), world_size=world_size)
    keys = ["arch", "patch_size", "depth", "out_dim", "head_hidden_dim", "use_bn_in_head", "local_crops_number"]
    keys += ["batch_size_per_gpu", "world_size"] if ckpt.get("iteration") else []
    diff = [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in keys if k in saved and saved[k] != now[k]]
    if diff:
        raise ConfigError(f"{args.output_dir}/checkpoint.pth was trained with other settings ({'; '.join(diff)}): "
                          f"use another --output_dir or the same flags")


def log(out, stats, message=None):
    """Append one JSON row to out/log.txt (the figures of an epoch), and print `message`."""
    with open(out / "log.txt", "a") as f:
        f.write(json.dumps(stats) + "\n")
    if message:
        print(message, flush=True)


def trim_log(out, start_epoch):
    """Keep the rows of the epochs before start_epoch only: those after it (logged by a run killed before their
    checkpoint) are trained again; a row cut by a kill goes too."""
    rows = (out / "log.txt").read_text().splitlines() if (out / "log.txt").exists() else []
    kept = [row for row in rows if row.endswith("}") and json.loads(row)["epoch"] < start_epoch]
    if kept != rows:
        (out / "log.txt.tmp").write_text("".join(row + "\n" for row in kept))
        os.replace(out / "log.txt.tmp", out / "log.txt")
