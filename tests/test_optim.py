"""Optimization pieces of train.py: the schedules (paper Sec. 3.2 "Implementation details"), the weight-decay
groups and per-parameter gradient clipping (official code), the EMA teacher (paper Sec. 3.1 "Teacher network",
Algorithm 1)."""
import copy

import numpy as np
import pytest
import torch

import train
import vit
from conftest import TINY_TRAIN, random_batch
from head import DINOHead, MultiCropWrapper
from train import clip_gradients, cosine_scheduler, ema_update, param_groups


def tiny_dino(norm_last_layer=True, seed=0):
    torch.manual_seed(seed)
    return MultiCropWrapper(vit.vit_tiny(patch_size=4, depth=2, img_size=16),
                            DINOHead(192, 32, norm_last_layer=norm_last_layer, hidden_dim=48, bottleneck_dim=16))


# --- schedules -------------------------------------------------------------------------------------------
def test_lr_warms_up_linearly_then_decays_by_cosine():
    """Paper Sec. 3.2: "The learning rate is linearly ramped up during the first 10 epochs to its base value ...
    After this warmup, we decay the learning rate with a cosine schedule"; one value per iteration."""
    base, final, epochs, steps_per_epoch, warmup, start = 1.0, 0.1, 6, 10, 2, 0.2
    s = np.asarray(cosine_scheduler(base, final, epochs, steps_per_epoch, warmup_epochs=warmup,
                                    start_warmup_value=start))
    assert len(s) == epochs * steps_per_epoch
    w = warmup * steps_per_epoch
    np.testing.assert_allclose(s[:w], np.linspace(start, base, w), atol=1e-12)
    assert s[w] == pytest.approx(base, abs=1e-12)  # the cosine part starts at base
    assert np.all(np.diff(s[w:]) < 0)  # and decreases monotonically
    T = epochs * steps_per_epoch - w
    assert s[w + T // 2] == pytest.approx((base + final) / 2, abs=1e-12)  # half-way down at half the time


def test_cosine_ends_at_final_value():
    """The schedule ends at its final value: lr 0.0005 -> min_lr 1e-6, and weight decay 0.04 -> 0.4 (paper Sec. 3.2:
    "The weight decay also follows a cosine schedule from 0.04 to 0.4")."""
    lr = np.asarray(cosine_scheduler(0.0005, 1e-6, 100, 100, warmup_epochs=10))  # 100 epochs x 100 steps
    assert lr[-1] == pytest.approx(1e-6, rel=1e-3)
    assert lr.max() == pytest.approx(0.0005, rel=1e-12)
    wd = np.asarray(cosine_scheduler(0.04, 0.4, 100, 100))
    assert wd[0] == pytest.approx(0.04, abs=1e-12) and wd[-1] == pytest.approx(0.4, rel=1e-3)
    assert np.all(np.diff(wd) > 0)


def test_teacher_momentum_follows_cosine_from_0_996_to_1():
    """Paper Sec. 3.1: "with lambda following a cosine schedule from 0.996 to 1 during training"."""
    m = np.asarray(cosine_scheduler(0.996, 1.0, 10, 100))  # 10 epochs x 100 steps
    assert len(m) == 1000
    assert m[0] == pytest.approx(0.996, abs=1e-12)
    assert m[-1] == pytest.approx(1.0, abs=1e-6) and m.max() <= 1.0
    assert np.all(np.diff(m) > 0)


def test_no_warmup_schedule_starts_at_base():
    """warmup_epochs 0: the first value is the base value."""
    s = cosine_scheduler(0.5, 0.0, 3, 7)  # 3 epochs x 7 steps
    assert len(s) == 21 and s[0] == 0.5


# --- weight-decay groups ---------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_no_weight_decay_on_biases_and_norms(norm_last_layer):
    """Official code: weight decay applies only to parameters with more than one dimension that are not biases.
    Every trainable parameter is in exactly one group; the frozen weight_g (norm_last_layer) is in none."""
    model = tiny_dino(norm_last_layer)
    groups = param_groups(model)
    assert len(groups) == 2
    no_decay = [g for g in groups if g.get("weight_decay") == 0.0]
    decay = [g for g in groups if g.get("weight_decay") != 0.0]
    assert len(no_decay) == 1 and len(decay) == 1
    got_no_decay = {id(p) for p in no_decay[0]["params"]}
    got_decay = {id(p) for p in decay[0]["params"]}
    named = dict(model.named_parameters())
    want_no_decay = {id(p) for n, p in named.items() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)}
    want_decay = {id(p) for p in named.values() if p.requires_grad} - want_no_decay
    assert got_no_decay == want_no_decay and got_decay == want_decay
    assert len(no_decay[0]["params"]) + len(decay[0]["params"]) == sum(p.requires_grad for p in named.values())
    assert not got_no_decay & got_decay
    # examples by name: LayerNorm weights and biases are not decayed; linear weights, cls_token, pos_embed are
    for name in ("backbone.norm.weight", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias",
                 "head.mlp.0.bias"):
        assert id(named[name]) in got_no_decay, name
    for name in ("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
                 "backbone.blocks.1.mlp.fc2.weight", "head.last_layer.weight_v"):
        assert id(named[name]) in got_decay, name
    g = id(named["head.last_layer.weight_g"])
    assert (g in got_decay) == (not norm_last_layer) and g not in got_no_decay
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


