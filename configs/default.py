"""The paper's model (6 layers, D 128, 8 heads, FF 2048) and schedule; sized for an accelerator.

Command (GPU):
  fdnc-train --config=configs/default.py --workdir=runs/default \
      --config.data.sources='$FDNC_SHARED/data/wormnd/*.npz'

Simulator knobs and their calibration against real animals are documented field by field in
fdnc_jax/sim/config.py (SimConfig); this config lists every one with its default value.
"""

import dataclasses

import ml_collections

from fdnc_jax.sim.config import SimConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = (
        0  # Root PRNG seed: model init, simulated batches (fold_in(step)), validation set.
    )

    config.model = ml_collections.ConfigDict()
    config.model.width = 128  # D (d_model).
    config.model.layers = 6  # Transformer encoder layers.
    config.model.heads = 8  # Attention heads.
    config.model.ff_width = 2048  # Feed-forward width.
    config.model.dropout = 0.1  # Dropout in attention and feed-forward blocks.
    config.model.color_features = 0  # >0: normalised NeuroPAL color (first 3 channels) as input.
    config.model.canonical_pose = False  # Rotate clouds to their principal axes (fdnc_jax.pose).
    # Learned per-head distance bias on the attention logits (fdnc_jax.model.layers.EncoderBlock).
    config.model.distance_bias = False

    # Every simulator field (see SimConfig for meaning, units and the calibration on real worms).
    config.sim = ml_collections.ConfigDict(dataclasses.asdict(SimConfig()))

    config.data = ml_collections.ConfigDict()
    config.data.sources = "$FDNC_SHARED/data/wormnd/*.npz"  # "bundled", folder(s) or glob(s).
    config.data.val_lab = "NP"  # Hold out this whole lab for validation ("" → val_fraction).
    config.data.val_fraction = 0.15  # Fraction of sources held out when val_lab is "".
    config.data.split_seed = 0  # Seed of the val_fraction split.
    # Training sources are grouped into banks of these sizes (points; the largest worm sets the
    # last): a step draws its pairs from one bank, so small worms do not pay for padding.
    config.data.source_buckets = (128,)
    config.data.val_pairs = 1024  # Size of the fixed held-out semi-synthetic validation set.
    # With sim.real_pair_fraction > 0: mirror the animals imaged as mirror images (atlas fit) so
    # that real pairs across animals share one handedness.
    config.data.unify_handedness = True

    config.train = ml_collections.ConfigDict()
    config.train.steps = 20_000  # Optimizer steps.
    config.train.batch_size = 64  # Pairs per step (paper: 64).
    config.train.learning_rate = 2e-4  # Adam learning rate (paper).
    config.train.clip_norm = 1.0  # Global gradient-norm clip (paper).
    config.train.optimizer = "adam"  # "adam" or "adamw".
    # > 0: validate, keep as best and ship an exponential moving average of the weights (e.g.
    # 0.999 ≈ the last 1,000 steps; kept in the optimizer state, so resumes and plateau restores
    # carry it). 0: the weights themselves (paper).
    config.train.ema_decay = 0.0
    config.train.log_every = 50  # Steps between training-metric logs.
    config.train.eval_every = 500  # Steps between validations (paper: 500).
    config.train.checkpoint_every = 500  # Steps between "latest" checkpoints.
    # "plateau" (paper): constant rate, lowered on validation plateaus (below); "cosine": warm-up
    # over train.warmup_steps, then a cosine decay to zero at train.steps (no plateau rule).
    config.train.lr_schedule = "plateau"
    config.train.warmup_steps = 0  # Linear warm-up steps of the "cosine" schedule.
    config.train.plateau_patience = 5  # Validations without improvement before lr decay (paper).
    config.train.plateau_factor = 0.5  # Learning-rate factor on plateau; best weights restored.
    config.train.max_plateau_trials = 10  # Stop after this many decays (paper).
    # Wall-clock budget in minutes for one invocation (0: none): when reached, training validates,
    # saves and stops; rerunning on the same workdir resumes with a fresh budget.
    config.train.max_minutes = 0.0
    # Start a fresh run from these weights instead of random ones: "" (none), a bundled name
    # ("default", "color", "small"), a training workdir or a weights .npz; the architecture above
    # must match (configs/finetune.py). A workdir with checkpoints resumes instead.
    config.train.init_weights = ""
    config.train.tensorboard = True  # Also write workdir/tensorboard when tensorboard is installed.
    config.train.progress_bar = True  # tqdm progress bar.
    # Validation metric that picks the best weights and drives the plateau schedule: "accuracy"
    # (semi-synthetic pairs of the validation worms) or "real_accuracy" (real pairs across the
    # validation worms; needs sim.real_pair_fraction > 0).
    config.train.select_on = "accuracy"
    return config
