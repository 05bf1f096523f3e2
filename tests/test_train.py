"""End-to-end claims about train.py on real Fashion-MNIST images (tiny ViT, a few steps, CPU)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--data_path", "fashion_mnist", "--subset", "256", "--arch", "vit_tiny", "--depth", "1",
        "--patch_size", "7", "--global_crop_size", "28", "--local_crop_size", "14", "--out_dim", "128",
        "--local_crops_number", "2", "--batch_size_per_gpu", "32", "--num_workers", "0", "--knn_every", "1",
        "--lr", "0.002", "--warmup_epochs", "0", "--log_every", "2"]  # crop sizes: also for folders (no preset)


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


def run_script(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_tiny_training_has_finite_decreasing_loss_and_writes_checkpoint(tmp_path):
    """Alg. 1 on real images: the loss starts near ln K (near-uniform outputs at init) and falls."""
    train.main(TINY + ["--epochs", "3", "--teacher_temp", "0.02", "--warmup_teacher_temp", "0.02",
                       "--output_dir", str(tmp_path)])
    log = read_log(tmp_path)
    assert log[0]["epoch"] == -1 and 0 <= log[0]["knn_top1"] <= 100  # k-NN before training
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
    epochs = [row["epoch"] for row in read_log(tmp_path)]
    assert epochs == [-1, 0, 1]  # no second "before training" k-NN, epoch 0 not trained again
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--data_path", "/no/such/folder"], "neither a folder nor a known dataset"),
    (["--global_crop_size", "30"], "not a multiple of --patch_size"),
])
def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(tmp_path, flags, message):
    res = run_script("train.py", *TINY, "--output_dir", str(tmp_path), *flags)
    assert res.returncode == 2 and message in res.stderr
    assert "Traceback" not in res.stderr


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(train.ConfigError, match="no images found"):
        train.main(TINY + ["--data_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])


def test_checkpoint_of_another_architecture_is_refused_and_kept(tmp_path):
    train.main(TINY + ["--epochs", "1", "--output_dir", str(tmp_path)])
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(train.ConfigError, match="out_dim"):
        train.main(TINY + ["--epochs", "2", "--out_dim", "256", "--output_dir", str(tmp_path)])
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train.main(TINY + ["--epochs", "1", "--knn_every", "0", "--output_dir", str(tmp_path)])
    before = (tmp_path / "checkpoint.pth").read_bytes()
    def nan_loss(self, student_output, teacher_output, epoch):
        self.teacher_entropy = torch.zeros(())
        return student_output.sum() * float("nan")

    monkeypatch.setattr(train.DINOLoss, "forward", nan_loss)
    with pytest.raises(SystemExit, match="loss is nan"):
        train.main(TINY + ["--epochs", "2", "--knn_every", "0", "--output_dir", str(tmp_path)])
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
