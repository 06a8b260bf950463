"""torchvision's per-image numbers on one fixed canvas (``model.exact_canvas``).

torchvision runs each image (or batch) on a tensor padded to its size rounded up to a multiple of 32
(``GeneralizedRCNNTransform``, ``size_divisible=32``); we run every image on one compiled canvas, e.g.
800x1344. The normalised padding is zero in both, but after the first convolution and normalisation the
features in the padded area are not, and every later 3x3 convolution reads them at the border of the image's
extent: a bigger canvas gives other numbers. With a :class:`Canvas`, the model makes the canvas look like
torchvision's tensor for each image:

* every spatial operation's input (the 3x3 and 7x7 convolutions, the stem's max pool) is zero outside the
  image's *extent* at that stride, ``ceil(E / stride)`` with ``E`` the image size rounded up to 32, as the
  zero padding of torchvision's convolutions is (after a ReLU, zero also stands in for max-pool's -inf);
* GroupNorm statistics are taken over the extent only;
* the RPN's anchors are those of the image's own grid, with torchvision's integer strides ``E // grid``
  (which is not 64 at P6 when ``E / 32`` is odd); anchors outside the grid never become proposals;
* RoIAlign clamps its samples to the extent of each level, as torchvision clamps to its tensor's border.

Training runs the same features and RoIAlign; its anchors stay those of the canvas (torchvision trains on a
batch padded to its largest image, so its anchors cover that tensor, not each image's own).

Conventions: ``image_sizes`` [N, 2] int32 (height, width) of each resized image inside the canvas, at the
top left; features NHWC.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

SIZE_DIVISIBLE = 32  # torchvision's GeneralizedRCNNTransform.size_divisible


def padded_extent(image_sizes: Array, divisible: int = SIZE_DIVISIBLE) -> Array:
    """[N, 2] int32 (h, w) -> each rounded up to a multiple of ``divisible`` (torchvision's tensor size)."""
    sizes = jnp.asarray(image_sizes, jnp.int32)
    return (sizes + divisible - 1) // divisible * divisible


class Canvas:
    """Each image's torchvision extent on a shared canvas; built inside a traced function.

    Attributes:
      extent: [N, 2] int32, (h, w) of each image rounded up to 32.
    """

    def __init__(self, image_sizes: Array):
        self.extent: Array = padded_extent(image_sizes)

    def grid(self, stride: int) -> Array:
        """[N, 2] int32: the extent at a stride, ``ceil(extent / stride)`` (nested ceilings compose, so this
        is also the size torchvision's stride-2 convolutions and P6's subsampling reach)."""
        return (self.extent + stride - 1) // stride

    def inside(self, stride: int, hw: tuple[int, int]) -> Array:
        """[N, h, w, 1] bool: which positions of an [N, h, w, C] map at ``stride`` lie in each extent."""
        g = self.grid(stride)
        rows = jnp.arange(hw[0], dtype=jnp.int32)[None, :, None] < g[:, 0, None, None]
        cols = jnp.arange(hw[1], dtype=jnp.int32)[None, None, :] < g[:, 1, None, None]
        return (rows & cols)[..., None]

    def zero_outside(self, x: Array, stride: int) -> Array:
        """x [N, h, w, C] at ``stride`` -> the same with zeros outside each image's extent."""
        return jnp.where(self.inside(stride, x.shape[1:3]), x, jnp.zeros((), x.dtype))


def zero_outside(canvas: Canvas | None, x: Array, stride: int) -> Array:
    """:meth:`Canvas.zero_outside`, or ``x`` unchanged without a canvas."""
    return x if canvas is None else canvas.zero_outside(x, stride)


def inside(canvas: Canvas | None, stride: int, x: Array) -> Array | None:
    """:meth:`Canvas.inside` for the map ``x``, or None without a canvas (normalisation layers take it)."""
    return None if canvas is None else canvas.inside(stride, x.shape[1:3])
