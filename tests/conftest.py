"""Shared fixtures: a PRNG key, the real-data root (gated on FDNC_SHARED), tiny worms."""

import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# Many tests build the same small jitted functions afresh (one per training run); the persistent
# compilation cache turns their repeated XLA compiles into disk reads. Subprocesses inherit it.
_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
