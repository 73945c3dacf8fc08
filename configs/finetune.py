"""Fine-tune the bundled paper-size model (``fd.load_pretrained("default")``) on your own worms.

Starts from the shipped weights (``train.init_weights``) with their architecture (canonical pose, no
dropout) and recipe (half real across-animal pairs, best weights on real validation pairs), at a
10x smaller learning rate. Point ``data.sources`` at your labelled worms (.npz / .csv, µm) and hold
out some for validation: a lab of them (``data.val_lab``, from the file-name prefix) or a fraction
(``--config.data.val_lab='' --config.data.val_fraction=0.2``). ``init_weights="color"`` with
``--config.model.color_features=3`` fine-tunes the color model instead. Use the result with
``fd.load_checkpoint(workdir)`` or ``fdnc-predict --checkpoint=WORKDIR``.

Command:
  fdnc-train --config=configs/finetune.py --workdir=runs/finetune \
      --config.data.sources='my_worms/*.npz' --config.data.val_lab='' --config.data.val_fraction=0.2
"""

import pathlib

from fdnc_jax.train.config_files import get_config as _load


def get_config():
    config = _load(pathlib.Path(__file__).with_name("default.py"))
    config.model.canonical_pose = True
    config.model.dropout = 0.0
    config.train.init_weights = "default"
    config.train.learning_rate = 2e-5
    config.train.steps = 2000
    config.train.batch_size = 16
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.log_every = 25
    config.sim.real_pair_fraction = 0.5
    config.data.unify_handedness = True
    config.data.val_pairs = 256
    config.train.select_on = "real_accuracy"
    return config
