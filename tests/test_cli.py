"""Every script answers bad input with one line `error: ...` and exit code 2: never a traceback, never a silent run."""
from pathlib import Path

import pytest
import torch

import bench
import cli
import eval_knn
import eval_linear
import train
import visualize_attention


def run(main, argv, capsys):
    """(exit code, stderr lines) of main(argv) run as the scripts run it, through cli.run_cli."""
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(lambda: main(argv))
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def corrupt_image(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return str(path)


@pytest.mark.parametrize("main, argv, message", [
    (train.main, ["--lr", "-1"], "argument --lr: expected a number >= 0"),
    (train.main, ["--batch_size_per_gpu", "0"], "expected an integer > 0"),
    (train.main, ["--momentum_teacher", "1.5"], "expected a number in [0, 1]"),
    (train.main, ["--teacher_temp", "nan"], "expected a number > 0"),
    (train.main, ["--local_crops_scale", "0.4", "0.05"], "expected 0 < low <= high"),
    (train.main, ["--device", "tpu"], "expected a device"),
    (train.main, ["--epoch", "2"], "unrecognized arguments: --epoch 2"),  # --epochs spelled short: no guessing
    (eval_knn.main, ["--pretrained_weights", "/no/such/file.pth"], "does not exist"),
    (eval_knn.main, ["--nb_knn", "0"], "expected an integer > 0"),
    (eval_knn.main, ["--nb", "5"], "unrecognized arguments: --nb 5"),  # not --nb_knn 5
    (eval_knn.main, ["--temperature", "0"], "expected a number > 0"),
    (eval_linear.main, ["--epochs", "0"], "expected an integer > 0"),
    (eval_linear.main, ["--pretrained_weights", "/no/such/file.pth"], "does not exist"),
    (visualize_attention.main, ["--threshold", "2"], "expected a number in [0, 1]"),
    (visualize_attention.main, ["--image_path", "/no/such/image.jpg"], "does not exist"),
    (bench.main, ["--batch_size", "-3"], "expected an integer > 0"),
])
def test_bad_flags_and_missing_files_get_one_line_and_exit_code_2(main, argv, message, capsys):
    code, lines = run(main, argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("main", [eval_knn.main, eval_linear.main, visualize_attention.main])
def test_cuda_on_a_machine_without_a_gpu_is_one_line(main, capsys):
    code, lines = run(main, ["--device", "cuda"], capsys)
    assert code == 2 and lines == ["error: argument --device: cuda: no CUDA GPU is available here (use cpu) "
                                   "(see --help)"], lines


@pytest.mark.parametrize("main", [eval_knn.main, eval_linear.main, visualize_attention.main])
def test_without_a_checkpoint_the_default_weights_say_to_train_first(main, capsys, tmp_path, monkeypatch):
    """--pretrained_weights defaults to output/checkpoint.pth; where train.py has not written it, one line says
    what to do (visualize_attention used to fall back to a random init without being asked)."""
    monkeypatch.chdir(tmp_path)
    code, lines = run(main, [], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: output/checkpoint.pth does not exist: "
                                                                 "train first"), lines


def test_an_unreadable_image_given_to_a_script_is_one_line_naming_it(corrupt_image, capsys, tmp_path):
    argv = ["--image_path", corrupt_image, "--pretrained_weights", "random", "--arch", "vit_tiny",
            "--patch_size", "16", "--output_dir", str(tmp_path / "out")]
    code, lines = run(visualize_attention.main, argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot read image"), lines
    assert "corrupt.jpg" in lines[0]


def test_an_unreadable_weights_file_is_one_line(tmp_path, capsys):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    code, lines = run(eval_knn.main, ["--pretrained_weights", str(tmp_path / "broken.pth")], capsys)
    assert code == 2 and len(lines) == 1 and "as a safe torch checkpoint" in lines[0]


def test_a_file_that_is_not_a_checkpoint_is_one_line_saying_what_it_is_not_and_what_is_expected(capsys):
    """README.md given as the weights: not a torch.save file (not a checkpoint holding unsafe objects)."""
    readme = str(Path(__file__).resolve().parent.parent / "README.md")
    code, lines = run(eval_knn.main, ["--pretrained_weights", readme], capsys)
    assert code == 2 and lines == [f"error: cannot read {readme} as a safe torch checkpoint: it is not a file written "
                                   f"by torch.save (UnpicklingError); expected train.py's checkpoint.pth, an official "
                                   f"training checkpoint or an official backbone file"], lines


def test_a_reader_that_closes_stdout_stops_train_py_quietly_and_at_once(tmp_path):
    """`python train.py | head -4`: the print after the reader has gone ends the run with exit code 1, without a
    traceback and at once (before: a traceback and, when it came inside an epoch, a hang until killed)."""
    import subprocess
    import sys
    from conftest import ROOT, TINY_TRAIN
    command = [sys.executable, "train.py", *TINY_TRAIN, "--subset", "64", "--batch_size_per_gpu", "16",
               "--num_workers", "1", "--knn_every", "0", "--output_dir", str(tmp_path)]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        assert run.stdout.readline().startswith("data: ")
        run.stdout.close()  # the reader goes away; the epoch's line is printed into a closed pipe
        assert run.wait(timeout=60) == 1
        assert "Traceback" not in run.stderr.read()
