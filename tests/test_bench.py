"""bench.py measures its three figures (step, data pipeline, whole loop) and prints them as a table."""
import math

import bench

TINY = ["--device", "cpu", "--arch", "vit_tiny", "--depth", "1", "--patch_size", "8", "--global_crop_size", "32",
        "--local_crop_size", "16", "--local_crops_number", "2", "--batch_size", "8", "--out_dim", "256",
        "--num_images", "20", "--unique_jpegs", "10", "--num_workers", "1", "--warmup", "1", "--iters", "1",
        "--repeats", "2"]


def table_rows(printed):
    """{what: [images/s, ...]} from the markdown table's body rows."""
    rows = {}
    for line in printed.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "what":
            rows.setdefault(cells[0], []).append(float(cells[1].replace(",", "")))
    return rows


def test_every_part_prints_a_positive_finite_images_per_s(tmp_path, capsys):
    bench.main(TINY + ["--data_dir", str(tmp_path / "jpegs"), "--official_reference"])
    rows = table_rows(capsys.readouterr().out)
    for what in ("step (train_step)", "pipeline: decode + multi-crop (DataLoader)",
                 "pipeline: photometric ops on the device", "whole loop (train.main)"):
        assert len(rows[what]) == 1 and 0 < rows[what][0] < math.inf, what
    assert rows["official: step"] == [401, 610]  # the official step measured on one H100
    assert len(list((tmp_path / "jpegs").rglob("*.jpg"))) == 20  # 10 distinct JPEGs, each listed twice
