"""Pictures a person can read without the README: labelled image grids and line charts, drawn with PIL.

    labelled_grid(rows, col_titles, row_titles, caption)   a grid of uint8 (3, H, W) images with titles
    draw_panel(...)                                        axes, ticks and curves (collapse_study.py's figure)
    read_rows(path)                                        the JSON rows of a run's log.txt or steps.txt
    training_curves(output_dir, out_dim)                   a run's curves.png, drawn by train.py after each epoch

    python draw.py output                                  redraw curves.png of any run from its logs

PIL comes with torchvision; nothing else is needed.
"""
import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import checkpoint
import cli

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def load_font(size=13):
    return ImageFont.load_default(size=size)


def to_pil(image):
    """uint8 (3, H, W) tensor -> PIL RGB image."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())


def labelled_grid(rows, col_titles=None, row_titles=None, caption=None, pad=2, size=13):
    """One PIL image: rows[r][c] (uint8 (3, H, W) tensors, all of one size) in a grid on white, a title above each
    column, a title left of each row and a caption line under the grid."""
    f = load_font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda s: math.ceil(measure.textlength(s, font=f))
    h, w = rows[0][0].shape[-2:]
    left = max(map(text_w, row_titles)) + 8 if row_titles else 0
    top = size + 8 if col_titles else 0
    ncols = max(len(r) for r in rows)
    grid_w, grid_h = left + ncols * (w + pad) + pad, top + len(rows) * (h + pad) + pad
    lines = wrap(caption, grid_w - 8, text_w) if caption else []
    canvas = Image.new("RGB", (max(grid_w, 8), grid_h + len(lines) * (size + 4) + (6 if lines else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(col_titles or []):
        x = left + pad + c * (w + pad) + w / 2
        draw.text((x, top - 4), fit(title, w + pad, text_w), fill="black", font=f, anchor="md")
    for r, row in enumerate(rows):
        y = top + pad + r * (h + pad)
        if row_titles:
            draw.text((left - 6, y + h / 2), row_titles[r], fill="black", font=f, anchor="rm")
        for c, image in enumerate(row):
            canvas.paste(to_pil(image), (left + pad + c * (w + pad), y))
    for i, line in enumerate(lines):
        draw.text((4, grid_h + 4 + i * (size + 4)), line, fill="black", font=f)
    return canvas


def fit(text, width, text_w):
    """text, cut with '..' when wider than width."""
    while len(text) > 1 and text_w(text) > width:
        text = text[:-3] + ".."
    return text


def wrap(text, width, text_w):
    """The words of text in lines no wider than width."""
    lines = []
    for word in text.split():
        if lines and text_w(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def save(image, path):
    """Write a PIL image (or a uint8 (3, H, W) tensor) as PNG, creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    (to_pil(image) if torch.is_tensor(image) else image).save(path, optimize=True)
    return Path(path)


# --- line charts -------------------------------------------------------------------------------------------------
def nice_ticks(high, n=5):
    """Round tick values 0, s, 2s, ... covering [0, high] with at most about n + 1 ticks (s = 1, 2 or 5 x 10^k)."""
    step = 10 ** math.floor(math.log10(high / n))
    step *= next(m for m in (1, 2, 5, 10) if high / (step * m) <= n)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def draw_panel(draw, box, title, curves, key, y_high, font, hline=None, x_label="training steps"):
    """Axes, ticks and one polyline per curve inside box = (left, top, right, bottom) of the plotting area.
    curves: {legend: {"steps": [...], key: [...]}}; hline: (value, label) drawn dashed."""
    left, top, right, bottom = box
    x_high = max(max(max(c["steps"]) for c in curves.values()), 1)
    x_ticks = [s for s in nice_ticks(x_high) if s <= x_high]  # the x axis ends at the last step
    y_ticks = nice_ticks(y_high)
    y_high = y_ticks[-1]
    to_xy = lambda s, v: (left + (right - left) * s / x_high, bottom - (bottom - top) * min(v, y_high) / y_high)
    for s in x_ticks:
        x = to_xy(s, 0)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), f"{s:g}", fill="black", font=font, anchor="mt")
    for v in y_ticks:
        y = to_xy(0, v)[1]
        draw.line([(left - 4, y), (right, y)], fill=(225, 225, 225))
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left - 6, y), f"{v:g}", fill="black", font=font, anchor="rm")
    draw.rectangle(box, outline="black")
    draw.text(((left + right) / 2, top - 8), title, fill="black", font=font, anchor="md")
    draw.text(((left + right) / 2, bottom + 22), x_label, fill="black", font=font, anchor="mt")
    if hline is not None:  # a dashed horizontal line with its label
        value, label = hline
        y = to_xy(0, value)[1]
        for x in range(left, right, 10):
            draw.line([(x, y), (min(x + 5, right), y)], fill="black")
        draw.text((right - 4, y - 3), label, fill="black", font=font, anchor="rd")
    for color, c in zip(COLORS, curves.values()):
        points = [to_xy(s, v) for s, v in zip(c["steps"], c[key]) if v is not None]
        draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)


