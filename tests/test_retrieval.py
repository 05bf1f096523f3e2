"""Retrieval and copy detection with frozen features (paper Sec. 4.2.1): mAP as the revisited Oxford/Paris
evaluation computes it, GeM pooling, PCA whitening, and both scripts end to end on a few tiny images."""
import json
import pickle

import numpy as np
import pytest
import torch
import PIL.Image
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

import eval_copy_detection
import eval_image_retrieval
from cli import ConfigError
from conftest import write_checkpoint
from retrieval import Whitening, average_precision, class_retrieval, compute_map, gem, precision_at


def test_ap_is_the_trapezoid_rule_over_ranks():
    """Positives at ranks 0 and 2 of 4, two positives in all:
      1st at r = 0: P_left = 1, P_right = 1/1 -> (1 + 1) / 2 * 1/2 = 0.5
      2nd at r = 2: P_left = 1/2, P_right = 2/3 -> (1/2 + 2/3) / 2 * 1/2 = 7/24
    AP = 12/24 + 7/24 = 19/24. A positive never ranked (3 positives) only lowers the recall step: 19/36."""
    hits = torch.tensor([[True, False, True, False]])
    assert average_precision(hits, [2]).item() == pytest.approx(19 / 24)
    assert average_precision(hits, [3]).item() == pytest.approx(19 / 36)
    assert average_precision(torch.tensor([[True, True, False]]), [2]).item() == pytest.approx(1.0)
    # One positive at rank r > 0: (0 + 1 / (r + 1)) / 2, the Copydays score (0.25 at rank 1)
    assert average_precision(torch.tensor([[False, True, False]]), [1]).item() == pytest.approx(0.25)


def test_junk_images_are_taken_out_of_the_ranking():
    """"Junk images ... are ignored": database items 0..5; query 0 has positives {3, 5}, junk {1};
    ranking 3, 1, 5, 0, 2, 4. Without the junk: 3, 5, 0, 2, 4 -> positives at ranks 0 and 1 -> AP = 1.
    Query 1 (same ranking) has positives {0, 4} and no junk: ranks 3 and 5 ->
      (0/3 + 1/4) / 2 / 2 + (1/5 + 2/6) / 2 / 2 = 1/16 + 2/15 = 47/240.
    mP@k caps k at the rank of the last positive (1-based): query 0 (last at 2): P@1 = 1, P@5 = 2/2 = 1;
    query 1 (last at 6): P@1 = 0, P@5 = 1/5. A query without positives is left out of the means."""
    ranks = np.array([[3, 1, 5, 0, 2, 4]] * 3).T  # (N, Q)
    gnd = [{"ok": [3, 5], "junk": [1]}, {"ok": [0, 4], "junk": []}, {"ok": [], "junk": [2]}]
    mean_ap, aps, mpr, prs = compute_map(ranks, gnd, kappas=[1, 5])
    assert aps[0] == pytest.approx(1.0) and aps[1] == pytest.approx(47 / 240) and np.isnan(aps[2])
    assert mean_ap == pytest.approx((1 + 47 / 240) / 2)
    assert prs[0].tolist() == [1.0, 1.0] and prs[1].tolist() == [0.0, 1 / 5]  # float64: exactly 1/5
    assert mpr == pytest.approx([0.5, 0.6])


def test_precision_at_k_counts_positives_in_the_top_k():
    """Divided in float64, as the official numpy code: 2/3 exactly, not float32's 0.6666666865."""
    hits = torch.tensor([[True, False, True, True, False, False, False, False, False, True]])
    precisions = precision_at(hits, [1, 2, 3, 5, 10])
    assert precisions.dtype == torch.float64
    assert precisions[0].tolist() == [1.0, 0.5, 2 / 3, 0.6, 0.4]


def test_class_retrieval_map():
    """Two classes on two directions: every query ranks its class first -> mAP 1. Swapping the query labels
    ranks the 2 positives after the 3 others: (0 + 1/4) / 2 / 2 + (1/4 + 2/5) / 2 / 2 = 0.225."""
    db = torch.tensor([[1.0, 0], [2, 0.1], [0, 1], [0.1, 3], [0.2, 2]])
    db_labels = torch.tensor([0, 0, 1, 1, 1])
    queries, query_labels = torch.tensor([[1.0, 0.05]]), torch.tensor([0])
    assert class_retrieval(queries, query_labels, db, db_labels)[0] == pytest.approx(1.0)
    assert class_retrieval(torch.tensor([[0.05, 1.0]]), query_labels, db, db_labels)[0] == pytest.approx(0.225)


