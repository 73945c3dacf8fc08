"""The fdnc-predict command line, run as a user would (a subprocess)."""

from __future__ import annotations

import importlib.resources
import subprocess

import pytest
from cli_process import run_cli

WEIGHTS = importlib.resources.files("fdnc_jax") / "data" / "fdnc_position.npz"


def run_predict(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("predict", *args, timeout=timeout)


def test_help_lists_flags():
    out = run_predict("--help")
    assert out.returncode in (0, 1), out.stderr  # absl's --help exits with 1 after printing usage.
    assert "Traceback" not in out.stderr
    for flag in (
        "--template",
        "--test",
        "--use_color",
        "--top_k",
        "--min_probability",
        "--out",
        "--checkpoint",
        "--demo",
        "--matmul_dtype",
    ):
        assert flag in out.stdout, f"{flag} missing from --help"


def test_matmul_dtype_choices_match_the_model():
    from fdnc_jax.cli._common import MATMUL_DTYPE_CHOICES
    from fdnc_jax.model.fdnc import MATMUL_DTYPES

    assert tuple(MATMUL_DTYPE_CHOICES) == MATMUL_DTYPES


def test_missing_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope.npz"
    out = run_predict(f"--template={missing}", f"--test={missing}")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("fdnc-predict: error:")
    assert "nope.npz: no such file" in lines[0]  # files are read before the model is loaded


def test_demo_runs():
    if not WEIGHTS.is_file():
        pytest.skip("bundled weights fdnc_jax/data/fdnc_position.npz not present yet")
    out = run_predict("--demo")  # Both demo worms have color: --weights=auto picks "color".
    assert out.returncode == 0, out.stderr
    assert "model: bundled weights 'color'" in out.stdout
    assert "accuracy" in out.stdout
    correct = int(out.stdout.split("accuracy ")[1].split("/")[0])
    fast = run_predict("--demo", "--matmul_dtype=bfloat16")
    assert fast.returncode == 0, fast.stderr
    # bfloat16 products move single names (on 90 real pairs: mean |change| 0.6 points, max 5).
    assert abs(int(fast.stdout.split("accuracy ")[1].split("/")[0]) - correct) <= 15
    out = run_predict("--demo", "--weights=nope")
    assert out.returncode == 2 and "no bundled weights named 'nope'" in out.stderr
