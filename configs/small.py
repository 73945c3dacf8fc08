"""A CPU-sized model: trains on 2 CPU cores in ≤ 30 min to a useful matcher.

Command:
  fdnc-train --config=configs/small.py --workdir=runs/small \
      --config.data.sources='$FDNC_SHARED/data/wormnd/*.npz'
"""

import pathlib

from fdnc_jax.train.config_files import get_config as _load


def get_config():
    config = _load(pathlib.Path(__file__).with_name("default.py"))
    config.model.width = 64
    config.model.layers = 4
    config.model.heads = 4
    config.model.ff_width = 256
    config.data.val_pairs = 256
    config.train.steps = 6000
    config.train.batch_size = 32
    config.train.learning_rate = 5e-4
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.plateau_patience = 4
    return config
