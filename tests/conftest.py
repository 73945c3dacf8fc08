"""Shared fixtures: a PRNG key, the real-data root (gated on FDNC_SHARED), tiny worms."""

import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The shared folder (holding data/); skips when FDNC_SHARED is unset, fails when it is wrong."""
    root = os.environ.get("FDNC_SHARED")
    if not root:
        pytest.skip("FDNC_SHARED not set: real-data test skipped")
    p = pathlib.Path(root)
    if not (p / "data").is_dir():
        pytest.fail(f"FDNC_SHARED={root} is set but has no data/ folder")
    return p


@pytest.fixture
def rng():
    return jax.random.key(0)


@pytest.fixture
def np_rng():
    return np.random.default_rng(0)
