"""curves.png: after every epoch train.py draws the run's loss, teacher entropy against ln K, KL, k-NN and lr
(Sec. 5.3's diagnostics) from log.txt and steps.txt; `python draw.py OUTPUT_DIR` redraws it for any run."""
import json

import pytest
from PIL import Image

import draw
import run_control
import train
from cli import ConfigError
from conftest import TINY_TRAIN
from draw import read_rows

FLAGS = TINY_TRAIN + ["--subset", "128", "--batch_size_per_gpu", "16", "--epochs", "2", "--knn_every", "1",
                      "--log_every", "2"]


def test_training_writes_curves_and_a_row_every_log_every_steps(tmp_path):
    train.main(FLAGS + ["--output_dir", str(tmp_path)])
    steps = read_rows(tmp_path / "steps.txt")
    assert [r["step"] for r in steps] == list(range(2, 17, 2))  # 8 steps an epoch, a row every 2
    assert all(r["kl_teacher_student"] == pytest.approx(r["train_loss"] - r["teacher_entropy"]) for r in steps)
    epochs = read_rows(tmp_path / "log.txt")
    assert [r["step"] for r in epochs] == [0, 8, 16]  # the k-NN before training, then each epoch's last step
    image = Image.open(tmp_path / "curves.png")
    assert image.size == (1050, 620) and len(image.convert("RGB").getcolors(1 << 20)) > 10  # text, axes, curves
    redrawn = draw.training_curves(tmp_path, 64, tmp_path / "again.png")
    assert Image.open(redrawn).tobytes() == image.tobytes()  # the command draws what training drew


def test_resume_drops_the_step_rows_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    (tmp_path / "steps.txt").write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 6)) + '{"step": 8')
    (tmp_path / "log.txt").write_text(json.dumps({"epoch": -1, "step": 0}) + "\n")
    run_control.trim_log(tmp_path, 0, 4)
    assert [r["step"] for r in read_rows(tmp_path / "steps.txt")] == [2, 4]  # 6 and the cut row: trained again
    assert read_rows(tmp_path / "log.txt") == [{"epoch": -1, "step": 0}]


def test_read_rows_leaves_out_only_a_last_row_cut_by_a_kill(tmp_path):
    """No file yet: no rows. The row being written when a run was killed is not a row; a broken one before it is
    an error, not a silent gap."""
    assert read_rows(tmp_path / "log.txt") == []
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n{"epoch": 1, "train_lo')
    assert read_rows(tmp_path / "log.txt") == [{"epoch": 0}]
    (tmp_path / "log.txt").write_text('{"epoch": 0, "train_lo\n{"epoch": 1}\n')
    with pytest.raises(json.JSONDecodeError):
        read_rows(tmp_path / "log.txt")


def test_the_command_says_in_one_line_what_it_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint.pth in .* give --out_dim"):
        draw.main([str(tmp_path)])
    with pytest.raises(ConfigError, match="holds no train.py log"):
        draw.main([str(tmp_path), "--out_dim", "64"])