def test_gem_is_average_pooling_at_p_1_and_max_pooling_for_large_p():
    """GeM (Radenovic et al.) "p = 1: average pooling, p -> infinity: max pooling"."""
    x = torch.rand(2, 16, 8) + 0.1  # (B, N, D), positive as the clamp assumes
    assert torch.allclose(gem(x, p=1), x.mean(dim=1), atol=1e-6)
    assert torch.allclose(gem(x.double(), p=200), x.double().amax(dim=1), rtol=0.02)
    assert not torch.allclose(gem(x, p=4), x.amax(dim=1), rtol=0.02)


def test_centered_whitening_makes_the_learning_set_covariance_the_identity():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3  # correlated, off-center
    white = Whitening(feats, "centered")(feats).double()
    cov = (white - white.mean(0)).T @ (white - white.mean(0)) / len(white)
    assert torch.allclose(white.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(cov, torch.eye(6, dtype=torch.float64), atol=1e-4)


def test_official_whitening_is_from_the_second_moment_of_the_uncentered_features():
    """The official operator: x -> (x - mean) V diag(eigval^-1/2), (eigval, V) the eigenpairs of M = X^T X / n of the
    whitening features X, uncentered, columns by decreasing eigenvalue (up to the sign of each eigenvector). So the
    whitened dot products are (y - mean)^T M^-1 (z - mean); the centered operator gives (y - mean)^T C^-1 (z - mean),
    C the covariance of X, which is not the same."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, 5, generator=g) @ torch.randn(5, 5, generator=g) + 2).double()  # (n, D), off-center
    y = torch.randn(7, 5, generator=g).double() + 1  # (7, D): queries or database
    mean, second_moment = x.mean(0), x.T @ x / len(x)  # (D,), (D, D)
    eigval, eigvec = np.linalg.eigh(second_moment.numpy())
    direct = torch.from_numpy((y - mean).numpy() @ eigvec[:, ::-1] / np.sqrt(eigval[::-1]))  # (7, D)
    official, centered = (Whitening(x.float(), mode)(y.float()).double() for mode in ("official", "centered"))
    signs = (official * direct).sum(0).sign()  # (D,): an eigenvector is only defined up to its sign
    assert torch.allclose(official, direct * signs, rtol=1e-4, atol=1e-4)
    covariance = second_moment - torch.outer(mean, mean)  # (x - mean)^T (x - mean) / n
    gram = lambda matrix: (y - mean) @ torch.linalg.solve(matrix, (y - mean).T)  # (7, 7)
    assert torch.allclose(official @ official.T, gram(second_moment), rtol=1e-4, atol=1e-4)
    assert torch.allclose(centered @ centered.T, gram(covariance), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(gram(second_moment), gram(covariance), rtol=0.1)


# --- the scripts end to end on a few tiny images ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 2-block vit_tiny/4 trained (so its saved args say) at 16 px."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pth", global_crop_size=16)


def random_images(n, size=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8) for _ in range(n)]


def write_images(folder, names, images):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, images):
        to_pil_image(image).save(folder / name)  # PNG, by the name's suffix


def test_class_retrieval_script_on_an_image_folder(tiny_checkpoint, tmp_path):
    for seed, (split, c, n) in enumerate([("train", "a", 3), ("train", "b", 3), ("val", "a", 2), ("val", "b", 2)]):
        write_images(tmp_path / split / c, [f"{i}.png" for i in range(n)], random_images(n, seed=seed))
    out = tmp_path / "results.json"
    results = eval_image_retrieval.main(["--pretrained_weights", tiny_checkpoint, "--data_path", str(tmp_path),
                                         "--baselines", "true", "--output_json", str(out), "--multiscale", "true"])
    assert list(results) == [f"DINO ({tiny_checkpoint})", "random init", "raw pixels"]
    for row in results.values():
        assert list(row) == ["mAP", "mP@1", "mP@5", "mP@10"] and all(0 <= v <= 1 for v in row.values())
    assert json.loads(out.read_text())["results"] == results


def write_revisited(root, gnd_extra=None):
    """A 4-image database; query 0 is an exact copy of database image 1, its only hard positive."""
    folder = root / "roxford5k"
    images = random_images(5, size=(20, 28))
    write_images(folder / "jpg", ["a.png", "b.png", "c.png", "d.png", "q.png"], images)
    for name in "abcdq":  # the protocol's file names end in .jpg; PNG content decodes all the same
        (folder / "jpg" / f"{name}.png").rename(folder / "jpg" / f"{name}.jpg")
    (folder / "jpg" / "q2.jpg").write_bytes((folder / "jpg" / "b.jpg").read_bytes())
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}, {"easy": np.array([3]), "hard": np.array([], dtype=int),
                                                     "junk": np.array([0])}]
    cfg = {"imlist": ["a", "b", "c", "d"], "qimlist": ["q2", "q"], "gnd": gnd} | (gnd_extra or {})
    with open(folder / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(cfg, f)


def test_revisited_oxford_script(tiny_checkpoint, tmp_path):
    """Query 0 is database image 1 itself: ranked first, so its Hard AP is 1; query 1 has no hard positive and is
    left out of the Hard means, so mAP_hard = mP@1_hard = 1."""
    write_revisited(tmp_path)
    results = eval_image_retrieval.main(["--pretrained_weights", tiny_checkpoint, "--data_path", str(tmp_path),
                                         "--dataset", "roxford5k", "--imsize", "24"])
    row = results[f"DINO ({tiny_checkpoint})"]
    assert row["mAP_hard"] == pytest.approx(1.0) and row["mP@1_hard"] == pytest.approx(1.0)
    assert 0 < row["mAP_medium"] <= 1


def test_revisited_images_are_pils_lanczos_thumbnails(tmp_path):
    """As the official `img.thumbnail((imsize, imsize), Image.ANTIALIAS)` (ANTIALIAS is LANCZOS): the short side is
    rounded by PIL's rule, to the size whose aspect ratio is nearest the image's (1024 x 681 -> 512 x 341, where
    rounding 340.5 half to even gives 340; a 683 x 1024 portrait -> 341 x 512, where the two widths tie and PIL keeps
    the smaller), an image that already fits is left as it is, and the pixels are PIL's Lanczos resampling."""
    g = torch.Generator().manual_seed(0)
    landscape = torch.randint(0, 256, (3, 681, 1024), generator=g, dtype=torch.uint8)
    assert eval_image_retrieval.thumbnail(landscape, 512).shape == (3, 341, 512)
    assert eval_image_retrieval.thumbnail(torch.zeros(3, 1024, 683, dtype=torch.uint8), 512).shape == (3, 512, 341)
    assert torch.equal(eval_image_retrieval.thumbnail(landscape, 1024), landscape)
    lanczos = to_pil_image(landscape).resize((512, 341), PIL.Image.Resampling.LANCZOS)  # halving: no reducing step
    assert torch.equal(eval_image_retrieval.thumbnail(landscape, 512), pil_to_tensor(lanczos))
    write_revisited(tmp_path)
    item = eval_image_retrieval.OxfordParisDataset(tmp_path, "roxford5k", "db", 24)[1][0]  # b.jpg, 20 x 28
    expected = PIL.Image.open(tmp_path / "roxford5k" / "jpg" / "b.jpg").convert("RGB")
    expected.thumbnail((24, 24), PIL.Image.Resampling.LANCZOS)
    assert item.shape == (3, 17, 24) and torch.equal(item, pil_to_tensor(expected))


def test_copydays_images_are_pils_bicubic_squares(tmp_path):
    """As the official `Resize((imsize, imsize), interpolation=3)` on a PIL image: PIL's bicubic resampling."""
    write_images(tmp_path, ["a.png"], random_images(1, size=(24, 30)))
    expected = PIL.Image.open(tmp_path / "a.png").convert("RGB").resize((16, 16), PIL.Image.Resampling.BICUBIC)
    image = eval_copy_detection.ImageList([str(tmp_path / "a.png")], 16)[0][0]
    assert torch.equal(image, pil_to_tensor(expected))


def test_ground_truth_pickles_may_not_run_code(tiny_checkpoint, tmp_path):
    """The .pkl files are read with Python's pickle, admitting only plain values and numpy arrays."""
    (tmp_path / "roxford5k").mkdir()
    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [], "x": torch.nn.Identity}, f)
    with pytest.raises(ConfigError, match="not a revisited"):
        eval_image_retrieval.main(["--pretrained_weights", tiny_checkpoint, "--data_path", str(tmp_path),
                                   "--dataset", "roxford5k"])


