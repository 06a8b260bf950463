"""Drawing detections (boxes, masks, labels) on an image with PIL; set-B classes marked.

In Mask^X R-CNN the masks of set-B classes come from the weight transfer function, not
from mask supervision. :func:`draw_detections` marks them with a dashed box, a ``*``
after the class name and a one-line legend, so a picture shows which masks were
transferred.

Detections come from models and files, so the boxes are not trusted: inverted corners are
swapped, boxes are clipped to the image, a box with a NaN/inf coordinate is replaced by its
mask's extent (or not drawn when it has no mask pixels), and a box wholly outside the image is
not drawn. None of these raise.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A fixed qualitative palette (Tableau 10 followed by its lighter/darker companions and a
# few extra hues): neighbours differ strongly in hue, all readable under white text.
PALETTE = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127),
        (0, 92, 230), (255, 187, 0), (0, 168, 132), (230, 0, 115), (102, 51, 204),
        (255, 85, 85), (0, 128, 128), (170, 110, 40), (110, 170, 255), (60, 60, 60),
    ],
    dtype=np.float32,
)
LEGEND = "set B: mask by weight transfer"
Rect = tuple[float, float, float, float]


def _font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled scalable font at ``size`` px (Pillow >= 10.1 with FreeType), else the
    fixed bitmap default; nothing is downloaded."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _class_name(class_names: Sequence[str] | Mapping[int, str] | None, label: int) -> str:
    if class_names is None:
        return str(label)
    try:
        return str(class_names[label])
    except (IndexError, KeyError):
        return str(label)


def _boundary(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of ``mask`` within ``thickness`` px of its edge (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return mask & ~inner


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear upscale of a bool mask then threshold: smooth edges instead of blocks."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((width, height), Image.BILINEAR)) >= 128


def sanitize_boxes(boxes: np.ndarray, masks: np.ndarray | None, height: int, width: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes safe to draw on a ``height`` x ``width`` image, and which of them to draw.

    Args:
      boxes: float [N, 4] XYXY, possibly inverted, non-finite or outside the image.
      masks: bool [N, H, W] or None; a box with a non-finite coordinate becomes its mask's extent.

    Returns:
      (float32 [N, 4] with x1 <= x2, y1 <= y2 inside [0, width] x [0, height]; bool [N] drawable).
    """
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    for i in np.flatnonzero(~finite):
        if masks is not None and masks[i].any():
            ys, xs = np.nonzero(masks[i])
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            finite[i] = True
    boxes[~finite] = 0.0
    x1, x2 = np.minimum(boxes[:, 0], boxes[:, 2]), np.maximum(boxes[:, 0], boxes[:, 2])
    y1, y2 = np.minimum(boxes[:, 1], boxes[:, 3]), np.maximum(boxes[:, 1], boxes[:, 3])
    touches = (x2 >= 0) & (x1 <= width) & (y2 >= 0) & (y1 <= height)
    out = np.stack([np.clip(x1, 0, width), np.clip(y1, 0, height), np.clip(x2, 0, width), np.clip(y2, 0, height)], 1)
    return out.astype(np.float32), finite & touches


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Rect, colour, width: int, dash: int) -> None:
    x1, y1, x2, y2 = box
    for a, b, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True), (y1, y2, x1, False), (y1, y2, x2, False)):
        start = a
        while start < b:
            end = min(start + dash, b)
            if horizontal:
                draw.line([(start, fixed), (end, fixed)], fill=colour, width=width)
            else:
                draw.line([(fixed, start), (fixed, end)], fill=colour, width=width)
            start += 2 * dash


