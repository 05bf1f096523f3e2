"""End-to-end claims about train.py on real Fashion-MNIST images (tiny ViT, a few steps, CPU)."""
import re
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import train
from conftest import TINY_TRAIN, random_batch
from draw import read_rows

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_TRAIN + ["--subset", "256", "--out_dim", "128", "--batch_size_per_gpu", "32", "--knn_every", "1",
                    "--lr", "0.002", "--log_every", "2"]


def run_script(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_tiny_training_has_finite_decreasing_loss_and_writes_checkpoint(tmp_path):
    """Alg. 1 on real images: the loss starts near ln K (near-uniform outputs at init) and falls."""
    train.main(TINY + ["--epochs", "3", "--teacher_temp", "0.02", "--warmup_teacher_temp", "0.02",
                       "--output_dir", str(tmp_path)])
    log = read_rows(tmp_path / "log.txt")
    assert log[0]["epoch"] == -1 and "knn_top1" in log[0]  # k-NN before training
    losses = [row["train_loss"] for row in log[1:]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] < math.log(128)
    assert all("knn_top1" in row and "teacher_entropy" in row for row in log[1:])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 3 and isinstance(ckpt["args"], dict)
    assert set(ckpt) >= {"student", "teacher", "optimizer", "scaler", "dino_loss", "epoch", "args"}
    assert any(k.startswith("backbone.") for k in ckpt["teacher"]) and any(k.startswith("head.") for k in ckpt["teacher"])


def test_training_resumes_from_the_saved_epoch(tmp_path, capsys):
    train.main(TINY + ["--epochs", "1", "--output_dir", str(tmp_path)])
    train.main(TINY + ["--epochs", "2", "--output_dir", str(tmp_path)])
    assert "resumed from" in capsys.readouterr().out
    epochs = [row["epoch"] for row in read_rows(tmp_path / "log.txt")]
    assert epochs == [-1, 0, 1]  # no second "before training" k-NN, epoch 0 not trained again
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 2


def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(tmp_path, capsys):
    """`python train.py` itself (a subprocess) exits 2 with one line; the second case runs it in-process."""
    res = run_script("train.py", *TINY, "--output_dir", str(tmp_path), "--data_path", "/no/such/folder")
    assert res.returncode == 2 and "neither a folder nor a known dataset" in res.stderr
    assert "Traceback" not in res.stderr
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(lambda: train.main(TINY + ["--output_dir", str(tmp_path), "--global_crop_size", "30"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "not a multiple of --patch_size" in err[0]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(train.ConfigError, match="no image files in .*empty"):
        train.main(TINY + ["--data_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])


def test_checkpoint_that_the_flags_cannot_continue_is_refused_in_one_line_and_kept(tmp_path):
    """Another model, or another optimizer state: the optimizer's kind, the last layer's norm fixed or not (one
    parameter more or fewer), fp16's loss scale."""
    train.main(TINY + ["--epochs", "1", "--knn_every", "0", "--output_dir", str(tmp_path)])
    before = (tmp_path / "checkpoint.pth").read_bytes()
    for flags, message in [(["--out_dim", "256"], "out_dim: checkpoint 128, now 256"),
                           (["--optimizer", "sgd"], "optimizer: checkpoint 'adamw', now 'sgd'"),
                           (["--norm_last_layer", "false"], "norm_last_layer: checkpoint True, now False"),
                           (["--precision", "fp16"], "fp16 (GradScaler): checkpoint False, now True")]:
        with pytest.raises(train.ConfigError, match=re.escape(message)):
            train.main(TINY + ["--epochs", "2", "--knn_every", "0", *flags, "--output_dir", str(tmp_path)])
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_a_finished_run_run_again_says_it_is_complete_and_how_to_go_on(tmp_path, capsys):
    train.main(TINY + ["--epochs", "1", "--knn_every", "0", "--output_dir", str(tmp_path)])
    capsys.readouterr()
    train.main(TINY + ["--epochs", "1", "--knn_every", "0", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "has finished training: epoch 1 of 1" in out and "--epochs" in out and "--output_dir" in out


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train.main(TINY + ["--epochs", "1", "--knn_every", "0", "--output_dir", str(tmp_path)])
    before = (tmp_path / "checkpoint.pth").read_bytes()
    forward = train.DINOLoss.forward

    def nan_loss(self, *args, **kwargs):
        return forward(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(train.DINOLoss, "forward", nan_loss)
    with pytest.raises(SystemExit, match="loss is nan"):
        train.main(TINY + ["--epochs", "2", "--knn_every", "0", "--output_dir", str(tmp_path)])
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


# --- Algorithm 1's wiring, on one step of random crops (no data loading) ------------------------------------
def one_step_training(*flags):
    args = train.parse_args(TINY + ["--device", "cpu", "--precision", "fp32", *flags])
    torch.manual_seed(0)
    return args, train.build_training(args, torch.device("cpu"), 1, False, 4)  # 4 steps per epoch


def test_teacher_sees_only_the_two_global_crops_and_the_student_all():
    """Alg. 1: "t1, t2 = gt(x1), gt(x2)" for the teacher, "s1, s2 = gs(x1), gs(x2)" for the student; Sec. 3.1:
    "all crops are passed through the student while only the global views are passed through the teacher"."""
    args, training = one_step_training()
    seen = {"teacher": [], "student": []}
    for name in seen:
        backbone = getattr(training, name).backbone
        backbone.register_forward_pre_hook(lambda m, inputs, name=name: seen[name].append(tuple(inputs[0].shape)))
    train.train_step(training, [random_batch(args, batch=4)], epoch=0, step=0)
    assert seen["teacher"] == [(2 * 4, 3, 28, 28)]  # the 2 global crops of 4 images, one pass
    assert seen["student"] == [(2 * 4, 3, 28, 28), (2 * 4, 3, 14, 14)]  # and the 2 local crops, one pass each size


def test_last_layer_gets_no_update_during_freeze_last_layer_epochs():
    """Official code: the head's last layer is kept fixed in the first --freeze_last_layer epochs,
    which helps training start; the rest of the student learns from the first step."""
    args, training = one_step_training("--freeze_last_layer", "1", "--norm_last_layer", "false")
    before = {k: v.clone() for k, v in training.student.state_dict().items()}
    train.train_step(training, [random_batch(args)], epoch=0, step=0)
    after = training.student.state_dict()
    frozen = [k for k in before if "last_layer" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])
    train.train_step(training, [random_batch(args, seed=1)], epoch=1, step=1)  # epoch 1: unfrozen
    after = training.student.state_dict()
    assert not torch.equal(before["head.last_layer.weight_v"], after["head.last_layer.weight_v"])


@pytest.mark.parametrize("batch, world_size", [(32, 1), (16, 4)])
def test_lr_follows_the_linear_scaling_rule(batch, world_size):
    """Sec. 3.2: "the learning rate is linearly ramped up during the first 10 epochs to its base value determined
    with the following linear scaling rule: lr = 0.0005 * batchsize / 256", batchsize over all processes."""
    args = train.parse_args(TINY + ["--batch_size_per_gpu", str(batch), "--lr", "0.0005", "--warmup_epochs", "1",
                                     "--epochs", "3", "--device", "cpu"])
    training = train.build_training(args, torch.device("cpu"), world_size, False, 10)  # 10 steps per epoch
    assert len(training.lr) == 30 and training.lr.max() == pytest.approx(0.0005 * batch * world_size / 256)
    train.train_step(training, [random_batch(args)], epoch=0, step=10)  # the step sets the optimizer's lr from it
    assert training.optimizer.param_groups[0]["lr"] == pytest.approx(training.lr[10])