# --- gradient clipping -----------------------------------------------------------------------------------
def test_clip_gradients_clips_each_parameter_separately():
    """Official clip_gradients: each parameter's gradient is scaled to norm <= clip on its own (not a global
    norm); gradients already below the threshold are left unchanged."""
    model = tiny_dino()
    torch.manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) * (10.0 if i % 2 else 1e-3)  # half far above clip, half far below
    params[0].grad = None  # a parameter without gradient is skipped
    clip = 3.0
    expected = []
    for p in params:  # the official per-parameter loop
        if p.grad is None:
            expected.append(None)
            continue
        g = p.grad.clone()
        coef = clip / (g.norm() + 1e-6)
        if coef < 1:
            g *= coef
        expected.append(g)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    clip_gradients(model, clip)
    assert params[0].grad is None
    n_clipped = 0
    for p, want, old in zip(params[1:], expected[1:], before[1:]):
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5)
        assert p.grad.norm() <= clip * (1 + 1e-5)
        if old.norm() < clip:
            assert torch.equal(p.grad, old)
        else:
            n_clipped += 1
    assert 0 < n_clipped < len(params) - 1  # both cases were exercised
    # per-parameter, not global: a clipped parameter ends at norm ~clip whatever the other gradients are
    big = [p for p, old in zip(params[1:], before[1:]) if old.norm() >= clip]
    assert all(abs(p.grad.norm().item() - clip) < 1e-3 for p in big)


# --- EMA teacher -----------------------------------------------------------------------------------------
def test_ema_update_is_m_teacher_plus_1_minus_m_student():
    """Paper Sec. 3.1: "The update rule is theta_t <- lambda theta_t + (1 - lambda) theta_s"."""
    student, teacher = tiny_dino(seed=0), tiny_dino(seed=1)
    teacher.requires_grad_(False)
    t0 = copy.deepcopy(teacher.state_dict())
    s0 = copy.deepcopy(student.state_dict())
    m = 0.9
    ema_update(teacher, student, m)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, m * t0[name] + (1 - m) * s0[name], atol=1e-7, rtol=0)
    for name, p in student.named_parameters():
        assert torch.equal(p, s0[name])  # the student is untouched


def test_ema_accepts_numpy_momentum():
    """train.py passes momentum_schedule[step], an element of a numpy schedule."""
    student, teacher = tiny_dino(seed=0), tiny_dino(seed=1)
    teacher.requires_grad_(False)
    t0 = copy.deepcopy(teacher.state_dict())
    m = np.float64(0.9)
    ema_update(teacher, student, m)
    w = "backbone.blocks.0.attn.qkv.weight"
    torch.testing.assert_close(dict(teacher.named_parameters())[w],
                               float(m) * t0[w] + (1 - float(m)) * student.state_dict()[w], atol=1e-7, rtol=0)


def test_momentum_one_leaves_teacher_unchanged():
    """lambda = 1 at the end of training: the teacher no longer moves (bit for bit)."""
    student, teacher = tiny_dino(seed=0), tiny_dino(seed=1)
    teacher.requires_grad_(False)
    t0 = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, student, 1.0)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, t0[name]), name


def test_training_teacher_gets_no_gradient_and_moves_by_ema_only():
    """Paper Sec. 3.1: "we build it from past iterations of the student network", by EMA, not by gradients. The
    teacher as train.build_training makes it: no parameter requires grad or is in the optimizer; after a step of
    train.train_step it holds no gradient and is exactly lambda theta_t + (1 - lambda) theta_s."""
    args = train.parse_args(TINY_TRAIN + ["--precision", "fp32", "--freeze_last_layer", "0"])
    torch.manual_seed(0)
    training = train.build_training(args, torch.device("cpu"))
    teacher = dict(training.teacher.named_parameters())
    assert teacher and not any(p.requires_grad for p in teacher.values())
    optimized = {id(p) for group in training.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.values()}
    before = {name: p.clone() for name, p in teacher.items()}
    train.train_step(training, [random_batch(args)], epoch=0, step=0)
    assert all(p.grad is None for p in teacher.values())
    assert all(p.grad is not None for p in training.student.parameters() if p.requires_grad)  # it back-propagated
    m, student = training.momentum[0], dict(training.student.named_parameters())
    assert m < 1 and not torch.equal(teacher["head.mlp.0.weight"], before["head.mlp.0.weight"])
    for name, p in teacher.items():
        torch.testing.assert_close(p, m * before[name] + (1 - m) * student[name], atol=1e-7, rtol=0)
