"""Paper Sec. 5.3, Fig. 7: centering alone collapses to a uniform output, sharpening alone to one dimension, and
only both together train. Short runs of train.py (tiny ViT, 32 steps, real Fashion-MNIST images, CPU) with each
mechanism switched off, and the figure of collapse_study.py."""
import math
from pathlib import Path

import pytest
from PIL import Image

import collapse_study
import draw
import train
from conftest import TINY_TRAIN

K = 64
TINY = TINY_TRAIN + ["--subset", "256", "--out_dim", str(K), "--head_hidden_dim", "256", "--batch_size_per_gpu", "32",
                    "--knn_every", "0", "--freeze_last_layer", "0", "--lr", "0.005", "--momentum_teacher", "0.95",
                    "--warmup_teacher_temp", "0.03", "--teacher_temp", "0.03", "--epochs", "4", "--log_every", "8"]


def final_row(tmp_path, flags):
    """The last epoch's log row of a tiny run with these flags (they override TINY's)."""
    train.main(TINY + flags + ["--output_dir", str(tmp_path)])
    return draw.read_rows(Path(tmp_path) / "log.txt")[-1]


def test_centering_alone_collapses_to_uniform(tmp_path):
    """Sec. 5.3: with centering only (no sharpening), the output collapses to a uniform distribution: the teacher's
    entropy reaches ln K and the KL between teacher and student falls to 0."""
    row = final_row(tmp_path, collapse_study.SETTINGS["centering_only"][1])
    assert row["teacher_entropy"] > 0.95 * math.log(K)
    assert row["kl_teacher_student"] < 0.05


def test_sharpening_alone_collapses_to_one_dimension(tmp_path):
    """Sec. 5.3: without centering, sharpening alone lets one dimension dominate: the teacher's entropy goes to 0."""
    row = final_row(tmp_path, collapse_study.SETTINGS["sharpening_only"][1])
    assert row["teacher_entropy"] < 0.1 * math.log(K)


def test_centering_and_sharpening_together_avoid_both_collapses(tmp_path):
    """Sec. 5.3: centering and sharpening have opposite effects and both are needed to avoid collapse: the
    entropy stays away from 0 and from ln K, and the student still has something to learn (KL > 0)."""
    row = final_row(tmp_path, collapse_study.SETTINGS["both"][1])
    assert 0.15 * math.log(K) < row["teacher_entropy"] < 0.9 * math.log(K)
    assert row["kl_teacher_student"] > 0.3


def test_plot_curves_writes_a_png_of_the_asked_size(tmp_path):
    steps = [8, 16, 24, 32]
    curves = {name: {"steps": steps, "teacher_entropy": [math.log(K) * f for f in fractions],
                     "kl_teacher_student": [0.5 * f for f in fractions]}
              for name, fractions in [("both", [0.5, 0.4, 0.45, 0.5]), ("sharpening only", [0.3, 0.1, 0.01, 0.0]),
                                      ("centering only", [0.9, 0.99, 1.0, 1.0])]}
    collapse_study.plot_curves(curves, math.log(K), tmp_path / "fig.png", size=(640, 300))
    with Image.open(tmp_path / "fig.png") as image:
        assert image.size == (640, 300) and image.format == "PNG"
        assert len(image.convert("RGB").getcolors(1 << 20)) > 3  # axes, text and three coloured curves, not a blank


def test_summarize_puts_each_epoch_at_its_last_step():
    rows = [{"epoch": -1, "knn_top1": 50.0},
            {"epoch": 0, "teacher_entropy": 2.0, "kl_teacher_student": 1.0, "epoch_time_s": 2.0},
            {"epoch": 1, "teacher_entropy": 1.5, "kl_teacher_student": 0.5, "knn_top1": 60.0, "epoch_time_s": 3.0}]
    r = collapse_study.summarize(rows, {"subset": 256, "batch_size_per_gpu": 32, "out_dim": K})
    assert r["steps"] == [8, 16] and r["final_teacher_entropy"] == 1.5 and r["final_kl"] == 0.5
    assert (r["knn_before"], r["knn_after"]) == (50.0, 60.0) and r["ln_k"] == pytest.approx(math.log(K))
    assert r["train_time_s"] == 5.0