def test_copy_detection_script_on_a_generated_set(tiny_checkpoint, tmp_path):
    for c in ("a", "b"):
        write_images(tmp_path / "train" / c, [f"{i}.png" for i in range(3)], random_images(3, seed=ord(c)))
        write_images(tmp_path / "val" / c, [f"{i}.png" for i in range(4)], random_images(4, seed=ord(c) + 1))
    results = eval_copy_detection.main(["--pretrained_weights", tiny_checkpoint, "--data_path", str(tmp_path),
                                        "--num_queries", "3", "--num_whitening", "6", "--baselines", "true",
                                        "--save_examples", str(tmp_path / "examples.png")])
    assert list(results) == [f"DINO ({tiny_checkpoint})", "random init", "raw pixels"]
    assert (tmp_path / "examples.png").stat().st_size > 0
    for row in results.values():
        assert len(row) == 4 and all(0 <= v <= 1 for v in row.values())


def test_copydays_layout_originals_find_themselves(tiny_checkpoint, tmp_path):
    """The "original" block queries the originals themselves: each is its own nearest neighbour, AP 1."""
    originals = random_images(3, size=(24, 30))
    write_images(tmp_path / "original", ["1000.png", "1100.png", "1200.png"], originals)
    write_images(tmp_path / "strong", ["1000a.png", "1000b.png", "1200a.png"],
                 [o.flip(-1) for o in (originals[0], originals[0], originals[2])])
    write_images(tmp_path / "distractors", ["x.png", "y.png"], random_images(2, seed=5))
    results = eval_copy_detection.main(["--pretrained_weights", tiny_checkpoint, "--data_path", str(tmp_path),
                                        "--distractors_path", str(tmp_path / "distractors"), "--imsize", "16",
                                        "--whitening_path", str(tmp_path / "distractors"), "--whitening", "centered"])
    row = results[f"DINO ({tiny_checkpoint})"]
    assert row["original mAP"] == pytest.approx(1.0) and row["original top-1"] == 1.0
    assert set(row) == {f"{b} {m}" for b in ("original", "strong") for m in
                        ("mAP", "top-1", "mAP whitened", "top-1 whitened")}


