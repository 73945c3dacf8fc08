"""fdnc-train: train the fDNC matcher on semi-synthetic worms.

Usage:
  fdnc-train --config=configs/small.py --workdir=runs/small [--config.train.steps=3000]

Running the same command again on the same workdir resumes from the latest checkpoint (and continues
to a larger ``--config.train.steps``). Intentionally kept short: all logic is in fdnc_jax.train.loop.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fdnc_jax.cli._common import run_main

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config file (configs/default.py, small.py or tiny.py).",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, config.json and metrics.jsonl.")
flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (multi-host cluster launch)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    if FLAGS.multihost:
        jax.distributed.initialize()
    from fdnc_jax.train.loop import train_and_evaluate

    if not FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO; progress and validations are shown by the loop.
        logging.set_verbosity(logging.WARNING)

    logging.info("JAX devices: %s", jax.devices())
    model = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(
        f"best validation accuracy {model.info.get('best_accuracy', float('nan')):.4f} "
        f"(step {model.info.get('step')}); checkpoints in {FLAGS.workdir}/checkpoints"
    )


def run():
    run_main(main, __name__)


if __name__ == "__main__":
    run()
