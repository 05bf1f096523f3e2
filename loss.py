"""The DINO loss: sharpened, centered teacher targets against student predictions (paper Sec. 3.1, Alg. 1).

    P_t = softmax((g_t(x) - c) / tau_t)          teacher: centering, then sharpening (tau_t small)
    P_s = softmax(g_s(x') / tau_s)                student
    loss = mean over pairs (x in globals, x' in all crops, x' != x) of  H(P_t(x), P_s(x'))
    c <- m c + (1 - m) mean_batch g_t(x)          center: EMA of the teacher's batch mean (Eq. 4)

Shape letters: B images, V crops (ncrops), K out_dim.
"""
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_sum, self.teacher_count = 0.0, 0  # teacher outputs recorded for the next center update
        # tau_t per epoch: linear warm-up from warmup_teacher_temp, then constant (Sec. 3.2)
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp,
        ))

    def teacher_temp(self, epoch):
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output, teacher_output, epoch, update_center=True):
        """student_output (V * B, K) and teacher_output (2 * B, K), crops stacked in order: the loss, a scalar.

        Also sets `self.teacher_entropy`, the collapse diagnostic of Sec. 5.3: the mean entropy of the targets P_t,
        ln K when they are uniform, 0 when one-hot. The teacher outputs are recorded for the center: with
        update_center (the default, as the official forward) the center moves at once; with update_center=False it
        moves when update_center() is called, from everything recorded since (train.py: once per optimizer step,
        from all its micro-batches, after the EMA as in Alg. 1).
        """
        # P_s: student crops over tau_s; P_t: teacher global crops centered, then sharpened by tau_t
        log_ps = F.log_softmax(student_output.float() / self.student_temp, dim=-1)  # (V * B, K)
        log_ps = log_ps.unflatten(0, (self.ncrops, -1))  # (V, B, K)
        teacher_out = teacher_output.detach().float()  # no gradient reaches the teacher
        teacher_probs = F.softmax((teacher_out - self.center) / self.teacher_temp(epoch), dim=-1)  # (2B, K)
        self.teacher_entropy = torch.special.entr(teacher_probs).sum(dim=-1).mean().detach()

        # H(P_t(x_i), P_s(x_v)) = -sum_k P_t log P_s for every (teacher i, student v) pair, batch-averaged
        pt = teacher_probs.unflatten(0, (2, -1))  # (2, B, K)
        cross_entropy = -torch.einsum("ibk,vbk->iv", pt, log_ps) / log_ps.shape[1]  # (2, V)
        same_view = torch.eye(2, self.ncrops, dtype=torch.bool, device=cross_entropy.device)  # pairs v == i
        loss = cross_entropy.masked_fill(same_view, 0).sum() / (2 * self.ncrops - 2)  # mean over the others

        # NOTE: the official forward updates the center itself; recording the outputs and update_center=False are
        # ours, so that gradient accumulation moves the center once per optimizer step
        self.teacher_sum = self.teacher_sum + teacher_out.sum(dim=0, keepdim=True)  # (1, K), for the center
        self.teacher_count += len(teacher_out)
        if update_center:
            self.update_center()
        return loss

    @torch.no_grad()
    def update_center(self):
        """c <- m c + (1 - m) mean of the teacher outputs recorded since the last update, over all ranks (Eq. 4)."""
        if not self.teacher_count:  # nothing recorded since the last update: the center stays
            return
        batch_sum, count = self.teacher_sum.clone(), self.teacher_count
        if dist.is_available() and dist.is_initialized():  # one process needs no process group
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count * (1 - self.center_momentum))
        self.teacher_sum, self.teacher_count = 0.0, 0


def collapse_warning(loss, teacher_entropy, out_dim):
    """Paper Sec. 5.3: collapse shows as a teacher entropy of 0 (one dimension dominates) or as a loss stuck at
    ln K with KL(teacher || student) = loss - entropy near 0 (uniform output). A message, or None."""
    if teacher_entropy < 0.05:
        return "teacher output entropy is ~0: collapse to one dimension (check the centering)"
    if abs(loss - math.log(out_dim)) < 0.01 * math.log(out_dim) and loss - teacher_entropy < 0.01:
        return f"loss sits at ln(out_dim) = {math.log(out_dim):.2f}: uniform collapse (lower the teacher temperature)"
    return None
