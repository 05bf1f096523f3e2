"""Pictures a person can read without the README: labelled image grids and line charts, drawn with PIL.

    labelled_grid(rows, col_titles, row_titles, caption)   a grid of uint8 (3, H, W) images with titles
    line_chart(...) / plot_panels(...)                     axes, ticks and curves (collapse_study.py, curves.png)

PIL comes with torchvision; nothing else is needed.
"""
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

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
    x_high = max(max(c["steps"]) for c in curves.values())
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


def plot_curves(curves, ln_k, path, size=(960, 400)):
    """Fig. 7 of the paper: teacher entropy (with ln K dashed) and KL(P_t || P_s) against steps, side by side.
    curves: {legend: {"steps": [...], "teacher_entropy": [...], "kl_teacher_student": [...]}}."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=13)
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
