"""One way to get a backbone: the flags every script shares, the model built from them, the evaluation size, the
flags that choose a backbone's dense descriptors (add_descriptor_args, resolve_descriptor_args), and the linear
protocol's feature (ProbeFeatures: the last blocks' CLS tokens, paper Sec. 4.1).

Every script that looks at a backbone (eval_knn.py, eval_linear.py, visualize_attention.py, the dense,
video and retrieval scripts) gets it here, so the flags, their defaults, the device check and the message of
a random init are the same everywhere:

    import backbone, cli
    p = cli.ArgumentParser(description="...")
    backbone.add_args(p)  # --pretrained_weights --checkpoint_key --arch --patch_size --depth --device
    args = p.parse_args()
    model, saved = backbone.from_args(args)  # in eval mode on args.device; saved: the training args, or {}

`--pretrained_weights` is one of our checkpoints (train.py's output/checkpoint.pth, the default), an official
training checkpoint or an official pretrained backbone file (dino_deitsmall16_pretrain.pth...); `random`
gives the architecture at random init (seed 0), the baseline that has learned nothing.
"""
import argparse
import os

import torch
import torch.nn as nn
import torchvision

import checkpoint
import cli
import dense
import vit
from cli import ConfigError

RANDOM = "random"  # --pretrained_weights random: no weights


def add_args(parser):
    """The backbone flags, in a group of their own, with one set of defaults for every script."""
    g = parser.add_argument_group("backbone")
    g.add_argument("--pretrained_weights", default="output/checkpoint.pth", help="our checkpoint (train.py's "
                   "output), an official training checkpoint or an official backbone file "
                   f"(dino_deitsmall16_pretrain.pth...); '{RANDOM}': the architecture at random init (seed 0)")
    g.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="which network of a training checkpoint (official code: the teacher, which "
                   "'has better performance than the student throughout the training', paper Sec. 3.1)")
    g.add_argument("--arch", type=arch_name, default=None, help="vit_tiny, vit_small, vit_base or a torchvision "
                   "model (resnet50); default: the checkpoint's, else vit_small (official backbone files hold no args)")
    g.add_argument("--patch_size", type=cli.positive_int, default=None, help="default: the checkpoint's, else 16")
    g.add_argument("--depth", type=cli.positive_int, default=None,
                   help="number of blocks (default: the checkpoint's, else the arch's 12)")
    g.add_argument("--device", type=cli.device, default=None, help="cuda or cpu (default: cuda when available)")
    return g


def default_device(name=None):
    """torch.device(name), or cuda when this machine has a GPU, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def unknown_arch(name):
    return f"unknown arch {name!r}: {', '.join(vit.ARCHS)} or a torchvision classification model such as resnet50"


def arch_name(name):
    """An argparse type: a ViT of vit.py (vit_tiny, vit_small, vit_base) or a torchvision classification model."""
    if name not in vit.ARCHS and name not in torchvision.models.list_models(module=torchvision.models):
        raise argparse.ArgumentTypeError(unknown_arch(name))
    return name


def build(arch, patch_size=16, depth=None, drop_path_rate=0.0):
    """A randomly initialized backbone by name: a ViT of vit.py, or a torchvision model without its classifier."""
    if arch in vit.ARCHS:
        return vit.ARCHS[arch](patch_size=patch_size, drop_path_rate=drop_path_rate,
                               **({"depth": depth} if depth else {}))
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError:
        raise ConfigError(unknown_arch(arch)) from None
    # As the official code: the classifier (the last linear layer: resnet50's fc) becomes an identity, so the
    # backbone gives its pooled features, embed_dim wide. NOTE: the official replaces `fc` (and `head`) only.
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, child = name.rpartition(".")
    model.embed_dim = getattr(model.get_submodule(parent), child).in_features
    setattr(model.get_submodule(parent), child, nn.Identity())
    model.arch_name = arch
    return model


def is_vit(model):
    return isinstance(model, vit.VisionTransformer)


def load(path, arch=None, patch_size=None, key="teacher", depth=None):
    """(backbone with the weights of `path`, the training args saved with them as a dict, {} for a backbone file).

    arch, patch_size and depth default to the checkpoint's args, else the official vit_small with patch 16.
    """
    ckpt = checkpoint.load_state_dict(path)
    state_dict = checkpoint.backbone_state_dict(ckpt, key)
    saved = ckpt.get("args", {})
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)  # official: a Namespace
    model = build(arch or saved.get("arch", "vit_small"), patch_size or saved.get("patch_size", 16),
                  depth or saved.get("depth"))
    checkpoint.load_strict(model, state_dict, f"{path} ({key})" if isinstance(ckpt.get(key), dict) else str(path))
    return model, saved


def from_args(args, needs_vit=None):
    """(backbone in eval mode on the device, saved training args) from the flags of add_args.

    Fills in what the flags left open: args.device becomes a torch.device, and args.arch, args.patch_size and
    args.depth say what was built. needs_vit: the script's name when it works on a ViT's patches or attention
    (a convnet is then refused in one line).
    """
    args.device = default_device(args.device)
    if args.pretrained_weights == RANDOM:
        torch.manual_seed(0)
        model, saved = build(args.arch or "vit_small", args.patch_size or 16, args.depth), {}
        print(f"--pretrained_weights {RANDOM}: {describe(model, args.arch or 'vit_small')} at random init (seed 0), "
              f"a baseline that has learned nothing")
    else:
        if args.pretrained_weights == "output/checkpoint.pth" and not os.path.isfile(args.pretrained_weights):
            raise ConfigError("output/checkpoint.pth does not exist: train first (python train.py), or give "
                              f"--pretrained_weights a weights file, or '{RANDOM}' for a random init")
        model, saved = load(args.pretrained_weights, args.arch, args.patch_size, args.checkpoint_key, args.depth)
    args.arch = args.arch or saved.get("arch", "vit_small")
    if needs_vit and not is_vit(model):
        raise ConfigError(f"{needs_vit} needs a ViT ({', '.join(vit.ARCHS)}): {args.arch} has no patch tokens "
                          f"or attention")
    args.patch_size, args.depth = getattr(model, "patch_size", None), len(getattr(model, "blocks", [])) or None
    return model.to(args.device).eval(), saved


def describe(model, arch):
    return f"{arch}/{model.patch_size}" if is_vit(model) else arch


def random_like(model, seed=0):
    """The same architecture as `model` at random init (seed `seed`), in eval mode on the same device."""
    torch.manual_seed(seed)
    if is_vit(model):
        random = vit.VisionTransformer(model.patch_size, model.embed_dim, len(model.blocks), model.num_heads)
    else:
        random = build(model.arch_name)
    return random.to(next(model.parameters()).device).eval()


def eval_size(requested, saved, dataset_size, patch_size, flag="--image_size"):
    """The evaluation crop side: the one asked for, else the global crop size the backbone was trained at, else
    the dataset's image side; a multiple of the patch size."""
    size = requested or saved.get("global_crop_size") or dataset_size
    if patch_size and size % patch_size:
        origin = f"{flag} {size}" if requested else (f"the evaluation size {size} (the checkpoint's global crop size)"
                 if saved.get("global_crop_size") else f"the evaluation size {size} (the dataset's image size)")
        raise ConfigError(f"{origin} is not a multiple of the patch size {patch_size}: give {flag} a multiple")
    return size


