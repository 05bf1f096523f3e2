"""Tests of augment.py: multi-crop geometry, reproducible draws, and the batched photometric ops against
torchvision.transforms.v2.functional applied to one image at a time."""

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

import augment
from augment import PARAM_COLUMNS, DataAugmentationDINO, photometric, random_resized_crop_box
from training_data import EpochSampler, MultiCropDataset

COL = {name: i for i, name in enumerate(PARAM_COLUMNS)}


def small_aug(**kw):
    return DataAugmentationDINO(global_crop_size=32, local_crop_size=16, local_crops_number=3, **kw)


def random_pil(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_multicrop_gives_two_global_then_local_crops():
    """Paper Sec. 3.1: "two global views at resolution 224^2 ... and several local views of resolution 96^2"."""
    crops, params = DataAugmentationDINO()(random_pil(), torch.Generator().manual_seed(0))
    assert len(crops) == 2 + 8 and params.shape == (10, len(PARAM_COLUMNS)) and params.dtype == torch.float32
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(c.dtype == torch.uint8 for c in crops)
    rgb = random_pil(20, 30)
    images = [rgb.convert(mode) for mode in ("L", "LA", "RGBA", "P", "CMYK", "1")]
    images += [PIL.Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))]  # mode I;16
    images += [torch.randint(0, 256, (1, 20, 30), dtype=torch.uint8), TF.pil_to_tensor(rgb)]
    for image in images:
        crops, params = small_aug()(image)  # generator=None: the global RNG
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
        assert params.shape == (5, len(PARAM_COLUMNS))


def test_same_generator_seed_gives_same_crops():
    aug, image = small_aug(), random_pil()
    crops_a, params_a = aug(image, torch.Generator().manual_seed(7))
    crops_b, params_b = aug(image, torch.Generator().manual_seed(7))
    crops_c, params_c = aug(image, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(crops_a, crops_b)) and torch.equal(params_a, params_b)
    assert not all(torch.equal(a, c) for a, c in zip(crops_a, crops_c)) and not torch.equal(params_a, params_c)


def test_dataset_item_is_a_function_of_seed_epoch_and_index():
    data = [(random_pil(seed=i), i) for i in range(4)]
    ds = MultiCropDataset(data, small_aug(), seed=0)
    crops, params, label, error = ds[(2, 3)]
    again, params_again, _, _ = ds[(2, 3)]
    assert label == 3 and torch.equal(params, params_again)
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    assert all(torch.equal(a, b) for a, b in zip(ds[3][0], ds[(0, 3)][0]))  # a plain index is epoch 0
    next_epoch = ds[(3, 3)][0]
    assert not all(torch.equal(a, b) for a, b in zip(crops, next_epoch))
    other_seed = MultiCropDataset(data, small_aug(), seed=1)[(2, 3)][0]
    assert not all(torch.equal(a, b) for a, b in zip(crops, other_seed))


def test_epoch_sampler_yields_epoch_index_pairs_and_forwards_set_epoch():
    inner = torch.utils.data.DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler = EpochSampler(inner)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert len(sampler) == 10 and {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert sorted(i for _, i in second) == list(range(10)) and [i for _, i in first] != [i for _, i in second]
    # Through a DataLoader: crops collate to V batches (B, 3, S, S) and params to (B, V, P).
    ds = MultiCropDataset([(random_pil(seed=i), i) for i in range(10)], small_aug())
    crops, params, labels, errors = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)))
    assert len(crops) == 5 and crops[0].shape == (4, 3, 32, 32) and params.shape == (4, 5, len(PARAM_COLUMNS))
    assert photometric(crops[2], params[:, 2]).shape == (4, 3, 16, 16)


def test_crop_boxes_match_torchvision_get_params_for_same_seed():
    """Same sampling as torchvision's RandomResizedCrop (10 tries, then the central-crop fallback)."""
    for (h, w), scale in [((40, 56), (0.4, 1.0)), ((40, 56), (0.05, 0.4)), ((300, 20), (0.9, 1.0)),
                          ((10, 100), (0.99, 1.0)), ((7, 7), (0.05, 0.4))]:
        for seed in range(20):
            ours = random_resized_crop_box(h, w, scale, (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
            torch.manual_seed(seed)
            theirs = T.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), [3 / 4, 4 / 3])
            assert ours == theirs


def identity_params(B):
    """Params that change nothing: jitter factors 1, 1, 1, 0 and every flag 0."""
    params = torch.zeros(B, len(PARAM_COLUMNS))
    params[:, [COL["brightness"], COL["contrast"], COL["saturation"]]] = 1.0
    params[:, COL["sigma"]] = 1.0
    return params


def check_op_matches_torchvision(column, values, reference, size=16, atol=1e-5, flag=None):
    """Apply one op with per-sample values through photometric (mean 0, std 1, so no normalization) and
    compare each sample with torchvision on that sample alone; the last sample keeps identity params."""
    torch.manual_seed(0)
    B = len(values) + 1
    crops = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8)
    crops[0] = crops[0, :1]  # one gray sample: hue and saturation edge cases
    params = identity_params(B)
    params[:-1, COL[column]] = torch.tensor(values)
    if flag is not None:
        params[:-1, COL[flag]] = 1.0
    out = photometric(crops, params, mean=(0, 0, 0), std=(1, 1, 1))
    images = crops.float() / 255
    for i in range(B - 1):
        expected = reference(images[i], float(params[i, COL[column]]))
        torch.testing.assert_close(out[i], expected, atol=atol, rtol=0)
    torch.testing.assert_close(out[-1], images[-1], atol=1e-6, rtol=0)


