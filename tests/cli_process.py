"""Runs a fdnc_jax command line as a user would: in a subprocess (absl flags are process-global)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(
    command: str, *args: str, cwd: os.PathLike | str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``python -m fdnc_jax.cli.<command> *args`` on the CPU; output captured as text."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", f"fdnc_jax.cli.{command}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
