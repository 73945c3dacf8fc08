"""Canonical pose: invariant to rotation, translation and order; keeps chirality; padding inert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fdnc_jax.pose import SIGN_FLIPS, canonical_pose, canonical_pose_batch


def _worm_like(seed, n=60):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * np.array([0.4, 0.1, 0.06])
    x[:, 0] += 0.3 * x[:, 0] ** 2  # skewed along every principal axis
    x[:, 1] += 2.0 * x[:, 1] ** 2
    x[:, 2] += 3.0 * x[:, 2] ** 2
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("seed", range(5))
def test_invariant_to_rotation_and_translation(seed):
    x = _worm_like(seed)
    mask = jnp.ones(len(x), bool)
    rot = jnp.asarray(Rotation.random(random_state=seed).as_matrix(), jnp.float32)
    a = canonical_pose(x, mask)
    b = canonical_pose(x @ rot.T + jnp.array([[0.3, -1.0, 2.0]]), mask)
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_mirror_image_stays_mirrored():
    x = _worm_like(0)
    mask = jnp.ones(len(x), bool)
    a = canonical_pose(x, mask)
    m = canonical_pose(x * jnp.array([[-1.0, 1.0, 1.0]]), mask)
    assert not np.allclose(a, m, atol=1e-2)  # no proper rotation maps a worm to its mirror image
    np.testing.assert_allclose(m, a * jnp.array([[1.0, 1.0, -1.0]]), atol=2e-4)


def test_permutation_and_padding():
    x = _worm_like(1)
    mask = jnp.ones(len(x), bool)
    perm = np.random.default_rng(0).permutation(len(x))
    a = canonical_pose(x, mask)
    np.testing.assert_allclose(canonical_pose(x[perm], mask), a[perm], atol=1e-5)
    padded = jnp.concatenate([x, 50.0 * jnp.ones((7, 3))])
    pmask = jnp.concatenate([mask, jnp.zeros(7, bool)])
    out = canonical_pose(padded, pmask)
    np.testing.assert_allclose(out[: len(x)], a, atol=1e-5)
    assert float(jnp.abs(out[len(x) :]).max()) == 0.0


def test_proper_rotation_and_batch():
    x = _worm_like(2)
    mask = jnp.ones(len(x), bool)
    out = canonical_pose(x, mask)
    centred = x - x.mean(0, keepdims=True)
    rot, *_ = np.linalg.lstsq(np.asarray(centred), np.asarray(out), rcond=None)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-4)
    assert np.linalg.det(rot) > 0
    batch = canonical_pose_batch(jnp.stack([x, 2 * x]), jnp.stack([mask, mask]))
    np.testing.assert_allclose(batch[0], out, atol=1e-6)
    np.testing.assert_allclose(jax.jit(canonical_pose)(x, mask), out, atol=1e-6)


def test_sign_flips():
    assert SIGN_FLIPS.shape == (8, 3)
    assert len({tuple(s) for s in SIGN_FLIPS}) == 8
    np.testing.assert_array_equal(np.prod(SIGN_FLIPS[:4], 1), 1)
    np.testing.assert_array_equal(np.prod(SIGN_FLIPS[4:], 1), -1)


def test_oracle_signs_pick_the_best_flip():
    from fdnc_jax.datasets import bundled_worm_paths
    from fdnc_jax.io import load_worm
    from fdnc_jax.pose import oracle_signs
    from fdnc_jax.sim.config import SimConfig
    from fdnc_jax.sim.pairs import make_pair_batch, make_source_bank

    bank = make_source_bank([load_worm(p) for p in bundled_worm_paths()[:3]])
    b = make_pair_batch(jax.random.key(3), bank, 8, SimConfig())
    signs = np.asarray(
        oracle_signs(b.template_xyz, b.template_mask, b.test_xyz, b.test_mask, b.target)
    )
    t = np.asarray(canonical_pose_batch(b.template_xyz, b.template_mask))
    s = np.asarray(canonical_pose_batch(b.test_xyz, b.test_mask))
    for i in range(8):
        ok = np.asarray(b.test_mask[i] & (b.target[i] >= 0))
        partner = t[i][np.asarray(b.target[i])[ok]]
        errors = [np.sum((s[i][ok] * f[None, :] - partner) ** 2) for f in SIGN_FLIPS[:4]]
        np.testing.assert_array_equal(signs[i], SIGN_FLIPS[int(np.argmin(errors))])
    # Identical clouds need no flip.
    same = oracle_signs(
        b.template_xyz,
        b.template_mask,
        b.template_xyz,
        b.template_mask,
        jnp.where(b.template_mask, jnp.arange(b.template_mask.shape[1])[None, :], -3),
    )
    np.testing.assert_array_equal(np.asarray(same), np.ones((8, 3)))
