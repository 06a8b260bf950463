"""``build_model``: the one place that maps the ml_collections experiment config onto modules."""
from __future__ import annotations

import dataclasses

import ml_collections
from flax import nnx

from maskx_jax.detector import DetectorConfig, MaskRCNN

# config.model keys that are not DetectorConfig fields (used by the data pipeline or training).
_NOT_ARCHITECTURE: frozenset[str] = frozenset()


def detector_config(config: ml_collections.ConfigDict, num_classes: int) -> DetectorConfig:
    """DetectorConfig from ``config.model`` (every DetectorConfig field present there is copied)."""
    fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    model = config.model.to_dict()
    unknown = sorted(set(model) - fields - _NOT_ARCHITECTURE)
    if unknown:
        raise ValueError(f"config.model has keys the detector does not know: {unknown}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.items() if k in fields}
    return DetectorConfig(num_classes=num_classes, **kwargs)


def build_model(config: ml_collections.ConfigDict, num_classes: int, seed: int = 0) -> MaskRCNN:
    """A randomly initialised detector for ``config`` with ``num_classes`` classes incl. background."""
    return MaskRCNN(detector_config(config, num_classes), rngs=nnx.Rngs(seed))