def test_batched_brightness_matches_torchvision():
    check_op_matches_torchvision("brightness", [0.6, 0.9, 1.2, 1.4], TF.adjust_brightness)


def test_batched_contrast_matches_torchvision():
    check_op_matches_torchvision("contrast", [0.6, 0.9, 1.2, 1.4], TF.adjust_contrast)


def test_batched_saturation_matches_torchvision():
    check_op_matches_torchvision("saturation", [0.8, 0.9, 1.1, 1.2], TF.adjust_saturation)


def test_batched_hue_matches_torchvision():
    check_op_matches_torchvision("hue", [0.1, -0.1, 0.03, -0.07], TF.adjust_hue, atol=1e-5)


def test_batched_grayscale_matches_torchvision():
    check_op_matches_torchvision("grayscale", [1.0, 1.0, 1.0, 1.0],
                                 lambda img, _: TF.rgb_to_grayscale(img, num_output_channels=3))


@pytest.mark.parametrize("size", [24, 9])
def test_batched_blur_matches_torchvision(size):
    """Per-sample sigma; kernel 2 * ceil(3 * sigma_max) + 1 = 13, capped at the largest odd number < S."""
    k = min(13, size - 1 if size % 2 == 0 else size - 2)
    check_op_matches_torchvision("sigma", [0.1, 0.7, 1.3, 2.0], lambda img, s: TF.gaussian_blur(img, [k, k], [s, s]),
                                 size=size, flag="blur")


def test_batched_solarize_matches_torchvision():
    """Solarization threshold 0.5 of the range (128 of 255 in the official code)."""
    check_op_matches_torchvision("solarize", [1.0, 1.0, 1.0, 1.0], lambda img, _: TF.solarize(img, 0.5))


def test_blur_and_solarize_rates_per_crop_group():
    """Official code (BYOL's augmentations, paper Sec. 3.2): blur with p = 1.0 on global 1, 0.1 on global 2, 0.5
    on locals; solarization 0.2 on global 2 only; color jitter with p = 0.8 and grayscale with p = 0.2 on every crop."""
    aug, g, n = DataAugmentationDINO(local_crops_number=4), torch.Generator().manual_seed(0), 2000
    params = torch.stack([aug.draw_params(g) for _ in range(n)])  # (n, V, P)
    jittered = (params[..., COL["brightness"]] != 1).float()
    observed = {"blur": params[..., COL["blur"]], "solarize": params[..., COL["solarize"]], "jitter": jittered,
                "grayscale": params[..., COL["grayscale"]]}
    expected = {"blur": [1.0, 0.1] + [0.5] * 4, "solarize": [0.0, 0.2] + [0.0] * 4, "jitter": [0.8] * 6,
                "grayscale": [0.2] * 6}
    for name, p in expected.items():
        p = torch.tensor(p)
        tolerance = torch.maximum(3 * (p * (1 - p) / n).sqrt(), torch.tensor(0.01))
        assert ((observed[name].mean(0) - p).abs() <= tolerance).all(), name
    j = params[..., :4][jittered.bool()]  # (M, 4) jitter factors where applied
    assert (j.min(0).values >= torch.tensor([0.6, 0.6, 0.8, -0.1])).all()
    assert (j.max(0).values <= torch.tensor([1.4, 1.4, 1.2, 0.1])).all()
    sigma = params[..., COL["sigma"]]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.03


def test_photometric_output_is_normalized_float():
    """The ops work on floats in [0, 1]; the last one normalizes with the given mean and std, ImageNet's by default."""
    aug, g = small_aug(), torch.Generator().manual_seed(0)
    crops, params = zip(*(aug(random_pil(seed=i), g) for i in range(6)))
    batch = torch.stack([c[0] for c in crops])  # (B, 3, 32, 32) first global crops
    first = torch.stack([p[0] for p in params])  # (B, P)
    x = photometric(batch, first, mean=(0, 0, 0), std=(1, 1, 1))  # no normalization
    assert x.dtype == torch.float32 and x.shape == (6, 3, 32, 32)
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(photometric(batch, first), TF.normalize(x, augment.IMAGENET_MEAN, augment.IMAGENET_STD))
    torch.testing.assert_close(photometric(batch, first, mean=(0.5,) * 3, std=(0.5,) * 3), 2 * x - 1)


def test_blur_kernel_follows_the_drawn_sigmas_without_the_caller_passing_them(monkeypatch):
    """The kernel spans +-3 sigma of the widest blur drawn for the batch: crops drawn with sigma <= 0.5 (the
    Fashion-MNIST preset) get a 5-tap kernel, not the 13 taps that sigma 2 needs; unblurred crops do not count."""
    aug, g = DataAugmentationDINO(local_crops_number=2, global_crop_size=16, local_crop_size=8,
                                  blur_sigma=(0.1, 0.5)), torch.Generator().manual_seed(0)
    crops, params = zip(*[aug(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8), g) for _ in range(8)])
    crops = [torch.stack(v) for v in zip(*crops)]  # V x (B, 3, S, S)
    params = torch.stack(params)  # (B, V, P)
    seen = []
    blur = augment.gaussian_blur
    monkeypatch.setattr(augment, "gaussian_blur", lambda x, sigma, sigma_max: seen.append(sigma_max) or
                        blur(x, sigma, sigma_max))
    augment.photometric_views(crops, params, torch.device("cpu"))
    blurred = params[..., COL["blur"]] > 0
    assert seen and max(seen) == params[..., COL["sigma"]][blurred].max().item() <= 0.5
    params[..., COL["blur"]] = 0
    assert augment.largest_blur_sigma(params) == 0.0  # nothing blurred: no blur at all
