"""Why DINO does not collapse: centering and sharpening, alone and together (paper Sec. 5.3, Fig. 7).

The teacher's targets are P_t = softmax((g_t(x) - c) / tau_t). Centering (subtracting c, an EMA of the batch mean)
keeps one dimension from dominating but pushes the output towards uniform; sharpening (tau_t below the student's
tau_s = 0.1) does the opposite. The paper trains with each one alone and shows, in Fig. 7, the entropy of P_t and
the KL between teacher and student over training: with centering alone the entropy goes to ln K and the KL to 0
(uniform output), with sharpening alone the entropy goes to 0 (one dimension), and only both together keep the
entropy in between and a KL above 0, that is, a teacher that still has something to teach.

This script runs train.py three times, identical but for the two switches, and reads each run's log.txt:
    both             the default: --center_momentum 0.9, the preset's sharp teacher temperature
    sharpening only  --center_momentum 1 (the center stays 0)
    centering only   --warmup_teacher_temp 0.1 --teacher_temp 0.1 (the teacher at the student's temperature)
It writes --output_dir/<setting>/ (train.py's files), results.json, and a two-panel figure (teacher entropy and
KL against steps, one curve per setting, ln K dashed), and prints the final figures and the k-NN top-1 of each
run before and after training. With --subset the k-NN classifies the subset's test images against the subset's
training images.

    python collapse_study.py                # Fashion-MNIST preset, 2048 images, 512 steps each: ~7 min on 2 CPU cores
    python collapse_study.py --subset 4096 --epochs 20 --lr 0.008   # other flags go to train.py as they are

Each log row holds the means over an epoch's steps; a curve's point sits at the step that ends its epoch.
"""
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

import checkpoint
import cli
from draw import COLORS, draw_panel, load_font, read_rows

ROOT = Path(__file__).resolve().parent
SETTINGS = {  # name: (legend, train.py flags)
    "both": ("centering + sharpening (DINO)", []),
    "sharpening_only": ("sharpening only (no centering)", ["--center_momentum", "1"]),
    "centering_only": ("centering only (no sharpening)", ["--warmup_teacher_temp", "0.1", "--teacher_temp", "0.1"]),
}


def get_args(argv=None):
    p = cli.ArgumentParser(description="The centering / sharpening study of the DINO paper (Sec. 5.3, Fig. 7): "
                           "train.py with each mechanism off and with both on. Unknown flags go to train.py.")
    p.add_argument("--data_path", default="fashion_mnist", help="train.py's --data_path (its preset applies)")
    p.add_argument("--subset", type=cli.positive_int, default=2048, help="train on the first N images (and the "
                   "k-NN on the first N of each split)")
    p.add_argument("--epochs", type=cli.positive_int, default=8, help="epochs per setting: one curve point each")
    p.add_argument("--warmup_epochs", type=cli.nonneg_float, default=1, help="train.py's lr warm-up")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help="which to run")
    p.add_argument("--output_dir", default="collapse_study", help="one train.py output folder per setting "
                   "(emptied first), results.json and the figure")
    p.add_argument("--figure", default=None, help="where to write the PNG (default: OUTPUT_DIR/collapse_fig7.png)")
    p.add_argument("--plot_only", action="store_true", help="train nothing: redraw from the logs in OUTPUT_DIR")
    return p.parse_known_args(argv)


