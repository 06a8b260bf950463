"""The training API in one place: ``from maskx_jax import train_lib`` then ``train_lib.train(...)``,
``train_lib.Trainer``, ``train_lib.evaluate`` ... Each name lives in its own module of :mod:`maskx_jax.train`
(see its docstring for which does what); this module only gathers them."""
from __future__ import annotations

from maskx_jax.train.layout import (  # noqa: F401
    CONFIG_FILE, CHECKPOINT_DIR, DAMAGED_DIR, TB_DIR, METRICS_FILE, PICTURES_DIR, INIT_REPORT_FILE,
)
from maskx_jax.train.distributed import (  # noqa: F401
    DATA_AXIS, maybe_initialize_distributed, quiet_library_logs, create_mesh,
)
from maskx_jax.train.config_checks import (  # noqa: F401
    ON_NONFINITE, INFERENCE_ONLY_MODEL_KEYS, COMPUTE_ONLY_MODEL_KEYS, TRAINING_ONLY_MODEL_KEYS,
    ARCHITECTURE_DATA_KEYS, STATE_LAYOUT_KEYS, ABSENT_MEANT, ConfigMismatchError, flat_config, config_to_json_dict,
    is_architecture_key, config_differences, format_differences, check_resume_config, write_config, check_scaling,
    LOOP_ONLY_KEYS, check_trainer_config,
)
from maskx_jax.train.step import (  # noqa: F401
    TrainState, make_train_step,
)
from maskx_jax.train.trainer import (  # noqa: F401
    ModelFn, Trainer,
)
from maskx_jax.train.init_checkpoint import (  # noqa: F401
    InitCheckpointError, load_init_checkpoint, log_init_report,
)
from maskx_jax.train.checkpointing import (  # noqa: F401
    make_checkpoint_manager, check_checkpoint_fits, CheckpointSaveError, recorded_digests, restore_state,
    save_state, restore_intact,
)
from maskx_jax.train.hooks import (  # noqa: F401
    ProgressLogger, TerminationWatch, make_tb_images_hook,
)
from maskx_jax.train.datasets import (  # noqa: F401
    load_datasets, default_train_iter,
)
from maskx_jax.train.evaluation import (  # noqa: F401
    evaluate, write_pictures, draw_predictions,
)
from maskx_jax.train.loop import (  # noqa: F401
    NonFiniteLossError, TrainResult, train,
)