def _asterisk(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, fill, width: int) -> None:
    """A six-spoke asterisk drawn with lines: the bundled font's ``*`` is a small raised dot at label size."""
    for angle in (90.0, 30.0, 150.0):
        dx, dy = radius * np.cos(np.radians(angle)), radius * np.sin(np.radians(angle))
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=width)


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_label(box: Rect, size: tuple[float, float], placed: list[Rect], out_w: int, out_h: int,
                 max_shift: int = 3) -> Rect:
    """Where a label of ``size`` (w, h) goes: above the box's top-left corner, else just inside it, else
    below the box, else inside its bottom, else up to ``max_shift`` label heights further above or
    below; the first such spot inside the image that no earlier label (or the legend) covers. When
    all are taken, above the box anyway: a label far from its box would name the wrong object."""
    w, h = size
    x1, y1, x2, y2 = box
    x = min(max(x1, 0.0), max(out_w - w, 0.0))

    def at(y: float) -> Rect:
        y = min(max(y, 0.0), max(out_h - h, 0.0))
        return (x, y, x + w, y + h)

    candidates = [at(y1 - h), at(y1), at(y2), at(y2 - h)]
    for k in range(1, max_shift + 1):
        candidates += [at(y1 - (k + 1) * h), at(y2 + k * h)]
    for rect in candidates:
        if not any(_overlaps(rect, p) for p in placed):
            return rect
    return candidates[0]


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever contrasts more with ``colour`` (WCAG 2 relative luminance)."""
    c = np.asarray(colour, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lum = float(linear @ np.array([0.2126, 0.7152, 0.0722]))
    return (0, 0, 0) if (lum + 0.05) / 0.05 > 1.05 / (lum + 0.05) else (255, 255, 255)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    set_b_ids: Iterable[int] = (),
    min_short_side: int = 384,
    max_upscaled_side: int = 2048,
    mask_alpha: float = 0.45,
    legend: bool = True,
) -> np.ndarray:
    """Draws instances on a copy of ``image``.

    Small images are first upscaled (bicubic) so that the short side is at least
    ``min_short_side`` px and text stays legible, but not so far that the long side passes
    ``max_upscaled_side`` (a 4 x 600 strip must not become 384 x 57600); boxes and masks are
    scaled with them, so the output may be larger than the input. Labels (class name, ``*`` for set B, score) sit
    above each box when there is room, else inside it, and never on top of one another.

    Args:
      image: uint8 [H, W, 3] RGB (or [H, W] grayscale) in the original frame.
      boxes: float [N, 4] XYXY in original-image pixels. Inverted, non-finite and outside
        boxes are repaired or skipped (see :func:`sanitize_boxes`), never an error.
      labels: int [N] class labels (indices into ``class_names``).
      scores: float [N] or None (then no score is printed). Instances are drawn from the
        lowest to the highest score, so the best ones end on top; N = 0 is fine.
      masks: bool [N, H, W] binary masks in the original frame (e.g. pasted and
        thresholded), or None for boxes only.
      class_names: sequence or mapping label -> name; missing names print the label.
      set_b_ids: labels (same space as ``labels``) of set-B classes, whose masks are
        predicted by weight transfer: dashed box, ``*`` after the name, and a legend line.
      min_short_side: upscale target for small images (0 disables).
      max_upscaled_side: upscaling stops when the long side reaches this.
      mask_alpha: opacity of the mask fill.
      legend: write "* set B: mask by weight transfer" at the bottom left when a set-B
        instance is drawn.

    Returns:
      uint8 [H', W', 3] with H' = H, W' = W unless upscaled.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3].astype(np.uint8)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    n = labels.shape[0]
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if masks is not None:
        masks = np.asarray(masks).astype(bool)
        if masks.shape != (n,) + image.shape[:2]:
            raise ValueError(f"masks {masks.shape} do not match {n} boxes on a {image.shape[:2]} image")
    set_b = {int(i) for i in set_b_ids}
    height, width = image.shape[:2]
    boxes, drawable = sanitize_boxes(boxes, masks, height, width)

    scale = float(min_short_side) / max(min(height, width), 1) if min_short_side else 1.0
    scale = max(1.0, min(scale, float(max_upscaled_side) / max(height, width)))
    out_h, out_w = int(round(height * scale)), int(round(width * scale))
    if (out_h, out_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BICUBIC))
        boxes = boxes * np.array([out_w / width, out_h / height] * 2, dtype=np.float32)
    short = min(out_h, out_w)
    line_w = max(2, round(short / 220))
    font = _font(max(14, round(short / 30)))
    pad = max(2, line_w)

    # NaN scores sort first (drawn underneath); ties keep the input order.
    order = np.argsort(np.nan_to_num(scores, nan=-np.inf), kind="stable") if scores is not None else np.arange(n)
    colours = PALETTE[np.arange(n) % len(PALETTE)]  # instance i's colour, by input order

    canvas = image.astype(np.float32)
    if masks is not None:
        for i in order:
            mask = masks[i]
            if (out_h, out_w) != (height, width):
                mask = _resize_mask(mask, out_w, out_h)
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            if rows.size == 0:
                continue
            # Work on the mask's bounding box (plus a 1 px margin, so the rim is found as on the whole
            # image): per-instance cost follows the object's size, not the photo's.
            r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, out_h)
            c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, out_w)
            sub, region = mask[r0:r1, c0:c1], canvas[r0:r1, c0:c1]
            region[sub] = region[sub] * (1.0 - mask_alpha) + colours[i] * mask_alpha
            # A darker rim separates touching instances of similar colour.
            region[_boundary(sub, line_w)] = colours[i] * 0.55
    pil = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)

    # Every outline first, then every label, so no box line crosses a label.
    shown = [i for i in order if drawable[i]]
    for i in shown:
        colour = tuple(int(c) for c in colours[i])
        box = tuple(float(v) for v in boxes[i])
        if int(labels[i]) in set_b:
            _dashed_rectangle(draw, box, colour, line_w, dash=4 * line_w)
        else:
            draw.rectangle(box, outline=colour, width=line_w)

    any_set_b = any(int(labels[i]) in set_b for i in shown)
    placed: list[Rect] = []
    _, top, _, bottom = draw.textbbox((0, 0), "Hg0", font=font)
    text_h = bottom - top  # one height for every label: rows line up
    star_r = 0.36 * text_h
    star_w = int(round(2 * star_r + 0.25 * text_h))
    strip_h = text_h + 2 * pad
    if legend and any_set_b:
        note_w = star_w + draw.textlength(" " + LEGEND, font=font) + 2 * pad
        placed.append((0.0, float(out_h - strip_h), note_w, float(out_h)))
    # The best detections choose their spots first.
    for i in reversed(shown):
        colour = tuple(int(c) for c in colours[i])
        in_b = int(labels[i]) in set_b
        name = _class_name(class_names, int(labels[i]))
        score = "" if scores is None else f" {scores[i]:.2f}"
        name_w = draw.textlength(name, font=font)
        width_px = name_w + (star_w if in_b else 0) + draw.textlength(score, font=font) + 2 * pad
        x, y, x2, y2 = _place_label(tuple(boxes[i]), (width_px, strip_h), placed, out_w, out_h)
        placed.append((x, y, x2, y2))
        draw.rectangle([x, y, x2, y2], fill=colour)
        ink = _ink(colour)
        draw.text((x + pad, y + pad - top), name, fill=ink, font=font)
        if in_b:
            _asterisk(draw, x + pad + name_w + star_w / 2, y + pad + 0.4 * text_h, star_r, ink, max(1, line_w - 1))
        draw.text((x + pad + name_w + (star_w if in_b else 0), y + pad - top), score, fill=ink, font=font)

    if legend and any_set_b:
        x, y, x2, y2 = placed[0]
        draw.rectangle([x, y, x2, y2], fill=(0, 0, 0))
        _asterisk(draw, x + pad + star_w / 2, y + pad + 0.4 * text_h, star_r, (255, 255, 255), max(1, line_w - 1))
        draw.text((x + pad + star_w, y + pad - top), " " + LEGEND, fill=(255, 255, 255), font=font)
    return np.asarray(pil, dtype=np.uint8)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] (or [H, W]) array as PNG, creating parent directories."""
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")
