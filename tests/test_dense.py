"""Dense descriptors, co-segmentation and correspondences (Amir et al. 2021, "Deep ViT Features as Dense Visual
Descriptors"; reference code ShirAmir/dino-vit-features)."""
import math

import pytest
import torch
import torch.nn.functional as F

import dense
import vit
from conftest import tiny_vit, write_checkpoint


def reference_facet(model, images, layer, facet, stride):
    """The reference's way: the patch convolution's stride set to `stride`, position embeddings interpolated
    for the grid 1 + (H - p) // stride, and a forward hook on block `layer` (its attention module for
    key / query / value, recomputing qkv from the hooked input) during a full forward pass."""
    p = model.patch_size
    B, _, H, W = images.shape
    h0, w0 = 1 + (H - p) // stride, 1 + (W - p) // stride
    side = int(math.sqrt(model.pos_embed.shape[1] - 1))
    patch_pos = model.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic",
                              align_corners=False, recompute_scale_factor=False)
    pos = torch.cat([model.pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)
    x = F.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=stride)
    x = torch.cat([model.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + pos
    feats = []

    def hook(module, inputs, output):
        if facet == "token":
            feats.append(output[:, None])  # (B, 1, T, D)
        else:
            t = inputs[0]
            qkv = module.qkv(t).reshape(B, t.shape[1], 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
            feats.append(qkv[("query", "key", "value").index(facet)])  # (B, H, T, D/H)

    target = model.blocks[layer] if facet == "token" else model.blocks[layer].attn
    handle = target.register_forward_hook(hook)
    with torch.no_grad():
        for blk in model.blocks:
            x = blk(x)
    handle.remove()
    return feats[0][:, :, 1:].permute(0, 2, 3, 1).flatten(-2), (h0, w0)  # (B, N, D), the reference's layout


@pytest.mark.parametrize("facet", dense.FACETS)
def test_descriptors_at_stride_p_are_the_plain_forward_tokens(facet):
    """At stride = patch size, 'token' of the last block is the plain forward's output before the final norm, and
    the key / query / value are those the plain forward computes in that block."""
    model = tiny_vit(seed=0)
    x = torch.randn(2, 3, 16, 20)
    desc, sal, grid = dense.descriptors(model, x, layer=1, facet=facet, include_cls=True)
    assert grid == (4, 5) and sal is None
    with torch.no_grad():
        if facet == "token":
            assert torch.allclose(model.norm(desc), model.get_intermediate_layers(x)[0], atol=1e-5)
    ref, _ = reference_facet(model, x, 1, facet, stride=4)
    assert torch.allclose(desc[:, 1:], ref, atol=1e-5)


@pytest.mark.parametrize("facet", ["key", "token"])
@pytest.mark.parametrize("stride,size", [(2, (16, 16)), (1, (13, 18)), (2, (15, 22)), (4, (15, 22))])
def test_lower_stride_gives_the_grid_and_the_numbers_of_the_reference(facet, stride, size):
    """Sec. 3.1: "we ... change the stride of the patch extraction ... overlapping patches"; the grid is
    (H - p) // s + 1 and the position embeddings are interpolated to it, as the reference's _fix_pos_enc. At
    stride p, sides that are not multiples of p lose their last pixels, as in the reference's convolution."""
    model = tiny_vit(seed=0)
    x = torch.randn(2, 3, *size)
    desc, _, grid = dense.descriptors(model, x, layer=0, facet=facet, stride=stride)
    expected_grid = ((size[0] - 4) // stride + 1, (size[1] - 4) // stride + 1)
    assert grid == expected_grid and desc.shape == (2, expected_grid[0] * expected_grid[1], 192)
    ref, ref_grid = reference_facet(model, x, 0, facet, stride)
    assert ref_grid == grid
    assert torch.allclose(desc, ref, atol=1e-5)


def test_stride_divides_the_patch_size_layer_is_a_block_images_hold_a_patch():
    with pytest.raises(ValueError, match="does not divide"):
        dense.descriptors(tiny_vit(seed=0), torch.randn(1, 3, 16, 16), layer=0, stride=3)
    with pytest.raises(ValueError, match="blocks 0..1"):
        dense.descriptors(tiny_vit(seed=0), torch.randn(1, 3, 16, 16), layer=2)
    with pytest.raises(ValueError, match="smaller than one 4 px patch"):
        dense.descriptors(tiny_vit(seed=0), torch.randn(1, 3, 3, 16), layer=0, stride=2)


def slow_log_bin(desc, grid):
    """Log-binning patch by patch: bin b of patch (y, x) is the mean over a window of the grid, windows that leave
    the grid are clamped to the border window, averages count only the patches inside the grid."""
    h, w = grid
    x = desc.reshape(h, w, -1)
    out = torch.zeros(h, w, 17, x.shape[-1])
    for y in range(h):
        for xx in range(w):
            b = 0
            for size in (1, 3):
                for cy in (y - size, y, y + size):
                    for cx in (xx - size, xx, xx + size):
                        if size == 3 and (cy, cx) == (y, xx):
                            continue
                        cy_, cx_ = min(max(cy, 0), h - 1), min(max(cx, 0), w - 1)
                        r = size // 2
                        window = x[max(cy_ - r, 0):cy_ + r + 1, max(cx_ - r, 0):cx_ + r + 1]
                        out[y, xx, b] = window.reshape(-1, x.shape[-1]).mean(0)
                        b += 1
    return out.reshape(h * w, -1)


@pytest.mark.parametrize("grid", [(5, 7), (2, 3), (1, 1)])
def test_log_binning_equals_a_direct_computation(grid):
    """Sec. 3.1 "Log-binning": 17 bins of 2 levels, a 3 x 3 then a 9 x 9 neighbourhood."""
    desc = torch.randn(2, grid[0] * grid[1], 3)
    binned = dense.log_bin(desc, grid)
    assert binned.shape == (2, grid[0] * grid[1], 17 * 3)
    for b in range(2):
        assert torch.allclose(binned[b], slow_log_bin(desc[b], grid), atol=1e-6)


def test_saliency_is_the_min_max_normalized_cls_attention_of_the_last_block():
    model = tiny_vit(seed=0)
    x = torch.randn(2, 3, 16, 16)
    _, sal, _ = dense.descriptors(model, x, layer=0, saliency=True)
    with torch.no_grad():
        cls = model.get_last_selfattention(x)[:, :, 0, 1:].mean(1)  # all 3 heads of this tiny model
    expected = (cls - cls.amin(1, keepdim=True)) / (cls.amax(1, keepdim=True) - cls.amin(1, keepdim=True))
    assert torch.allclose(sal, expected, atol=1e-5)
    assert dense.saliency_heads(vit.vit_small(patch_size=8, depth=1)) == [0, 2, 4, 5]


def blobs(k=4, per=50, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, dim, generator=g), dim=1) * 5
    labels = torch.arange(k).repeat_interleave(per)
    return centers[labels] + 0.1 * torch.randn(k * per, dim, generator=g), labels


def same_partition(a, b):
    return torch.equal(a[:, None] == a[None], b[:, None] == b[None])


def test_kmeans_recovers_well_separated_clusters():
    x, labels = blobs()
    centroids, found = dense.kmeans(x, 4)
    assert same_partition(found, labels)
    for c in range(4):
        assert torch.allclose(centroids[found[labels == c][0]], x[labels == c].mean(0), atol=1e-5)


def test_elbow_stops_past_the_true_number_of_clusters():
    """The reference's rule: the first k whose mean squared distance is above 0.975 x that of k - 1. With 3
    tight clusters, k = 3 still gains a lot and k = 4 gains little: it stops at 4 (the first with no gain)."""
    x, labels = blobs(k=3, per=40, dim=64)  # k = 4 gains 1.6%: splitting a cluster helps little in 64 dims
    centroids, found = dense.elbow_kmeans(list(x.split(30)), sample_interval=1)
    assert len(centroids) == 4
    merged = torch.stack([torch.bincount(found[labels == c], minlength=4).argmax() for c in range(3)])
    assert len(set(merged.tolist())) == 3  # each true cluster lies mostly in its own cluster


def test_best_buddies_recover_a_known_permutation():
    """Sec. 4.3: best buddies, "pairs of descriptors that are mutual nearest neighbours"."""
    g = torch.Generator().manual_seed(0)
    desc1 = torch.randn(30, 16, generator=g)
    perm = torch.randperm(30, generator=g)
    desc2 = desc1[perm] + 0.01 * torch.randn(30, 16, generator=g)  # desc2[k] ~ desc1[perm[k]]
    i, j = dense.best_buddies(desc1, desc2)
    assert len(i) == 30 and torch.equal(perm[j], i)
    extra = torch.cat([desc2, desc1[:1] * 0.9 + desc1[1:2] * 0.1])  # a near-copy of desc1[0]: only one buddy
    i, j = dense.best_buddies(desc1, extra)
    assert len(i) == 30 and torch.equal(torch.bincount(i, minlength=30), torch.ones(30, dtype=torch.long))


def test_best_buddies_drop_nearest_neighbours_that_are_not_mutual():
    """Sec. 4.3: a pair is kept only when each is the other's nearest neighbour. Unit vectors at angles (degrees):
    desc1 0, 10, 90 and desc2 4, 90, 200. 0 and 10 both have 4 as nearest neighbour, but 4's is 0; 200's nearest
    is 90, whose own is 90 of desc2. Best buddies: (0, 0) and (2, 1) only."""
    unit = lambda degrees: torch.stack([torch.cos(torch.deg2rad(torch.tensor(degrees))),
                                        torch.sin(torch.deg2rad(torch.tensor(degrees)))], dim=1)  # (M, 2)
    i, j = dense.best_buddies(unit([0.0, 10.0, 90.0]), unit([4.0, 90.0, 200.0]))
    assert list(zip(i.tolist(), j.tolist())) == [(0, 0), (2, 1)]
    i, j = dense.best_buddies(unit([4.0, 90.0, 200.0]), unit([0.0, 10.0, 90.0]))  # the other way round
    assert list(zip(i.tolist(), j.tolist())) == [(0, 0), (1, 2)]


def test_correspondences_pick_salient_buddies_one_per_cluster():
    x, labels = blobs(k=5, per=10, dim=8)
    sal1 = torch.ones(50)
    sal1[torch.arange(50) % 10 == 3] = 0.9  # one slightly less salient patch in every cluster
    sal1[labels == 4] = 0.0  # the fifth cluster is background
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    (i, j), (all_i, all_j) = dense.correspondences(x, x[perm], sal1, sal1[perm], num_pairs=4)
    assert len(all_i) == 40 and torch.equal(perm[all_j], all_i)
    assert sorted(labels[i].tolist()) == [0, 1, 2, 3] and torch.equal(perm[j], i)
    assert (sal1[i] == 1).all()


def test_cosegmentation_finds_the_cluster_salient_in_every_image_and_parts_split_it():
    """Sec. 4.1: clusters are "salient" when most images vote for them; Sec. 4.2: the foreground is clustered
    again into parts."""
    x, labels = blobs(k=4, per=60, dim=16)
    # 6 images of 40 patches; clusters 0, 1 (the object, two parts) are salient, 2 and 3 are not
    order = torch.randperm(240, generator=torch.Generator().manual_seed(2))
    descs, truth = list(x[order].split(40)), list(labels[order].split(40))
    sals = [(t < 2).float() * 0.8 + 0.05 for t in truth]
    masks, centroids, salient = dense.cosegment(descs, sals, sample_interval=1)
    for m, t in zip(masks, truth):
        assert torch.equal(m, t < 2)
    parts = dense.part_cosegment(descs, sals, num_parts=2, sample_interval=1)
    flat, truth = torch.cat(parts), torch.cat(truth)
    assert (flat[truth >= 2] == 2).all()  # background label = num_parts
    assert same_partition(flat[truth < 2], truth[truth < 2])


def test_patch_centres_and_pixel_maps():
    assert dense.patch_centers(torch.tensor([0, 6]), (3, 5), 8, 4).tolist() == [[4, 4], [8, 8]]
    grid_map = torch.arange(4).reshape(1, 4)  # a 2 x 2 grid, patch 4, stride 4, 8 x 8 px: four 4 x 4 blocks
    pixels = dense.patches_to_pixels(grid_map, (2, 2), (8, 8), 4, 4)[0]
    assert torch.equal(pixels, torch.arange(4).reshape(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1))
    pixels = dense.patches_to_pixels(torch.arange(9), (3, 3), (8, 8), 4, 2)  # centres at 2, 4, 6
    assert pixels[:, 0].tolist() == [0, 0, 0, 3, 3, 6, 6, 6]


# --- the scripts, end to end on tiny images ------------------------------------------------------------
@pytest.fixture
def tiny_setup(tmp_path):
    """A 2-block ViT checkpoint in our format, and 3 images: a bright square on black, at different places."""
    from PIL import Image
    ckpt = write_checkpoint(tmp_path / "ckpt.pth", tiny_vit(patch_size=4, depth=2, seed=0))
    paths = []
    for n, (y, x) in enumerate([(4, 4), (8, 12), (12, 6)]):
        image = torch.zeros(3, 32, 32, dtype=torch.uint8)
        image[:, y:y + 14, x:x + 14] = 200
        image[0, y:y + 7, x:x + 14] = 50  # a two-coloured object
        paths.append(str(tmp_path / f"img{n}.png"))
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return ckpt, paths, tmp_path


def test_cosegment_command_writes_its_pictures(tiny_setup):
    import cosegment
    ckpt, paths, tmp = tiny_setup
    cosegment.main(["--pretrained_weights", ckpt, "--image_path", *paths, "--load_size", "32", "--stride", "2",
                    "--num_parts", "2", "--sample_interval", "1", "--output_dir", str(tmp / "out")])
    written = {p.name for p in (tmp / "out").iterdir()}
    assert {"cosegmentation.png", "img0_mask.png", "img2_parts.png"} <= written
    from PIL import Image
    width, height = Image.open(tmp / "out" / "cosegmentation.png").size
    tile = 32 * 7  # 32 px images are enlarged 7 times to be seen
    assert width > 3 * tile + 30 and height > 3 * tile + 30  # row titles left, column titles above, a caption


def test_class_images_are_the_first_of_their_class(tmp_path):
    """--data_path with --class_index: the first images of that class (here of train/<class>/, without val/); a
    folder without classes gives its first images, and refuses --class_index in one line."""
    from PIL import Image
    import data
    for c, name in enumerate(["cats", "dogs"]):
        (tmp_path / "train" / name).mkdir(parents=True)
        for n in range(3):
            Image.new("RGB", (10, 8), (c * 100, n * 50, 0)).save(tmp_path / "train" / name / f"{n}.png")
    images, names = data.class_images(str(tmp_path), "unused", 1, 2)
    assert names == [f"{tmp_path.name}_class1_test3", f"{tmp_path.name}_class1_test4"]
    assert [im[:, 0, 0].tolist() for im in images] == [[100, 0, 0], [100, 50, 0]]
    images, names = data.class_images(str(tmp_path / "train"), "unused", None, 4)  # cats/, dogs/: no train/
    assert names == ["cats_0", "cats_1", "cats_2", "dogs_0"]
    with pytest.raises(data.ConfigError, match="has no classes"):
        data.class_images(str(tmp_path / "train"), "unused", 1, 2)


def test_correspond_command_writes_its_picture_and_points(tiny_setup):
    import correspond
    ckpt, paths, tmp = tiny_setup
    correspond.main(["--pretrained_weights", ckpt, "--image_path", paths[0], paths[1], "--load_size", "32",
                     "--stride", "2", "--num_pairs", "3", "--output_dir", str(tmp / "out")])
    assert (tmp / "out" / "correspondences.png").stat().st_size > 0
    for line in (tmp / "out" / "correspondences.txt").read_text().splitlines():
        assert all(0 <= int(v) < 32 for v in line.split())


def test_bad_input_is_one_line(tiny_setup, capsys):
    import correspond
    import cosegment
    from cli import ConfigError
    ckpt, paths, tmp = tiny_setup
    with pytest.raises(ConfigError, match="does not divide"):
        cosegment.main(["--pretrained_weights", ckpt, "--image_path", *paths, "--stride", "3"])
    with pytest.raises(ConfigError, match="blocks 0..1"):
        correspond.main(["--pretrained_weights", ckpt, "--image_path", *paths[:2], "--layer", "5"])
    with pytest.raises(ConfigError, match="needs a ViT"):  # a convnet has no patch tokens
        cosegment.main(["--pretrained_weights", "random", "--arch", "resnet18", "--image_path", *paths])
    with pytest.raises(SystemExit) as e:
        correspond.main(["--image_path", str(tmp / "missing.png")])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("warp_index", [0, 1, 2])
def test_warp_maps_send_a_pixel_where_the_warp_puts_it(warp_index):
    """The truth of the correspondence measurement: a bright pixel goes where the coordinate map says."""
    import correspond
    name, warp, to_warped = correspond.warps(56)[warp_index]
    image = torch.zeros(1, 3, 56, 56, dtype=torch.uint8)
    image[..., 20:22, 30:32] = 255  # a 2 x 2 dot centred at (20.5, 30.5)
    warped = warp(image)[0, 0].float()
    ys, xs = torch.meshgrid(torch.arange(56.0), torch.arange(56.0), indexing="ij")
    centre = torch.stack([(warped * ys).sum(), (warped * xs).sum()]) / warped.sum()
    assert torch.allclose(centre, to_warped(torch.tensor([[20.5, 30.5]]))[0].float(), atol=0.3), name


def test_an_image_against_itself_matches_every_buddy_and_jaccard_is_a_fraction():
    """The two measurements run end to end: the identity warp puts every best buddy at its true place, and the
    co-segmentation Jaccard of squares on black is in [0, 1]."""
    import argparse
    import correspond
    import cosegment
    model = tiny_vit(patch_size=7, depth=1, seed=0)
    images = torch.zeros(12, 28, 28, dtype=torch.uint8)
    for n in range(12):
        images[n, 4 + n % 5:18 + n % 5, 6:20] = 150 + n
    args = argparse.Namespace(layer=0, facet="key", stride=7, bin=True, thresh=0.05, device="cpu",
                              load_size=28, elbow=0.975, votes_percentage=75, sample_interval=1, num_images=6)
    rgb = images[:, None].expand(-1, 3, -1, -1)
    share, pairs = correspond.warp_accuracy(model, rgb, lambda x: x, lambda p: p, args)
    assert share == 1.0 and pairs > 0
    mean, per_class, grid = cosegment.jaccard_on_fashion_mnist(model, images, torch.arange(12) % 2, args)
    assert grid == (4, 4) and 0.0 <= mean <= 1.0 and set(per_class) == {0, 1}
