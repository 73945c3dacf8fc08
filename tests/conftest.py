"""Shared fixtures: a PRNG key, the real-data root (gated on FDNC_SHARED), tiny worms."""

import gc
import importlib
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


@pytest.fixture(autouse=True, scope="module")
def _release_after_each_file():
    """Drops every compiled executable after each test file. Each XLA:CPU executable keeps ~5
    memory mappings for the life of the process; the whole suite in one process compiled enough
    of them to reach Linux's 65,530 mappings per process (``vm.max_map_count``), and the next
    compile aborted inside XLA (measured: 63,665 mappings at the crash). The persistent cache
    makes the recompiles in later files disk reads."""
    yield
    _release_compiled_executables()


@pytest.fixture(autouse=True)
def _mapping_headroom():
    """Before each test, drops the compiled executables early when the process already holds
    over 3/4 of its mapping limit (the heaviest test file now peaks at ~33,000 mappings; one test
    adds at most a few thousand)."""
    counts = _mappings_and_limit()
    if counts is not None and counts[0] > counts[1] * 3 // 4:
        _release_compiled_executables()


def _release_compiled_executables() -> None:
    """Frees every compiled executable: jax's caches and the package's own lru caches of jitted
    functions (which hold models and executables); later calls recompile (or read the disk cache)."""
    jax.clear_caches()
    predict = importlib.import_module("fdnc_jax.predict")  # fdnc_jax.predict is the function.
    evaluate = importlib.import_module("fdnc_jax.evaluate")
    predict._compiled_forward.cache_clear()  # The package's own caches of jitted functions.
    evaluate._sim_forward.cache_clear()
    gc.collect()


def _mappings_and_limit() -> tuple[int, int] | None:
    """(memory mappings of this process, the kernel's per-process limit); None off Linux."""
    try:
        with open("/proc/self/maps") as maps:
            count = sum(1 for _ in maps)
        return count, int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


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