def test_bad_input_is_one_line_error(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="gnd_rparis6k.pkl does not exist"):
        eval_image_retrieval.main(["--pretrained_weights", tiny_checkpoint, "--data_path", str(tmp_path),
                                   "--dataset", "rparis6k"])
    with pytest.raises(ConfigError, match="neither a folder nor a known dataset"):
        eval_copy_detection.main(["--pretrained_weights", tiny_checkpoint, "--data_path", str(tmp_path / "nope")])
    write_images(tmp_path / "folder" / "train" / "a", ["0.png"], random_images(1))
    write_images(tmp_path / "folder" / "val" / "a", ["0.png"], random_images(1))
    with pytest.raises(ConfigError, match="--imsize 18 is not a multiple of the patch size 4"):
        eval_image_retrieval.main(["--pretrained_weights", tiny_checkpoint, "--data_path", str(tmp_path / "folder"),
                                   "--imsize", "18"])


def test_cuda_without_a_gpu_is_one_line_error(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        eval_copy_detection.main(["--pretrained_weights", tiny_checkpoint, "--device", "cuda"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert "no CUDA GPU" in err


def test_copy_detection_picture_shows_the_original_beside_its_copy_and_results(tmp_path, monkeypatch):
    """Each row: the original (framed green), its copy, then the copy's top results, the original framed green
    again where it is found; the columns are titled and the row says at which rank the original came."""
    colors = [(10, 0, 0), (0, 90, 0), (0, 0, 170), (250, 250, 250)]
    database = [(torch.tensor(c, dtype=torch.uint8)[:, None, None].repeat(1, 8, 8), 0) for c in colors]
    queries = [(database[2][0].flip(-1), 0), (database[0][0] // 2, 1)]
    ranking = torch.tensor([[1, 2, 0, 3], [3, 1, 2, 0]])  # query 0 finds its original 2 second, query 1 never
    drawn, labelled_grid = {}, eval_copy_detection.draw.labelled_grid

    def spy(rows, col_titles, row_titles, caption):
        drawn.update(rows=rows, titles=col_titles, row_titles=row_titles)
        return labelled_grid(rows, col_titles, row_titles, caption)
    monkeypatch.setattr(eval_copy_detection.draw, "labelled_grid", spy)
    eval_copy_detection.save_examples(tmp_path / "x.png", ("strong", queries, [[2], [0]]), database, ranking[:, :3],
                                      "a test", top=3, cell=8)
    assert (tmp_path / "x.png").stat().st_size > 0
    rows, green = drawn["rows"], torch.tensor([40, 200, 40], dtype=torch.uint8)
    assert drawn["titles"] == ["original", "copy", "top 1", "top 2", "top 3"]
    assert drawn["row_titles"] == ["original at rank 2", "original not in top 3"]
    assert torch.equal(rows[0][0][:, 3:-3, 3:-3], database[2][0]) and torch.equal(rows[0][0][:, 0, 0], green)
    assert torch.equal(rows[0][1][:, 3:-3, 3:-3], queries[0][0])
    assert torch.equal(rows[0][3][:, 3:-3, 3:-3], database[2][0]) and torch.equal(rows[0][3][:, 0, 0], green)
    assert not torch.equal(rows[0][2][:, 0, 0], green)
    assert torch.equal(rows[1][0][:, 3:-3, 3:-3], database[0][0])
