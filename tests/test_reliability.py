"""Issue 3: training survives crashes, restarts and bad data, and gives the same result on 1 or N processes.

Tiny everything: a ViT-tiny of 2 blocks (drop path 0.2 on the second, so the RNG matters), patch 7, 28 px
Fashion-MNIST, 64 images, batch 16: 4 steps per epoch. Subprocesses run with OMP_NUM_THREADS=1, as the tests
do (conftest), so that a run split over processes can be compared bit for bit with one straight run.
"""
import errno
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backbone
import checkpoint
import data
import train
import training_data
from cli import ConfigError
from conftest import TINY_TRAIN, load, no_key_bias, relative_difference
from draw import read_rows

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_TRAIN + ["--subset", "64", "--batch_size_per_gpu", "16", "--epochs", "1", "--freeze_last_layer", "0",
                    "--knn_every", "0", "--saveckp_freq", "0", "--log_every", "1", "--precision", "fp32"]
RESUME = TINY + ["--depth", "2", "--drop_path_rate", "0.2", "--epochs", "2"]  # 8 steps
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def read_log(out):
    """out/log.txt's rows without their timings, which differ from run to run."""
    timing = ("images_per_s", "epoch_time_s")
    return [{k: v for k, v in row.items() if k not in timing} for row in read_rows(Path(out) / "log.txt")]


