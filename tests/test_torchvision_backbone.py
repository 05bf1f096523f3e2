"""Convnets as backbones, as in the official code: `--arch resnet50` (or any torchvision classification model) with
its classifier replaced by an identity, trained with the same head, loss and loop; the official ResNet-50 file
(dino_resnet50_pretrain.pth: torchvision's resnet50 state dict without `fc`) loads strictly."""
import pytest
import torch
import torchvision

import backbone
import eval_knn
import train
from cli import ConfigError
from conftest import TINY_TRAIN, load

RESNET = TINY_TRAIN + ["--arch", "resnet18", "--subset", "64", "--batch_size_per_gpu", "16", "--epochs", "1",
                       "--out_dim", "64", "--head_hidden_dim", "128", "--knn_every", "0", "--optimizer", "sgd",
                       "--lr", "0.03", "--weight_decay", "1e-4", "--weight_decay_end", "1e-4", "--log_every", "1"]


def test_resnet_trains_with_the_dino_head_and_its_checkpoint_evaluates_with_knn(tmp_path, capsys):
    train.main(RESNET + ["--output_dir", str(tmp_path)])
    ckpt = load(tmp_path)
    assert "backbone.layer4.1.conv2.weight" in ckpt["teacher"] and not any(".fc." in k for k in ckpt["teacher"])
    assert ckpt["student"]["head.mlp.0.weight"].shape[1] == 512  # resnet18's pooled features feed the head
    eval_knn.main(["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--nb_knn", "5", "--num_workers", "0", "--subset", "256",
                   "--device", "cpu"])
    assert "5-NN classifier result: top1 =" in capsys.readouterr().out


def test_official_resnet50_layout_loads_strictly(tmp_path):
    """dino_resnet50_pretrain.pth holds resnet50's state dict without the classifier `fc`."""
    torch.manual_seed(0)
    official = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    torch.save(official, tmp_path / "dino_resnet50_pretrain.pth")
    model, saved = backbone.load(tmp_path / "dino_resnet50_pretrain.pth", arch="resnet50")
    assert saved == {} and model.embed_dim == 2048
    assert all(torch.equal(model.state_dict()[k], v) for k, v in official.items())
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 2048)  # pooled features, no classifier
    with pytest.raises(ConfigError, match="unexpected keys"):  # and a file with the classifier does not fit
        torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "with_fc.pth")
        backbone.load(tmp_path / "with_fc.pth", arch="resnet50")


def test_scripts_that_need_patches_refuse_a_convnet_in_one_line(tmp_path):
    import argparse
    args = argparse.Namespace(pretrained_weights="random", arch="resnet18", patch_size=None, depth=None,
                              checkpoint_key="teacher", device="cpu")
    with pytest.raises(ConfigError, match="visualize_attention.py needs a ViT"):
        backbone.from_args(args, needs_vit="visualize_attention.py")


def test_an_unknown_arch_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--arch", "xcit_small_12_p16"])
    assert stop.value.code == 2 and "unknown arch 'xcit_small_12_p16'" in capsys.readouterr().err
