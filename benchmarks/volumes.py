"""Benchmark inputs shared by ``predict_bench.py`` and ``matching_bench.py``: tracking volumes."""

from __future__ import annotations

import jax
import numpy as np

import fdnc_jax as fd
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.sim.pairs import make_source_bank, synthesize
from fdnc_jax.worm import from_model_units

BATCH_NEURONS = 150


def tracking_volumes(
    count: int, n: int = BATCH_NEURONS, seed: int = 0
) -> tuple[fd.Worm, list[fd.Worm]]:
    """A template and ``count`` test volumes of exactly ``n`` points, as in tracking one animal.

    The template is ``n`` neurons of the bundled demo template (µm); each test is a semi-synthetic
    copy of the whole demo animal (``fdnc_jax.sim.pairs.synthesize``, default simulator: warp,
    rotation, dropped neurons, outlier points, bend, scale, shear, jitter), of which the first ``n``
    valid points (in shuffled order) are kept. The network's scores on such volumes are as peaked as
    on real ones, which matters for the Hungarian step (a random cloud's near-uniform scores make it
    several times slower)."""
    source, _ = fd.load_demo_pair()
    bank = make_source_bank([source])
    synth = jax.jit(jax.vmap(synthesize, in_axes=(0, None, None, None, None)), static_argnums=4)
    tests: list[fd.Worm] = []
    key = jax.random.key(seed)
    while len(tests) < count:
        key, sub = jax.random.split(key)
        xyz, mask, _, _ = jax.device_get(
            synth(jax.random.split(sub, 256), bank.xyz[0], bank.mask[0], None, SimConfig())
        )
        for x, m in zip(xyz, mask, strict=True):
            if m.sum() >= n and len(tests) < count:
                tests.append(fd.Worm(xyz_um=from_model_units(x[m][:n], np.zeros(3))))
    return fd.Worm(xyz_um=source.xyz_um[:n]), tests
