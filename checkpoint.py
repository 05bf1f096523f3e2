"""Weights and training state on disk: safe reading, official layouts, strict loading, atomic saving, exact resume.

- Every file is read with `torch.load(weights_only=True)`: a checkpoint can never run code from a pickle.
- `backbone_state_dict` finds the backbone in one of our checkpoints, an official training checkpoint or an
  official pretrained backbone file (dino_deitsmall16_pretrain.pth...); `load_strict` loads it with strict=True
  or says in one line what does not fit. backbone.py builds the model around them; `start_from` (--init_weights)
  loads a whole training checkpoint or a backbone into train.py's networks.
- Training state (`checkpoint_dict`, `resume`) holds what a resumed run needs to continue bit for bit, inside an
  epoch too: models, optimizer, scaler, center, RNG states and running sums of every rank. It is written
  atomically (`save_atomic`); `check_resumable` refuses a checkpoint that the current flags cannot continue.
- `to_timm`, `to_transformers` and back (`from_timm`...): a ViT under timm's and transformers' names, checked whole.
"""
import argparse
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from cli import ConfigError


# --- reading weights -------------------------------------------------------------------------------------
def load_state_dict(path):
    """What `path` holds, read with weights_only=True: a checkpoint can never run code from a pickle.

    Official training checkpoints store their `args` as an argparse.Namespace: that one class is allowed.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path} does not exist")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        with warnings.catch_warnings():  # a bare pickle (not torch's zip format) of protocol > 2 makes torch warn
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # that it may not read it: it
            return torch.load(path, map_location="cpu", weights_only=True)  # reads it, or we say why not below
    except Exception as e:
        # torch's own message is pages long and advises weights_only=False, which no flag here allows
        reason = ("it holds Python objects other than tensors and plain values (such a file could run code)"
                  if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e)
                  else f"it is not a file written by torch.save ({type(e).__name__})")
        raise ConfigError(f"cannot read {path} as a safe torch checkpoint: {reason}; expected train.py's "
                          f"checkpoint.pth, an official training checkpoint or an official backbone file") from None


def backbone_state_dict(ckpt, key="teacher"):
    """The ViT state dict in an official pretrained backbone file (a plain ViT state dict, taken as it is; timm's
    names are the same; a transformers ViTModel file is converted), an official training checkpoint (ckpt[key] with
    keys `module.backbone.*` for the DDP-wrapped student, `backbone.*` for the teacher) or one of ours. The head's
    keys (`head.*`, its weight norm as weight_g / weight_v or parametrizations.weight.original0 / 1) are left out."""
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
    if any(k.removeprefix("vit.").startswith(("embeddings.", "encoder.layer.", "layers.")) for k in sd):
        return from_transformers(sd)  # strict: all of it, or one line
    if any(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def start_from(path, state, fresh_head=False):
    """train.py --init_weights (NOTE: ours; main_dino.py cannot start from weights): load `path` into the student,
    teacher (MultiCropWrappers) and dino_loss of `state`; what was loaded, in words. A training checkpoint (ours, or
    an official full one: `module.` dropped, newer weight-norm names mapped to weight_g / weight_v) gives both
    networks, heads and center; a backbone file (or fresh_head) only the backbones, the heads staying at random
    init (the teacher's a copy of the student's). Strict: what does not fit is one line."""
    ckpt = load_state_dict(path)
    student, teacher = state["student"], state["teacher"]
    hint = "check --arch, --patch_size, --depth, --out_dim and --head_hidden_dim, or --fresh_head for a new head"
    full = isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("student", "teacher"))
    rename = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    weights = {name: {next((k.replace(a, b) for a, b in rename.items() if k.endswith(a)), k): v
                      for k, v in ((k.removeprefix("module."), v) for k, v in ckpt[name].items())}
               for name in ("student", "teacher")} if full else {}
    if full and not fresh_head:
        load_strict(student, weights["student"], f"{path} (student)", hint)
        load_strict(teacher, weights["teacher"], f"{path} (teacher)", hint)
        center = ckpt.get("dino_loss", {}).get("center")
        if center is not None:
            load_strict(state["dino_loss"], {"center": center}, f"{path} (center)", hint)
        return "student, teacher, heads" + (" and center" if center is not None else "")
    for net, name in ((student, "student"), (teacher, "teacher")):
        what = f"{path} ({name})" if full else str(path)
        load_strict(net.backbone, backbone_state_dict(weights.get(name, ckpt)), what, hint)
    teacher.head.load_state_dict(student.head.state_dict())
    return "backbones; the heads start at random init" + (" (--fresh_head)" if fresh_head else " (a backbone file)")


def load_strict(model, state_dict, what, hint="check --arch, --patch_size and --checkpoint_key"):
    """model.load_state_dict(strict=True), shapes included, or one line naming what does not fit (and `hint`)."""
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
        raise ConfigError(f"{what} does not fit the model: {'; '.join(problems)}; {hint}")
    model.load_state_dict(state_dict)


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


def gather(obj, group):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] for one process."""
    if group is None:
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj, group=group)
    return objs


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


