"""The datasets of a config and the training iterator over them (the data stack is imported lazily: building a
:class:`~maskx_jax.train.trainer.Trainer` does not need it)."""
from __future__ import annotations

from typing import Callable, Iterator

import ml_collections
from absl import logging

from maskx_jax.types import Batch


def load_datasets(config: ml_collections.ConfigDict):
    """``data.pipeline.load_datasets`` (imported lazily: the data stack is not needed to build a Trainer)."""
    from maskx_jax.data.pipeline import load_datasets as load

    info = load(config)
    logging.info("%s", info.report())
    return info


def default_train_iter(info) -> Callable[..., Iterator[Batch]]:
    from maskx_jax.data.pipeline import make_train_iterator

    def make(config, *, start_step, process_index, process_count) -> Iterator[Batch]:
        return make_train_iterator(config, start_step=start_step, process_index=process_index,
                                   process_count=process_count, info=info)

    return make
