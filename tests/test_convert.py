"""A ViT backbone moves between the official DINO names (ours, timm's) and transformers' exactly, or not at all.

The state dicts here are synthetic: tiny ViTs of vit.py, and tensors with the names and shapes that timm 1.0.31 and
transformers 5.25.0 give a ViT-S/16 (tests/timm_vit_state_dict_shapes.json, tests/transformers_vit_state_dict_shapes
.json, generated once from those libraries with random weights; tests/official_dino_state_dict_shapes.json: the
official releases). The same features in the libraries themselves were checked outside the tests (see the README).
"""
import json
from pathlib import Path

import pytest
import torch

import backbone
import checkpoint
import cli
import convert_weights
from cli import ConfigError
from conftest import tiny_vit, write_checkpoint

HERE = Path(__file__).resolve().parent
SHAPES = {name: json.loads((HERE / f"{file}_state_dict_shapes.json").read_text())
          for name, file in [("official", "official_dino"), ("timm", "timm_vit"), ("transformers", "transformers_vit")]}


def names_and_shapes(sd):
    return {k: list(v.shape) for k, v in sd.items()}


def meta_tensors(shapes):
    """Tensors with only names and shapes (no memory): what the maps read to check a layout."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def assert_equal(a, b):
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("to, back", [(checkpoint.to_timm, checkpoint.from_timm),
                                      (checkpoint.to_transformers, checkpoint.from_transformers)],
                         ids=["timm", "transformers"])
def test_official_to_library_and_back_is_exact(to, back):
    sd = tiny_vit(seed=0).state_dict()
    assert_equal(back(to(sd)), sd)


def test_query_key_value_are_the_rows_of_qkv_in_this_order():
    """vit.py's reshape (B, N, 3, H, D/H) of qkv's output: rows [0, D) are the query, [D, 2D) the key, [2D, 3D) the
    value, as transformers' separate query, key and value."""
    sd = tiny_vit(seed=0).state_dict()
    hf = checkpoint.to_transformers(sd)
    q, k, v = sd["blocks.1.attn.qkv.weight"].split(192)  # (3D, D) -> 3 x (D, D)
    layer = "encoder.layer.1.attention.attention"
    assert all(torch.equal(hf[f"{layer}.{n}.weight"], t) for n, t in [("query", q), ("key", k), ("value", v)])


def test_official_shapes_become_each_librarys_names_and_shapes_and_back():
    official = meta_tensors(SHAPES["official"]["vit_small_p16"])
    for to, back, library in [(checkpoint.to_timm, checkpoint.from_timm, SHAPES["timm"]["vit_small_p16"]),
                              (checkpoint.to_transformers, checkpoint.from_transformers,
                               SHAPES["transformers"]["vit_small_p16"])]:
        assert names_and_shapes(to(official)) == library
        assert names_and_shapes(back(meta_tensors(library))) == SHAPES["official"]["vit_small_p16"]


def test_transformers_5_names_in_memory_and_the_vit_prefix_are_read_too():
    """transformers >= 5 names a model's tensors in memory otherwise than its files (layers.i.attention.q_proj...);
    ViTForImageClassification prefixes them with `vit.`."""
    in_memory_names = lambda name: checkpoint.transformers_names(name, in_memory=True)
    official, in_memory = SHAPES["official"]["vit_small_p16"], SHAPES["transformers"]["vit_small_p16_in_memory"]
    assert names_and_shapes(checkpoint.from_official(meta_tensors(official), in_memory_names)) == in_memory
    assert names_and_shapes(checkpoint.from_transformers(meta_tensors(in_memory))) == official
    sd = tiny_vit(seed=0).state_dict()
    assert_equal(checkpoint.from_transformers(checkpoint.from_official(sd, in_memory_names)), sd)
    assert_equal(checkpoint.from_transformers({f"vit.{k}": v for k, v in checkpoint.to_transformers(sd).items()}), sd)


def test_the_layout_is_detected():
    """timm's DINO models use the official names: "official" stands for both."""
    assert checkpoint.detect_layout(SHAPES["official"]["vit_small_p16"]) == "official"
    assert checkpoint.detect_layout(SHAPES["timm"]["vit_small_p16"]) == "official"
    for names in ("vit_small_p16", "vit_small_p16_in_memory"):
        assert checkpoint.detect_layout(SHAPES["transformers"][names]) == "transformers"
    with pytest.raises(ConfigError, match="neither .* its first keys are conv1.weight"):
        checkpoint.detect_layout({"conv1.weight": None})


def tiny_in(layout):
    sd = tiny_vit(seed=0).state_dict()
    return checkpoint.to_transformers(sd) if layout == "transformers" else sd


