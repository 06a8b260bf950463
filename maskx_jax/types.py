"""Pytree containers passed between jitted functions.

Conventions (for the whole library):
  * images are NHWC float32 RGB, normalised, zero-padded at the bottom/right to a fixed size
    (a multiple of 32); ``image_sizes`` [N, 2] int32 holds each image's (height, width) before padding;
  * boxes are XYXY float32 in absolute pixels of that (resized, padded) input frame;
  * class 0 is background, foreground classes are 1..K (torchvision's convention);
  * every fixed-size output carries a boolean ``valid`` mask: padded rows hold finite garbage
    and must be ignored.
"""
from __future__ import annotations

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class Proposals:
    """RPN output. boxes [N, P, 4]; scores [N, P] (objectness probability); valid [N, P] bool."""

    boxes: Array
    scores: Array
    valid: Array


@struct.dataclass
class Detections:
    """Detector output for a batch, in the input frame.

    boxes [N, D, 4]; scores [N, D]; labels [N, D] int32 in 1..K; valid [N, D] bool, sorted by
    descending score; masks [N, D, M, M] float32 mask probabilities in the box's frame (M = 28;
    paste them into the image with :func:`maskx_jax.paste.paste_masks` and threshold at 0.5).
    """

    boxes: Array
    scores: Array
    labels: Array
    valid: Array
    masks: Array
