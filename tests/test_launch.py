"""train.py's launch under SLURM and its precision and compile paths, on the CPU (so a first GPU run meets no
untested code). Two processes started as srun starts them train as one: tests/test_grad_accum.py."""
import pytest
import torch

import distributed
import train
from conftest import TINY_TRAIN, load
from draw import read_rows

FLAGS = TINY_TRAIN + ["--subset", "64", "--epochs", "1", "--drop_path_rate", "0", "--precision", "fp32",
                      "--knn_every", "0", "--saveckp_freq", "0", "--freeze_last_layer", "0", "--log_every", "1"]


def test_slurm_variables_become_torchruns():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu07,gpu08"}
    assert distributed.slurm_environment(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                  "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_on_the_cpu(tmp_path, precision):
    """The autocast path (bf16), and fp16 with its GradScaler where this torch runs fp16 on the CPU: finite losses,
    and the scaler's state saved only for fp16."""
    if precision == "fp16":
        try:
            torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        except RuntimeError:
            pytest.skip("this torch has no fp16 matmul on the CPU")
    train.main(FLAGS + ["--batch_size_per_gpu", "16", "--precision", precision, "--output_dir", str(tmp_path)])
    rows = read_rows(tmp_path / "log.txt")
    assert torch.isfinite(torch.tensor(rows[-1]["train_loss"]))
    scaler = load(tmp_path)["scaler"]
    assert ("scale" in scaler) == (precision == "fp16")


def test_compiled_backbones_train_a_few_steps_on_the_cpu(tmp_path):
    """--compile (torch.compile of both backbones) on a tiny model: it runs, and its loss is that of the eager
    model within rounding."""
    flags = FLAGS + ["--batch_size_per_gpu", "32"]
    train.main(flags + ["--output_dir", str(tmp_path / "eager")])
    try:
        train.main(flags + ["--compile", "--output_dir", str(tmp_path / "compiled")])
    except Exception as e:  # a machine without a C compiler cannot compile: say so, do not pass silently
        pytest.skip(f"torch.compile is not available here: {type(e).__name__}: {str(e)[:200]}")
    eager, compiled = read_rows(tmp_path / "eager" / "log.txt")[-1], read_rows(tmp_path / "compiled" / "log.txt")[-1]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
