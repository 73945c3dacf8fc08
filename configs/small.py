"""A CPU-sized model (150 k parameters) for training on 2 CPU cores in under an hour (9,000 steps).

Command:
  fdnc-train --config=configs/small.py --workdir=runs/small \
      --config.data.sources='$FDNC_SHARED/data/wormnd/*.npz'
"""

import pathlib

from fdnc_jax.train.config_files import get_config as _load


def get_config():
    config = _load(pathlib.Path(__file__).with_name("default.py"))
    config.model.width = 64
    config.model.layers = 3
    config.model.heads = 2  # On CPU the [B, H, L, L] softmax dominates: 2 heads cost ~half of 4.
    config.model.ff_width = 256
    config.model.dropout = 0.0  # Endless simulated data: no overfitting to regularise against.
    config.model.canonical_pose = True  # Principal-axes frame: ~4x faster learning on CPU.
    config.data.val_pairs = 256
    config.train.steps = 9000
    config.train.batch_size = 16
    config.train.learning_rate = 5e-4
    config.train.log_every = 25
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.plateau_patience = 4
    return config
