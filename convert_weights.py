"""Convert a ViT backbone's weights between the official DINO names (ours, and timm's) and Hugging Face transformers'.

    python convert_weights.py output/checkpoint.pth vit_hf.pth --to transformers     # our teacher -> transformers
    python convert_weights.py dino_deitsmall16_pretrain.pth vit_timm.pth --to timm   # official file -> timm
    python convert_weights.py vit_hf.pth vit.pth --to official                       # transformers -> ours

IN is one of our checkpoints (train.py's output: --checkpoint_key picks teacher or student), an official backbone
file or training checkpoint, a timm state dict or a transformers ViTModel state dict: its layout is detected. OUT is
a plain state dict (torch.save), written only when every tensor of the backbone is there, none is left over and every
shape fits (checkpoint.py, "other libraries' layouts"). timm's DINO models use the official names, so `--to timm`
checks and copies. transformers' names are those of its files: ViTModel.from_pretrained(None, config=config,
state_dict=torch.load(OUT)) loads them in every version (transformers 4: model.load_state_dict too).
"""
import torch

import checkpoint
import cli

CONVERT = {"official": lambda sd: sd, "timm": checkpoint.to_timm, "transformers": checkpoint.to_transformers}


def main(argv=None):
    p = cli.ArgumentParser(description="Convert a ViT backbone between the official DINO (= timm) and the Hugging "
                           "Face transformers layouts, strictly: every tensor used, every shape checked")
    p.add_argument("input", help="our checkpoint, an official backbone file or training checkpoint, a timm or "
                   "transformers state dict (.pth, written by torch.save)")
    p.add_argument("output", help="where the converted state dict is written (torch.save, atomically)")
    p.add_argument("--to", required=True, choices=list(CONVERT), help="the layout written (required, no default): "
                   "official (vit.py's names, as the official DINO files), timm (the same names) or transformers "
                   "(the names of ViTModel's files)")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="which network of a training checkpoint (the paper evaluates the teacher); ignored for a "
                   "plain state dict, which holds one network")
    args = p.parse_args(argv)
    for path in (args.input, args.output):
        if str(path).endswith(".safetensors"):
            raise cli.ConfigError(f"{path}: .safetensors files are out of scope (this script reads and writes "
                                  f"torch.save files): convert with safetensors.torch.load_file / save_file")
    ckpt = checkpoint.load_state_dict(args.input)
    plain = isinstance(ckpt, dict) and all(torch.is_tensor(v) for v in ckpt.values())
    layout = checkpoint.detect_layout(ckpt) if plain else "official"  # a training checkpoint: ours or official
    sd = ckpt if plain else checkpoint.backbone_state_dict(ckpt, args.checkpoint_key)
    official = checkpoint.from_timm(checkpoint.backbone_state_dict(sd))  # transformers' names converted on the way
    out = CONVERT[args.to](official)
    checkpoint.save_atomic(out, args.output)
    key = f" ({args.checkpoint_key})" if isinstance(ckpt.get(args.checkpoint_key), dict) else ""
    print(f"read {args.input}{key}: {layout} layout{' (= timm)' if layout == 'official' else ''}, {len(sd)} tensors, "
          f"{checkpoint.describe_vit({k: v.shape for k, v in official.items()})}; wrote {args.output}: {args.to} "
          f"layout, {len(out)} tensors")


if __name__ == "__main__":
    cli.run_cli(main)
