"""The DAVIS-2017 measures J and F (davis.py) on cases computed by hand or by a direct distance check."""
import math

import numpy as np
import pytest
import torch

import davis


def square(size=40, top=10, left=10, side=10):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_region_similarity_is_one_for_identical_zero_for_disjoint_and_one_for_two_empty_masks():
    """DAVIS: "region similarity J ... the intersection-over-union of the estimated segmentation and the
    ground-truth mask"; two empty masks agree perfectly."""
    a, b = square(), square(top=25, left=25)
    assert davis.db_eval_iou(a, a).item() == 1.0
    assert davis.db_eval_iou(a, b).item() == 0.0
    empty = torch.zeros_like(a)
    assert davis.db_eval_iou(empty, empty).item() == 1.0
    assert davis.db_eval_iou(a, empty).item() == 0.0


def test_region_similarity_of_a_square_shifted_by_one_pixel():
    """A 10 x 10 square and the same one column to the right: intersection 10 x 9, union 10 x 11."""
    assert davis.db_eval_iou(square(), square(left=11)).item() == pytest.approx(90 / 110)


def test_the_boundary_of_a_half_plane_is_the_last_column_inside_it():
    """seg2bmap marks a pixel whose right, lower or lower-right neighbour differs: for the left c columns set,
    that is column c - 1, on every row (the last row included)."""
    mask = torch.zeros(6, 9, dtype=torch.bool)
    mask[:, :4] = True
    expected = torch.zeros_like(mask)
    expected[:, 3] = True
    assert torch.equal(davis.seg2bmap(mask), expected)


def test_contour_accuracy_of_a_one_pixel_shift_depends_on_the_tolerance():
    """DAVIS F: boundary precision and recall with a tolerance of ceil(0.008 x diagonal) pixels (1 px on a
    40 x 40 image). The half-plane boundaries one column apart all match within 1 px and none within 0 px."""
    gt, pred = torch.zeros(40, 40, dtype=torch.bool), torch.zeros(40, 40, dtype=torch.bool)
    gt[:, :20], pred[:, :21] = True, True
    assert math.ceil(0.008 * math.hypot(40, 40)) == 1
    assert davis.db_eval_boundary(gt, pred).item() == pytest.approx(1.0)  # the DAVIS default 0.008
    assert davis.db_eval_boundary(gt, pred, bound_th=0).item() == 0.0  # 0 px: the columns must coincide
    assert davis.db_eval_boundary(gt, gt, bound_th=0).item() == 1.0
    far = torch.zeros_like(gt)
    far[:, :22] = True
    assert davis.db_eval_boundary(gt, far, bound_th=1).item() == 0.0  # 2 px away with a 1 px tolerance


def test_contour_accuracy_special_cases():
    """No boundary in either mask: F = 1; a boundary in only one: F = 0 (davis2017-evaluation's f_measure)."""
    empty, a = torch.zeros(30, 30, dtype=torch.bool), square(30, 5, 5, 10)
    assert davis.db_eval_boundary(empty, empty).item() == 1.0
    assert davis.db_eval_boundary(a, empty).item() == 0.0
    assert davis.db_eval_boundary(empty, a).item() == 0.0


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

    gb, pb = davis.seg2bmap(gt), davis.seg2bmap(pred)
    precision, recall = share_within(pb, gb), share_within(gb, pb)
    assert 0 < precision < 1 and 0 < recall < 1  # a case where the tolerance matters
    expected = 2 * precision * recall / (precision + recall)
    assert davis.db_eval_boundary(gt, pred, bound_th=r).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("radius", [1, 2.5, 8])
def test_cutting_each_frame_to_its_masks_box_changes_no_boundary_count(radius):
    """db_eval_boundary counts the boundary pixels and their matches on the box of the two masks, one pixel wider:
    the same counts as on the whole frame, for masks in the middle, at the frame's edges, and empty ones."""
    gen = torch.Generator().manual_seed(2)
    blobs = torch.nn.functional.interpolate(torch.rand(6, 1, 4, 5, generator=gen), size=(30, 37), mode="bilinear")
    masks = blobs[:, 0] > 0.6  # (6, 30, 37): blobs that touch the edges
    masks[0], masks[1] = False, False
    masks[1, 12:15, 20:26] = True  # a small mask in the middle ...
    masks[2, :, :] = False  # ... against an empty one
    for gt, pred in [(masks[0], masks[0]), (masks[1], masks[3]), (masks[2], masks[1]), (masks[4], masks[5]),
                     (masks[3], masks[4])]:
        gt_b, pred_b = davis.seg2bmap(gt), davis.seg2bmap(pred)
        whole = [gt_b.sum(), pred_b.sum(), (gt_b & davis.dilate_disk(pred_b, radius)).sum(),
                 (pred_b & davis.dilate_disk(gt_b, radius)).sum()]
        assert davis.boundary_counts(gt, pred, radius).tolist() == [int(c) for c in whole]
    f = davis.db_eval_boundary(masks[None, :3].expand(2, 3, 30, 37), masks[None, 3:].expand(2, 3, 30, 37), radius)
    assert f.shape == (2, 3) and torch.equal(f[0], f[1])


def test_scores_average_over_frames_per_object_then_over_objects():
    gt = np.zeros((2, 40, 40), np.uint8)
    gt[:, 10:20, 10:20], gt[:, 25:35, 25:35] = 1, 2
    pred = gt.copy()
    pred[1][pred[1] == 2] = 0  # object 2 lost in the second frame: J = F = 0 there
    s = davis.score_video(gt, pred, num_objects=2)
    assert s["objects"][1] == {"J": 100.0, "F": 100.0}
    assert s["objects"][2]["J"] == pytest.approx(50.0) and s["objects"][2]["F"] == pytest.approx(50.0)
    assert s["J&F"] == pytest.approx(75.0)