# What a resumed run must share with the checkpoint: the shapes of the models and crops, and what shapes the optimizer's
# state (its kind; norm_last_layer: one tensor more or fewer) and the scaler's (fp16 keeps a loss scale, bf16 none).
RESUME_KEYS = ["arch", "patch_size", "depth", "out_dim", "head_hidden_dim", "use_bn_in_head", "norm_last_layer",
               "local_crops_number", "optimizer"]


def check_resumable(ckpt, args, world_size):
    """ConfigError listing every difference that forbids resuming: RESUME_KEYS, fp16 or not and, inside an epoch,
    the batch per process, the micro-batches per step and the number of processes (steps are counted in batches)."""
    saved = dict(ckpt.get("args", {}), world_size=ckpt.get("world_size", 1))
    now = dict(vars(args), world_size=world_size)
    for a in (saved, now):
        a["fp16 (GradScaler)"] = a.get("precision") == "fp16"
        a.setdefault("grad_accum_steps", 1)
    keys = RESUME_KEYS + ["fp16 (GradScaler)"]
    keys += ["batch_size_per_gpu", "grad_accum_steps", "world_size"] if ckpt.get("iteration") else []
    diff = [f"{k}: checkpoint {saved[k]!r}, now {now.get(k)!r}" for k in keys if k in saved and saved[k] != now.get(k)]
    if diff:
        raise ConfigError(f"{args.output_dir}/checkpoint.pth was trained with other settings ({'; '.join(diff)}): "
                          f"use another --output_dir or the same flags")


# --- other libraries' layouts: timm and Hugging Face transformers ----------------------------------------------
# One ViT, two sets of names. timm's DINO models (vit_small_patch16_224.dino..., created with num_classes=0) have
# exactly the official names and shapes (checked with timm 1.0.31): their map is the identity, behind the same
# strict checks. transformers' ViTModel renames every tensor and splits qkv into query, key and value. Its files
# (facebook/dino-vits16, save_pretrained) use HF_BLOCK's first names in every version; since transformers 5 a
# model in memory names block i `layers.i.` and uses the second ones. Its from_pretrained reads both.
HF_TOP = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
          "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
          "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
          "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
HF_BLOCK = {  # blocks.i.<part> -> (encoder.layer.i.<names in files>, layers.i.<names in memory, transformers >= 5>)
    "norm1": (["layernorm_before"], ["layernorm_before"]),
    "attn.qkv": (["attention.attention.query", "attention.attention.key", "attention.attention.value"],
                 ["attention.q_proj", "attention.k_proj", "attention.v_proj"]),
    "attn.proj": (["attention.output.dense"], ["attention.o_proj"]),
    "norm2": (["layernorm_after"], ["layernorm_after"]),
    "mlp.fc1": (["intermediate.dense"], ["mlp.fc1"]),
    "mlp.fc2": (["output.dense"], ["mlp.fc2"]),
}


def transformers_names(name, in_memory=False):
    """The transformers names of the official tensor `name`: three for attn.qkv (query, key, value), else one."""
    if name in HF_TOP:
        return [HF_TOP[name]]
    _, i, rest = name.split(".", 2)  # blocks.<i>.<part>.<weight|bias>
    part, kind = rest.rsplit(".", 1)
    block = f"layers.{i}" if in_memory else f"encoder.layer.{i}"
    return [f"{block}.{p}.{kind}" for p in HF_BLOCK[part][in_memory]]


def official_names(name):
    """The official (and timm's) names of the official tensor `name`: itself."""
    return [name]


def vit_shapes(sd, names, what):
    """Official name -> shape of the ViT that `sd` holds, in the layout where the official tensor n is names(n)[0]:
    width D, channels and patch p from the patch embedding, 1 + patches from the position embedding, MLP width from
    block 0, depth from the highest block number. ConfigError when these tensors are not there."""
    anchors = {names(n)[0]: ndim for n, ndim in [("patch_embed.proj.weight", 4), ("pos_embed", 3),
                                                 ("blocks.0.mlp.fc1.weight", 2)]}
    if absent := [a for a, ndim in anchors.items() if a not in sd or sd[a].ndim != ndim]:
        raise ConfigError(f"{what} is not a ViT in this layout: no {' or '.join(absent)} (its first keys: "
                          f"{', '.join(list(sd)[:4])})")
    (D, c, p, _), (_, positions, _), (hidden, _) = (sd[a].shape for a in anchors)
    block = ("blocks.", "encoder.layer.", "layers.")  # block i in the official, transformers' file and memory names
    numbers = [k.removeprefix("encoder.").split(".")[1] for k in sd if k.startswith(block)]
    depth = 1 + max(int(n) for n in numbers if n.isdigit())
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, positions, D), "patch_embed.proj.weight": (D, c, p, p),
              "patch_embed.proj.bias": (D,)}
    for i in range(depth):  # (output, input) of each part; a LayerNorm has no input
        for part, out, inp in [("norm1", D, None), ("attn.qkv", 3 * D, D), ("attn.proj", D, D), ("norm2", D, None),
                               ("mlp.fc1", hidden, D), ("mlp.fc2", D, hidden)]:
            shapes[f"blocks.{i}.{part}.weight"] = (out, inp) if inp else (out,)
            shapes[f"blocks.{i}.{part}.bias"] = (out,)
    return shapes | {"norm.weight": (D,), "norm.bias": (D,)}


