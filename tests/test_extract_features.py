"""extract_features.py writes the features the evaluations compute (paper Sec. 4.1: the CLS token of k-NN, the linear
probe's concatenation), as files that numpy and torch open alone."""
import json

import numpy as np
import PIL.Image
import pytest
import torch

import backbone
import cli
import data
import extract_features
from conftest import tiny_vit, write_checkpoint

FAST = ["--num_workers", "0", "--device", "cpu"]


@pytest.fixture
def weights(tmp_path):
    """A 2-block ViT with patches of 7 px (4 x 4 patches of a 28 px Fashion-MNIST image) and its checkpoint."""
    model = tiny_vit(patch_size=7, depth=2, seed=0)
    return model, write_checkpoint(tmp_path / "checkpoint.pth", model, global_crop_size=28)


def read(folder, name):
    return torch.from_numpy(np.load(folder / name, mmap_mode="r").copy())


def view(image, size=28):
    """The evaluation view of one image as the backbone sees it: (1, 3, S, S)."""
    return data.normalize(data.EvalTransform(size)(image))[None]


def test_written_features_equal_what_eval_knn_computes(tmp_path, weights):
    """cls.npy holds, row for row, the features eval_knn.py computes (data.extract_features: the backbone's CLS
    token after the final norm), bit for bit; labels.npy the labels; names.txt the dataset indices."""
    _, path = weights
    extract_features.main(["--pretrained_weights", path, "--subset", "40", "--batch_size", "16",
                           "--output_dir", str(tmp_path / "features"), *FAST])
    model, _ = backbone.load(path)  # loaded as eval_knn.py loads it
    datasets = data.build_datasets("fashion_mnist", "data", subset=40)
    for split, dataset in (("train", datasets.labelled_train), ("test", datasets.labelled_test)):
        folder = tmp_path / "features" / split
        feats, labels = data.extract_features(model.eval(), dataset, 28, torch.device("cpu"), batch_size=16)
        assert read(folder, "cls.npy").dtype == torch.float32 and torch.equal(read(folder, "cls.npy"), feats)
        assert read(folder, "labels.npy").dtype == torch.int64 and torch.equal(read(folder, "labels.npy"), labels)
        assert (folder / "names.txt").read_text().splitlines() == [str(i) for i in range(40)]
        settings = json.loads((folder / "settings.json").read_text())
        assert (settings["split"], settings["N"], settings["D"], settings["image_size"]) == (split, 40, 192, 28)
        assert settings["features"] == ["cls.npy"] and not (folder / "patch_tokens.npy").exists()


def test_a_folder_of_3_images_gives_3_rows_named_after_them(tmp_path, weights):
    """Unlabelled images of different sizes, one in a sub-folder: one row each, in the sorted order of their paths,
    each row the feature of the image its name says; no labels."""
    model, path = weights
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name, size in (("b.jpg", (40, 30)), ("a.jpg", (20, 50)), ("sub/c.jpg", (64, 64))):
        PIL.Image.effect_noise(size, 60).convert("RGB").save(images / name)
    out = tmp_path / "features"
    extract_features.main(["--pretrained_weights", path, "--data_path", str(images), "--output_dir", str(out),
                           "--image_size", "28", *FAST])
    names = (out / "names.txt").read_text().splitlines()
    assert names == ["a.jpg", "b.jpg", "sub/c.jpg"]
    cls = read(out, "cls.npy")
    assert cls.shape == (3, 192) and not (out / "labels.npy").exists()
    with torch.no_grad():
        assert torch.allclose(cls[2], model(view(data.read_image(images / "sub" / "c.jpg")))[0], atol=1e-5)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["N"] == 3 and settings["split"] == "all" and settings["data_path"] == str(images)


def test_patch_tokens_and_linear_features_are_the_models_own_for_one_image(tmp_path, weights):
    """patch_tokens.npy (N, P, D): the last block's normed patch tokens; linear.npy (N, F): eval_linear's feature
    (the CLS tokens of the last n blocks, and the mean patch token), both from get_intermediate_layers."""
    model, path = weights
    out = tmp_path / "features"
    extract_features.main(["--pretrained_weights", path, "--subset", "4", "--split", "test", "--patch_tokens",
                           "--linear_features", "--n_last_blocks", "2", "--avgpool_patchtokens", "true",
                           "--output_dir", str(out), *FAST])
    assert not (out / "train").exists()
    patches, linear = read(out / "test", "patch_tokens.npy"), read(out / "test", "linear.npy")
    assert patches.shape == (4, 16, 192) and linear.shape == (4, 3 * 192)
    image = data.build_datasets("fashion_mnist", "data").labelled_test[0][0]
    with torch.no_grad():
        blocks = model.get_intermediate_layers(view(image), 2)  # 2 x (1, 1+P, D)
    assert torch.allclose(patches[0], blocks[1][0, 1:], atol=1e-5)
    assert torch.allclose(linear[0], torch.cat([blocks[0][0, 0], blocks[1][0, 0], blocks[1][0, 1:].mean(0)]),
                          atol=1e-5)
    assert torch.allclose(read(out / "test", "cls.npy")[0], blocks[1][0, 0], atol=1e-5)


def error_line(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(lambda: extract_features.main(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # and the progress bar's
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err and "\n" not in lines[0]
    return lines[0]


def test_bad_input_is_one_error_line(tmp_path, capsys, weights):
    """A folder without images; patch tokens asked of a convnet; --split test of unlabelled images."""
    (tmp_path / "empty").mkdir()
    out = ["--output_dir", str(tmp_path / "features"), *FAST]
    assert "no image files in" in error_line(capsys, ["--pretrained_weights", weights[1], "--data_path",
                                                      str(tmp_path / "empty"), *out])
    assert "--patch_tokens needs a ViT" in error_line(capsys, ["--arch", "resnet18", "--pretrained_weights",
                                                               "random", "--patch_tokens", *out])
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "one.png")
    assert "no test split" in error_line(capsys, ["--pretrained_weights", weights[1], "--data_path",
                                                  str(tmp_path / "empty"), "--split", "test", *out])


def test_an_unreadable_image_read_by_a_worker_is_named_and_nothing_looks_complete(tmp_path, capsys, weights):
    """A file that is not an image, met by a DataLoader worker after a batch was written: one line naming it, and
    the output folder holds only .tmp files (no settings.json, no cls.npy); a full rerun replaces them."""
    images, out = tmp_path / "images", tmp_path / "features"
    images.mkdir()
    PIL.Image.new("RGB", (30, 30)).save(images / "a.png")
    (images / "b.png").write_bytes(b"not a png")
    argv = ["--pretrained_weights", weights[1], "--data_path", str(images), "--output_dir", str(out),
            "--image_size", "28", "--batch_size", "1", "--num_workers", "1", "--device", "cpu"]
    line = error_line(capsys, argv)
    assert "cannot read image" in line and "b.png" in line
    assert not (out / "settings.json").exists() and not (out / "cls.npy").exists()
    (images / "b.png").unlink()
    extract_features.main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["cls.npy", "names.txt", "settings.json"]