@pytest.mark.parametrize("layout, change, message", [
    ("transformers", {"pooler.dense.weight": (192, 192)}, "unexpected keys 1 (pooler.dense.weight)"),
    ("transformers", {"encoder.layer.1.attention.attention.key.bias": None},
     "missing keys 1 (encoder.layer.1.attention.attention.key.bias)"),
    ("transformers", {"encoder.layer.0.output.dense.weight": (192, 767)},
     "wrong shapes (file vs expected) 1 (encoder.layer.0.output.dense.weight (192, 767) vs (192, 768))"),
    ("timm", {"head.weight": (1000, 192), "head.bias": (1000,)}, "unexpected keys 2 (head.weight, head.bias)"),
    ("timm", {"fc_norm.weight": (192,)}, "unexpected keys 1 (fc_norm.weight)"),
    ("timm", {"blocks.1.norm2.bias": None}, "missing keys 1 (blocks.1.norm2.bias)"),
    ("official", {"blocks.1.attn.qkv.bias": (575,)}, "wrong shapes (file vs expected) 1 (blocks.1.attn.qkv.bias "
                                                     "(575,) vs (576,))"),
])
def test_a_key_missing_left_over_or_of_the_wrong_shape_is_refused_by_name(layout, change, message):
    """Never a partial map: one line that counts and names what does not fit, and no output."""
    sd = tiny_in(layout)
    for name, shape in change.items():  # None: the key is taken out
        if shape is None:
            del sd[name]
        else:
            sd[name] = torch.zeros(shape)
    convert = {"transformers": checkpoint.from_transformers, "timm": checkpoint.from_timm,
               "official": checkpoint.to_transformers}[layout]
    with pytest.raises(ConfigError) as error:
        convert(sd)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "a ViT of width 192, patch 4, 2 blocks" in str(error.value)


def test_a_converted_file_loads_strictly_and_gives_the_same_features(tmp_path):
    model = tiny_vit(seed=0)
    torch.save(checkpoint.to_transformers(model.state_dict()), tmp_path / "hf.pth")
    convert_weights.main([str(tmp_path / "hf.pth"), str(tmp_path / "ours.pth"), "--to", "official"])
    loaded, saved = backbone.load(tmp_path / "ours.pth", "vit_tiny", 4, depth=2)
    again = tiny_vit(seed=1)
    checkpoint.load_strict(again, checkpoint.from_timm(checkpoint.to_timm(model.state_dict())), "timm")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x)) and torch.equal(again(x), model(x))
    assert saved == {}


def test_convert_weights_reads_our_checkpoint_and_prints_one_line(tmp_path, capsys):
    student = tiny_vit(seed=3)
    path = write_checkpoint(tmp_path / "checkpoint.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["student"] = {f"backbone.{k}": v for k, v in student.state_dict().items()} | {"head.x": torch.zeros(1)}
    torch.save(ckpt, path)
    convert_weights.main([path, str(tmp_path / "hf.pth"), "--to", "transformers", "--checkpoint_key", "student"])
    out = capsys.readouterr().out
    assert out == (f"read {path} (student): official layout (= timm), 30 tensors, a ViT of width 192, patch 4, 2 "
                   f"blocks; wrote {tmp_path / 'hf.pth'}: transformers layout, 38 tensors\n")
    written = torch.load(tmp_path / "hf.pth", weights_only=True)
    assert_equal(checkpoint.from_transformers(written), student.state_dict())


@pytest.mark.parametrize("tensors, argv_end, message", [
    ({"pooler.dense.weight": (192, 192)}, ["out.pth"], "unexpected keys 1 (pooler.dense.weight)"),
    ({}, ["out.safetensors"], "out.safetensors: .safetensors files are out of scope"),
])
def test_convert_weights_refuses_bad_input_in_one_error_line(tmp_path, capsys, monkeypatch, tensors, argv_end,
                                                              message):
    monkeypatch.chdir(tmp_path)
    sd = tiny_in("transformers") | {k: torch.zeros(s) for k, s in tensors.items()}
    torch.save(sd, "hf.pth")
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(lambda: convert_weights.main(["hf.pth", *argv_end, "--to", "official"]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not Path("out.pth").exists()


def test_a_transformers_file_is_read_directly_by_every_script_and_by_init_weights(tmp_path):
    """--pretrained_weights / --init_weights vit_hf.pth: backbone_state_dict converts it (strictly) on the way in."""
    model = tiny_vit(seed=0)
    torch.save({f"vit.{k}": v for k, v in checkpoint.to_transformers(model.state_dict()).items()}, tmp_path / "hf.pth")
    loaded, _ = backbone.load(tmp_path / "hf.pth", "vit_tiny", 4, depth=2)
    assert_equal(loaded.state_dict(), model.state_dict())
    broken = checkpoint.to_transformers(model.state_dict())
    broken["pooler.dense.weight"] = torch.zeros(192, 192)
    with pytest.raises(ConfigError, match="unexpected keys 1 .pooler.dense.weight"):
        checkpoint.backbone_state_dict(broken)
