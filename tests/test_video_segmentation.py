"""Video object segmentation by label propagation (paper Sec. 4.2.2); the scores are tested in test_davis.py."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import davis
import draw
import eval_video_segmentation as evs
import synthetic_video
from cli import ConfigError
from conftest import tiny_vit, write_checkpoint


# --- propagation --------------------------------------------------------------------------------------------
def official_neighborhood_loops(h, w, size):
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if 0 <= i - size + p < h and 0 <= j - size + q < w:
                        mask[i, j, i - size + p, j - size + q] = 1
    return mask.reshape(h * w, h * w).bool()


@pytest.mark.parametrize("h, w, size", [(5, 7, 2), (4, 3, 0), (3, 6, 12)])
def test_neighborhood_mask_equals_the_official_loops(h, w, size):
    """Official restrict_neighborhood: "We restrict the set of source nodes considered to a spatial
    neighborhood of the query node"."""
    assert torch.equal(evs.neighborhood_mask(h, w, size), official_neighborhood_loops(h, w, size))


def official_propagation(feat_tar, feats, segs, topk, neighborhood, temperature=0.1):
    """The official label_propagation's arithmetic: dense affinities, zero below the k-th largest per target."""
    M, N, _ = feats.shape
    aff = torch.exp(torch.einsum("nd,mkd->mnk", feat_tar, feats) / temperature)  # (M, N tar, N src)
    aff = aff * neighborhood[None]
    aff = aff.transpose(2, 1).reshape(-1, N)  # (M*N src, N tar)
    kth = aff.topk(topk, dim=0).values.min(dim=0).values
    aff = torch.where(aff < kth, 0, aff)
    aff = aff / aff.sum(dim=0, keepdim=True)
    return segs.permute(1, 0, 2).reshape(segs.shape[1], -1) @ aff  # (C, N)


def test_label_propagation_equals_the_official_dense_computation():
    """Paper Sec. 4.2.2, following Jabri et al.: each patch takes the labels of its top-k nearest neighbours in
    the context, weighted by exp(cos / 0.1), within a local window."""
    gen = torch.Generator().manual_seed(0)
    h, w, M, C, D = 5, 6, 3, 4, 16
    feats = torch.nn.functional.normalize(torch.randn(M, h * w, D, generator=gen), dim=-1)
    feat_tar = torch.nn.functional.normalize(torch.randn(h * w, D, generator=gen), dim=-1)
    segs = torch.rand(M, C, h * w, generator=gen)
    nb = evs.neighborhood_mask(h, w, 2)
    ours = evs.label_propagation(feat_tar, feats, segs, topk=5, neighborhood=nb, chunk=7)  # chunks of 7 queries
    assert torch.allclose(ours, official_propagation(feat_tar, feats, segs, 5, nb), atol=1e-5)


def test_upsampling_a_one_hot_patch_grid_gives_the_pixel_mask():
    """Bilinear upsampling by the patch size, then the argmax, returns the patch-aligned mask exactly."""
    grid = torch.tensor([[0, 1, 1], [2, 2, 0]])
    seg = evs.to_one_hot(grid, 3).flatten(1)  # (C, N)
    expected = grid.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(evs.upsample_labels(seg, 2, 3, 4), expected)


def test_a_clip_of_identical_frames_propagates_the_first_mask_unchanged():
    """With nothing moving, every patch's best match is itself in every context frame, so each propagated mask
    is the first one on the patch grid (a tiny randomly initialized ViT, patch 4, 32 x 40 frames). In pixels,
    the official per-label min-max normalization before the argmax may move an edge by a pixel."""
    model = tiny_vit(patch_size=4, depth=2, seed=0)
    frame = torch.randn(3, 32, 40)
    first = torch.zeros(8, 10, dtype=torch.long)
    first[2:6, 1:4], first[3:8, 6:9] = 1, 2
    segs = list(evs.propagate_video(model, [frame] * 10, first, n_last_frames=3, size_mask_neighborhood=2))
    assert len(segs) == 9
    expected = first.repeat_interleave(4, 0).repeat_interleave(4, 1)
    near_edge = davis.dilate_disk(davis.seg2bmap(expected[None] == 1) | davis.seg2bmap(expected[None] == 2), 1)[0]
    for seg in segs:
        assert torch.equal(seg.argmax(dim=0).reshape(8, 10), first)
        wrong = evs.upsample_labels(seg, 8, 10, 4) != expected
        assert not (wrong & ~near_edge).any()


def test_frames_are_resized_to_the_patch_grid_keeping_the_aspect_ratio():
    assert evs.resized_size(480, 854, 480, 16) == (480, 848)
    assert evs.resized_size(854, 480, 480, 8) == (848, 480)
    assert evs.resized_size(112, 112, 112, 7) == (112, 112)
    assert evs.resized_size(100, 150, 56, 7) == (56, 84)


# --- the script ---------------------------------------------------------------------------------------------
@pytest.fixture
def davis_root(tmp_path):
    clips = {"a": synthetic_video.make_clip(0, num_frames=5, size=32),
             "b": synthetic_video.make_clip(1, num_frames=4, size=32)}
    synthetic_video.write_davis(tmp_path / "davis", clips)
    return tmp_path / "davis"


