"""Winograd F(4x4, 3x3) convolution: stride-1 3x3 convolutions with 4x fewer multiplications.

Why: on CPU most of a Mask R-CNN step is 3x3 convolutions (the FPN output and RPN convolutions at
P2/P3 alone are ~40% of a 512x512 training step's FLOPs), and XLA:CPU's direct convolution already
runs them near the machine's matrix-product peak, so only a cheaper algorithm makes them faster. Winograd's minimal
filtering algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes
each 4x4 block of outputs from the 6x6 input tile around it as

    Y = A^T [ (G k G^T) ⊙ (B^T d B) ] A

i.e. 36 products per (input channel, output channel) pair where the direct form needs 16 x 9 = 144.
Over channels the elementwise product becomes 36 independent matrix products [P, C] x [C, O] (P =
number of 4x4 output tiles), which XLA runs at its dot rate; the transforms are cheap elementwise
passes (input: separable, output: one [16, 36] matrix product). GPU libraries such as cuDNN have
this algorithm among those they pick from; XLA:CPU has none.

Numerics: the transforms use the interpolation points 0, ±1, ±2, ∞, whose coefficients (up to 8 and
1/24) cost float32 accuracy: outputs differ from the direct convolution by ~5e-6 relative to their
scale (the direct form's own rounding is ~1e-7), far inside this project's parity tolerances
(tests/unit/test_winograd.py, tests/parity/test_detector_parity.py). Only float32 takes this path.

Gradients (a custom VJP; the residuals are the input and the kernel, as for the direct form):
  * input gradient: the full correlation of the cotangent with the flipped, in/out-swapped kernel,
    itself a stride-1 3x3 convolution, so again F(4x4, 3x3);
  * kernel gradient: in the transformed domain, dU[t] = V[t]^T dM[t] (36 matrix products contracting
    over the tiles), with dM = the output transform's transpose applied to the cotangent, then
    dk = G^T dU G.

Where it pays (measured on a 2-core AVX-512 CPU, forward + both gradients against XLA's direct
convolution): with at least ~512 output tiles and 128+ channels, 1.07-1.85x (the FPN's P2
convolution of a 512x512 image 1.6x, of 800x1333 1.85x, layer2's at 512 tiles 1.07x); with fewer
tiles the 36 kernel transforms and the small matrix products cost more than they save. :func:`applies` encodes
that rule.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2, inf.
_AT = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)  # [4, 6] output transform
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], np.float64)  # [6, 3] kernel transform
_BT = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], np.float64)  # [6, 6] input transform
OUT = 4  # output tile side
TILE = OUT + 2  # input tile side (3x3 kernel)
# Both output-transform matrices at once: Y[(r, s)] = sum_(x, y) A^T[r, x] A^T[s, y] M[(x, y)].
_AT_KRON = np.einsum("rx,sy->rsxy", _AT, _AT).reshape(OUT * OUT, TILE * TILE)

# The rule of :func:`applies`: at least this many 4x4 output tiles and this many channels in and out.
MIN_TILES = 512
MIN_CHANNELS = 128

_HIGHEST = jax.lax.Precision.HIGHEST


def output_tiles(n: int, h: int, w: int, padding: int) -> tuple[int, int, int, int]:
    """For an [n, h, w, C] input and a 3x3 kernel: (Ho, Wo, tile rows, tile columns)."""
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    return ho, wo, -(-ho // OUT), -(-wo // OUT)


def applies(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int, padding: int, dtype) -> bool:
    """Whether :func:`conv2d` is the faster form for this convolution (see the module docstring)."""
    if tuple(kernel_shape[:2]) != (3, 3) or stride != 1 or not 0 <= padding <= 2:
        return False
    if jnp.dtype(dtype) != jnp.float32:
        return False
    n, h, w, c = x_shape
    ho, wo, th, tw = output_tiles(n, h, w, padding)
    return ho > 0 and wo > 0 and n * th * tw >= MIN_TILES and min(c, kernel_shape[3]) >= MIN_CHANNELS


def _combine(terms: list[tuple[float, Array]]) -> Array:
    """sum(coefficient * array), skipping zero coefficients and multiplications by +-1."""
    out = None
    for coef, a in terms:
        if coef == 0:
            continue
        t = a if coef == 1 else -a if coef == -1 else a * jnp.asarray(coef, a.dtype)
        out = t if out is None else out + t
    return out


def _input_transform(xp: Array, th: int, tw: int) -> Array:
    """B^T d B for every 6x6 tile d (stride 4) of xp [N, 4th+2, 4tw+2, C] -> V [36, N*th*tw, C].

    Separable: the rows of every tile first (strided row slices combined, stacked into one array), then the
    columns of that array. Stacking each pass keeps the program small: combining the column slices of six
    separate row results inlines every row combination into every column term (XLA fuses by duplicating
    producers), ~4x the instructions in every fusion that reads a transform, which the compiled step keeps
    in host memory (see docs/performance.md); the arithmetic, and so the result, is the same bit for bit.
    """
    n, c = xp.shape[0], xp.shape[-1]
    rows = [xp[:, a: a + OUT * (th - 1) + 1: OUT] for a in range(TILE)]  # row a of every tile row
    row_t = jnp.stack([_combine([(_BT[i, a], rows[a]) for a in range(TILE)]) for i in range(TILE)])
    cols = [row_t[:, :, :, b: b + OUT * (tw - 1) + 1: OUT] for b in range(TILE)]  # [6 (i), N, th, tw, C]
    out = jnp.stack([_combine([(_BT[j, b], cols[b]) for b in range(TILE)]) for j in range(TILE)], axis=1)
    return out.reshape(TILE * TILE, n * th * tw, c)  # tile position i * 6 + j


def _kernel_transform(kernel: Array) -> Array:
    """G k G^T per (input, output) channel pair: [3, 3, C, O] -> U [36, C, O]."""
    g = jnp.asarray(_G, kernel.dtype)
    c, o = kernel.shape[2:]
    return jnp.einsum("xa,abio,yb->xyio", g, kernel, g, precision=_HIGHEST).reshape(TILE * TILE, c, o)


def _output_transform(m: Array, n: int, th: int, tw: int) -> Array:
    """A^T M A per tile: M [36, N*th*tw, O] -> Y [N, 4th, 4tw, O] (tiles interleaved back)."""
    o = m.shape[-1]
    y = jnp.dot(jnp.asarray(_AT_KRON, m.dtype), m.reshape(TILE * TILE, -1), precision=_HIGHEST)
    return y.reshape(OUT, OUT, n, th, tw, o).transpose(2, 3, 0, 4, 1, 5).reshape(n, OUT * th, OUT * tw, o)


def _output_transform_transposed(g: Array) -> Array:
    """The transpose of :func:`_output_transform`: g [N, 4th, 4tw, O] -> dM [36, N*th*tw, O]."""
    n, hh, ww, o = g.shape
    th, tw = hh // OUT, ww // OUT
    tiles = g.reshape(n, th, OUT, tw, OUT, o).transpose(2, 4, 0, 1, 3, 5).reshape(OUT * OUT, -1)
    dm = jnp.dot(jnp.asarray(_AT_KRON.T, g.dtype), tiles, precision=_HIGHEST)
    return dm.reshape(TILE * TILE, n * th * tw, o)


def _padded(x: Array, padding: int, th: int, tw: int) -> Array:
    """x zero-padded by ``padding`` on the top/left and up to whole tiles on the bottom/right."""
    _, h, w, _ = x.shape
    p = padding
    return jnp.pad(x, ((0, 0), (p, OUT * th + 2 - h - p), (p, OUT * tw + 2 - w - p), (0, 0)))


def _forward(x: Array, kernel: Array, padding: int) -> Array:
    n, h, w, _ = x.shape
    ho, wo, th, tw = output_tiles(n, h, w, padding)
    v = _input_transform(_padded(x, padding, th, tw), th, tw)
    m = jax.lax.dot_general(v, _kernel_transform(kernel), (((2,), (1,)), ((0,), (0,))))  # [36, P, O]
    return _output_transform(m, n, th, tw)[:, :ho, :wo]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: Array, kernel: Array, padding: int) -> Array:
    """torch ``conv2d`` (stride 1, symmetric zero padding 0-2) by F(4x4, 3x3).

    x [N, H, W, C] float32, kernel [3, 3, C, O] -> [N, H + 2p - 2, W + 2p - 2, O].
    """
    return _forward(x, kernel, padding)


def _conv2d_fwd(x: Array, kernel: Array, padding: int):
    return _forward(x, kernel, padding), (x, kernel)


def _conv2d_bwd(padding: int, residuals, g: Array):
    x, kernel = residuals
    n, h, w, c = x.shape
    ho, wo, th, tw = output_tiles(n, h, w, padding)
    # d/dx: full correlation of g with the flipped, in/out-swapped kernel (padding 2 - p: same size as x).
    gx = _forward(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), 2 - padding)
    # d/dkernel in the transformed domain: U enters M = V U linearly per tile position t.
    v = _input_transform(_padded(x, padding, th, tw), th, tw)
    dm = _output_transform_transposed(jnp.pad(g, ((0, 0), (0, OUT * th - ho), (0, OUT * tw - wo), (0, 0))))
    du = jax.lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))))  # [36, C, O]
    gt = jnp.asarray(_G, g.dtype)
    gk = jnp.einsum("xa,xyio,yb->abio", gt, du.reshape(TILE, TILE, c, -1), gt, precision=_HIGHEST)
    return gx.astype(x.dtype), gk.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