def run_setting(args, flags, out):
    """Train one setting in a fresh folder with train.py, as a subprocess (a script never imports another)."""
    shutil.rmtree(out, ignore_errors=True)  # train.py would otherwise resume an old run
    command = [sys.executable, "train.py", "--data_path", args.data_path, "--subset", str(args.subset),
               "--epochs", str(args.epochs), "--warmup_epochs", str(args.warmup_epochs),
               "--knn_every", str(args.epochs), "--saveckp_freq", "0", "--output_dir", str(out), *flags]
    print(" ".join(command[1:]), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode:
        raise cli.ConfigError(f"train.py failed for {out.name} (its message is above)")


def read_run(out):
    """A finished run's log rows and the args train.py ran with."""
    if not (out / "log.txt").is_file():
        raise cli.ConfigError(f"no {out / 'log.txt'}: run without --plot_only first")
    return read_rows(out / "log.txt"), checkpoint.load_state_dict(out / "checkpoint.pth")["args"]


def summarize(rows, train_args):
    """The curves of a run (x = steps done at the end of each epoch) and its final figures."""
    steps_per_epoch = train_args["subset"] // train_args["batch_size_per_gpu"]  # the loader drops the last batch
    epochs = [r for r in rows if r["epoch"] >= 0]
    knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
    return {"steps": [(r["epoch"] + 1) * steps_per_epoch for r in epochs],
            "teacher_entropy": [r["teacher_entropy"] for r in epochs],
            "kl_teacher_student": [r["kl_teacher_student"] for r in epochs],
            "final_teacher_entropy": epochs[-1]["teacher_entropy"], "final_kl": epochs[-1]["kl_teacher_student"],
            "ln_k": math.log(train_args["out_dim"]),
            "knn_before": knn[0] if len(knn) > 1 else None, "knn_after": knn[-1] if knn else None,
            "train_time_s": round(sum(r["epoch_time_s"] for r in epochs), 1)}


# --- the figure: PIL only ------------------------------------------------------------------------------------
def plot_curves(curves, ln_k, path, size=(960, 400)):
    """Fig. 7 of the paper: teacher entropy (with ln K dashed) and KL(P_t || P_s) against steps, side by side.
    curves: {legend: {"steps": [...], "teacher_entropy": [...], "kl_teacher_student": [...]}}."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), load_font(13)
    legend_h = 26
    top, bottom, half = 30, height - 44 - legend_h, width // 2
    kl_high = max(max(c["kl_teacher_student"]) for c in curves.values())
    draw_panel(draw, (55, top, half - 15, bottom), "teacher entropy H(P_t)", curves, "teacher_entropy",
               1.1 * ln_k, font, hline=(ln_k, f"ln K = {ln_k:.2f}"))
    draw_panel(draw, (half + 55, top, width - 15, bottom), "KL(P_t || P_s)", curves, "kl_teacher_student",
               max(1.1 * kl_high, 1e-3), font)
    for i, (color, label) in enumerate(zip(COLORS, curves)):  # the legend: one row under the panels
        x, y = 55 + i * (width - 55) // len(curves), height - legend_h
        draw.line([(x, y + 6), (x + 24, y + 6)], fill=color, width=3)
        draw.text((x + 30, y + 6), label, fill="black", font=font, anchor="lm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


# --- the study ------------------------------------------------------------------------------------------------
def print_table(results):
    print(f"\n{'setting':<34} {'entropy':>8} {'/ ln K':>7} {'KL':>7} {'train s':>8}   k-NN top-1 before -> after")
    for name, r in results.items():
        knn = f"{r['knn_before']:.2f} -> {r['knn_after']:.2f}" if r["knn_before"] is not None else "-"
        print(f"{SETTINGS[name][0]:<34} {r['final_teacher_entropy']:8.3f} "
              f"{r['final_teacher_entropy'] / r['ln_k']:7.3f} {r['final_kl']:7.3f} {r['train_time_s']:8.0f}   {knn}")


def main(argv=None):
    args, train_flags = get_args(argv)
    out = Path(args.output_dir)
    checkpoint.check_writable(out)
    results, t0 = {}, time.time()
    for name in args.settings:
        start = time.time()
        if not args.plot_only:
            run_setting(args, train_flags + SETTINGS[name][1], out / name)
        results[name] = summarize(*read_run(out / name))
        if not args.plot_only:  # train.py's start-up and k-NN included
            results[name]["wall_time_s"] = round(time.time() - start, 1)
    figure = args.figure or out / "collapse_fig7.png"
    plot_curves({SETTINGS[name][0]: r for name, r in results.items()}, next(iter(results.values()))["ln_k"], figure)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"\n{len(results)} settings, {time.time() - t0:.0f} s; figure: {figure}, figures: {out / 'results.json'}")


if __name__ == "__main__":
    cli.run_cli(main)
