"""The files of a work directory (``train.py --workdir``)::

    WORKDIR/config.json        the config of the run that created it (checked on every resume)
    WORKDIR/checkpoints/N/     orbax checkpoint of the TrainState after N completed steps (with content hashes)
    WORKDIR/damaged_checkpoints/  checkpoints that failed verification on resume, moved aside
    WORKDIR/tb/                TensorBoard event files (every loss, lr, grad norm, images/s; prediction
                               images every ``eval.tb_images_every`` steps)
    WORKDIR/init_checkpoint_report.json   what ``train.init_checkpoint`` loaded, by name
    WORKDIR/metrics.json       COCO AP (all / set A / set B) of the final evaluation
    WORKDIR/pictures/          prediction PNGs (``eval.num_pictures``)
"""
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
TB_DIR = "tb"
METRICS_FILE = "metrics.json"
PICTURES_DIR = "pictures"
INIT_REPORT_FILE = "init_checkpoint_report.json"
