"""The official DINO weight files load strictly, and files that do not fit are refused with one clear line.

The files are built here with the official names and shapes (tests/official_dino_state_dict_shapes.json, read
from the official releases) and random values: a pretrained backbone file (a plain ViT state dict) and a full
training checkpoint (student under DDP: `module.backbone.*`, `module.head.*`; teacher: `backbone.*`, `head.*`;
args an argparse.Namespace), whose head is saved with either weight-norm naming.
"""
import argparse
import json
from pathlib import Path

import pytest
import torch

import backbone
from cli import ConfigError
from head import DINOHead, MultiCropWrapper

FACTS = Path(__file__).resolve().parent / "official_dino_state_dict_shapes.json"  # of the official releases
SHAPES = json.loads(FACTS.read_text()) if FACTS.exists() else None
needs_shapes = pytest.mark.skipif(SHAPES is None, reason="official_dino_state_dict_shapes.json not found")


def random_tensors(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def constant_tensors(shapes, value):
    """Tensors whose values do not matter: a stride-0 view of one number, saved as one number (small files)."""
    return {name: torch.full((1,), value).expand(shape) for name, shape in shapes.items()}


def head_tensors(parametrizations):
    """The official DINO head of ViT-S, named as torch < 2.1 saves weight norm or as newer torch does."""
    head = constant_tensors(SHAPES["dino_head_384_65536"], 0.5)
    if parametrizations:
        head["last_layer.parametrizations.weight.original0"] = head.pop("last_layer.weight_g")
        head["last_layer.parametrizations.weight.original1"] = head.pop("last_layer.weight_v")
    return head


def assert_loaded(model, tensors):
    sd = model.state_dict()
    assert sd.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(sd[name], t), name


@pytest.fixture(scope="module")
def teacher_backbone():
    return random_tensors(SHAPES["vit_small_p16"], seed=0) if SHAPES else None


@needs_shapes
def test_official_pretrained_backbone_file_loads_exactly(tmp_path, teacher_backbone):
    """dino_deitsmall16_pretrain.pth is a plain state dict of the ViT-S/16: every tensor arrives unchanged."""
    torch.save(teacher_backbone, tmp_path / "dino_deitsmall16_pretrain.pth")
    model, saved = backbone.load(tmp_path / "dino_deitsmall16_pretrain.pth", "vit_small", 16)
    assert_loaded(model, teacher_backbone)
    assert saved == {}


@needs_shapes
@pytest.mark.parametrize("parametrizations", [False, True], ids=["weight_g_v", "parametrizations"])
def test_official_full_checkpoint_loads_teacher_or_student(tmp_path, teacher_backbone, parametrizations):
    """The teacher is the network evaluated, as in the official code (paper Sec. 3.1: it "has better performance
    than the student throughout the training"). --checkpoint_key student takes the DDP student instead;
    arch and patch size come from the checkpoint's args, an argparse.Namespace read with weights_only=True."""
    student_backbone = constant_tensors(SHAPES["vit_small_p16"], 0.25)
    head = head_tensors(parametrizations)
    ckpt = {"student": {f"module.backbone.{k}": v for k, v in student_backbone.items()}
            | {f"module.head.{k}": v for k, v in head.items()},
            "teacher": {f"backbone.{k}": v for k, v in teacher_backbone.items()}
            | {f"head.{k}": v for k, v in head.items()},
            "optimizer": {}, "epoch": 100, "dino_loss": {"center": torch.zeros(1, 65536)},
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, global_crops_scale=(0.4, 1.0))}
    path = tmp_path / "dino_deitsmall16_full_checkpoint.pth"
    torch.save(ckpt, path)
    model, saved = backbone.load(path)  # no --arch / --patch_size: read from args
    assert_loaded(model, teacher_backbone)
    assert saved["arch"] == "vit_small" and saved["out_dim"] == 65536
    model, _ = backbone.load(path, key="student")
    assert_loaded(model, {k: v.contiguous() for k, v in student_backbone.items()})


def test_our_checkpoint_loads_with_the_architecture_it_records(tmp_path):
    """train.py saves MultiCropWrapper state dicts and args as a plain dict (arch, patch_size, depth, ...)."""
    torch.manual_seed(0)
    wrapper = MultiCropWrapper(backbone.build("vit_tiny", 7, depth=2), DINOHead(192, 64))
    args = {"arch": "vit_tiny", "patch_size": 7, "depth": 2, "out_dim": 64, "global_crop_size": 28}
    torch.save({"student": wrapper.state_dict(), "teacher": wrapper.state_dict(), "args": args, "epoch": 1},
               tmp_path / "checkpoint.pth")
    model, saved = backbone.load(tmp_path / "checkpoint.pth")
    assert len(model.blocks) == 2 and model.patch_size == 7 and saved["global_crop_size"] == 28
    assert_loaded(model, wrapper.backbone.state_dict())


@needs_shapes
@pytest.mark.parametrize("arch, patch_size, file_shapes, messages", [
    ("vit_base", 16, "vit_small_p16", ["wrong shapes (file vs model) 150 (cls_token (1, 1, 384) vs (1, 1, 768), ",
                                       "the file holds a ViT of width 384, patch 16, 12 blocks"]),
    ("vit_small", 16, "vit_small_p8", ["wrong shapes (file vs model) 2 (pos_embed (1, 785, 384) vs (1, 197, 384), "
                                       "patch_embed.proj.weight (384, 3, 8, 8) vs (384, 3, 16, 16))",
                                       "the file holds a ViT of width 384, patch 8, 12 blocks"]),
    ("vit_small", 16, "resnet", ["missing keys 150 (blocks.0.attn.proj.bias, blocks.0.attn.proj.weight, ",
                                 "unexpected keys 2 (conv1.weight, fc.weight)"]),
])
def test_a_file_that_does_not_fit_is_refused_in_one_line(tmp_path, arch, patch_size, file_shapes, messages):
    """Never a silent partial load (the official code loads with strict=False): missing, unexpected and
    mis-shaped keys are named, with what the file holds and the flags to check."""
    shapes = SHAPES.get(file_shapes, {"conv1.weight": [64, 3, 7, 7], "fc.weight": [1000, 2048]})
    torch.save(constant_tensors(shapes, 0.0), tmp_path / "weights.pth")
    with pytest.raises(ConfigError) as error:
        backbone.load(tmp_path / "weights.pth", arch, patch_size)
    message = str(error.value)
    assert all(m in message for m in messages) and "\n" not in message
    assert message.endswith("check --arch, --patch_size and --checkpoint_key")


class NotAllowed:
    pass


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """weights_only=True: a pickle naming any other class than tensors, containers and Namespace is not loaded."""
    torch.save({"teacher": {}, "args": NotAllowed()}, tmp_path / "unsafe.pth")
    with pytest.raises(ConfigError, match="cannot read .* as a safe torch checkpoint"):
        backbone.load(tmp_path / "unsafe.pth")


def test_a_missing_checkpoint_key_names_the_keys_there(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="no 'teacher' entry .*epoch, model"):
        backbone.load(tmp_path / "other.pth")
