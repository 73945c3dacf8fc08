"""Shared CLI plumbing: make ``--help`` of a console script list its own flags; recording volumes."""

from __future__ import annotations

import sys

from absl import app, flags

# fdnc_jax.model.fdnc.MATMUL_DTYPES, without importing JAX for --help (tests/test_cli.py checks).
MATMUL_DTYPE_CHOICES = ["float32", "bfloat16"]
MATMUL_DTYPE_HELP = (
    "Operand type of the network's matrix products: bfloat16 (float32 accumulation) is ~1.4x "
    "faster on CPUs with bfloat16 units (Intel AMX), slower on those without (AMD Zen 3: 0.7x); "
    "accuracy unchanged on average, single pairs move by ~0.6 points (README, Benchmarks)."
)


def run_main(main, module_name: str) -> None:
    """``app.run(main)`` with the flags defined in ``module_name`` listed by ``--help``.

    absl lists the flags of the program's main module; a console-script wrapper is not that module,
    so its flags are registered as key flags of the running program too.
    """
    fv = flags.FLAGS
    for flag in fv.get_flags_for_module(module_name):
        fv.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


def recording_volume(volumes: list, number: int, recording: str):
    """The volume numbered ``number`` (``meta["volume"]``) of ``load_recording(recording)``.

    Raises:
      ValueError: no such volume (naming the recording's range of volume numbers).
    """
    for v in volumes:
        if v.meta["volume"] == number:
            return v
    numbers = [v.meta["volume"] for v in volumes]
    raise ValueError(
        f"--reference_volume={number}: {recording} has no such volume (volumes "
        f"{numbers[0]}..{numbers[-1]}, {len(numbers)} in all)"
    )
