"""configs/small.py plus real across-animal pairs: half of the pairs take the test copy from another
animal of the same source bank (names give the correspondence), simulated on top; the best weights
are chosen on real pairs across the validation lab's animals.

Command:
  fdnc-train --config=configs/small_real.py --workdir=runs/small_real \
      --config.data.sources='$FDNC_SHARED/data/wormnd/*.npz'
"""

import pathlib

from fdnc_jax.train.config_files import get_config as _load


def get_config():
    config = _load(pathlib.Path(__file__).with_name("small.py"))
    config.sim.real_pair_fraction = 0.5
    config.data.unify_handedness = True
    config.train.select_on = "real_accuracy"
    return config
