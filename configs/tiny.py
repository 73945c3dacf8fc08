"""A seconds-long run for tests and smoke checks, on the bundled demo worms.

Command:
  fdnc-train --config=configs/tiny.py --workdir=runs/tiny
"""

import pathlib

from fdnc_jax.train.config_files import get_config as _load


def get_config():
    config = _load(pathlib.Path(__file__).with_name("default.py"))
    config.model.width = 16
    config.model.layers = 1
    config.model.heads = 2
    config.model.ff_width = 32
    config.model.dropout = 0.0
    config.data.sources = "bundled"
    config.data.val_lab = ""
    config.data.val_fraction = 0.25
    config.data.val_pairs = 8
    config.train.steps = 20
    config.train.batch_size = 4
    config.train.learning_rate = 1e-3
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.train.progress_bar = False
    return config