# --- dense descriptors of the backbone: which block, facet and stride (cosegment, correspond, pca, similarity) ----
def add_descriptor_args(parser, layer_default, bin_default=False):
    """The flags that choose the backbone's dense descriptors (Amir et al. Sec. 3), in a group of their own:
    --layer (its default, said by layer_default, is set by resolve_descriptor_args), --facet, --stride, --bin."""
    g = parser.add_argument_group("descriptors (Amir et al. Sec. 3)")
    g.add_argument("--layer", type=cli.nonneg_int, default=None, help="block (from 0) whose facet is the "
                   f"descriptor; default: {layer_default}")
    g.add_argument("--facet", default="key", choices=dense.FACETS, help="key, query, value of the attention (heads "
                   "concatenated) or token (the block's output)")
    g.add_argument("--stride", type=cli.positive_int, default=None, help="patches taken every STRIDE pixels, a "
                   "divisor of the patch size; smaller: overlapping patches, a finer grid (reference: 4 for patch "
                   "8); default: the patch size")
    g.add_argument("--bin", type=cli.bool_flag, default=bin_default, help="log-binning: each descriptor with the "
                   "averages of its 9 x 9 neighbourhood, 17 bins (Sec. 3.1)")
    return g


def resolve_descriptor_args(model, args, layer):
    """Fill in args.layer (default `layer`) and args.stride (default the patch size) and check them for this
    model: a wrong one is a one-line error that names its flag."""
    args.layer = layer if args.layer is None else args.layer
    args.stride = args.stride or model.patch_size
    if problem := dense.settings_error(model, args.layer, args.stride):
        raise ConfigError(f"--{problem}")  # "--stride 3 does not divide ..."


# --- the linear protocol's feature (eval_linear.py, extract_features.py) ----------------------------------------
class ProbeFeatures(nn.Module):
    """The frozen feature of the linear protocol: normalized images (B, 3, S, S) -> (B, F)."""

    def __init__(self, model, n_last_blocks=4, avgpool_patchtokens=False):
        super().__init__()
        self.backbone, self.n_last_blocks, self.avgpool_patchtokens = model, n_last_blocks, avgpool_patchtokens
        if not hasattr(model, "blocks"):  # a convnet (resnet50): its pooled features, as the official protocol
            self.dim = model.embed_dim
            return
        if not 1 <= n_last_blocks <= len(model.blocks):
            raise ConfigError(f"--n_last_blocks {n_last_blocks}: the backbone has {len(model.blocks)} blocks")
        self.dim = model.embed_dim * (n_last_blocks + int(avgpool_patchtokens))

    @torch.no_grad()
    def forward(self, x):
        if not hasattr(self.backbone, "blocks"):
            return self.backbone(x)  # (B, F)
        return self.from_blocks(self.backbone.get_intermediate_layers(x, self.n_last_blocks))

    def from_blocks(self, blocks):
        """The feature of the last n blocks' normed outputs, n x (B, 1+N, D), as get_intermediate_layers gives them."""
        feats = [out[:, 0] for out in blocks]  # the CLS tokens, n x (B, D)
        if self.avgpool_patchtokens:
            feats.append(blocks[-1][:, 1:].mean(dim=1))  # (B, D): average of the last block's patch tokens
        return torch.cat(feats, dim=-1)  # (B, F)
