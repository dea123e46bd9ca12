"""Human-readable PNG overlays of one slice: class masks, grounded boxes with their keywords, a legend.

For looking at the data, not for the model: CT is shown in the soft-tissue window, MR
min-max scaled; masks are drawn translucent in a stable colour per class id; every
grounded box is labelled "keyword: display name". The picture is upscaled (nearest) by
``scale`` before the boxes and text are drawn, so text stays sharp on 256-px slices.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from radground.imaging import CT_WINDOWS, normalize_mr, window
from radground.lexicon import display_name
from radground.masks import decode_rle
from radground.schemas import GroundingRecord, MaskRecord

MASK_ALPHA = 0.45  # share of the class colour in a masked pixel
_GOLDEN = 0.6180339887498949


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A stable, well-spread RGB colour per class id: golden-ratio hue steps, three brightness levels.

    Hue alone repeats closely among 121 ids (heart 51 and right lung 119 differ by 0.02 in hue);
    the brightness level (id mod 3) keeps such neighbours apart.
    """
    hue = (class_id * _GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, (1.0, 0.8, 0.6)[class_id % 3])
    return round(r * 255), round(g * 255), round(b * 255)


def grey(pixels: np.ndarray, modality: str) -> np.ndarray:
    """(H, W) values -> (H, W) uint8: CT soft-tissue window, MR per-image min-max."""
    if modality == "CT":
        unit = window(pixels, *CT_WINDOWS["soft_tissue"])  # [-1, 1]
    elif modality == "MR":
        unit = normalize_mr(pixels)[0]
    else:
        raise ValueError(f"modality {modality!r}: expected CT or MR")
    return np.round((unit + 1.0) * 127.5).astype(np.uint8)


def _check_grid(shape: tuple[int, int], records: Sequence[MaskRecord | GroundingRecord]) -> None:
    ids = {r.image_id for r in records}
    if len(ids) > 1:
        raise ValueError(f"an overlay shows one slice; got records of {len(ids)} images ({sorted(ids)[:3]} …)")
    for r in records:
        if (r.rows, r.cols) != shape:
            raise ValueError(f"image {r.image_id}, class {r.class_name}: mask grid {r.rows}x{r.cols} differs from "
                             f"the pixels' {shape[0]}x{shape[1]}; pass the masks of this slice.")


def label_font(scale: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = 10 + 2 * scale  # 14 px on a 256-px slice at scale 2
    try:  # DejaVu has every umlaut; Pillow's bundled default font lacks some ("Wirbelkörper")
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_box(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill: tuple[int, int, int],
              bounds: tuple[int, int], taken: list[tuple[float, float, float, float]]) -> None:
    """Text on a dark backing box, pushed inside the picture and below labels already placed."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x = min(max(0.0, xy[0]), max(0.0, bounds[0] - w))
    y = min(max(0.0, xy[1]), max(0.0, bounds[1] - h))
    for _ in range(len(taken)):  # step past overlapping labels; a few boxes per slice, so this stays cheap
        hit = [t for t in taken if x < t[2] and t[0] < x + w and y < t[3] and t[1] < y + h]
        if not hit:
            break
        y = max(t[3] for t in hit)
        if y + h > bounds[1]:  # no room below: stack upwards from the bottom edge instead
            y = max(0.0, min(t[1] for t in hit) - h)
    taken.append((x, y, x + w, y + h))
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(0, 0, 0, 170))
    draw.text((x + 2 - left, y + 2 - top), text, font=font, fill=fill + (255,))


def render_overlay(pixels: np.ndarray, modality: str, masks: Sequence[MaskRecord],
                   groundings: Sequence[GroundingRecord] = (), language: str = "en", scale: int = 2) -> Image.Image:
    """One slice with its class masks, grounded boxes and a legend, as an RGB image of (H*scale, W*scale)."""
    array = np.asarray(pixels)
    if array.ndim != 2:
        raise ValueError(f"pixels must be one 2D slice (H, W); got shape {array.shape}")
    if scale < 1:
        raise ValueError(f"scale must be a positive integer; got {scale}")
    _check_grid(array.shape, [*masks, *groundings])
    rgb = np.repeat(grey(array, modality)[..., None], 3, axis=2).astype(np.float32)  # (H, W, 3)
    for m in sorted(masks, key=lambda m: m.class_id):  # id order: overlaps look the same every time
        region = decode_rle(m.rle, m.rows, m.cols)
        rgb[region] = (1.0 - MASK_ALPHA) * rgb[region] + MASK_ALPHA * np.asarray(class_colour(m.class_id))
    height, width = array.shape
    size = (width * scale, height * scale)
    base = Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB").resize(size, Image.Resampling.NEAREST)

    layer = Image.new("RGBA", size, (0, 0, 0, 0))  # boxes and text, composited once for translucent backings
    draw = ImageDraw.Draw(layer)
    font = label_font(scale)
    taken: list[tuple[float, float, float, float]] = []  # label rectangles already drawn
    labels: dict[tuple, list[str]] = {}  # one label per box: "Lunge" and "lungs" share the lung's box
    for g in groundings:
        words = labels.setdefault((tuple(g.bbox), g.class_id, g.class_name), [])
        word = f"{g.keyword} (neg.)" if g.negated else g.keyword
        if word not in words:
            words.append(word)
    for (bbox, class_id, class_name), words in sorted(labels.items(), key=lambda item: (item[0][1], item[0][0])):
        colour = class_colour(class_id)
        x1, y1, x2, y2 = (v * scale for v in bbox)
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour + (255,), width=max(1, scale))  # x2/y2 exclusive
        text = f"{' / '.join(words)}: {display_name(class_name, language)}"
        text_h = draw.textbbox((0, 0), text, font=font)[3] + 4
        text_box(draw, (x1, y1 - text_h if y1 >= text_h else y2), text, font, colour, size, taken)

    shown = sorted({m.class_id: m.class_name for m in masks}.items())
    if shown:
        line = draw.textbbox((0, 0), "Ag", font=font)[3] + 4
        swatch = line - 4
        legend_w = max(draw.textlength(display_name(n, language), font=font) for _, n in shown) + swatch + 10
        draw.rectangle([0, 0, legend_w, line * len(shown) + 4], fill=(0, 0, 0, 150))
        for i, (class_id, name) in enumerate(shown):
            y = 2 + i * line
            draw.rectangle([3, y + 2, 3 + swatch, y + 2 + swatch], fill=class_colour(class_id) + (255,))
            draw.text((swatch + 7, y), display_name(name, language), font=font, fill=(255, 255, 255, 255))
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
