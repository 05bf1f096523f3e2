"""The DINO projection head and the multi-crop wrapper (paper Sec. 3.1, Fig. 2, Appendix "Projection head")."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vit
from head import DINOHead, MultiCropWrapper

# Official DINOHead(384, 65536) state dict (facts file key dino_head_384_65536).
OFFICIAL_HEAD_384_65536 = {
    "mlp.0.weight": [2048, 384], "mlp.0.bias": [2048], "mlp.2.weight": [2048, 2048], "mlp.2.bias": [2048],
    "mlp.4.weight": [256, 2048], "mlp.4.bias": [256], "last_layer.weight_g": [65536, 1],
    "last_layer.weight_v": [65536, 256],
}


def small_head(norm_last_layer=True, out_dim=64):
    torch.manual_seed(0)
    return DINOHead(32, out_dim, norm_last_layer=norm_last_layer, hidden_dim=48, bottleneck_dim=16)


def effective_last_weight(head):
    ll = head.last_layer
    return ll.weight_g * F.normalize(ll.weight_v, dim=1)  # (K, bottleneck)


def test_head_outputs_K_dimensions():
    """Paper Sec. 3.1: "a weight normalized fully connected layer with K dimensions"."""
    out = small_head(out_dim=64)(torch.randn(5, 32))
    assert out.shape == (5, 64)


def test_head_is_3_layer_gelu_mlp_then_l2_norm_then_weight_normed_linear():
    """Paper Sec. 3.1: "The projection head consists of a 3-layer multi-layer perceptron (MLP) with hidden
    dimension 2048 followed by l2 normalization and a weight normalized fully connected layer with K dimensions"."""
    head = DINOHead(384, 1024)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [2048, 2048, 256]
    x = torch.randn(4, 384)
    with torch.no_grad():
        expected = F.linear(F.normalize(head.mlp(x), dim=-1), effective_last_weight(head))
        torch.testing.assert_close(head(x), expected, atol=1e-6, rtol=0)


def test_bottleneck_is_l2_normalized():
    """The 256-d bottleneck reaches the last layer on the unit sphere, whatever the scale of the input."""
    head = small_head()
    seen = []
    head.last_layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    head(100 * torch.randn(6, 32))
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(6), atol=1e-5, rtol=0)


def test_state_dict_names_and_shapes_equal_official():
    """Official keys mlp.0/2/4 and last_layer.weight_g [K, 1], weight_v [K, 256]: its checkpoints load strictly."""
    got = {k: list(v.shape) for k, v in DINOHead(384, 65536).state_dict().items()}
    assert got == OFFICIAL_HEAD_384_65536


def test_norm_last_layer_fixes_row_norms_at_one_and_gets_no_gradient():
    """norm_last_layer (official default True): the magnitude weight_g is 1 and frozen, so every output row of
    the last layer has norm 1 throughout training."""
    head = small_head(norm_last_layer=True)
    g = head.last_layer.weight_g
    assert torch.equal(g, torch.ones_like(g))
    assert not g.requires_grad
    head(torch.randn(4, 32)).square().sum().backward()
    assert g.grad is None
    assert head.last_layer.weight_v.grad is not None and head.last_layer.weight_v.grad.abs().sum() > 0
    with torch.no_grad():
        head.last_layer.weight_v.mul_(3.0)  # rescaling v changes nothing: only its direction counts
    torch.testing.assert_close(effective_last_weight(head).norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)


def test_without_norm_last_layer_the_magnitude_is_trained():
    """norm_last_layer=False (the "boosted" recipe): weight_g is a trainable parameter and receives a gradient."""
    head = small_head(norm_last_layer=False)
    g = head.last_layer.weight_g
    assert g.requires_grad
    head(torch.randn(4, 32)).square().sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


# --- multi-crop wrapper ----------------------------------------------------------------------------------
@pytest.fixture
def wrapper():
    torch.manual_seed(0)
    backbone = vit.vit_tiny(patch_size=4, depth=2, img_size=32)
    head = DINOHead(192, 32, hidden_dim=48, bottleneck_dim=16)
    return MultiCropWrapper(backbone, head).eval()


def test_multicrop_output_follows_crop_order(wrapper):
    """Paper Sec. 3.1: "All crops are passed through the student while only the global views are passed through
    the teacher". The wrapper takes [2 global, 3 local] crop batches and returns (5B, K) in the crops' order,
    equal to running each crop alone."""
    B = 2
    torch.manual_seed(1)
    crops = [torch.randn(B, 3, 16, 16) for _ in range(2)] + [torch.randn(B, 3, 8, 8) for _ in range(3)]
    with torch.no_grad():
        out = wrapper(crops)
        alone = torch.cat([wrapper.head(wrapper.backbone(c)) for c in crops])
    assert out.shape == (5 * B, 32)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=0)


def test_multicrop_runs_backbone_once_per_resolution(wrapper):
    """Consecutive crops of one resolution share one backbone pass: 2 global + 3 local crops, 2 passes."""
    calls = []
    wrapper.backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    crops = [torch.randn(2, 3, 16, 16) for _ in range(2)] + [torch.randn(2, 3, 8, 8) for _ in range(3)]
    with torch.no_grad():
        wrapper(crops)
    assert calls == [(4, 3, 16, 16), (6, 3, 8, 8)]


def test_multicrop_accepts_a_single_tensor(wrapper):
    """A plain batch (evaluation) is one crop: (B, K)."""
    with torch.no_grad():
        assert wrapper(torch.randn(3, 3, 16, 16)).shape == (3, 32)
