"""Drawing detections (boxes, masks, labels) on an image with PIL; set-B classes marked.

In Mask^X R-CNN the masks of set-B classes come from the weight transfer function, not
from mask supervision. :func:`draw_detections` marks them with a dashed box, a ``*``
after the class name and a one-line legend, so a picture shows which masks were
transferred.
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


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box, colour, width: int, dash: int) -> None:
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


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    set_b_ids: Iterable[int] = (),
    min_short_side: int = 384,
    mask_alpha: float = 0.45,
    legend: bool = True,
) -> np.ndarray:
    """Draws instances on a copy of ``image``.

    Small images are first upscaled (bicubic) so that the short side is at least
    ``min_short_side`` px and text stays legible; boxes and masks are scaled with them, so
    the output may be larger than the input.

    Args:
      image: uint8 [H, W, 3] RGB (or [H, W] grayscale) in the original frame.
      boxes: float [N, 4] XYXY in original-image pixels.
      labels: int [N] class labels (indices into ``class_names``).
      scores: float [N] or None (then no score is printed). Instances are drawn from the
        lowest to the highest score, so the best ones end on top; N = 0 is fine.
      masks: bool [N, H, W] binary masks in the original frame (e.g. pasted and
        thresholded), or None for boxes only.
      class_names: sequence or mapping label -> name; missing names print the label.
      set_b_ids: labels (same space as ``labels``) of set-B classes, whose masks are
        predicted by weight transfer: dashed box, ``*`` after the name, and a legend line.
      min_short_side: upscale target for small images (0 disables).
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
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    n = boxes.shape[0]
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if masks is not None:
        masks = np.asarray(masks).astype(bool)
        if masks.shape != (n,) + image.shape[:2]:
            raise ValueError(f"masks {masks.shape} do not match {n} boxes on a {image.shape[:2]} image")
    set_b = {int(i) for i in set_b_ids}

    height, width = image.shape[:2]
    scale = max(1.0, float(min_short_side) / max(min(height, width), 1)) if min_short_side else 1.0
    out_h, out_w = int(round(height * scale)), int(round(width * scale))
    if (out_h, out_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BICUBIC))
        boxes = boxes * np.array([out_w / width, out_h / height] * 2, dtype=np.float32)
    short = min(out_h, out_w)
    line_w = max(2, round(short / 220))
    font = _font(max(11, round(short / 30)))

    order = np.argsort(scores, kind="stable") if scores is not None else np.arange(n)
    colours = PALETTE[np.arange(n) % len(PALETTE)]  # instance i's colour, by input order

    canvas = image.astype(np.float32)
    if masks is not None:
        for i in order:
            mask = masks[i]
            if (out_h, out_w) != (height, width):
                mask = _resize_mask(mask, out_w, out_h)
            if not mask.any():
                continue
            canvas[mask] = canvas[mask] * (1.0 - mask_alpha) + colours[i] * mask_alpha
            # A darker rim separates touching instances of similar colour.
            canvas[_boundary(mask, line_w)] = colours[i] * 0.55
    pil = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)

    any_set_b = False
    for i in order:
        colour = tuple(int(c) for c in colours[i])
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        in_b = int(labels[i]) in set_b
        any_set_b |= in_b
        if in_b:
            _dashed_rectangle(draw, (x1, y1, x2, y2), colour, line_w, dash=4 * line_w)
        else:
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=line_w)
        text = _class_name(class_names, int(labels[i])) + ("*" if in_b else "")
        if scores is not None:
            text += f" {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(2, line_w)
        strip_h = th + 2 * pad
        tx = min(max(x1 - line_w / 2, 0), max(out_w - tw - 2 * pad, 0))
        # Above the box when there is room, else just inside its top edge.
        ty = y1 - strip_h if y1 - strip_h >= 0 else max(y1, 0)
        ty = min(ty, max(out_h - strip_h, 0))
        draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + strip_h], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 165 else (255, 255, 255)
        draw.text((tx + pad - left, ty + pad - top), text, fill=ink, font=font)

    if legend and any_set_b:
        note = "* set B: mask by weight transfer"
        left, top, right, bottom = draw.textbbox((0, 0), note, font=font)
        pad = max(2, line_w)
        y = out_h - (bottom - top) - 2 * pad
        draw.rectangle([0, y, right - left + 2 * pad, out_h], fill=(0, 0, 0))
        draw.text((pad - left, y + pad - top), note, fill=(255, 255, 255), font=font)
    return np.asarray(pil, dtype=np.uint8)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] (or [H, W]) array as PNG, creating parent directories."""
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")
