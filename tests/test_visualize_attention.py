"""The attention maps of paper Fig. 1 and 3, the masks of Fig. 4, and the foreground-share measurement."""
import numpy as np
import pytest
import torch
from PIL import Image

import draw
import visualize_attention as va
from conftest import tiny_vit, write_checkpoint


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_attention_maps_give_one_map_per_head_summing_to_one_over_the_patches(size):
    """Fig. 1: "We look at the self-attention of the [CLS] token on the heads of the last layer." One (h, w) map
    per head; the CLS-to-CLS weight is dropped, so each map is a distribution over the patches."""
    model = tiny_vit(patch_size=4, seed=0)
    maps = va.attention_maps(model, torch.randn(2, 3, *size))
    assert maps.shape == (2, 3, size[0] // 4, size[1] // 4)  # (B, heads, h, w)
    assert torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(2, 3))
    assert (maps >= 0).all()
    one = va.attention_maps(model, torch.randn(3, *size))
    assert one.shape == (3, size[0] // 4, size[1] // 4)


def test_attention_maps_are_the_cls_row_of_the_last_block():
    """The map of head j at patch i is the softmax weight of the CLS query on patch i, renormalized without CLS."""
    model = tiny_vit(seed=0)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)[0, :, 0]  # (H, 1+N)
    expected = (attn[:, 1:] / (1 - attn[:, :1])).reshape(3, 4, 4)  # the row sums to 1 with CLS
    assert torch.allclose(va.attention_maps(model, x)[0], expected, atol=1e-6)


def test_threshold_masks_keep_the_smallest_set_holding_the_mass():
    """Fig. 4: "masks obtained by thresholding the self-attention maps to keep 60% of the mass"."""
    maps = torch.tensor([[0.4, 0.3], [0.2, 0.1]])
    assert va.threshold_masks(maps, 0.6).tolist() == [[True, True], [False, False]]  # 0.4 + 0.3 >= 0.6
    assert va.threshold_masks(maps, 0.7).tolist() == [[True, True], [False, False]]  # exactly 0.7 suffices
    assert va.threshold_masks(maps, 0.75).tolist() == [[True, True], [True, False]]
    assert va.threshold_masks(maps, 0.3).tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9, 1.0])
def test_threshold_masks_on_random_maps_hold_at_least_the_share_and_no_patch_more_than_needed(threshold):
    maps = torch.rand(5, 6, 7, 9) ** 4  # peaky, unnormalized: (B, H, h, w)
    masks = va.threshold_masks(maps, threshold)
    total = maps.sum(dim=(-2, -1))
    kept = (maps * masks).sum(dim=(-2, -1))
    assert (kept >= threshold * total - 1e-5).all()
    smallest_kept = torch.where(masks, maps, torch.inf).amin(dim=(-2, -1))
    assert (kept - smallest_kept < threshold * total + 1e-5).all()  # without its smallest patch the set falls short


def test_foreground_share_is_a_fraction_and_uniform_attention_gets_the_foreground_fraction():
    """A black image with one bright quarter: 4 of the 16 patches (patch 4, 16 px) are foreground."""
    images = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    images[:, :, :8, :8] = 200
    share, fraction = va.foreground_share(tiny_vit(seed=0), images)
    assert 0.0 <= share <= 1.0
    assert fraction == pytest.approx(0.25)

    class Uniform(torch.nn.Module):  # every query attends equally to all 1 + N tokens
        patch_size = 4

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # tells the device

        def get_last_selfattention(self, x):
            n = 1 + (x.shape[-2] // 4) * (x.shape[-1] // 4)
            return torch.full((len(x), 3, n, n), 1.0 / n)

    assert va.foreground_share(Uniform(), images) == pytest.approx((0.25, 0.25))


def test_grid_has_a_title_over_each_column_and_a_caption_saying_what_red_marks(monkeypatch):
    """grid.png is read without the README: columns image, head 0..H-1, mean; the caption names the 60% (the
    --threshold) of the attention mass that the red patches hold. The titles and caption are drawn as text."""
    calls, labelled_grid = [], draw.labelled_grid
    monkeypatch.setattr(draw, "labelled_grid", lambda *a, **kw: calls.append(a) or labelled_grid(*a, **kw))
    image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8)
    names, heat, masks = va.attention_pictures(tiny_vit(seed=0), image, 0.6)
    grid = va.labelled_attention_grid(image, heat, masks, 0.6, patch_size=4)
    rows, titles, row_titles, caption = calls[0]
    assert names == ["head0", "head1", "head2", "mean"] and len(rows) == 2 and len(rows[0]) == 5
    assert titles == ["image", "head 0", "head 1", "head 2", "mean of heads"]
    assert "red" in caption and "60% of that map's attention mass" in caption and "--threshold 0.6" in caption
    pixels, top = np.asarray(grid), 15 + 8  # the title row (font 15 and a margin), then the tiles (16 px, pad 2)
    assert (pixels[:top] < 128).any()  # dark title text above the tiles
    assert (pixels[top + 2 * (16 + 2) + 2:] < 128).any()  # dark caption text below them


def test_the_default_output_folder_is_not_the_tracked_assets():
    """The README's figure lives in assets/; a plain run writes into attention/ and never over it."""
    assert va.get_args_parser().parse_args([]).output_dir == "attention"


def test_main_writes_the_image_heat_maps_masks_and_grid(tmp_path, capsys):
    """One small image, a tiny random model: img, one heat map and one mask per head and for the mean, a grid."""
    image = torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8)
    Image.fromarray(image.numpy()).save(tmp_path / "photo.png")
    va.main(["--pretrained_weights", "random", "--arch", "vit_tiny", "--patch_size", "8",
             "--image_path", str(tmp_path / "photo.png"), "--image_size", "32", "--output_dir", str(tmp_path / "out"),
             "--device", "cpu"])
    assert "--pretrained_weights random: vit_tiny/8 at random init" in capsys.readouterr().out
    heads = [f"head{j}" for j in range(3)] + ["mean"]  # vit_tiny has 3 heads
    expected = {"img.png", "grid.png"} | {f"attn-{h}.png" for h in heads} | {f"mask-{h}.png" for h in heads}
    assert {p.name for p in (tmp_path / "out" / "photo").iterdir()} == expected
    with Image.open(tmp_path / "out" / "photo" / "img.png") as img, \
            Image.open(tmp_path / "out" / "photo" / "attn-head0.png") as heat:
        assert img.mode == heat.mode == "RGB" and img.size == heat.size
        width, height = img.size
    assert height % 32 == 0 and width % 40 == 0  # 32 x 40 (multiples of 8), enlarged for viewing


def test_main_reads_our_checkpoint_and_shows_its_dataset(tmp_path, capsys):
    """With one of our Fashion-MNIST checkpoints and no --image_path, the images are Fashion-MNIST test images."""
    write_checkpoint(tmp_path / "checkpoint.pth", tiny_vit(patch_size=7, depth=1, seed=0), global_crop_size=28,
                     data_path="fashion_mnist")
    va.main(["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--num_images", "2",
             "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fashion_mnist_test0", "fashion_mnist_test1"]
    va.main(["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--foreground_share", "--num_images", "50",
             "--device", "cpu"])
    assert "foreground attention share over 50 fashion_mnist test images at 28 px: trained" in capsys.readouterr().out
