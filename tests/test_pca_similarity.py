"""PCA of dense descriptors (pca.py) and the similarity of one point to every patch (similarity.py), Amir et al.
2021, "Deep ViT Features as Dense Visual Descriptors"; reference code ShirAmir/dino-vit-features, pca.py and
inspect_similarity.py."""
import argparse

import pytest
import torch
from PIL import Image

import pca
import similarity
from cli import ConfigError
from conftest import tiny_vit, write_checkpoint

SHIFT = (4, 8)  # (dy, dx) pixels: one patch down, two right for patches of 4 px


@pytest.fixture
def noise_and_shifted(tmp_path):
    """A 2-block ViT checkpoint with 4 px patches, and two 32 px images: noise and the same noise rolled by SHIFT."""
    ckpt = write_checkpoint(tmp_path / "ckpt.pth", tiny_vit(patch_size=4, depth=2, seed=0))
    noise = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    paths = []
    for name, image in (("noise", noise), ("shifted", noise.roll(SHIFT, dims=(1, 2)))):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])  # (32, 32, 3)
    return ckpt, noise, paths, tmp_path


# --- pca.py -------------------------------------------------------------------------------------------------
def test_joint_pca_is_the_eigenbasis_of_the_covariance_up_to_sign():
    """The components are the eigenvectors of the covariance with the largest eigenvalues (computed here directly,
    in float64), the projections the centred descriptors on them, the ratios the eigenvalues' shares; the sign of
    each component makes its largest projection positive."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]) + 7
    proj, components, ratios = pca.joint_pca(x, 3)
    centred = (x - x.mean(0)).double()
    values, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending
    expected = vectors.flip(1)[:, :3].T  # (3, 6): largest eigenvalues first
    assert proj.shape == (40, 3) and components.shape == (3, 6)
    for c in range(3):
        sign = torch.sign(components[c].double() @ expected[c])
        assert torch.allclose(components[c].double(), sign * expected[c], atol=1e-5)
        assert proj[:, c].abs().argmax() == proj[:, c].argmax()  # the largest projection is positive
    assert torch.allclose(proj.double(), centred @ components.double().T, atol=1e-4)
    assert torch.allclose(ratios.double(), values.flip(0)[:3] / values.sum(), atol=1e-5)


def two_images_of_descriptors():
    """Descriptors (N, 5) of two images whose patches differ mostly along one direction: +4 in image a, -4 in b."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 5, generator=g) + torch.tensor([4.0, 0, 0, 0, 0])
    b = torch.randn(20, 5, generator=g) - torch.tensor([4.0, 0, 0, 0, 0])
    return [a, b]


def test_colours_are_one_pca_of_all_images_scaled_over_all_of_them():
    """One PCA of all the patches: the first component tells image a (bright red) from image b (dark), each
    component scaled to [0, 1] over all the images; --scale per_image (the reference) stretches each image."""
    descs = two_images_of_descriptors()
    colours, ratios = pca.pca_colours(descs, [None, None], 3)
    proj, _, _ = pca.joint_pca(torch.cat(descs), 3)
    assert torch.allclose(torch.cat(colours), pca.unit_scale(proj), atol=1e-6)
    red_a, red_b = colours[0][:, 0], colours[1][:, 0]
    assert (red_a.min() > red_b.max()) or (red_b.min() > red_a.max())  # the images apart in red
    assert torch.cat(colours).amin(0).tolist() == [0, 0, 0] and torch.cat(colours).amax(0).tolist() == [1, 1, 1]
    assert ratios[0] > 0.6  # the +-4 direction holds most of the variance
    per_image, _ = pca.pca_colours(descs, [None, None], 3, per_image=True)
    for c in per_image:
        assert torch.allclose(c.amin(0), torch.zeros(3)) and torch.allclose(c.amax(0), torch.ones(3))