def run(davis_root, tmp_path, *flags, model=("--pretrained_weights", "random", "--arch", "vit_tiny",
                                              "--patch_size", "4", "--depth", "2")):
    """The script on davis_root with a tiny random-init ViT (or the `model` flags) on the CPU; its output folder."""
    out = tmp_path / "out"
    evs.main(["--data_path", str(davis_root), "--output_dir", str(out), "--device", "cpu", *model,
              "--image_size", "32", *flags])
    return out


def test_script_writes_indexed_masks_a_strip_and_scores_on_a_synthetic_davis_folder(davis_root, tmp_path):
    out = run(davis_root, tmp_path)
    report = json.loads((out / "scores.json").read_text())
    assert set(report["videos"]) == {"a", "b"} and report["num_objects"] == 4
    assert 0 <= report["J&F-mean"] <= 100
    assert report["J&F-mean"] == pytest.approx((report["J-mean"] + report["F-mean"]) / 2)
    assert sorted(p.name for p in (out / "a").glob("0*.png")) == [f"{t:05d}.png" for t in range(5)]
    with Image.open(out / "a" / "00003.png") as mask:
        assert mask.mode == "P" and mask.getpalette()[:9] == synthetic_video.davis_palette()[:9]
    first = np.array(Image.open(davis_root / "Annotations/480p/a/00000.png"))
    assert np.array_equal(np.array(Image.open(out / "a" / "00000.png")), first)  # the given mask, as written
    assert (out / "a" / "strip.png").is_file()


def test_copying_the_first_mask_scores_it_against_every_frame(davis_root, tmp_path):
    """The trivial baseline: J of each object = mean over frames 1..T-2 of IoU(first mask, that frame's mask)."""
    out = run(davis_root, tmp_path, "--copy_first_mask")
    report = json.loads((out / "scores.json").read_text())
    gt = [np.array(Image.open(davis_root / f"Annotations/480p/a/{t:05d}.png")) for t in range(5)]
    j1 = np.mean([((gt[0] == 1) & (g == 1)).sum() / ((gt[0] == 1) | (g == 1)).sum() for g in gt[1:-1]])
    assert report["videos"]["a"]["objects"]["1"]["J"] == pytest.approx(100 * j1, abs=1e-4)


def test_a_folder_of_frames_with_first_mask_is_scored_against_the_masks_beside_it(davis_root, tmp_path):
    out = tmp_path / "out"
    report = evs.main(["--data_path", str(davis_root / "JPEGImages/480p/a"), "--output_dir", str(out),
                       "--first_mask", str(davis_root / "Annotations/480p/a/00000.png"), "--copy_first_mask"])
    assert set(report["videos"]) == {"a"}


def test_clear_errors_for_a_missing_first_mask_frames_of_different_sizes_and_an_empty_folder(davis_root, tmp_path):
    with pytest.raises(ConfigError, match="no first-frame mask"):
        (davis_root / "Annotations/480p/b/00000.png").unlink()
        run(davis_root, tmp_path, "--videos", "b")
    Image.new("RGB", (40, 32)).save(davis_root / "JPEGImages/480p/a/00002.jpg")
    with pytest.raises(ConfigError, match="must have one size"):
        run(davis_root, tmp_path, "--videos", "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no frames"):
        evs.main(["--data_path", str(tmp_path / "empty"), "--first_mask", "m.png"])
    with pytest.raises(ConfigError, match="not a DAVIS root"):
        evs.main(["--data_path", str(davis_root / "JPEGImages/480p/a")])


def test_the_script_propagates_with_the_weights_of_a_checkpoint(davis_root, tmp_path):
    """--pretrained_weights goes through backbone.from_args: train.py's layout, its arch and patch size read from
    the checkpoint's args; the masks differ from those of the random init of the same architecture."""
    ckpt = write_checkpoint(tmp_path / "ckpt.pth", tiny_vit(patch_size=4, depth=2, seed=1))
    trained = json.loads((run(davis_root, tmp_path / "t", model=("--pretrained_weights", ckpt)) / "scores.json")
                         .read_text())
    assert trained["args"]["arch"] == "vit_tiny" and trained["args"]["patch_size"] == 4
    random = json.loads((run(davis_root, tmp_path / "r") / "scores.json").read_text())
    assert trained["J&F-mean"] != random["J&F-mean"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the claim is about a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(davis_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evs.main(["--data_path", str(davis_root), "--pretrained_weights", "random", "--device", "cuda"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error:") and "cuda" in err and err.count("\n") == 1


def test_the_strip_titles_its_rows_with_the_mask_sets_and_its_columns_with_the_frame_numbers(davis_root, tmp_path,
                                                                                            monkeypatch):
    """The picture reads alone: a row "true masks", a row named for the method with its J&F, a column per shown
    frame titled "frame t" (5 frames: all of them), and a caption."""
    calls = []
    real = draw.labelled_grid
    monkeypatch.setattr(draw, "labelled_grid", lambda *a: calls.append(a) or real(*a))
    out = run(davis_root, tmp_path, "--videos", "a", "--copy_first_mask")
    rows, col_titles, row_titles, caption = calls[0]
    assert col_titles == [f"frame {t}" for t in range(5)]
    jf = json.loads((out / "scores.json").read_text())["videos"]["a"]["J&F"]
    assert row_titles == ["true masks", f"first mask copied, J&F {jf:.1f}"]
    assert len(rows) == 2 and all(len(r) == 5 for r in rows) and caption.startswith("a, 5 of its 5 frames")
    with Image.open(out / "a" / "strip.png") as strip:
        assert strip.width > 5 * rows[0][0].shape[-1]  # room for the row titles
