"""The linear protocol (paper Sec. 4.1): a linear classifier on frozen features, on real Fashion-MNIST images."""
import torch

import data
import eval_linear
from conftest import tiny_vit, write_checkpoint


def test_features_are_the_last_cls_tokens_and_optionally_the_mean_patch_token():
    """Official protocol: ViT-S concatenates the CLS tokens of the last 4 blocks; ViT-B the last CLS token and
    the average of the patch tokens. Each block's output passes the final norm."""
    model = tiny_vit(patch_size=7, depth=2, seed=0)
    x = torch.randn(3, 3, 28, 28)
    blocks = model.get_intermediate_layers(x, 2)  # 2 x (B, 1+N, D)
    feats = eval_linear.ProbeFeatures(model, n_last_blocks=2)(x)
    assert feats.shape == (3, 2 * 192) and torch.equal(feats, torch.cat([blocks[0][:, 0], blocks[1][:, 0]], dim=1))
    assert torch.allclose(feats[:, 192:], model(x), atol=1e-6)  # the last CLS token is what k-NN uses
    pooled = eval_linear.ProbeFeatures(model, n_last_blocks=1, avgpool_patchtokens=True)
    assert pooled.dim == 2 * 192
    assert torch.allclose(pooled(x), torch.cat([blocks[1][:, 0], blocks[1][:, 1:].mean(dim=1)], dim=1))


def test_linear_layer_starts_as_in_the_paper():
    """N(0, 0.01) weights, zero bias."""
    torch.manual_seed(0)
    layer = eval_linear.linear_layer(2000, 100)
    assert abs(layer.weight.std().item() - 0.01) < 1e-3 and abs(layer.weight.mean().item()) < 1e-3
    assert not layer.bias.any()


def fashion_mnist(n_train, n_test):
    datasets = data.build_datasets("fashion_mnist", "data")
    return (torch.utils.data.Subset(datasets.labelled_train, range(n_train)),
            torch.utils.data.Subset(datasets.labelled_test, range(n_test)))


def test_linear_probe_of_random_features_beats_chance_by_far_on_fashion_mnist():
    """2,000 train / 500 test images, a 2-block ViT at random init: even untrained features are linearly
    separable far above the 10% of chance (measured: about 60% top-1, 94% top-5)."""
    train_set, test_set = fashion_mnist(2000, 500)
    features = eval_linear.ProbeFeatures(tiny_vit(patch_size=7, depth=2, seed=0), n_last_blocks=2)
    top1, top5 = eval_linear.linear_probe(features, train_set, test_set, 10, 28, torch.device("cpu"), epochs=50,
                                          lr=0.03, batch_size=128)
    assert top1 > 50 and top5 > 85 and top5 >= top1


def test_augmented_training_runs_with_random_resized_crops():
    """Without --precomputed_features each batch is a fresh RandomResizedCrop + flip of the training images."""
    train_set, test_set = fashion_mnist(64, 32)
    crops = torch.stack([eval_linear.Augmented(train_set, 28)[0][0] for _ in range(4)])
    assert crops.shape == (4, 3, 28, 28) and crops.dtype == torch.uint8
    assert len({c.sum().item() for c in crops}) > 1  # random views
    features = eval_linear.ProbeFeatures(tiny_vit(patch_size=7, depth=1, seed=0), n_last_blocks=1)
    top1, top5 = eval_linear.linear_probe(features, train_set, test_set, 10, 28, torch.device("cpu"), epochs=2,
                                          batch_size=32, precomputed=False)
    assert 0 <= top1 <= top5 <= 100


def test_main_reads_our_checkpoint_and_prints_top1_and_top5(tmp_path, capsys):
    write_checkpoint(tmp_path / "checkpoint.pth", tiny_vit(patch_size=7, depth=1, seed=0), global_crop_size=28)
    eval_linear.main(["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--n_last_blocks", "1",
                      "--subset", "200", "--epochs", "2", "--num_workers", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "precomputed features" in out and "Linear probe on 200 test images: top-1 = " in out