def test_salient_only_fits_the_salient_patches_and_paints_the_rest_black():
    descs = two_images_of_descriptors()
    sals = [torch.linspace(0, 1, len(d)) for d in descs]
    colours, _ = pca.pca_colours(descs, sals, 3, thresh=0.5)
    for c, s in zip(colours, sals):
        assert (c[s <= 0.5] == 0).all()
    proj, _, _ = pca.joint_pca(torch.cat([d[s > 0.5] for d, s in zip(descs, sals)]), 3)
    assert torch.allclose(torch.cat([c[s > 0.5] for c, s in zip(colours, sals)]), pca.unit_scale(proj), atol=1e-6)


def test_pca_command_writes_its_pictures(noise_and_shifted):
    ckpt, _, paths, tmp = noise_and_shifted
    pca.main(["--pretrained_weights", ckpt, "--image_path", *paths, "--load_size", "32", "--stride", "2",
              "--salient_only", "true", "--output_dir", str(tmp / "out")])
    written = {p.name for p in (tmp / "out").iterdir()}
    assert {"pca.png", "noise_pca1-3.png", "shifted_pca2-4.png"} <= written
    width, height = Image.open(tmp / "out" / "pca.png").size
    tile = 32 * 7  # 32 px images are enlarged 7 times to be seen
    assert width > 2 * tile + 30 and height > 3 * tile + 30  # row titles left, column titles above, a caption
    with pytest.raises(ConfigError, match="--n_components 2: the picture needs 3"):
        pca.main(["--pretrained_weights", ckpt, "--image_path", *paths, "--n_components", "2"])
    with pytest.raises(ConfigError, match="--n_components 200: 200 components need"):
        pca.main(["--pretrained_weights", ckpt, "--image_path", *paths, "--load_size", "32", "--n_components", "200"])


# --- similarity.py ------------------------------------------------------------------------------------------
def test_the_point_picks_the_patch_that_holds_it_at_stride_p():
    for y in range(32):
        for x in range(32):
            assert similarity.patch_at((x, y), (8, 8), (32, 32), 4, 4) == (y // 4) * 8 + x // 4


@pytest.mark.parametrize("layer,stride", [(0, 4), (1, 4), (0, 2), (1, 2)])
def test_the_most_similar_patch_of_a_shifted_copy_is_where_the_shift_put_it(noise_and_shifted, layer, stride):
    """Patches of noise rolled by a whole patch: the descriptor of each point's patch is most similar to the same
    pixels at their new place (grid cells SHIFT / stride away), and to itself (similarity 1) in its own image."""
    _, noise, _, _ = noise_and_shifted
    args = argparse.Namespace(layer=layer, facet="key", stride=stride, bin=False, device="cpu")
    model = tiny_vit(patch_size=4, depth=2, seed=0)
    images = [noise, noise.roll(SHIFT, dims=(1, 2))]
    w = (32 - 4) // stride + 1
    for x, y in [(1, 1), (13, 6), (10, 17), (18, 2)]:  # patches whose pixels the roll does not wrap
        maps, query, grids = similarity.similarity_maps(model, images, (x, y), args)
        assert grids == [(w, w)] * 2 and maps[0].argmax() == query
        assert torch.isclose(maps[0][query], torch.tensor(1.0), atol=1e-5)
        row, col = divmod(query, w)
        assert maps[1].argmax() == (row + SHIFT[0] // stride) * w + col + SHIFT[1] // stride


def test_similarity_command_draws_the_maps_and_finds_the_shifted_patch(noise_and_shifted, capsys):
    ckpt, _, paths, tmp = noise_and_shifted
    best = similarity.main(["--pretrained_weights", ckpt, "--image_path", *paths, "--load_size", "32", "--point",
                            "9", "5", "--num_sim_patches", "2", "--output_dir", str(tmp / "out")])
    assert best[1].indices[0] == (1 + 1) * 8 + 2 + 2  # the point's patch (1, 2), one down and two right
    assert "shifted: most similar patch centred at x 18, y 10" in capsys.readouterr().out
    width, height = Image.open(tmp / "out" / "similarity.png").size
    assert width > 2 * 32 * 7 + 30 and height > 2 * 32 * 7 + 30
    with pytest.raises(ConfigError, match="--point 32 0 is outside noise: x < 32 and y < 32"):
        similarity.main(["--pretrained_weights", ckpt, "--image_path", *paths, "--load_size", "32", "--point",
                         "32", "0"])
