"""Your own images and your own weights: a folder of photos without labels trains (and resumes bit for bit), and a
run can start from a training checkpoint or a backbone file.

Self-supervised learning needs no labels (paper Sec. 1: "self-supervised pretraining ... without labels"), so any
folder of images is training data; the k-NN, which needs labels, is skipped there with one line.
"""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import cli
import data
import train
from conftest import TINY_TRAIN, load
from draw import read_rows

TINY = TINY_TRAIN + ["--batch_size_per_gpu", "8", "--freeze_last_layer", "0", "--saveckp_freq", "0",
                    "--log_every", "1", "--precision", "fp32", "--knn_every", "1"]
FASHION = TINY + ["--subset", "32", "--epochs", "1"]


def photo_folder(root, count=24):
    """`count` JPEGs of 40 x 32 px: some at the top, the rest in nested folders; hidden and non-image files beside
    them, which are not images. Returns the image paths relative to root, in the expected (sorted) order."""
    rng = np.random.default_rng(0)
    names = [f"top{i}.jpg" for i in range(4)] + [f"trip/day{i}.JPG" for i in range(10)]
    names = (names + [f"trip/z_night/n{i}.png" for i in range(count)])[:count]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / name)
    (root / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "notes.txt").write_text("not an image")
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbnails" / "hidden.jpg")
    return sorted(names, key=lambda n: n.split("/"))


# --- 1. a folder of photos --------------------------------------------------------------------------------
def test_every_image_under_a_folder_is_found_in_a_stable_order_and_nothing_else(tmp_path):
    expected = photo_folder(tmp_path)
    images = data.build_datasets(str(tmp_path), "data").train
    assert images.names() == expected  # recursive, sorted, top-level files included, hidden / other files not
    image, label = images[0]
    assert image.shape == (3, 32, 40) and image.dtype == torch.uint8 and label == -1


