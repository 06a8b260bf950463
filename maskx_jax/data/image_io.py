"""Robust image decoding: any file PIL can read becomes uint8 [H, W, 3] RGB, or None.

Conversions are repairs and are counted (:mod:`maskx_jax.data.issues`): grayscale is
replicated to RGB, alpha is dropped (not composited, as ``transform.to_rgb_float``),
16-bit images are scaled to 8 bits (``round(v / 257)``, which maps 0..65535 onto 0..255),
palette/CMYK/other modes go through PIL's ``convert('RGB')``. EXIF orientation is not
applied for training and evaluation (COCO annotations refer to the pixels as stored); prediction on
photos asks for it (``exif_transpose=True``: the image the way a viewer shows it, counted as
``image_exif_rotated``).

A missing, truncated or corrupt file returns None after a counted warning; the caller
decides what replaces it. PIL's global ``LOAD_TRUNCATED_IMAGES`` is left False, so a
truncated JPEG is an error here rather than a silently grey-filled image.

Very large images: anything with more pixels than PIL's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5 megapixels unless changed; ``None`` disables it)
is refused from its header, before any pixel is decoded (counted as ``image_too_large``).
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from maskx_jax.data.issues import Issues

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open(source: str | bytes) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    return Image.open(source)


class ImageTooLargeError(ValueError):
    """The image has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``."""


def too_large(height: int, width: int) -> bool:
    """Whether a ``height x width`` image exceeds PIL's decompression-bomb limit (read at call time)."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and int(height) * int(width) > limit


def _too_large_message(height: int, width: int) -> str:
    return f"{width}x{height} = {int(height) * int(width)} pixels > PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}"


def read_image_size(source: str | bytes) -> tuple[int, int] | None:
    """(height, width) from the file header without decoding the pixels; None if unreadable.

    Raises:
      ImageTooLargeError: the header announces more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels.
    """
    try:
        with _open(source) as img:
            size = int(img.height), int(img.width)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e)) from None
    except Exception:  # noqa: BLE001 - any failure means "cannot tell"; callers count it
        return None
    if too_large(*size):
        raise ImageTooLargeError(_too_large_message(*size))
    return size


def _to_rgb_uint8(img: Image.Image, name: str, issues: Issues) -> np.ndarray:
    """Converts a loaded PIL image to uint8 [H, W, 3], counting every non-RGB conversion."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("L", "1"):
        issues.warn("image_grayscale", name, f"mode {mode}")
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "RGBA":
        issues.warn("image_rgba", name, "mode RGBA")
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[:, :, :3])
    if mode == "LA":
        issues.warn("image_rgba", name, "mode LA")
        issues.warn("image_grayscale", name, "mode LA")
        gray = np.asarray(img, dtype=np.uint8)[:, :, 0]
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in _SIXTEEN_BIT_MODES:
        issues.warn("image_16bit", name, f"mode {mode}")
        issues.warn("image_grayscale", name, f"mode {mode}")
        wide = np.asarray(img).astype(np.float64)
        gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    issues.warn("image_other_mode", name, f"mode {mode}")
    if mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8)[:, :, :3])


def decode_image(source: str | bytes, name: str, issues: Issues, *, exif_transpose: bool = False
                 ) -> np.ndarray | None:
    """Decodes an image file (path) or encoded bytes to uint8 [H, W, 3] RGB.

    Args:
      source: a file path, or the encoded file's bytes.
      name: the record's name for warnings.
      issues: counter that receives conversions and failures.
      exif_transpose: apply the EXIF orientation tag (a phone photo taken sideways comes out upright).

    Returns:
      uint8 [H, W, 3], or None (missing/unreadable/too large file, counted).
    """
    if isinstance(source, str) and not os.path.isfile(source):
        issues.warn("image_missing", name, source)
        return None
    try:
        with _open(source) as img:
            if too_large(img.height, img.width):  # between 1x and 2x the limit PIL only warns
                issues.warn("image_too_large", name, _too_large_message(img.height, img.width))
                return None
            img.load()  # forces the full decode: truncation/corruption raises here
            if exif_transpose and img.getexif().get(0x0112, 1) not in (0, 1):  # 0x0112: Orientation
                issues.warn("image_exif_rotated", name, f"EXIF orientation {img.getexif().get(0x0112)}")
                img = ImageOps.exif_transpose(img)
            array = _to_rgb_uint8(img, name, issues)
    except Image.DecompressionBombError as e:  # over 2x the limit: PIL refuses to open it
        issues.warn("image_too_large", name, str(e))
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        issues.warn("image_unreadable", name, f"{type(e).__name__}: {e}")
        return None
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        issues.warn("image_unreadable", name, f"decoded shape {array.shape}")
        return None
    return np.ascontiguousarray(array)


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of [H, W, ...] to [height, width, ...] (pixel-centre sampling).

    Used only to repair an image whose decoded size disagrees with its annotation, so the
    annotation's coordinates stay valid.
    """
    h, w = image.shape[:2]
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return np.ascontiguousarray(image[rows][:, cols])
