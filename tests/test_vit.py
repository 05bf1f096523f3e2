"""The ViT backbone (paper Sec. 3.2 "Implementation and evaluation protocols"): shapes, official names, numerics."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vit

FACTS = Path(__file__).resolve().parent / "official_dino_state_dict_shapes.json"  # names and shapes of the official releases


def official_vit_shapes(dim, patch_size, depth=12):
    """Names and shapes of the official DINO ViT state dict (224 px position embeddings, mlp_ratio 4)."""
    shapes = {"cls_token": [1, 1, dim], "pos_embed": [1, 1 + (224 // patch_size) ** 2, dim],
              "patch_embed.proj.weight": [dim, 3, patch_size, patch_size], "patch_embed.proj.bias": [dim]}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": [dim], b + "norm1.bias": [dim],
            b + "attn.qkv.weight": [3 * dim, dim], b + "attn.qkv.bias": [3 * dim],
            b + "attn.proj.weight": [dim, dim], b + "attn.proj.bias": [dim],
            b + "norm2.weight": [dim], b + "norm2.bias": [dim],
            b + "mlp.fc1.weight": [4 * dim, dim], b + "mlp.fc1.bias": [4 * dim],
            b + "mlp.fc2.weight": [dim, 4 * dim], b + "mlp.fc2.bias": [dim]})
    shapes.update({"norm.weight": [dim], "norm.bias": [dim]})
    return shapes


OFFICIAL = {
    "vit_tiny_p16": (lambda: vit.vit_tiny(16), official_vit_shapes(192, 16)),
    "vit_small_p16": (lambda: vit.vit_small(16), official_vit_shapes(384, 16)),
    "vit_small_p8": (lambda: vit.vit_small(8), official_vit_shapes(384, 8)),
    "vit_base_p16": (lambda: vit.vit_base(16), official_vit_shapes(768, 16)),
}


@pytest.fixture
def no_init(monkeypatch):
    """Skip weight initialization (slow on CPU for full-size models) where only names and shapes matter."""
    for name in ("trunc_normal_", "kaiming_uniform_", "uniform_"):
        monkeypatch.setattr(nn.init, name, lambda t, *args, **kwargs: t)


def tiny(patch_size=4, depth=2, **kw):
    """A 2-block ViT-Tiny with position embeddings for 32 px (16 px inputs exercise the interpolation)."""
    torch.manual_seed(0)
    return vit.vit_tiny(patch_size=patch_size, depth=depth, img_size=32, **kw).eval()


def tokens_before_last_block(model, x):
    x = model.prepare_tokens(x)
    for blk in model.blocks[:-1]:
        x = blk(x)
    return x  # (B, 1+N, D)


# --- shapes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_size,size", [(4, (16, 16)), (4, (32, 32)), (4, (24, 40)), (8, (16, 16)),
                                             (8, (24, 40)), (16, (32, 32)), (16, (32, 48))])
def test_output_is_one_cls_feature_per_image_for_any_multiple_of_the_patch_size(patch_size, size):
    """Paper Sec. 3.2: "The ViT architecture takes as input a grid of non-overlapping contiguous image patches
    of resolution N x N." Any grid works (position embeddings are interpolated); the output is (B, D)."""
    model = tiny(patch_size)
    with torch.no_grad():
        out = model(torch.randn(3, 3, *size))
    assert out.shape == (3, 192)
    assert torch.isfinite(out).all()


def test_size_not_multiple_of_patch_size_raises_value_error():
    """Non-overlapping N x N patches must tile the image: a side that is not a multiple of N is an error."""
    model = tiny(4)
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 16, 18))


# --- official names, shapes and numerics -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_names_and_shapes_equal_official(name, no_init):
    """The official pretrained backbone files load with strict=True: same names, same shapes."""
    build, expected = OFFICIAL[name]
    got = {k: list(v.shape) for k, v in build().state_dict().items()}
    assert got == expected


def test_embedded_official_shapes_equal_the_facts_file():
    """The shapes table above is a transcription of the official state dicts (facts file, 150 tensors each)."""
    if not FACTS.exists():
        pytest.skip(f"{FACTS} not present")
    facts = json.loads(FACTS.read_text())
    for name, (_, expected) in OFFICIAL.items():
        assert facts[name] == expected, name
        assert len(expected) == 150


def test_vit_small_has_21_665_664_parameters(no_init):
    """Paper Table 1 lists ViT-S with 21M parameters; the official ViT-S/16 has exactly 21,665,664."""
    assert sum(p.numel() for p in vit.vit_small(16).parameters()) == 21_665_664


def test_numerics_match_official_vit():
    """Official ViT: LayerNorm eps 1e-6, qkv with bias, exact (erf) GELU, attention scale head_dim^-0.5."""
    model = tiny(4, depth=2)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1
    assert all(m.eps == 1e-6 for m in norms)
    for blk in model.blocks:
        assert blk.attn.qkv.bias is not None
        assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
    x = torch.linspace(-4, 4, 101)
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(model.blocks[0].mlp.act(x), exact, atol=1e-6, rtol=0)
    assert not torch.allclose(F.gelu(x, approximate="tanh"), exact, atol=1e-6, rtol=0)  # the check can fail