def test_a_folder_of_photos_trains_without_knn_and_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    """24 photos, batch 8: 3 steps per epoch, 2 epochs. A run that crashes after its checkpoint inside epoch 1
    (--saveckp_steps 2: after steps 2, 3 (epoch end), 4) ends, resumed, with the straight run's weights."""
    photo_folder(tmp_path / "photos")
    flags = TINY + ["--data_path", str(tmp_path / "photos"), "--epochs", "2", "--saveckp_steps", "2",
                    "--depth", "2", "--drop_path_rate", "0.2"]
    train.main(flags + ["--output_dir", str(tmp_path / "straight")])
    out = capsys.readouterr().out
    assert "24 images; 3 steps of 8 per epoch (24 images, 0 left out" in out
    assert "no k-NN: " in out and "has no labels" in out
    rows = read_rows(tmp_path / "straight" / "log.txt")
    assert [r["epoch"] for r in rows] == [0, 1] and all("knn_top1" not in r for r in rows)
    assert all(np.isfinite([r["train_loss"], r["teacher_entropy"], r["kl_teacher_student"]]).all() for r in rows)
    assert (tmp_path / "straight" / "curves.png").exists()

    save_atomic, saves = checkpoint.save_atomic, []

    def save_then_crash(obj, path):
        save_atomic(obj, path)
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt  # a crash right after the checkpoint of step 4 (epoch 1, step 1)

    monkeypatch.setattr(checkpoint, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags + ["--output_dir", str(tmp_path / "crashed")])
    assert (load(tmp_path / "crashed")["epoch"], load(tmp_path / "crashed")["iteration"]) == (1, 1)
    monkeypatch.setattr(checkpoint, "save_atomic", save_atomic)
    train.main(flags + ["--output_dir", str(tmp_path / "crashed")])
    a, b = load(tmp_path / "crashed"), load(tmp_path / "straight")
    for part in ("student", "teacher", "dino_loss"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "notes.txt").write_text("no photos here"), "no image files in .* or its sub-folders "
                                                                      r"\(looked for .jpg .jpeg .png"),
    (lambda root: [(root / f"bad{i}.jpg").write_bytes(b"not a jpeg") for i in range(3)],
     "none of the 3 image files in .* can be read"),
])
def test_a_folder_without_a_readable_image_is_one_error_line(tmp_path, capsys, make, message):
    (tmp_path / "folder").mkdir()
    make(tmp_path / "folder")
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(lambda: train.main(TINY + ["--data_path", str(tmp_path / "folder"),
                                               "--output_dir", str(tmp_path / "out")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert pytest.importorskip("re").search(message, err[0]), err[0]


def test_class_folders_under_train_keep_their_labels(tmp_path):
    for split in ("train", "val"):
        for label in ("cats", "dogs"):
            photo_folder(tmp_path / split / label, count=4)  # each class folder holds nested photos too
    datasets = data.build_datasets(str(tmp_path), "data")
    assert datasets.num_classes == 2 and len(datasets.labelled_test) == 8
    assert sorted({datasets.train[i][1] for i in range(8)}) == [0, 1]


# --- 2. start from weights ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run's folder: 1 epoch on 32 Fashion-MNIST images (its center has moved away from 0)."""
    out = tmp_path_factory.mktemp("trained")
    train.main(FASHION + ["--knn_every", "0", "--output_dir", str(out)])
    return out


def weights_at_first_step(monkeypatch, argv):
    """train.main(argv) stopped at its first step: the state dicts of student, teacher and loss at that moment."""
    seen = {}

    def first_step(training, *args):
        seen.update({k: {n: v.clone() for n, v in m.state_dict().items()}
                     for k, m in training.state().items() if k in ("student", "teacher", "dino_loss")})
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_step", first_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    return seen


def test_a_run_from_a_checkpoint_has_exactly_its_weights_before_the_first_step(tmp_path, trained, monkeypatch,
                                                                               capsys):
    ckpt = load(trained)
    seen = weights_at_first_step(monkeypatch, FASHION + ["--init_weights", str(trained / "checkpoint.pth"),
                                                         "--output_dir", str(tmp_path)])
    assert "started from --init_weights" in capsys.readouterr().out
    for part in ("student", "teacher", "dino_loss"):
        assert seen[part].keys() == ckpt[part].keys()
        assert all(torch.equal(seen[part][k], ckpt[part][k]) for k in ckpt[part]), part
    assert ckpt["dino_loss"]["center"].abs().sum() > 0  # the center was really taken over


def test_an_official_full_checkpoint_loads_with_its_ddp_prefix_and_newer_weight_norm_names(tmp_path, trained,
                                                                                          monkeypatch):
    ckpt = load(trained)
    names = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
             "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}
    official = lambda sd, prefix: {prefix + next((k.replace(a, b) for a, b in names.items() if k.endswith(a)), k): v
                                   for k, v in sd.items()}
    path = tmp_path / "dino_tiny_full_checkpoint.pth"
    torch.save({"student": official(ckpt["student"], "module."), "teacher": official(ckpt["teacher"], ""),
                "dino_loss": ckpt["dino_loss"], "epoch": 100, "args": argparse.Namespace(arch="vit_tiny")}, path)
    seen = weights_at_first_step(monkeypatch, FASHION + ["--init_weights", str(path), "--output_dir",
                                                         str(tmp_path / "out")])
    assert all(torch.equal(seen["student"][k], v) for k, v in ckpt["student"].items())


def test_a_run_from_a_backbone_file_has_its_backbone_and_a_fresh_head(tmp_path, trained, monkeypatch, capsys):
    teacher = load(trained)["teacher"]
    backbone = {k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")}
    torch.save(backbone, tmp_path / "exported.pth")  # a plain backbone state dict, as the official *_pretrain.pth
    seen = weights_at_first_step(monkeypatch, FASHION + ["--init_weights", str(tmp_path / "exported.pth"),
                                                         "--output_dir", str(tmp_path / "out")])
    assert "the heads start at random init" in capsys.readouterr().out
    for part in ("student", "teacher"):
        assert all(torch.equal(seen[part][f"backbone.{k}"], v) for k, v in backbone.items()), part
    heads = [{k: v for k, v in seen[p].items() if k.startswith("head.")} for p in ("student", "teacher")]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # teacher = student at the start
    assert not torch.equal(heads[0]["head.mlp.0.weight"], teacher["head.mlp.0.weight"])  # not the trained head


def test_weights_that_do_not_fit_are_one_line_unless_a_fresh_head_is_asked_for(tmp_path, trained, capsys):
    flags = FASHION + ["--init_weights", str(trained / "checkpoint.pth"), "--out_dim", "32", "--epochs", "1"]
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(lambda: train.main(flags + ["--output_dir", str(tmp_path / "a")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert "wrong shapes (file vs model) 2 (" in err[0] and "head.last_layer.weight_g (64, 1) vs (32, 1)" in err[0]
    assert "--fresh_head" in err[0]
    train.main(flags + ["--fresh_head", "--knn_every", "0", "--output_dir", str(tmp_path / "b")])
    assert "backbones; the heads start at random init (--fresh_head)" in capsys.readouterr().out


def test_an_existing_checkpoint_in_the_output_dir_wins_over_init_weights(tmp_path, trained, capsys):
    train.main(FASHION + ["--knn_every", "0", "--output_dir", str(tmp_path)])
    capsys.readouterr()
    train.main(FASHION + ["--epochs", "2", "--knn_every", "0", "--init_weights", str(trained / "checkpoint.pth"),
                          "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "is not used: " in out and "resumed from" in out


def test_the_scripts_that_look_at_images_take_a_folder(tmp_path):
    """visualize_attention.py (--data_path or --image_path) and the dense scripts (data.images_from_args: pca.py,
    similarity.py, cosegment.py, correspond.py) read every image under a folder, in the training order."""
    import visualize_attention
    expected = photo_folder(tmp_path / "photos", count=3)  # top0.jpg, top1.jpg, top2.jpg
    visualize_attention.main(["--pretrained_weights", "random", "--arch", "vit_tiny", "--patch_size", "8", "--depth",
                              "1", "--device", "cpu", "--image_size", "32", "--data_path", str(tmp_path / "photos"),
                              "--output_dir", str(tmp_path / "attention")])
    assert sorted(p.name for p in (tmp_path / "attention").iterdir()) == ["top0", "top1", "top2"]
    for flags in (["--image_path", str(tmp_path / "photos")], ["--data_path", str(tmp_path / "photos")]):
        parser = cli.ArgumentParser()
        data.add_image_args(parser)
        images, names = data.images_from_args(parser.parse_args(flags + ["--load_size", "16"]), count=2)
        every = flags[0] == "--image_path"  # --image_path: every image of the folder; --data_path: `count` of them
        assert names == [n.removesuffix(".jpg") for n in expected][:None if every else 2]
        assert all(image.shape[-2] == 16 for image in images)


def test_fresh_head_without_init_weights_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(lambda: train.main(FASHION + ["--fresh_head", "--output_dir", str(tmp_path)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err == ["error: --fresh_head goes with --init_weights (the file whose backbones "
                                            "it keeps)"]
