"""A PNG chart drawn with Pillow: accuracy per group with the image-blind controls (bars), and the
inference-time scaling curves of group "all" (maj@N and pass@N against N)."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw, ImageFont

COLORS = {"standard": (47, 111, 176), "blank": (200, 200, 200), "shuffled": (237, 160, 60)}
LINE_COLORS = [(47, 111, 176), (209, 73, 59), (84, 160, 84), (140, 90, 170), (120, 120, 120)]
W, H, M = 520, 320, 44  # panel width, height, margin


def _axes(draw: ImageDraw.ImageDraw, x0: int, title: str, font) -> tuple[int, int, int, int]:
    left, top, right, bottom = x0 + M, M, x0 + W - 12, H - M
    draw.text((x0 + M, 12), title, fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for tick in range(0, 101, 25):
        y = bottom - (bottom - top) * tick / 100
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((x0 + 8, y - 6), f"{tick}%", fill="black", font=font)
    return left, top, right, bottom


def _bars(draw, x0: int, all_results: dict[str, dict], font, max_groups: int = 10) -> None:
    left, top, right, bottom = _axes(draw, x0, "accuracy per group: standard / blank / shuffled", font)
    clusters = []  # (label, [(condition, accuracy)])
    for model, results in all_results.items():
        standard = results["conditions"].get("standard", {})
        # "all", then the groups that have blind controls (the image questions), then the rest
        names = sorted(standard, key=lambda g: (g != "all", g not in results.get("blind", {}), g))[:max_groups]
        for group in names:
            label = group.split("/")[-1]
            label = f"{model}:{label}" if len(all_results) > 1 else label
            bars = [("standard", standard[group]["accuracy"])]
            bars += [(c, b["accuracy"]) for c, b in results.get("blind", {}).get(group, {}).items()]
            clusters.append((label, bars))
    if not clusters:
        return
    slots = sum(len(b) for _, b in clusters) + len(clusters)  # one empty slot between clusters
    width = max(3, (right - left - 8) // slots)
    x = left + 4
    for n, (label, bars) in enumerate(clusters):
        start = x
        for condition, accuracy in bars:
            y = bottom - (bottom - top) * accuracy
            draw.rectangle([x, y, x + width - 2, bottom], fill=COLORS[condition])
            x += width
        chars = max(3, (x - start + width) // 6)
        draw.text((start, bottom + 4 + 12 * (n % 2)), label[:chars], fill="black", font=font)
        x += width
    for j, (condition, color) in enumerate(COLORS.items()):  # legend on the title line
        lx = right - 210 + 70 * j
        draw.rectangle([lx, 26, lx + 10, 36], fill=color)
        draw.text((lx + 14, 25), condition, fill="black", font=font)


def _curves(draw, x0: int, all_results: dict[str, dict], font) -> None:
    left, top, right, bottom = _axes(draw, x0, "scaling (group all): maj@N solid, pass@N thin", font)
    curves = [(m, r["conditions"]["standard"]["all"].get("scaling", {})) for m, r in all_results.items()
              if "all" in r["conditions"].get("standard", {})]
    ks = sorted({int(k) for _, c in curves for k in c})
    if len(ks) < 2:
        draw.text((left + 10, top + 20), "one sample per item: no curve", fill="black", font=font)
        return
    def xy(k, v):
        return left + (right - left - 20) * ks.index(k) / (len(ks) - 1) + 10, bottom - (bottom - top) * v
    for k in ks:
        x, _ = xy(k, 0)
        draw.text((x - 4, bottom + 4), str(k), fill="black", font=font)
    for i, (model, curve) in enumerate(curves):
        color = LINE_COLORS[i % len(LINE_COLORS)]
        for key, width in (("maj", 3), ("pass", 1)):
            points = [xy(int(k), curve[k][key]) for k in sorted(curve, key=int)]
            draw.line(points, fill=color, width=width)
        draw.text((right - 120, 26 + 14 * i), model[:18], fill=color, font=font)


def draw_chart(all_results: dict[str, dict], path: str) -> None:
    """Writes the two-panel chart to `path` (PNG)."""
    image = Image.new("RGB", (2 * W, H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _bars(draw, 0, all_results, font)
    _curves(draw, W, all_results, font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
