"""fdnc_jax.geometry: the robust affine residual of a correspondence."""

import numpy as np
import pytest

from fdnc_jax.geometry import (
    batched_robust_affine_residuals,
    masked_median,
    robust_affine_residuals,
)


def _cloud(seed: int, k: int = 60) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-40, 40, (k, 3))  # [K, 3] µm


def test_an_affine_copy_has_zero_residual_reflections_included():
    x = _cloud(0)
    a = np.array([[0.9, 0.3, 0.0], [-0.2, 1.1, 0.1], [0.0, 0.1, -1.2]])  # det < 0: a mirror image
    y = x @ a.T + [3.0, -8.0, 2.0]
    np.testing.assert_allclose(robust_affine_residuals(x, y), 0.0, atol=1e-9)


def test_a_minority_of_wrong_pairs_does_not_move_the_fit():
    """20 % of the pairs scrambled: the right ones keep ~0 residual (a plain least-squares fit
    would spread the error over all), the wrong ones stand out."""
    rng = np.random.default_rng(1)
    x = _cloud(1, 100)
    y = x * 1.05 + 4.0
    wrong = rng.choice(100, 20, replace=False)
    y[wrong] = y[rng.permutation(wrong)]
    r = robust_affine_residuals(x, y)
    right = np.setdiff1d(np.arange(100), wrong)
    moved = wrong[np.linalg.norm(x[wrong] * 1.05 + 4.0 - y[wrong], axis=1) > 1.0]
    assert np.median(r[right]) < 0.5
    assert np.min(r[moved]) > 1.0
    plain = robust_affine_residuals(x, y, iterations=1)  # one round = ordinary least squares
    assert np.median(plain[right]) > 4 * np.median(r[right])


def test_a_scrambled_correspondence_has_a_large_median_residual():
    x = _cloud(2)
    y = x[np.random.default_rng(2).permutation(len(x))]
    assert np.median(robust_affine_residuals(x, y)) > 10.0


@pytest.mark.parametrize(
    "source,target,message",
    [
        (np.zeros((5, 2)), np.zeros((5, 2)), r"\[K, 3\]"),
        (np.zeros((5, 3)), np.zeros((6, 3)), r"\[K, 3\]"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "empty"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), "finite"),
    ],
)
def test_bad_input_is_named(source, target, message):
    with pytest.raises(ValueError, match=message):
        robust_affine_residuals(source, target)


def test_iterations_must_be_positive():
    with pytest.raises(ValueError, match="iterations"):
        robust_affine_residuals(_cloud(3), _cloud(3), iterations=0)


def _lstsq_irls(x: np.ndarray, y: np.ndarray, iterations: int = 5) -> np.ndarray:
    """The robust fit written out with np.linalg.lstsq, one correspondence at a time."""
    design = np.concatenate([x - x.mean(axis=0), np.ones((len(x), 1))], axis=1)
    weights = np.ones(len(x))
    for _ in range(iterations):
        root = np.sqrt(weights)[:, None]
        coef, *_ = np.linalg.lstsq(design * root, y * root, rcond=None)
        residual = np.linalg.norm(design @ coef - y, axis=1)
        scale = max(float(np.median(residual)), 1.0)
        weights = 1.0 / (1.0 + (residual / scale) ** 2)
    return residual


def test_the_batched_fit_equals_each_correspondence_fitted_alone():
    """Ragged correspondences (padding rows hold garbage) against the lstsq IRLS of each."""
    rng = np.random.default_rng(4)
    sizes = [60, 41, 17, 5, 4, 2]
    x = rng.uniform(-40, 40, (len(sizes), 60, 3))
    y = x * 1.05 + rng.normal(0, 2.0, x.shape)
    y[:, ::5] = rng.uniform(-40, 40, y[:, ::5].shape)  # some wrong pairs
    valid = np.arange(60)[None] < np.array(sizes)[:, None]
    r = batched_robust_affine_residuals(x, y, valid)
    for b, k in enumerate(sizes):
        np.testing.assert_allclose(r[b, :k], _lstsq_irls(x[b, :k], y[b, :k]), atol=1e-8)
        assert np.isnan(r[b, k:]).all()
    assert np.nanmax(np.abs(r[-2:])) < 1e-8  # ≤ 4 pairs: an exact fit


def test_masked_median_is_numpys_median_of_the_valid_entries():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(7, 9))
    valid = np.arange(9)[None] < np.array([9, 8, 5, 2, 1, 3, 0])[:, None]
    got = masked_median(values, valid)
    want = [np.median(v[m]) if m.any() else 0.0 for v, m in zip(values, valid, strict=True)]
    np.testing.assert_allclose(got, want)


def test_flat_and_collinear_clouds_fit_as_lstsq():
    """A 2-D recording (all z equal) or collinear points make the normal equations singular: the
    batched solve gives lstsq's minimum-norm fit, not a blow-up."""
    rng = np.random.default_rng(6)
    flat = rng.uniform(-40, 40, (50, 3))
    flat[:, 2] = 3.0
    line = flat.copy()
    line[:, 1] = 2.0 * line[:, 0]
    y = flat * 1.1 + rng.normal(0, 1.0, flat.shape)
    y[:, 2] = 5.0
    for x in (flat, line):
        np.testing.assert_allclose(robust_affine_residuals(x, y), _lstsq_irls(x, y), atol=1e-8)


def test_the_device_fit_under_jit_equals_the_host_fit():
    """jax arrays run the same code in float32 under jit (the orientation search on an
    accelerator): the residuals and medians of the float64 host fit within 0.005 µm, for
    ragged sizes, exact fits (≤ 4 pairs), a flat (2-D) cloud and positions far from the origin."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(7)
    sizes = [60, 41, 17, 4, 2, 60]
    x = rng.uniform(-40, 40, (len(sizes), 60, 3))
    x[-1, :, 2] = 3.0  # flat: singular normal equations
    x[2] += 500.0  # far from the origin (µm)
    y = x * 1.05 + rng.normal(0, 2.0, x.shape)
    y[:, ::5] = rng.uniform(-40, 40, y[:, ::5].shape)  # some wrong pairs
    valid = np.arange(60)[None] < np.array(sizes)[:, None]

    @jax.jit
    def device(x, y, valid):
        r = batched_robust_affine_residuals(x, y, valid)
        return r, masked_median(jnp.where(valid, r, 0.0), valid)

    r, median = device(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), valid)
    assert r.dtype == jnp.float32
    want = batched_robust_affine_residuals(x, y, valid)
    np.testing.assert_allclose(np.asarray(r)[valid], want[valid], rtol=1e-5, atol=5e-3)
    assert np.isnan(np.asarray(r)[~valid]).all()
    np.testing.assert_allclose(median, masked_median(want, valid), rtol=1e-5, atol=5e-3)