# --- a training run's curves ---------------------------------------------------------------------------------
def read_rows(path):
    """The JSON rows of a train.py log.txt (one per epoch; epoch -1: the k-NN before training) or steps.txt (one per
    --log_every optimizer steps); [] when the file is not there. A last row cut by a kill (no closing "}") is left
    out; any other unreadable row is an error."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    if lines and not lines[-1].endswith("}"):
        lines.pop()  # the row being written when the run was killed
    return [json.loads(line) for line in lines]


def training_curves(out, out_dim, path=None, size=(1050, 620)):
    """out/curves.png of a train.py output folder: loss, teacher entropy against ln K, KL(P_t || P_s) and lr over
    optimizer steps (steps.txt: a point per --log_every steps; else log.txt's epoch means), the k-NN top-1 at the
    end of the epochs where it was measured (0: before training). Sec. 5.3: a healthy run keeps the entropy
    between 0 and ln K and the KL above 0."""
    out = Path(out)
    epochs = read_rows(out / "log.txt")
    steps = read_rows(out / "steps.txt") or [r for r in epochs if r["epoch"] >= 0]
    if not epochs and not steps:
        raise ValueError(f"{out} holds no log.txt rows yet")
    at = lambda rows, key: {"run": {"steps": [r["step"] if "step" in r else r["epoch"] + 1 for r in rows if key in r],
                                    key: [r[key] for r in rows if key in r]}}
    knn = [r for r in epochs if "knn_top1" in r]
    ln_k = math.log(out_dim)
    image = Image.new("RGB", size, "white")
    draw, f = ImageDraw.Draw(image), load_font(13)
    w, h = size[0] // 3, (size[1] - 40) // 2
    box = lambda col, row: (col * w + 60, 40 + row * h + 20, (col + 1) * w - 20, 40 + (row + 1) * h - 46)
    x_label = "optimizer steps" if all("step" in r for r in steps) else "epochs"
    panels = [("training loss", "train_loss", None, (0, 0)), ("lr", "train_lr", None, (1, 1)),
              ("teacher entropy H(P_t)", "teacher_entropy", (ln_k, f"ln K = {ln_k:.2f}"), (1, 0)),
              ("KL(P_t || P_s) = loss - entropy", "kl_teacher_student", None, (2, 0))]
    for name, key, hline, (col, row) in panels:
        values = [r[key] for r in steps if key in r]
        if values:
            top = max(1.1 * max(values), 1.1 * ln_k if hline else 0, 1e-9)
            draw_panel(draw, box(col, row), name, at(steps, key), key, top, f, hline, x_label)
    if knn:
        draw_panel(draw, box(0, 1), "k-NN top-1 (%)", at(knn, "knn_top1"), "knn_top1", 100, f, x_label=x_label)
    last = steps[-1] if steps else {}
    done = [r for r in epochs if r["epoch"] >= 0]
    first = steps[-2].get("step", 0) + 1 if len(steps) > 1 else 1  # the last point: the mean of steps first..last
    span = f" (steps {first}-{last['step']})" if "step" in last else ""
    notes = [str(out), f"epochs done: {len(done)}"] + ([f"last point: loss {last['train_loss']:.4f}{span}",
             f"entropy {last['teacher_entropy']:.3f} of ln K {ln_k:.2f}"] if last else []) + (
             [f"epoch {done[-1]['epoch']} mean: loss {done[-1]['train_loss']:.4f} (as printed)"] if done else []) + (
             [f"k-NN top-1 {knn[0]['knn_top1']:.2f}% -> {knn[-1]['knn_top1']:.2f}%"] if knn else [])
    for j, line in enumerate(notes):
        draw.text((2 * w + 40, 40 + h + 30 + 20 * j), line, fill="black", font=f)
    draw.text((size[0] / 2, 8), f"DINO training curves: {out}", fill="black", font=f, anchor="mt")
    return save(image, path or out / "curves.png")


def main(argv=None):
    p = cli.ArgumentParser(description="Draw curves.png of a train.py run from its log.txt and steps.txt (resumed "
                           "runs included)")
    p.add_argument("output_dir", nargs="?", type=cli.existing_dir, default="output", help="a train.py --output_dir")
    p.add_argument("--out_dim", type=cli.positive_int, default=None, help="K of the run, for ln K (default: the "
                   "checkpoint.pth in the folder)")
    p.add_argument("--output", default=None, help="the PNG (default: curves.png in the folder)")
    args = p.parse_args(argv)
    folder = Path(args.output_dir)
    if args.out_dim is None:
        if not (folder / "checkpoint.pth").is_file():
            raise cli.ConfigError(f"no checkpoint.pth in {folder} to read out_dim from: give --out_dim")
        args.out_dim = checkpoint.load_state_dict(folder / "checkpoint.pth")["args"]["out_dim"]
    try:
        print(training_curves(folder, args.out_dim, args.output))
    except (ValueError, KeyError) as e:
        raise cli.ConfigError(f"{folder} holds no train.py log ({e})") from None


if __name__ == "__main__":  # python draw.py OUTPUT_DIR: redraw a run's curves
    cli.run_cli(main)
