"""Gradient accumulation is exact: N micro-batches per optimizer step give the step of one N times larger batch.

Sec. 3.2 trains with a total batch of 1024; one GPU holds a fraction of it. With --grad_accum_steps N the loss is
the mean of the micro-batches' losses, DDP synchronizes the gradients on the last micro-batch only, and the
teacher and the center stay fixed until the step is taken: then the EMA moves once, and the center once, from the
teacher outputs of all micro-batches of all processes. Compared in fp32 with drop path 0 over 3 optimizer steps.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, TINY_TRAIN, load, no_key_bias, random_batch, relative_difference

FLAGS = TINY_TRAIN + ["--subset", "96", "--epochs", "1", "--drop_path_rate", "0", "--precision", "fp32",
                      "--knn_every", "0", "--saveckp_freq", "0", "--freeze_last_layer", "0", "--log_every", "1"]


def assert_same_training(a, b, tol=1e-5):
    """Student, teacher and center of two checkpoints within tol (relative), the loss of the epoch too."""
    for part in ("student", "teacher", "dino_loss"):
        for name in a[part]:
            x, y = no_key_bias(name, a[part][name]), no_key_bias(name, b[part][name])
            assert relative_difference(x.float(), y.float()) <= tol, f"{part}.{name}"
    assert a["epoch"] == b["epoch"] == 1


def largest_difference(a, b):
    return max(relative_difference(no_key_bias(n, a[p][n]).float(), no_key_bias(n, b[p][n]).float())
               for p in ("student", "teacher", "dino_loss") for n in a[p])


def test_four_micro_batches_of_8_give_one_batch_of_32(tmp_path):
    """3 optimizer steps: 4 x 8 images with --grad_accum_steps 4, against 32 images at once."""
    train.main(FLAGS + ["--batch_size_per_gpu", "8", "--grad_accum_steps", "4", "--output_dir", str(tmp_path / "acc")])
    train.main(FLAGS + ["--batch_size_per_gpu", "32", "--output_dir", str(tmp_path / "one")])
    acc, one = load(tmp_path / "acc"), load(tmp_path / "one")
    print(f"largest relative difference: {largest_difference(acc, one):.2e}")
    assert_same_training(acc, one)
    assert acc["optimizer"]["state"][0]["step"] == one["optimizer"]["state"][0]["step"] == 3  # optimizer steps


def test_two_processes_of_two_micro_batches_give_one_process_of_one_batch(tmp_path):
    """2 processes x 2 micro-batches x 8 images against 1 process x 32 images. The 2 processes are started as srun
    starts its tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), so the launch under SLURM is tested too; only
    rank 0 writes."""
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=str(free_port()) if rank == 0 else procs[0][1])
        cmd = [sys.executable, "train.py", *FLAGS, "--batch_size_per_gpu", "8", "--grad_accum_steps", "2",
               "--output_dir", str(tmp_path / "two")]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True), env["MASTER_PORT"]))
    outputs = [p.communicate(timeout=300) for p, _ in procs]
    assert all(p.returncode == 0 for p, _ in procs), "".join(err[-2000:] for _, err in outputs)
    assert "epoch 0:" in outputs[0][0] and "epoch 0:" not in outputs[1][0]  # rank 0 prints and writes
    train.main(FLAGS + ["--batch_size_per_gpu", "32", "--output_dir", str(tmp_path / "one")])
    two, one = load(tmp_path / "two"), load(tmp_path / "one")
    print(f"largest relative difference: {largest_difference(two, one):.2e}")
    assert_same_training(two, one)
    assert two["world_size"] == 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_center_and_teacher_move_once_per_optimizer_step_not_per_micro_batch(monkeypatch):
    """Within a step the teacher and the center are those of the step's start: one EMA and one center update
    after the last micro-batch, whatever N."""
    args = train.parse_args(FLAGS + ["--batch_size_per_gpu", "4", "--grad_accum_steps", "3"])
    torch.manual_seed(0)
    training = train.build_training(args, torch.device("cpu"), 1, False, 4)  # 4 steps per epoch
    calls, teachers, centers = [], [], []
    real_forward = training.teacher.forward
    def watched_teacher(views):  # what the teacher is when each micro-batch sees it
        teachers.append(torch.cat([p.flatten() for p in training.teacher.parameters()]).clone())
        centers.append(training.dino_loss.center.clone())
        return real_forward(views)
    monkeypatch.setattr(training.teacher, "forward", watched_teacher)
    real_ema = train.ema_update
    monkeypatch.setattr(train, "ema_update", lambda *a: (calls.append("ema"), real_ema(*a)))
    micro_batches = [random_batch(args, batch=4, seed=s) for s in range(3)]
    center_before = training.dino_loss.center.clone()
    train.train_step(training, micro_batches, epoch=0, step=0)
    assert calls == ["ema"]
    assert all(torch.equal(x, teachers[0]) for x in teachers) and all(torch.equal(c, centers[0]) for c in centers)
    assert not torch.equal(training.dino_loss.center, center_before)  # and then it moved, once


@pytest.mark.parametrize("n", [1, 4])
def test_lr_scales_with_the_batch_of_an_optimizer_step(n):
    """Sec. 3.2's linear scaling rule applies to the effective batch: batch per process x processes x N."""
    args = train.parse_args(FLAGS + ["--batch_size_per_gpu", "8", "--grad_accum_steps", str(n), "--lr", "0.001",
                                     "--warmup_epochs", "0"])
    training = train.build_training(args, torch.device("cpu"), 1, False, 3)  # 3 steps per epoch
    assert training.lr[0] == pytest.approx(0.001 * 8 * n / 256)
