"""The synthetic dataset's object classes: shapes, defined as polygons with optional holes.

Every class is a shape in a local frame of radius ~1 centred at the origin, given as
``(outer polygons, hole polygons)`` (each polygon an [n, 2] float array of (x, y)). A scene
places it with a scale, an aspect jitter, a rotation and a translation, and rasterises it
with PIL (outer polygons filled with 1, then holes with 0). Class identity is the shape
alone: colour and texture are drawn independently per instance.

:data:`CLASS_NAMES` are the 10 classes of the ``shapes10`` dataset variant; :data:`CLASS_NAMES_24`
adds 14 more (concave letters, arrows, a gear, ...) for ``shapes24`` (see ``synthetic.VARIANTS``).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2.0 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> np.ndarray:
    t = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross(arm: float = 0.34) -> np.ndarray:
    a, b = arm, 1.0
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                     (-a, a), (-b, a), (-b, -a), (-a, -a)], np.float64)


def _l_shape(t: float = 0.6) -> np.ndarray:
    return np.array([(-1, -1), (-1 + t, -1), (-1 + t, 1 - t), (1, 1 - t), (1, 1), (-1, 1)], np.float64)


def _poly(*points: tuple[float, float]) -> np.ndarray:
    return np.array(points, np.float64)


def _heart() -> np.ndarray:
    """The classic parametric heart curve, centred and scaled to radius 1."""
    t = np.linspace(0.0, 2.0 * math.pi, 64, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    p = np.stack([x, y], axis=1)
    p -= (p.max(0) + p.min(0)) / 2.0
    return p / np.abs(p).max()


def _teardrop() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, 64, endpoint=False)
    return np.stack([0.8 * np.sin(t) * np.sin(t / 2.0) ** 1.5, -np.cos(t)], axis=1)


def _gear(teeth: int = 8, outer: float = 1.0, inner: float = 0.72) -> np.ndarray:
    points = []
    for k in range(teeth):
        a, w = 2.0 * math.pi * k / teeth, math.pi / teeth
        for angle, r in ((a - 0.5 * w, inner), (a - 0.35 * w, outer), (a + 0.35 * w, outer), (a + 0.5 * w, inner)):
            points.append((r * math.cos(angle), r * math.sin(angle)))
    return np.array(points, np.float64)


def _semicircle() -> np.ndarray:
    t = np.linspace(math.pi, 2.0 * math.pi, 33)
    return np.stack([np.cos(t), 0.5 + np.sin(t)], axis=1)  # flat side down, centred vertically


# name -> (outer polygons, holes, aspect range (height/width) used for this class)
_NEAR_ISO = (0.8, 1.25)
SHAPES: dict[str, tuple[list[np.ndarray], list[np.ndarray], tuple[float, float]]] = {
    "disk": ([_regular(48)], [], _NEAR_ISO),
    "square": ([_regular(4, math.sqrt(2) * 0.85, math.pi / 4)], [], _NEAR_ISO),
    "triangle": ([_regular(3, 1.1, -math.pi / 2) + np.array([0.0, 0.2])], [], _NEAR_ISO),
    "star": ([_star()], [], _NEAR_ISO),
    "ring": ([_regular(48)], [_regular(48, 0.55)], _NEAR_ISO),
    "cross": ([_cross()], [], _NEAR_ISO),
    "hexagon": ([_regular(6)], [], _NEAR_ISO),
    "crescent": ([_regular(48)], [_regular(48, 0.85) + np.array([0.5, -0.1])], _NEAR_ISO),
    "ellipse": ([_regular(48)], [], (0.35, 0.55)),
    "l_shape": ([_l_shape()], [], _NEAR_ISO),
    # shapes24 adds these (concavities, holes and thin parts: a class's outline is worth knowing)
    "heart": ([_heart()], [], _NEAR_ISO),
    "arrow": ([_poly((-1, -0.3), (0.1, -0.3), (0.1, -0.8), (1, 0), (0.1, 0.8), (0.1, 0.3), (-1, 0.3))], [],
              _NEAR_ISO),
    "t_shape": ([_poly((-1, -1), (1, -1), (1, -0.45), (0.3, -0.45), (0.3, 1), (-0.3, 1), (-0.3, -0.45),
                       (-1, -0.45))], [], _NEAR_ISO),
    "u_shape": ([_poly((-1, -1), (-0.4, -1), (-0.4, 0.4), (0.4, 0.4), (0.4, -1), (1, -1), (1, 1), (-1, 1))], [],
                _NEAR_ISO),
    "diamond": ([_poly((0, -1), (0.55, 0), (0, 1), (-0.55, 0))], [], _NEAR_ISO),
    "semicircle": ([_semicircle()], [], _NEAR_ISO),
    "trapezoid": ([_poly((-0.45, -0.7), (0.45, -0.7), (1, 0.7), (-1, 0.7))], [], _NEAR_ISO),
    "chevron": ([_poly((-1, -0.8), (-0.2, -0.8), (0.7, 0), (-0.2, 0.8), (-1, 0.8), (-0.1, 0))], [], _NEAR_ISO),
    "bowtie": ([_poly((-1, -1), (0, -0.25), (1, -1), (1, 1), (0, 0.25), (-1, 1))], [], _NEAR_ISO),
    "frame": ([_regular(4, math.sqrt(2) * 0.9, math.pi / 4)], [_regular(4, math.sqrt(2) * 0.5, math.pi / 4)],
              _NEAR_ISO),
    "star4": ([_star(4, 1.0, 0.3)], [], _NEAR_ISO),
    "teardrop": ([_teardrop()], [], _NEAR_ISO),
    "gear": ([_gear()], [_regular(24, 0.3)], _NEAR_ISO),
    "h_shape": ([_poly((-1, -1), (-0.45, -1), (-0.45, -0.2), (0.45, -0.2), (0.45, -1), (1, -1), (1, 1), (0.45, 1),
                       (0.45, 0.2), (-0.45, 0.2), (-0.45, 1), (-1, 1))], [], _NEAR_ISO),
}

CLASS_NAMES_24: tuple[str, ...] = tuple(SHAPES)
CLASS_NAMES: tuple[str, ...] = CLASS_NAMES_24[:10]  # the shapes10 variant (the default dataset)


def transform(points: np.ndarray, size: float, aspect: float, angle: float, center: tuple[float, float]) -> np.ndarray:
    """Local [n, 2] -> image (x, y): scale x by size/2, y by size*aspect/2, rotate, translate."""
    scaled = points * np.array([size / 2.0, size * aspect / 2.0])
    c, s = math.cos(angle), math.sin(angle)
    rot = scaled @ np.array([[c, s], [-s, c]])
    return rot + np.asarray(center, np.float64)


def rasterize(name: str, size: float, aspect: float, angle: float, center: tuple[float, float],
              image_size: int) -> np.ndarray:
    """Binary mask bool [image_size, image_size] of one placed shape."""
    outer, holes, _ = SHAPES[name]
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in outer:
        draw.polygon([tuple(p) for p in transform(poly, size, aspect, angle, center)], fill=1)
    for poly in holes:
        draw.polygon([tuple(p) for p in transform(poly, size, aspect, angle, center)], fill=0)
    return np.asarray(canvas, dtype=np.uint8).astype(bool)