def tensors(ckpt):
    """Every tensor that training changes: weights, center, optimizer moments, {name: tensor}."""
    found = {f"{part}.{k}": v for part in ("student", "teacher", "dino_loss") for k, v in ckpt[part].items()}
    for i, state in ckpt["optimizer"]["state"].items():
        found.update({f"optimizer.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return found


def assert_bit_identical(a, b):
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def start(args, out, code=None):
    """train.py (or `code` reading the same flags) in a subprocess, its output in files under `out`."""
    Path(out).mkdir(exist_ok=True)
    n = len(list(Path(out).glob("stdout*.txt")))
    stdout, stderr = open(Path(out) / f"stdout{n}.txt", "w"), open(Path(out) / f"stderr{n}.txt", "w")
    command = ["-c", code] if code else ["train.py"]
    return subprocess.Popen([sys.executable, *command, *args, "--output_dir", str(out)], cwd=ROOT, env=ENV,
                            stdout=stdout, stderr=stderr)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: RESUME trained for its 2 epochs without interruption, in this process."""
    out = tmp_path_factory.mktemp("straight")
    train.main(RESUME + ["--output_dir", str(out)])
    return out


# --- 1. reproducible data --------------------------------------------------------------------------------
def crops_by_index(args, world_size=1, epoch=1, start=0):
    """{index: (crops, params)} over an epoch of the training loader, from all ranks; and the batches' indices."""
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = data.TensorImages(images, torch.arange(16))  # label = index
    found, batches = {}, []
    for rank in range(world_size):
        loader, sampler = training_data.training_loader(dataset, args, rank, world_size, torch.device("cpu"))
        sampler.set_epoch(epoch, start)
        for k, (crops, params, labels, errors) in enumerate(loader):
            batches.append((k, rank, labels.tolist()))
            found.update({i: ([c[j] for c in crops], params[j]) for j, i in enumerate(labels.tolist())})
    return found, batches


def test_a_sample_gets_the_same_crops_whatever_the_workers_batch_and_ranks():
    """Crops and photometric draws are a function of (seed, epoch, index) only."""
    flags = lambda batch, workers: train.parse_args(TINY + ["--batch_size_per_gpu", str(batch),
                                                            "--num_workers", str(workers)])
    reference, one_process = crops_by_index(flags(8, 0))
    two_workers, _ = crops_by_index(flags(4, 2))
    two_ranks, ranks_batches = crops_by_index(flags(4, 0), world_size=2)
    assert sorted(reference) == sorted(two_workers) == sorted(two_ranks) == list(range(16))
    for other in (two_workers, two_ranks):
        for i, (crops, params) in reference.items():
            assert all(torch.equal(a, b) for a, b in zip(crops, other[i][0])) and torch.equal(params, other[i][1])
    # The two ranks' k-th batches of 4 together hold the k-th batch of 8 of one process (same loss, same step).
    for k, _, labels in one_process:
        assert sorted(labels) == sorted(sum((lab for kk, _, lab in ranks_batches if kk == k), []))
    # A resumed epoch skips the batches already done, and only those.
    _, full = crops_by_index(flags(4, 0))
    _, resumed = crops_by_index(flags(4, 0), start=8)
    assert [labels for _, _, labels in resumed] == [labels for _, _, labels in full][2:]


# --- 2, 3. exact resume ----------------------------------------------------------------------------------
class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after_save, where", [(2, (1, 0)), (3, (1, 2))])
def test_resume_after_a_crash_is_bit_identical_to_a_straight_run(tmp_path, monkeypatch, straight, crash_after_save,
                                                                 where):
    """Checkpoints after steps 3 (--saveckp_steps 3), 4 (end of epoch 0), 6, 8: the run crashes right after the
    2nd (an epoch boundary) or the 3rd (inside epoch 1, step 2 of 4 done); resumed, it ends with the weights,
    center, optimizer state and logged losses of the straight run, drop path included."""
    save_atomic, saves = checkpoint.save_atomic, []

    def save_then_crash(obj, path):
        save_atomic(obj, path)
        saves.append(path)
        if len(saves) == crash_after_save:
            raise Crash

    monkeypatch.setattr(checkpoint, "save_atomic", save_then_crash)
    with pytest.raises(Crash):
        train.main(RESUME + ["--saveckp_steps", "3", "--output_dir", str(tmp_path)])
    assert (load(tmp_path)["epoch"], load(tmp_path)["iteration"]) == where
    train.main(RESUME + ["--saveckp_steps", "3", "--output_dir", str(tmp_path)])
    assert_bit_identical(load(tmp_path), load(straight))
    assert read_log(tmp_path) == read_log(straight)  # the epoch's running loss sums were restored too


# --- 3. SIGTERM ------------------------------------------------------------------------------------------
def test_sigterm_finishes_the_step_saves_and_exits_0_and_the_run_resumes(tmp_path, straight):
    proc = start(RESUME, tmp_path)
    stderr, deadline = tmp_path / "stderr0.txt", time.time() + 120
    while "| 1/4 [" not in stderr.read_text():  # the progress bar after the first step
        assert proc.poll() is None and time.time() < deadline, stderr.read_text()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    message = (tmp_path / "stdout0.txt").read_text().splitlines()[-1]
    ckpt = load(tmp_path)
    assert message == (f"stopped by SIGTERM: {tmp_path / 'checkpoint.pth'} continues at epoch {ckpt['epoch']}, "
                       f"step {ckpt['iteration']}; to resume, run the same command again")
    assert (0, 1) <= (ckpt["epoch"], ckpt["iteration"]) < (2, 0)  # a step after the first one
    train.main(RESUME + ["--output_dir", str(tmp_path)])
    assert_bit_identical(load(tmp_path), load(straight))


# --- 3, 4. kill -9 at any moment -------------------------------------------------------------------------
# train.py whose torch.save writes half the checkpoint, waits 3 s, then writes the rest: a kill during the write.
SLOW_SAVE = """import io, sys, time, torch
sys.path.insert(0, '.')
save = torch.save
def slow_save(obj, f):
    buffer = io.BytesIO()
    save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[:len(data) // 2]); f.flush(); time.sleep(3); f.write(data[len(data) // 2:])
torch.save = slow_save
import checkpoint
import data
import train
import training_data
from cli import ConfigError
train.cli.run_cli(train.main)
"""


def file_id(path):
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


def wait_for_a_new_checkpoint(proc, path):
    """Until a save renames a new file onto `path`."""
    before, deadline = file_id(path), time.time() + 120
    while file_id(path) == before:
        assert proc.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.002)


def test_kill_9_three_times_even_while_saving_then_resume_gives_the_straight_result(tmp_path, straight):
    """--saveckp_steps 1: a checkpoint after every step. Kill -9 at a random moment after a step's checkpoint,
    then in the middle of writing one (half of it on disk), then at a random moment again: checkpoint.pth always
    loads, and the last resume ends with the weights of the straight run, bit for bit."""
    flags, ckpt, tmp = RESUME + ["--saveckp_steps", "1"], tmp_path / "checkpoint.pth", tmp_path / "checkpoint.pth.tmp"
    rng, done = random.Random(0), []
    for kill in ("random", "while saving", "random"):
        stale_tmp = file_id(tmp)  # a kill may have left one
        proc = start(flags, tmp_path, code=SLOW_SAVE if kill == "while saving" else None)
        if kill == "random":
            wait_for_a_new_checkpoint(proc, ckpt)
            time.sleep(rng.uniform(0, 0.3))
        else:  # as soon as the first half of the next checkpoint is in the .tmp
            while file_id(tmp) == stale_tmp or tmp.stat().st_size == 0:
                assert proc.poll() is None
                time.sleep(0.002)
        assert proc.poll() is None
        proc.kill()
        proc.wait()
        if kill == "while saving":
            with pytest.raises(Exception):  # the .tmp is half a checkpoint...
                torch.load(tmp, weights_only=True)
        done.append((load(tmp_path)["epoch"], load(tmp_path)["iteration"]))  # ...checkpoint.pth is whole
    assert done == sorted(done) and done[-1] < (2, 0)
    train.main(flags + ["--output_dir", str(tmp_path)])
    assert_bit_identical(load(tmp_path), load(straight))
    assert read_log(tmp_path) == read_log(straight)  # one row per epoch, whatever the kills cut


# --- 5. one process or N ---------------------------------------------------------------------------------
def test_two_processes_of_batch_16_give_one_process_of_batch_32(tmp_path):
    """torchrun with gloo, drop path 0, fp32: after 4 steps (2 epochs) loss, center and weights agree within
    1e-5 relative (summation order differs); only rank 0 writes the log and the checkpoint."""
    flags = TINY + ["--epochs", "2", "--drop_path_rate", "0", "--knn_every", "1"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *flags, "--output_dir", str(tmp_path / "two")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    train.main(flags + ["--batch_size_per_gpu", "32", "--output_dir", str(tmp_path / "one")])
    two, one = load(tmp_path / "two"), load(tmp_path / "one")
    assert two["epoch"] == one["epoch"] == 2 and two["world_size"] == 2 and len(two["per_rank"]) == 2
    for part in ("student", "teacher", "dino_loss"):
        a, b = ([no_key_bias(k, v) for k, v in ckpt[part].items()] for ckpt in (two, one))
        assert all(relative_difference(x, y) <= 1e-5 for x, y in zip(a, b)), part
        assert relative_difference(*(torch.cat([v.flatten() for v in c[part].values()]) for c in (two, one))) <= 1e-5
    log_two, log_one = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    assert [row["epoch"] for row in log_two] == [-1, 0, 1]  # k-NN before training, 2 epochs: rank 1 wrote nothing
    for a, b in zip(log_two[1:], log_one[1:]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


# --- 6. safe loading -------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs os.system(command)."""
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_carrying_code_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "out").mkdir()
    torch.save({"student": Payload(f"touch {marker}"), "epoch": 1}, tmp_path / "out" / "checkpoint.pth")
    with open(tmp_path / "plain.pth", "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump(Payload(f"touch {marker}"), f)
    with pytest.raises(ConfigError, match="cannot read .*checkpoint.pth as a safe torch checkpoint"):
        train.main(TINY + ["--output_dir", str(tmp_path / "out")])  # resume
    for path in (tmp_path / "plain.pth", tmp_path / "out" / "checkpoint.pth"):
        with pytest.raises(ConfigError, match="as a safe torch checkpoint"):
            backbone.load(path)  # eval_knn, eval_linear, visualize_attention
    assert not marker.exists()
    torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=False)  # the control: the payload is real
    assert marker.exists()


# --- 7. bad data -----------------------------------------------------------------------------------------
def make_image_folder(root):
    """16 files in one class folder: 4 unreadable, 7 readable oddities, 5 plain JPEGs. {name: expected RGB}."""
    folder = root / "train" / "things"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / f"plain{i}.jpg")
    readable = {"cmyk.jpg": (255, 0, 0), "rgba.png": (0, 255, 0), "gray16.png": (255, 255, 255),
                "palette.png": (0, 0, 255), "gray.png": (90, 90, 90), "tiny_3x3.png": (200, 100, 50),
                "wide_1000x10.png": (10, 200, 10)}
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (20, 20), (0, 255, 0, 100)).save(folder / "rgba.png")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(folder / "gray16.png")  # mode I;16
    Image.new("RGB", (20, 20), (0, 0, 255)).convert("P").save(folder / "palette.png")
    Image.new("L", (20, 20), 90).save(folder / "gray.png")
    Image.new("RGB", (3, 3), (200, 100, 50)).save(folder / "tiny_3x3.png")  # smaller than any crop
    Image.new("RGB", (1000, 10), (10, 200, 10)).save(folder / "wide_1000x10.png")
    jpeg = (folder / "plain0.jpg").read_bytes()
    unreadable = {"empty.jpg": b"", "truncated.jpg": jpeg[:len(jpeg) // 2],
                  "corrupt.jpg": jpeg[:20] + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
                  "text.jpg": b"this is not an image\n"}
    for name, content in unreadable.items():
        (folder / name).write_bytes(content)
    return folder, readable, sorted(unreadable)


def test_unreadable_images_are_skipped_and_counted_and_odd_ones_are_used(tmp_path, capsys):
    folder, readable, unreadable = make_image_folder(tmp_path / "zoo")
    for name, rgb in readable.items():  # converted to uint8 RGB, with the right colour
        image = data.read_image(str(folder / name))
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert (image.float().mean(dim=(1, 2)) - torch.tensor(rgb)).abs().max() < 3, name
    for name in unreadable:
        with pytest.raises(OSError, match=name):
            data.read_image(str(folder / name))
    flags = TINY + ["--data_path", str(tmp_path / "zoo"), "--batch_size_per_gpu", "4"]  # 4 steps: all 16 files
    train.main(flags + ["--max_bad_fraction", "0.5", "--output_dir", str(tmp_path / "out")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "skipped an unreadable image" in line]
    assert sorted(Path(line.split("cannot read image ")[1].split(" (")[0]).name for line in warnings) == unreadable
    assert read_log(tmp_path / "out")[0]["skipped_images"] == len(unreadable)
    with pytest.raises(ConfigError, match="unreadable images so far in this epoch, more than --max_bad_fraction "
                                                "0.1 of its 16 images"):
        train.main(flags + ["--max_bad_fraction", "0.1", "--output_dir", str(tmp_path / "out2")])


# --- 8. bad environment ----------------------------------------------------------------------------------
def test_a_full_disk_fails_at_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, straight):
    shutil.copy(straight / "checkpoint.pth", tmp_path / "checkpoint.pth")  # epoch 2 of RESUME
    before = (tmp_path / "checkpoint.pth").read_bytes()

    def disk_full(obj, f):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ConfigError, match="could not write the checkpoint .*No space left on device"):
        train.main(RESUME + ["--epochs", "3", "--output_dir", str(tmp_path)])
    assert (tmp_path / "checkpoint.pth").read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_an_output_dir_that_cannot_be_written_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="cannot write to --output_dir"):
        train.main(TINY + ["--output_dir", str(tmp_path / "a_file" / "out")])


def test_resuming_another_model_lists_every_difference():
    args = train.parse_args(TINY + ["--out_dim", "128", "--depth", "2", "--batch_size_per_gpu", "8"])
    saved = vars(train.parse_args(TINY))
    with pytest.raises(ConfigError) as error:
        checkpoint.check_resumable({"args": saved, "epoch": 1, "iteration": 0}, args, world_size=1)
    assert "depth: checkpoint 1, now 2; out_dim: checkpoint 64, now 128)" in str(error.value)
    with pytest.raises(ConfigError) as error:  # inside an epoch the batch counts too
        checkpoint.check_resumable({"args": saved, "epoch": 1, "iteration": 2, "world_size": 2}, args, world_size=1)
    assert ("depth: checkpoint 1, now 2; out_dim: checkpoint 64, now 128; batch_size_per_gpu: checkpoint 16, "
            "now 8; world_size: checkpoint 2, now 1)") in str(error.value)