# --- position embeddings ---------------------------------------------------------------------------------
def test_pos_embed_used_as_is_at_native_224_size():
    """At the trained 224 px grid (14 x 14 patches of 16) no interpolation happens: pos_embed is added as is."""
    torch.manual_seed(0)
    model = vit.vit_tiny(patch_size=16, depth=1).eval()
    assert model.interpolate_pos_encoding(14, 14) is model.pos_embed
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        patches = model.patch_embed(x)  # (B, 196, D)
        expected = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1) + model.pos_embed
        torch.testing.assert_close(model.prepare_tokens(x), expected, atol=0, rtol=0)


def test_interpolated_pos_embed_keeps_cls_and_grid_orientation():
    """Other sizes: the CLS position is kept and the patch grid is resized bicubically as an image of h rows
    and w columns (a non-square grid is not transposed)."""
    torch.manual_seed(0)
    model = vit.vit_tiny(patch_size=16, depth=1)
    side = 14
    rows = torch.arange(side, dtype=torch.float32)[:, None, None].expand(side, side, 192)  # value = row index
    with torch.no_grad():
        model.pos_embed[0, 1:] = rows.reshape(side * side, 192)
        h, w = 7, 28
        pos = model.interpolate_pos_encoding(h, w)  # (1, 1+h*w, D)
    assert pos.shape == (1, 1 + h * w, 192)
    torch.testing.assert_close(pos[:, 0], model.pos_embed[:, 0])
    grid = pos[0, 1:, 0].reshape(h, w)
    assert torch.allclose(grid, grid[:, :1].expand(h, w), atol=1e-5)  # constant along each row
    assert (grid[1:, 0] > grid[:-1, 0]).all()  # and increasing down the rows


# --- attention and intermediate layers -------------------------------------------------------------------
def test_last_selfattention_is_row_stochastic_with_shape_B_H_tokens_tokens():
    """Paper Fig. 1: "We look at the self-attention of the [CLS] token on the heads of the last layer."
    get_last_selfattention returns softmax weights (B, H, 1+N, 1+N): every row sums to 1."""
    model = tiny(4, depth=2)
    with torch.no_grad():
        attn = model.get_last_selfattention(torch.randn(2, 3, 16, 24))
    n = 1 + (16 // 4) * (24 // 4)
    assert attn.shape == (2, 3, n, n)
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, n), atol=1e-5, rtol=0)


def test_explicit_attention_agrees_with_fused_attention():
    """The weights from get_last_selfattention are softmax(q k^T / sqrt(d_head)) and, applied to v, give the same
    block output as the fused scaled_dot_product_attention path of forward."""
    model = tiny(4, depth=2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)  # (B, H, T, T)
        t = tokens_before_last_block(model, x)  # (B, T, D)
        blk = model.blocks[-1]
        B, T, D = t.shape
        H = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(t)).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
        by_hand = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).softmax(-1)
        torch.testing.assert_close(attn, by_hand, atol=1e-6, rtol=0)
        y = t + blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, T, D))
        y = y + blk.mlp(blk.norm2(y))
        torch.testing.assert_close(model.norm(y), model.get_intermediate_layers(x, 1)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.norm(y)[:, 0], model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_intermediate_layers_are_normed_tokens_of_last_n_blocks(n):
    """get_intermediate_layers(x, n): the last n block outputs through the final norm, (B, 1+N, D) each; the CLS
    token of the last one is forward(x) (the linear probe concatenates the last 4 CLS tokens)."""
    model = tiny(4, depth=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        outs = model.get_intermediate_layers(x, n)
        t = model.prepare_tokens(x)
        per_block = []
        for blk in model.blocks:
            t = blk(t)
            per_block.append(model.norm(t))
        cls = model(x)
    assert len(outs) == n
    for got, want in zip(outs, per_block[-n:]):
        assert got.shape == (2, 1 + 16, 192)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(outs[-1][:, 0], cls, atol=1e-6, rtol=0)


# --- stochastic depth ------------------------------------------------------------------------------------
def test_eval_is_deterministic_and_drop_path_is_random_in_training():
    """Stochastic depth (drop_path_rate, 0.1 on the student in the official recipe) acts only in train mode."""
    model = tiny(4, depth=4, drop_path_rate=0.5)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        a = model(x)
        b = model(x)
    assert not torch.allclose(a, b)


def test_no_drop_path_means_train_equals_eval():
    """With drop_path_rate 0 (the teacher) train and eval mode compute the same function."""
    model = tiny(4, depth=2)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out_eval = model.eval()(x)
        out_train = model.train()(x)
    torch.testing.assert_close(out_eval, out_train, atol=0, rtol=0)


@pytest.mark.parametrize("grid", [5, 9, 20])
def test_interpolated_pos_embed_equals_the_official_numerics(grid):
    """The official interpolate_pos_encoding resizes the trained grid bicubically with scale_factor
    (new + 0.1) / old, not with the target size: the two sample the grid at different positions, and features
    of official weights at other resolutions match only with the former. Written here from its description."""
    torch.manual_seed(0)
    model = vit.vit_tiny(patch_size=16, depth=1)
    side, dim = 14, model.embed_dim
    patch_pos = model.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, 14, 14)
    with torch.no_grad():
        official = F.interpolate(patch_pos, scale_factor=((grid + 0.1) / side, (grid + 0.1) / side), mode="bicubic")
        ours = model.interpolate_pos_encoding(grid, grid)
        by_size = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic")
    official = official.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)  # (1, N, D)
    torch.testing.assert_close(ours[:, 1:], official, atol=0, rtol=0)
    assert not torch.allclose(by_size.permute(0, 2, 3, 1).reshape(1, grid * grid, dim), official, atol=1e-4)
