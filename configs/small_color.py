"""configs/small.py with NeuroPAL color as a network input (normalised R, G, B per neuron, concatenated
to the positions) instead of only the color term added after the network; per-neuron color noise
stands in for the animal-to-animal variation of NeuroPAL colors.

Command:
  fdnc-train --config=configs/small_color.py --workdir=runs/small_color \
      --config.data.sources='$FDNC_SHARED/data/wormnd/*.npz'
"""

import pathlib

from fdnc_jax.train.config_files import get_config as _load


def get_config():
    config = _load(pathlib.Path(__file__).with_name("small.py"))
    config.model.color_features = 3
    config.sim.color_neuron_jitter = 0.3
    return config
