"""Training: one job per module.

| module | job |
|---|---|
| ``layout`` | the files of a work directory |
| ``distributed`` | multi-process start-up, the device mesh, quieter library logs |
| ``config_checks`` | which settings a run may resume with; checks before anything compiles |
| ``step`` | ``TrainState`` and the pure train step (non-finite updates dropped inside it) |
| ``trainer`` | ``Trainer``: the mesh, shardings and jitted init / step / predict of one experiment |
| ``init_checkpoint`` | ``train.init_checkpoint``: fill a fresh state from converted weights or a work directory |
| ``checkpointing`` | orbax manager, save with content hashes, verified restore, resume from the newest intact |
| ``hooks`` | progress bar and TensorBoard scalars, termination requests, prediction images |
| ``datasets`` | the config's datasets and training iterator |
| ``evaluation`` | COCO AP of a state or a work directory, ``metrics.json``, pictures |
| ``loop`` | ``train()``: resume or initialise, the loop, the final evaluation |

``maskx_jax.train_lib`` gathers the public names of all of them for callers.
"""
