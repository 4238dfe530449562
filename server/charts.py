"""Small PNG charts drawn with Pillow: the plots every run folder and report carries.

Every finished run writes ``progress.png`` and embeds bar charts in ``report.html``.
Drawing them with matplotlib cost about 0.4 s per run (import, tight layout, Agg
rendering), more than the whole training of the default heart federation, so the
per-run charts are drawn here directly: a few panels of lines, shaded bands or bars, with
nice ticks, a grid and a legend, in a few milliseconds. Research plots that compare
runs (``fedcare simulate compare``/``sweep``) still use matplotlib.
"""

from __future__ import annotations

import importlib.util
import io
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageColor, ImageDraw, ImageFont

#: matplotlib's "tab10" colours, so the charts read like the rest of the field's plots.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class Line:
    label: str
    points: Sequence[tuple[float, float]]
    color: str | None = None
    width: int = 2


@dataclass
class Band:
    """A shaded region between ``low`` and ``high`` with its median drawn as a line."""

    label: str
    xs: Sequence[float]
    low: Sequence[float]
    mid: Sequence[float]
    high: Sequence[float]


@dataclass
class Panel:
    title: str
    xlabel: str = ""
    ylabel: str = ""
    lines: list[Line] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    bars: list[tuple[str, float]] = field(default_factory=list)
    bar_color: str = "#3b7dd8"
    ylim: tuple[float, float] | None = None
    note: str = ""  # shown in the middle when there is nothing to draw

    def empty(self) -> bool:
        return not (any(ln.points for ln in self.lines) or self.bands or self.bars)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib, has Greek for ε), else Pillow's own font."""
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        ttf = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if ttf.exists():
            return ImageFont.truetype(str(ttf), size)
    return ImageFont.load_default(size=size)


def nice_ticks(lo: float, hi: float, target: int = 6, integer: bool = False) -> list[float]:
    """Round tick positions covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (1.0 if integer or lo == 0 else abs(lo) * 0.1)
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _label(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


class _Canvas:
    """One panel's plotting area: data coordinates to pixels."""

    def __init__(self, box: tuple[int, int, int, int], xr: tuple[float, float], yr: tuple[float, float]):
        self.box, self.xr, self.yr = box, xr, yr

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        fx = (x - self.xr[0]) / ((self.xr[1] - self.xr[0]) or 1.0)
        fy = (y - self.yr[0]) / ((self.yr[1] - self.yr[0]) or 1.0)
        return left + fx * (right - left), bottom - fy * (bottom - top)


def _ranges(panel: Panel) -> tuple[tuple[float, float], tuple[float, float], list[float], list[float]]:
    xs = [x for ln in panel.lines for x, _ in ln.points] + [x for b in panel.bands for x in b.xs]
    ys = [y for ln in panel.lines for _, y in ln.points] + [y for b in panel.bands for y in (*b.low, *b.high)]
    ys = [y for y in ys if math.isfinite(y)]
    if panel.bars:
        xs = [-0.5, len(panel.bars) - 0.5]
        ys = [0.0] + [v for _, v in panel.bars if math.isfinite(v)]
    xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    ylo, yhi = panel.ylim or ((min(ys), max(ys)) if ys else (0.0, 1.0))
    if yhi <= ylo:
        ylo, yhi = ylo - 0.05 * (abs(ylo) or 1), yhi + 0.05 * (abs(yhi) or 1)
    elif not panel.ylim:
        ylo, yhi = (ylo, yhi * 1.08) if panel.bars else (ylo - 0.05 * (yhi - ylo), yhi + 0.05 * (yhi - ylo))
    yticks = nice_ticks(ylo, yhi)
    if yticks and not panel.ylim:
        # Not a no-op: nice_ticks rounds ticks to 12 decimals, which on a range below
        # about 1e-11 can put the end ticks outside [ylo, yhi]; widen to keep them in the box.
        ylo, yhi = min(ylo, yticks[0]), max(yhi, yticks[-1])
    xticks = [] if panel.bars else nice_ticks(xlo, xhi, integer=True)
    pad = 0.04 * ((xhi - xlo) or 1.0) if not panel.bars else 0.0
    return (xlo - pad, xhi + pad), (ylo, yhi), xticks, yticks


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def _rotated_text(text: str, font, angle: float) -> Image.Image:
    """``text`` in black on a transparent image, turned ``angle`` degrees anticlockwise."""
    w, h = _text_size(ImageDraw.Draw(Image.new("RGBA", (1, 1))), text, font)
    label = Image.new("RGBA", (w + 4, h + 6), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2, 0), text, fill="black", font=font)
    return label.rotate(angle, expand=True)


