"""Mask^X R-CNN's weight transfer function tau (Hu et al., CVPR 2018, Sec. 3.1).

Each class's mask weights are predicted from that class's detection weights:
``w_seg[c] = tau(stop_gradient(w_det[c]); theta)``. The detection embedding is read from the box
predictor (seg_every_thing, lib/modeling/mask_rcnn_heads.py):
  * 'cls':     the ``cls_score`` weights of class c, [rep];
  * 'box':     the class's 4 rows of ``bbox_pred``, concatenated, [4 * rep];
  * 'cls+box': both, [5 * rep] (the paper's best).
  * 'random':  a fixed N(0, 1) vector per class, 300-d as in the official code's ``v_randn_0``, drawn at
               initialisation and never trained (the paper's Table 1a control: does tau learn anything
               from the detector's weights beyond telling the classes apart?).
tau is an MLP (1, 2 or 3 FC layers, hidden width 256, LeakyReLU(0.1) or ReLU between layers,
no activation on the output, MSRA init, zero bias); its output is a bias-free 1x1 conv weight on
the ``conv5_mask`` features.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maskx_jax.layers import FrozenStat, Linear

Array = jax.Array

INPUT_DIMS = {"cls": 1, "box": 4, "cls+box": 5}  # multiples of the box head representation width
RANDOM_EMBED_DIM = 300  # seg_every_thing configs/.../ablation_input/randn_2_layer.yaml: PRETRAINED_EMBED_DIM


def class_embedding(cls_kernel: Array, box_kernel: Array, kind: str, labels: Array | None = None) -> Array:
    """Per-class detection weights.

    cls_kernel: [rep, K+1] (``cls_score.kernel``); box_kernel: [rep, 4(K+1)] (``bbox_pred.kernel``,
    class-major columns). Returns [K+1, d] with d = rep, 4 rep or 5 rep; with ``labels`` [R], the
    rows of those classes only, [R, d], gathered straight from the kernels' columns so that no
    [K+1, d] array is formed (inference cost independent of the vocabulary size K).
    """
    if labels is not None:
        cls = cls_kernel[:, labels].T  # [R, rep]
        cols = 4 * labels[:, None] + jnp.arange(4, dtype=labels.dtype)  # [R, 4]: columns 4c..4c+3
        box = jnp.transpose(box_kernel[:, cols], (1, 2, 0)).reshape(labels.shape[0], -1)  # [R, 4 rep]
    else:
        k1 = cls_kernel.shape[1]
        cls = cls_kernel.T  # [K+1, rep]
        box = box_kernel.T.reshape(k1, -1)  # [K+1, 4 rep]: class c's rows 4c..4c+3 (torch layout)
    if kind == "cls":
        return cls
    if kind == "box":
        return box
    if kind == "cls+box":
        return jnp.concatenate([cls, box], axis=1)
    raise ValueError(f"unknown transfer_input {kind!r}; expected one of {sorted(INPUT_DIMS)}")


class WeightTransfer(nnx.Module):
    """tau: [K+1, d] detection embeddings -> [K+1, out_dim] mask weights.

    Attributes: ``fc1`` .. ``fc{num_layers}`` (Linear). ``stop_det_grad`` cuts the gradient into
    the detector's weights, so the mask loss trains theta only (the paper's default). With
    ``input_kind='random'``, ``embedding`` [K+1, 300] (a :class:`FrozenStat`: saved, never trained)
    replaces the detection weights; ``num_classes`` (K+1) is then required.
    """

    def __init__(self, representation: int, *, input_kind: str = "cls+box", num_layers: int = 2, hidden: int = 256,
                 out_dim: int = 256, activation: str = "leaky_relu", stop_det_grad: bool = True,
                 num_classes: int | None = None, rngs: nnx.Rngs):
        if input_kind not in INPUT_DIMS and input_kind != "random":
            raise ValueError(f"unknown transfer_input {input_kind!r}; "
                             f"expected one of {sorted(INPUT_DIMS) + ['random']}")
        if num_layers not in (1, 2, 3):
            raise ValueError(f"transfer_layers must be 1, 2 or 3, got {num_layers}")
        if activation not in ("leaky_relu", "relu"):
            raise ValueError(f"transfer_activation must be 'leaky_relu' or 'relu', got {activation!r}")
        self.input_kind: str = input_kind
        self.num_layers: int = num_layers
        self.activation: str = activation
        self.stop_det_grad: bool = stop_det_grad
        # Caffe2's MSRAFill (used by Detectron) scales by fan_out.
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        in_dim = RANDOM_EMBED_DIM if input_kind == "random" else INPUT_DIMS[input_kind] * representation
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            setattr(self, f"fc{i + 1}", Linear(dims[i], dims[i + 1], kernel_init=init, rngs=rngs))
        if input_kind == "random" and num_classes is None:
            raise ValueError("transfer_input='random' needs num_classes (one fixed vector per class)")
        self.embedding = (FrozenStat(jax.random.normal(rngs.params(), (num_classes, dims[0]), jnp.float32))
                          if input_kind == "random" else None)

    def embed(self, cls_kernel: Array, box_kernel: Array, labels: Array | None = None) -> Array:
        """Class embeddings [K+1, d], or [R, d] for ``labels`` [R] (see :func:`class_embedding`)."""
        if self.embedding is not None:
            table = self.embedding[...]
            return table if labels is None else table[labels]
        return class_embedding(cls_kernel, box_kernel, self.input_kind, labels)

    def __call__(self, cls_kernel: Array, box_kernel: Array) -> Array:
        """cls_kernel [rep, K+1], box_kernel [rep, 4(K+1)] -> mask weights [K+1, out_dim]."""
        return self.transform(self.embed(cls_kernel, box_kernel))

    def transform(self, x: Array) -> Array:
        """tau on class embeddings already gathered: [R, d] -> [R, out_dim] (any R, e.g. detected classes)."""
        if self.stop_det_grad:
            x = jax.lax.stop_gradient(x)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i + 1}")(x)
            if i < self.num_layers - 1:
                x = jax.nn.leaky_relu(x, 0.1) if self.activation == "leaky_relu" else jax.nn.relu(x)
        return x
