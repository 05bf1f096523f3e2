"""The DINO loss (paper Sec. 3.1, Eq. 3 and 4, Algorithm 1): cross-view pairs, centering, sharpening, stop-gradient."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from loss import DINOLoss


def make_loss(K=8, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_epochs=3, nepochs=10):
    return DINOLoss(K, ncrops, warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs)


def reference_loss(student, teacher, center, ncrops, t_student, t_teacher, same_view_pairs=False):
    """Eq. 3 by hand: mean over pairs (teacher crop iq in the 2 globals, student crop v, v != iq) of
    H(P_t, P_s) = -sum_k P_t log P_s, averaged over the batch."""
    B = teacher.shape[0] // 2
    terms = []
    for iq in range(2):
        q = F.softmax((teacher[iq * B:(iq + 1) * B] - center) / t_teacher, dim=-1)
        for v in range(ncrops):
            if v == iq and not same_view_pairs:
                continue
            log_p = F.log_softmax(student[v * B:(v + 1) * B] / t_student, dim=-1)
            terms.append(-(q * log_p).sum(-1).mean())
    return torch.stack(terms).mean(), len(terms)


def test_loss_averages_the_2_ncrops_minus_2_cross_view_pairs():
    """Paper Eq. 3: min sum_{x in {x1g, x2g}} sum_{x' in V, x' != x} H(P_t(x), P_s(x')); the official code
    averages over the 2 * ncrops - 2 pairs. Checked against a hand-written double loop (with a non-zero center and
    the epoch-2 teacher temperature), which differs from the same loop that also counts same-view pairs."""
    torch.manual_seed(0)
    K, ncrops, B = 8, 4, 3
    loss_fn = make_loss(K, ncrops)
    center = torch.randn(1, K)
    loss_fn.center.copy_(center)
    student, teacher = torch.randn(ncrops * B, K), torch.randn(2 * B, K)
    loss = loss_fn(student, teacher, epoch=2)
    expected, n_terms = reference_loss(student, teacher, center, ncrops, 0.1, loss_fn.teacher_temp(2))
    assert n_terms == 2 * ncrops - 2
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    with_same_view, _ = reference_loss(student, teacher, center, ncrops, 0.1, loss_fn.teacher_temp(2),
                                       same_view_pairs=True)
    assert abs(with_same_view - expected) > 1e-2


def test_same_view_pairs_are_excluded():
    """Two global crops only. Each student crop predicts exactly what the teacher says for the *same* crop, and the
    opposite class for the other crop: with same-view pairs excluded the loss is the cross-view value log(e^10 + 3)
    ~ 10.0001 (one-hot target, student logits 1/0.1 = 10 on the wrong class of 4); counting the two same-view
    pairs (each log(1 + 3 e^-10) ~ 0.0001) would halve it to ~ 5."""
    K = 4
    loss_fn = DINOLoss(K, 2, 0.04, 0.04, 0, 1)
    teacher = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0]])  # P_t(x1) ~ e_0, P_t(x2) ~ e_1 (tau_t = 0.04)
    student = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])  # P_s(x1) peaks at class 0, P_s(x2) at class 1
    loss = loss_fn(student, teacher, epoch=0)
    torch.testing.assert_close(loss, torch.tensor(math.log(math.exp(10) + 3)), atol=1e-4, rtol=0)


def test_uniform_outputs_give_log_K():
    """All-zero outputs: P_t and P_s are uniform, H(P_t, P_s) = ln K, the value a uniformly collapsed run sits at
    (about 11.09 for K = 65536)."""
    K, ncrops, B = 16, 4, 2
    loss_fn = make_loss(K, ncrops)
    loss = loss_fn(torch.zeros(ncrops * B, K), torch.zeros(2 * B, K), epoch=0)
    assert abs(loss.item() - math.log(K)) < 1e-5


def test_teacher_entropy_is_log_K_for_uniform_targets_and_zero_for_one_hot():
    """Paper Sec. 5.3 monitors collapse through the entropy of the teacher's output: ln K when uniform, ~0 when
    one dimension dominates."""
    K, ncrops, B = 16, 2, 3
    loss_fn = make_loss(K, ncrops)
    loss_fn(torch.zeros(ncrops * B, K), torch.zeros(2 * B, K), epoch=0)
    entropy = loss_fn.teacher_entropy
    assert abs(entropy.item() - math.log(K)) < 1e-5
    peaked = torch.zeros(2 * B, K)
    peaked[:, 3] = 10.0  # / tau_t = 0.04 -> one-hot
    loss_fn.center.zero_()
    loss_fn(torch.zeros(ncrops * B, K), peaked, epoch=0)
    entropy = loss_fn.teacher_entropy
    assert entropy.item() < 1e-6


def test_teacher_gets_no_gradient():
    """Paper Fig. 2: "We apply a stop-gradient (sg) operator on the teacher to propagate gradients only through
    the student." """
    torch.manual_seed(0)
    K, ncrops, B = 8, 4, 2
    student = torch.randn(ncrops * B, K, requires_grad=True)
    teacher = torch.randn(2 * B, K, requires_grad=True)
    make_loss(K, ncrops)(student, teacher, epoch=0).backward()
    assert teacher.grad is None or not teacher.grad.any()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_center_is_ema_of_teacher_batch_mean():
    """Paper Eq. 4: "c <- m c + (1 - m) 1/B sum_i g_t(x_i)", m = 0.9 (center_momentum); the loss of this step
    uses the center from before the update (Algorithm 1)."""
    torch.manual_seed(0)
    K, ncrops, B = 8, 4, 3
    loss_fn = make_loss(K, ncrops)
    old = torch.randn(1, K)
    loss_fn.center.copy_(old)
    student, teacher = torch.randn(ncrops * B, K), torch.randn(2 * B, K)
    loss = loss_fn(student, teacher, epoch=0)
    m = loss_fn.center_momentum
    torch.testing.assert_close(loss_fn.center, m * old + (1 - m) * teacher.mean(0, keepdim=True), atol=1e-6, rtol=0)
    expected, _ = reference_loss(student, teacher, old, ncrops, 0.1, loss_fn.teacher_temp(0))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


def test_defaults_are_student_temp_0_1_and_center_momentum_0_9():
    """Paper Sec. 3.2: "The temperature tau_s is set to 0.1"; the official center momentum is 0.9."""
    loss_fn = make_loss()
    assert loss_fn.student_temp == 0.1
    assert loss_fn.center_momentum == 0.9
    assert loss_fn.center.shape == (1, 8) and not loss_fn.center.any()


def test_teacher_temperature_warms_up_linearly_then_stays_constant():
    """Paper Sec. 3.2: "we use a linear warm-up for tau_t from 0.04 to 0.07 during the first 30 epochs"."""
    loss_fn = make_loss(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_epochs=30, nepochs=100)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.04, abs=1e-12)
    assert loss_fn.teacher_temp(29) == pytest.approx(0.07, abs=1e-12)
    assert loss_fn.teacher_temp(10) == pytest.approx(0.04 + 10 / 29 * 0.03, abs=1e-12)
    temps = [loss_fn.teacher_temp(e) for e in range(100)]
    assert all(a < b for a, b in zip(temps[:29], temps[1:30]))
    assert all(t == pytest.approx(0.07, abs=1e-12) for t in temps[29:])


def test_no_warmup_means_constant_teacher_temperature():
    """warmup_teacher_temp_epochs 0 (official default): tau_t = teacher_temp from the first epoch."""
    loss_fn = make_loss(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_epochs=0, nepochs=5)
    assert [loss_fn.teacher_temp(e) for e in range(5)] == pytest.approx([0.07] * 5, abs=1e-12)


def test_loss_runs_without_a_process_group():
    """Unlike the official loss (unconditional all_reduce), one process needs no torch.distributed setup."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    loss_fn = make_loss(8, 4)
    teacher = torch.randn(4, 8)
    loss = loss_fn(torch.randn(8, 8), teacher, epoch=0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True), atol=1e-6, rtol=0)


def test_the_loss_is_one_tensor_so_backward_works_as_in_the_official_code():
    """A copied loss.py works in a notebook: `loss = dino_loss(s, t, epoch); loss.backward()`."""
    student = torch.randn(4 * 2, 8, requires_grad=True)
    loss = make_loss()(student, torch.randn(2 * 2, 8), epoch=0)
    assert torch.is_tensor(loss) and loss.ndim == 0
    loss.backward()
    assert student.grad is not None


def test_with_update_center_false_the_center_moves_once_from_everything_recorded():
    """Alg. 1: "C = m*C + (1-m)*cat([t1, t2]).mean(dim=0)", once per step: the teacher outputs of two micro-batches
    move the center as their union would, and only when update_center() is called."""
    torch.manual_seed(0)
    t_a, t_b = torch.randn(2 * 3, 8), torch.randn(2 * 5, 8)
    loss_fn = make_loss()
    loss_fn(torch.randn(4 * 3, 8), t_a, epoch=0, update_center=False)
    loss_fn(torch.randn(4 * 5, 8), t_b, epoch=0, update_center=False)
    assert torch.equal(loss_fn.center, torch.zeros(1, 8))  # not yet
    loss_fn.update_center()
    expected = 0.1 * torch.cat([t_a, t_b]).mean(dim=0, keepdim=True)
    assert torch.allclose(loss_fn.center, expected, atol=1e-6)
    loss_fn.update_center()  # nothing recorded since: the center stays (no 0 / 0)
    assert torch.allclose(loss_fn.center, expected, atol=1e-6)