def describe_vit(shapes):
    """'a ViT of width D, patch p, n blocks' from official name -> shape."""
    depth = sum(k.endswith(".norm1.weight") for k in shapes)
    return f"a ViT of width {shapes['cls_token'][2]}, patch {shapes['patch_embed.proj.weight'][2]}, {depth} blocks"


def check_layout(sd, expected, what):
    """Nothing if `sd` has exactly the names and shapes of `expected` (name -> shape), else a one-line ConfigError
    that counts the missing keys, the keys left over and the wrong shapes, and names the first four of each."""
    found = {"missing keys": [k for k in expected if k not in sd],
             "unexpected keys": [k for k in sd if k not in expected],
             "wrong shapes (file vs expected)": [f"{k} {tuple(sd[k].shape)} vs {s}" for k, s in expected.items()
                                                 if k in sd and tuple(sd[k].shape) != s]}
    problems = [f"{label} {len(items)} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})"
                for label, items in found.items() if items]
    if problems:
        raise ConfigError(f"{what} is not whole, and nothing of it is converted: {'; '.join(problems)}")


def from_official(sd, names):
    """The official state dict `sd` under the names given by names(official name), every tensor checked."""
    shapes = vit_shapes(sd, official_names, "the official state dict")
    check_layout(sd, shapes, f"the official state dict ({describe_vit(shapes)})")
    out = {}
    for name in shapes:
        new = names(name)
        # attn.qkv (3D, D) -> query, key, value (D, D) each: vit.py's reshape (B, N, 3, H, D/H) puts q, k, v outermost.
        # Copies, so that each owns its memory (safetensors refuses tensors that share it).
        out |= dict(zip(new, [sd[name]] if len(new) == 1 else [t.clone() for t in sd[name].chunk(len(new))]))
    return out


def to_official(sd, names, layout):
    """A state dict of `layout`, where the official tensor n is called names(n), under the official names, every
    tensor checked."""
    shapes = vit_shapes(sd, names, f"the {layout} state dict")
    expected = {}
    for name, (rows, *rest) in shapes.items():  # attn.qkv (3D, D) = query, key, value (D, D) each
        expected |= {n: (rows // len(names(name)), *rest) for n in names(name)}
    check_layout(sd, expected, f"the {layout} state dict ({describe_vit(shapes)})")
    # query, key, value (D, D) each -> attn.qkv (3D, D), concatenated in this order
    return {name: sd[names(name)[0]] if len(names(name)) == 1 else torch.cat([sd[n] for n in names(name)])
            for name in shapes}


def to_timm(sd):
    """An official state dict under timm's names: the same ones (timm's DINO models use the official names), checked."""
    return from_official(sd, official_names)


def from_timm(sd):
    """A timm state dict (vit_*.dino, num_classes=0) under the official names: the same ones, checked. A `head.*`
    (num_classes > 0) or `fc_norm.*` (global_pool='avg') is refused by name: DINO's backbone has neither."""
    return to_official(sd, official_names, "timm")


def to_transformers(sd):
    """An official state dict under the names of transformers' ViTModel files (facebook/dino-vits16, save_pretrained):
    ViTModel.from_pretrained(None, config=config, state_dict=sd) loads it in every version."""
    return from_official(sd, transformers_names)


def from_transformers(sd):
    """A transformers ViTModel state dict under the official names: the names of its files or (transformers >= 5) of
    a model in memory, with or without the `vit.` prefix of ViTForImageClassification. A pooler (pooler.dense) or a
    classifier is refused by name: DINO's backbone has neither."""
    sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    in_memory = any(k.startswith("layers.") for k in sd)
    return to_official(sd, lambda name: transformers_names(name, in_memory), "transformers")


def detect_layout(sd):
    """"transformers" (ViTModel's names) or "official" (the names timm's DINO models use too: "official" is "timm")."""
    names = [k.removeprefix("vit.") for k in sd]
    if any(k.startswith(("embeddings.", "encoder.layer.", "layers.")) for k in names):
        return "transformers"
    if any(k.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.")) for k in names):
        return "official"
    raise ConfigError(f"the state dict holds neither a ViT of the official (= timm) layout nor of the transformers "
                      f"one: its first keys are {', '.join(list(sd)[:4])}")