def _draw_panel(img: Image.Image, panel: Panel, box: tuple[int, int, int, int]) -> None:
    draw = ImageDraw.Draw(img, "RGBA")
    small, normal, title = _font(11), _font(12), _font(14)
    left, top, right, bottom = box
    tw, _ = _text_size(draw, panel.title, title)
    draw.text(((left + right - tw) / 2, top - 26), panel.title, fill="black", font=title)
    xr, yr, xticks, yticks = _ranges(panel)
    cv = _Canvas(box, xr, yr)
    for t in yticks:
        _, y = cv.px(xr[0], t)
        draw.line([(left, y), (right, y)], fill=(0, 0, 0, 30))
        w, h = _text_size(draw, _label(t), small)
        draw.text((left - w - 6, y - h / 2 - 2), _label(t), fill="black", font=small)
    for t in xticks:
        x, _ = cv.px(t, yr[0])
        draw.line([(x, top), (x, bottom)], fill=(0, 0, 0, 30))
        w, _ = _text_size(draw, _label(t), small)
        draw.text((x - w / 2, bottom + 5), _label(t), fill="black", font=small)
    draw.rectangle(box, outline="black")
    if panel.xlabel:
        w, _ = _text_size(draw, panel.xlabel, normal)
        draw.text(((left + right - w) / 2, bottom + 22), panel.xlabel, fill="black", font=normal)
    if panel.ylabel:
        label = _rotated_text(panel.ylabel, normal, 90)
        img.paste(label, (left - 58, int((top + bottom - label.height) / 2)), label)
    if panel.empty():
        if panel.note:
            w, h = _text_size(draw, panel.note, normal)
            draw.text(((left + right - w) / 2, (top + bottom - h) / 2), panel.note, fill="black", font=normal)
        return
    legend: list[tuple[str, str, int]] = []
    for i, band in enumerate(panel.bands):
        color = PALETTE[i % len(PALETTE)]
        poly = [cv.px(x, y) for x, y in zip(band.xs, band.high)]
        poly += [cv.px(x, y) for x, y in reversed(list(zip(band.xs, band.low)))]
        rgb = ImageColor.getrgb(color)
        if len(poly) >= 3:
            draw.polygon(poly, fill=(*rgb, 64))
        _polyline(draw, [cv.px(x, y) for x, y in zip(band.xs, band.mid)], color, 2)
        legend.append((band.label, color, 2))
    for i, line in enumerate(panel.lines):
        color = line.color or PALETTE[(i + len(panel.bands)) % len(PALETTE)]
        _polyline(draw, [cv.px(x, y) for x, y in line.points if math.isfinite(y)], color, line.width)
        legend.append((line.label, color, line.width))
    if panel.bars:
        _draw_bars(img, draw, cv, panel)
    if legend:
        _legend(draw, legend, (left + 8, top + 8))


def _polyline(draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], color: str, width: int) -> None:
    if len(pts) > 1:
        draw.line(pts, fill=color, width=width, joint="curve")
    for x, y in pts:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)


def _draw_bars(img: Image.Image, draw: ImageDraw.ImageDraw, cv: _Canvas, panel: Panel) -> None:
    small = _font(11)
    _, base = cv.px(0, max(cv.yr[0], 0.0))
    for i, (name, value) in enumerate(panel.bars):
        x0, _ = cv.px(i - 0.35, 0)
        x1, _ = cv.px(i + 0.35, 0)
        if math.isfinite(value):
            _, y = cv.px(i, value)
            draw.rectangle([x0, min(y, base), x1, max(y, base)], fill=panel.bar_color)
        label = _rotated_text(name, small, 30)
        img.paste(label, (int((x0 + x1) / 2 - label.width), int(cv.box[3] + 4)), label)


def _legend(draw: ImageDraw.ImageDraw, items: list[tuple[str, str, int]], at: tuple[int, int]) -> None:
    font = _font(11)
    x, y = at
    width = max(_text_size(draw, label, font)[0] for label, _, _ in items) + 34
    draw.rectangle([x, y, x + width, y + 16 * len(items) + 6], fill=(255, 255, 255, 220), outline=(0, 0, 0, 60))
    for k, (label, color, lw) in enumerate(items):
        yy = y + 11 + 16 * k
        draw.line([(x + 6, yy), (x + 24, yy)], fill=color, width=lw)
        draw.text((x + 29, yy - 8), label, fill="black", font=font)


def render(panels: Sequence[Panel], size: tuple[int, int] = (1210, 460)) -> Image.Image:
    """Panels side by side on one white image."""
    width, height = size
    img = Image.new("RGB", size, "white")
    slot = width // max(len(panels), 1)
    bottom_margin = 110 if any(p.bars for p in panels) else 62
    for i, panel in enumerate(panels):
        box = (i * slot + 78, 40, (i + 1) * slot - 18, height - bottom_margin)
        _draw_panel(img, panel, box)
    return img


def png_bytes(panels: Sequence[Panel], size: tuple[int, int] = (1210, 460)) -> bytes:
    buf = io.BytesIO()
    render(panels, size).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def save_png(panels: Sequence[Panel], path: Path, size: tuple[int, int] = (1210, 460)) -> Path:
    path.write_bytes(png_bytes(panels, size))
    return path
