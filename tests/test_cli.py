"""Every script answers bad input with one line `error: ...` and exit code 2: never a traceback, never a silent run."""
import pytest

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
    (eval_knn.main, ["--pretrained_weights", "/no/such/file.pth"], "does not exist"),
    (eval_knn.main, ["--nb_knn", "0"], "expected an integer > 0"),
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


def test_an_unreadable_image_given_to_a_script_is_one_line_naming_it(corrupt_image, capsys, tmp_path):
    argv = ["--image_path", corrupt_image, "--arch", "vit_tiny", "--patch_size", "16",
            "--output_dir", str(tmp_path / "out")]
    code, lines = run(visualize_attention.main, argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot read image") and "corrupt.jpg" in lines[0]


def test_an_unreadable_weights_file_is_one_line(tmp_path, capsys):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    code, lines = run(eval_knn.main, ["--pretrained_weights", str(tmp_path / "broken.pth")], capsys)
    assert code == 2 and len(lines) == 1 and "as a safe torch checkpoint" in lines[0]
