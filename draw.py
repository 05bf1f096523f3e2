"""Pictures a person can read without the README: labelled image grids and line charts, drawn with PIL.

    labelled_grid(rows, col_titles, row_titles, caption)   a grid of uint8 (3, H, W) images with titles
    draw_panel(...)                                        axes, ticks and curves (collapse_study.py's figure)
    training_curves(rows, out_dim, path)                   a run's curves.png, drawn by train.py after each epoch

    python draw.py output/log.txt                          redraw curves.png from any run's log.txt

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
def read_log(path):
    """The rows of a train.py log.txt (one JSON object per epoch; epoch -1: the k-NN before training)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.endswith("}")]
    if not rows:
        raise ValueError(f"{path} holds no log row yet")
    return rows


def training_curves(rows, out_dim, path, title="", size=(1050, 620)):
    """curves.png: loss, teacher entropy against ln K, KL(P_t || P_s), k-NN top-1 and lr against epochs (a point
    at the end of each epoch; the k-NN before training at 0). Sec. 5.3: a healthy run keeps the entropy between 0
    and ln K and the KL above 0."""
    epochs = [r for r in rows if r["epoch"] >= 0]
    at = lambda rs, key: {"run": {"steps": [r["epoch"] + 1 for r in rs], key: [r[key] for r in rs]}}
    knn = [dict(r, epoch=r["epoch"]) for r in rows if "knn_top1" in r]
    ln_k = math.log(out_dim)
    image = Image.new("RGB", size, "white")
    draw, f = ImageDraw.Draw(image), load_font(13)
    w, h = size[0] // 3, (size[1] - 40) // 2
    box = lambda col, row: (col * w + 60, 40 + row * h + 20, (col + 1) * w - 20, 40 + (row + 1) * h - 46)
    high = lambda values: max(1.1 * max(values), 1e-9)
    panels = [("training loss", "train_loss", None), ("teacher entropy H(P_t)", "teacher_entropy",
                                                       (ln_k, f"ln K = {ln_k:.2f}")),
              ("KL(P_t || P_s) = loss - entropy", "kl_teacher_student", None), ("lr", "train_lr", None)]
    for i, (name, key, hline) in enumerate(panels):
        if epochs:
            top = max(high([r[key] for r in epochs]), 1.1 * ln_k if hline else 0)
            draw_panel(draw, box(i % 3 if i < 3 else 1, i // 3), name, at(epochs, key), key, top, f, hline, "epochs")
    if knn:
        draw_panel(draw, box(0, 1), "k-NN top-1 (%)", at(knn, "knn_top1"), "knn_top1", 100, f, x_label="epochs")
    last = epochs[-1] if epochs else {}
    notes = [title, f"{len(epochs)} epochs logged"] + ([f"last loss {last['train_loss']:.4f}",
             f"entropy {last['teacher_entropy']:.3f} of ln K {ln_k:.2f}"] if last else []) + (
             [f"k-NN top-1 {knn[0]['knn_top1']:.2f}% -> {knn[-1]['knn_top1']:.2f}%"] if knn else [])
    for j, line in enumerate(filter(None, notes)):
        draw.text((2 * w + 40, 40 + h + 30 + 20 * j), line, fill="black", font=f)
    draw.text((size[0] / 2, 8), "DINO training curves" + (f": {title}" if title else ""), fill="black", font=f,
              anchor="mt")
    return save(image, path)


def main(argv=None):
    p = cli.ArgumentParser(description="Draw curves.png of a train.py run from its log.txt (resumed runs included)")
    p.add_argument("log", nargs="?", type=cli.existing_file, default="output/log.txt", help="a train.py log.txt")
    p.add_argument("--out_dim", type=cli.positive_int, default=None, help="K of the run, for ln K (default: the "
                   "checkpoint.pth beside the log)")
    p.add_argument("--output", default=None, help="the PNG (default: curves.png beside the log)")
    args = p.parse_args(argv)
    folder = Path(args.log).parent
    if args.out_dim is None:
        if not (folder / "checkpoint.pth").is_file():
            raise cli.ConfigError(f"no checkpoint.pth beside {args.log} to read out_dim from: give --out_dim")
        args.out_dim = checkpoint.load_state_dict(folder / "checkpoint.pth")["args"]["out_dim"]
    try:
        rows = read_log(args.log)
    except (ValueError, KeyError) as e:
        raise cli.ConfigError(f"{args.log} is not a train.py log ({e})") from None
    print(training_curves(rows, args.out_dim, args.output or folder / "curves.png", str(folder)))


if __name__ == "__main__":  # python draw.py output/log.txt: redraw a run's curves
    cli.run_cli(main)
