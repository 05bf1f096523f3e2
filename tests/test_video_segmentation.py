"""Video object segmentation by label propagation (paper Sec. 4.2.2) and the DAVIS J and F scores."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import eval_video_segmentation as evs
import synthetic_video
import vit
from cli import ConfigError


def square(size=40, top=10, left=10, side=10):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:top + side, left:left + side] = True
    return mask


# --- J and F on hand-computable cases ---------------------------------------------------------------------
def test_region_similarity_is_one_for_identical_zero_for_disjoint_and_one_for_two_empty_masks():
    """DAVIS: "region similarity J ... the intersection-over-union of the estimated segmentation and the
    ground-truth mask"; two empty masks agree perfectly."""
    a, b = square(), square(top=25, left=25)
    assert evs.db_eval_iou(a, a).item() == 1.0
    assert evs.db_eval_iou(a, b).item() == 0.0
    empty = torch.zeros_like(a)
    assert evs.db_eval_iou(empty, empty).item() == 1.0
    assert evs.db_eval_iou(a, empty).item() == 0.0


def test_region_similarity_of_a_square_shifted_by_one_pixel():
    """A 10 x 10 square and the same one column to the right: intersection 10 x 9, union 10 x 11."""
    assert evs.db_eval_iou(square(), square(left=11)).item() == pytest.approx(90 / 110)


def test_the_boundary_of_a_half_plane_is_the_last_column_inside_it():
    """seg2bmap marks a pixel whose right, lower or lower-right neighbour differs: for the left c columns set,
    that is column c - 1, on every row (the last row included)."""
    mask = torch.zeros(6, 9, dtype=torch.bool)
    mask[:, :4] = True
    expected = torch.zeros_like(mask)
    expected[:, 3] = True
    assert torch.equal(evs.seg2bmap(mask), expected)


def test_contour_accuracy_of_a_one_pixel_shift_depends_on_the_tolerance():
    """DAVIS F: boundary precision and recall with a tolerance of ceil(0.008 x diagonal) pixels (1 px on a
    40 x 40 image). The half-plane boundaries one column apart all match within 1 px and none within 0 px."""
    gt, pred = torch.zeros(40, 40, dtype=torch.bool), torch.zeros(40, 40, dtype=torch.bool)
    gt[:, :20], pred[:, :21] = True, True
    assert math.ceil(0.008 * math.hypot(40, 40)) == 1
    assert evs.db_eval_boundary(gt, pred).item() == pytest.approx(1.0)  # the DAVIS default 0.008
    assert evs.db_eval_boundary(gt, pred, bound_th=0).item() == 0.0  # 0 px: the columns must coincide
    assert evs.db_eval_boundary(gt, gt, bound_th=0).item() == 1.0
    far = torch.zeros_like(gt)
    far[:, :22] = True
    assert evs.db_eval_boundary(gt, far, bound_th=1).item() == 0.0  # 2 px away with a 1 px tolerance


def test_contour_accuracy_special_cases():
    """No boundary in either mask: F = 1; a boundary in only one: F = 0 (davis2017-evaluation's f_measure)."""
    empty, a = torch.zeros(30, 30, dtype=torch.bool), square(30, 5, 5, 10)
    assert evs.db_eval_boundary(empty, empty).item() == 1.0
    assert evs.db_eval_boundary(a, empty).item() == 0.0
    assert evs.db_eval_boundary(empty, a).item() == 0.0


def test_contour_accuracy_matches_a_direct_distance_check_on_random_blobs():
    """Precision = share of predicted boundary pixels with a true boundary pixel at distance <= r (a disk of
    radius r), recall the converse: the conv-based dilation against pairwise distances."""
    gen = torch.Generator().manual_seed(0)
    blobs = torch.nn.functional.interpolate(torch.rand(2, 1, 5, 6, generator=gen), size=(22, 26), mode="bilinear")
    gt, pred = blobs[0, 0] > 0.5, blobs[1, 0] > 0.5
    r = 2

    def share_within(src, dst):
        a, b = src.nonzero().float(), dst.nonzero().float()  # (n, 2) pixel positions
        return ((torch.cdist(a, b) <= r + 1e-6).any(dim=1)).float().mean().item()

    gb, pb = evs.seg2bmap(gt), evs.seg2bmap(pred)
    precision, recall = share_within(pb, gb), share_within(gb, pb)
    assert 0 < precision < 1 and 0 < recall < 1  # a case where the tolerance matters
    expected = 2 * precision * recall / (precision + recall)
    assert evs.db_eval_boundary(gt, pred, bound_th=r).item() == pytest.approx(expected, abs=1e-6)


def test_scores_average_over_frames_per_object_then_over_objects():
    gt = np.zeros((2, 40, 40), np.uint8)
    gt[:, 10:20, 10:20], gt[:, 25:35, 25:35] = 1, 2
    pred = gt.copy()
    pred[1][pred[1] == 2] = 0  # object 2 lost in the second frame: J = F = 0 there
    s = evs.score_video(gt, pred, num_objects=2)
    assert s["objects"][1] == {"J": 100.0, "F": 100.0}
    assert s["objects"][2]["J"] == pytest.approx(50.0) and s["objects"][2]["F"] == pytest.approx(50.0)
    assert s["J&F"] == pytest.approx(75.0)


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
    torch.manual_seed(0)
    model = vit.vit_tiny(patch_size=4, depth=2).eval()
    frame = torch.randn(3, 32, 40)
    first = torch.zeros(8, 10, dtype=torch.long)
    first[2:6, 1:4], first[3:8, 6:9] = 1, 2
    segs = list(evs.propagate_video(model, [frame] * 10, first, n_last_frames=3, size_mask_neighborhood=2))
    assert len(segs) == 9
    expected = first.repeat_interleave(4, 0).repeat_interleave(4, 1)
    near_edge = evs.dilate_disk(evs.seg2bmap(expected[None] == 1) | evs.seg2bmap(expected[None] == 2), 1)[0]
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


def run(davis_root, tmp_path, *flags):
    out = tmp_path / "out"
    evs.main(["--data_path", str(davis_root), "--output_dir", str(out), "--device", "cpu", "--arch", "vit_tiny",
              "--patch_size", "4", "--depth", "2", "--image_size", "32", *flags])
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