def test_the_tolerance_is_8_pixels_on_a_480p_frame_and_bound_th_pixels_from_1_up():
    """DAVIS: bound_pix = bound_th if bound_th >= 1 else ceil(bound_th * ||(H, W)||); 0.008 x 979.9 -> 8. A pixel
    count that is not whole stays as it is (the DAVIS code builds its disk from 2.5, not from 2)."""
    assert davis.boundary_tolerance(0.008, 480, 854) == 8
    assert davis.boundary_tolerance(3, 480, 854) == 3
    assert davis.boundary_tolerance(2.5, 480, 854) == 2.5


def test_the_davis_disks_of_radius_2_and_2_5_are_5_by_5_and_6_by_6():
    """scikit-image's disk(r): the points of arange(-r, r + 1) squared within r of the origin. For r = 2.5 the
    grid is -2.5, -1.5, ..., 2.5 (6 points) and only the four points +-0.5, +-1.5 of each axis qualify (1.5^2 +
    1.5^2 = 4.5 <= 6.25 but 2.5^2 + 0.5^2 = 6.5 > 6.25): the central 4 x 4 of a 6 x 6 grid."""
    disk_2 = [[0, 0, 1, 0, 0],
              [0, 1, 1, 1, 0],
              [1, 1, 1, 1, 1],
              [0, 1, 1, 1, 0],
              [0, 0, 1, 0, 0]]
    disk_2_5 = [[0, 0, 0, 0, 0, 0],
                [0, 1, 1, 1, 1, 0],
                [0, 1, 1, 1, 1, 0],
                [0, 1, 1, 1, 1, 0],
                [0, 1, 1, 1, 1, 0],
                [0, 0, 0, 0, 0, 0]]
    assert np.array_equal(davis.davis_disk(2), np.array(disk_2, bool))
    assert np.array_equal(davis.davis_disk(2.5), np.array(disk_2_5, bool))
    assert davis.davis_disk(8).shape == (17, 17) and davis.davis_disk(8.0).sum() == davis.davis_disk(8).sum() == 197


def test_dilation_by_the_2_5_disk_sets_the_4_by_4_square_one_pixel_before_to_two_after_a_pixel():
    """OpenCV's dilate (the DAVIS code's) anchors a 6 x 6 element at its entry (3, 3): output (y, x) takes the
    input at (y + i - 3, x + j - 3) for the ones (i, j) in rows and columns 1..4, offsets -2..1; so the input
    pixel (5, 7) sets rows 4..7 and columns 6..9."""
    mask = torch.zeros(12, 14, dtype=torch.bool)
    mask[5, 7] = True
    expected = torch.zeros_like(mask)
    expected[4:8, 6:10] = True
    assert torch.equal(davis.dilate_disk(mask, 2.5), expected)


@pytest.mark.parametrize("radius", [0, 1, 2, 2.5, 3.7, 8])
def test_dilation_is_the_or_of_the_mask_moved_by_each_offset_of_the_disk(radius):
    """The definition of OpenCV's dilate with the anchor at (n // 2, n // 2), computed directly: for each one (i, j)
    of the n x n element, the mask read at (y + i - n // 2, x + j - n // 2) (outside the image: unset), OR-ed."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 23, 31, generator=gen) > 0.97
    disk = davis.davis_disk(radius)
    a = disk.shape[0] // 2
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (a, a, a, a)).bool()  # (2, 23 + 2a, 31 + 2a)
    expected = torch.zeros_like(mask)
    for i, j in zip(*np.nonzero(disk)):
        expected |= padded[:, i:i + 23, j:j + 31]
    assert torch.equal(davis.dilate_disk(mask, radius), expected)


def test_a_boundary_2_pixels_away_is_matched_one_way_only_with_a_2_5_pixel_tolerance():
    """With bound_th = 2.5 the DAVIS dilation reaches 1 pixel left and 2 right: a predicted boundary 2 columns right
    of the true one is within the dilated true boundary (precision 1) but the true one is not within the dilated
    predicted one (recall 0), so F = 0; a 2 pixel tolerance (the disk of 2) matches both ways, F = 1."""
    gt, pred = torch.zeros(30, 40, dtype=torch.bool), torch.zeros(30, 40, dtype=torch.bool)
    gt[:, :20], pred[:, :22] = True, True  # boundaries: columns 19 and 21
    assert davis.db_eval_boundary(gt, pred, bound_th=2.5).item() == 0.0
    assert davis.db_eval_boundary(gt, pred, bound_th=2).item() == pytest.approx(1.0)
    assert davis.db_eval_boundary(gt, pred, bound_th=3.5).item() == pytest.approx(1.0)  # 2 left, 3 right


def test_the_global_scores_average_over_all_objects_not_over_videos():
    """DAVIS's global J-mean is the mean over every object of every video: a video with 3 objects at 0 and one
    with 1 object at 100 give 25, not the 50 of a mean over videos."""
    one = lambda v: {"J": v, "F": v}
    scores = {"a": {"objects": {1: one(100.0)}}, "b": {"objects": {1: one(0.0), 2: one(0.0), 3: one(0.0)}}}
    overall = davis.global_scores(scores)
    assert overall["J-mean"] == overall["F-mean"] == overall["J&F-mean"] == pytest.approx(25.0)
    assert overall["num_objects"] == 4
