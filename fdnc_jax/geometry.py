"""Geometry of a proposed correspondence: how well one affine map explains it.

A correct neuron correspondence between two animals (or two volumes) is close to a smooth map: after
the best affine fit, matched pairs sit within a few µm of each other (across WormND animals, the
residual of shared names after a similarity fit has a median of ~4.5 µm). A correspondence under a
wrong 180° flip of the test's axes, or one that piles neurons onto the wrong side, is not.
``predict`` uses this to choose among orientation hypotheses (``fdnc_jax.orientation.orientation_key``).
The batched functions run on the host (numpy arrays, float64) or on the device (jax arrays, float32,
also under ``jax.jit``): the same code.

Letters: B correspondences, K matched pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# IRLS of the robust fit: Cauchy weights 1 / (1 + (r / s)²), s the median residual, floored so that a
# nearly exact fit does not give a handful of pairs all the weight.
AFFINE_ITERATIONS = 5
MIN_SCALE_UM = 1.0
# Eigenvalues of the normal equations below this fraction of the largest count as zero (a
# rank-deficient fit: ≤ 3 pairs, collinear or flat clouds), per precision: float32 rounding leaves
# ~1e-7 of the largest where float64 leaves ~1e-16; real fits stay above ~1e-4 (the ones column
# against the squared spread of the positions in µm).
RANK_RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6}


def _array_module(*arrays):
    """jax.numpy when any input is a jax array (or a tracer), else numpy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def robust_affine_residuals(
    source_um: np.ndarray, target_um: np.ndarray, iterations: int = AFFINE_ITERATIONS
) -> np.ndarray:
    """Distances between ``target_um`` and the robust affine image of ``source_um``.

    The affine map (12 parameters, reflections allowed) is fitted by iteratively reweighted least
    squares with Cauchy weights, so a minority of wrong pairs barely moves it.

    Args:
      source_um: [K, 3] positions (µm), e.g. the assigned test neurons.
      target_um: [K, 3] positions (µm) of their partners, e.g. the template neurons.
      iterations: reweighting rounds (≥ 1).

    Returns:
      [K] float64 residual distances (µm). With K ≤ 4 pairs the fit is exact (zeros).

    Raises:
      ValueError: shapes differ or are not [K, 3], K = 0, non-finite values, iterations < 1.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> x = rng.uniform(0, 80, (30, 3))
      >>> y = x @ np.diag([1.1, 0.9, 1.0]) + 5.0
      >>> y[0] += 40.0  # one wrong pair
      >>> r = robust_affine_residuals(x, y)
      >>> bool(r[0] > 30.0), bool(np.median(r[1:]) < 0.5)
      (True, True)
    """
    x = np.asarray(source_um, np.float64)
    y = np.asarray(target_um, np.float64)
    if x.ndim != 2 or x.shape[1] != 3 or x.shape != y.shape:
        raise ValueError(
            f"source_um and target_um must both be [K, 3], got {x.shape} and {y.shape}"
        )
    if not len(x):
        raise ValueError("source_um is empty: at least one pair is needed")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("source_um and target_um must be finite (NaN or inf found)")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return batched_robust_affine_residuals(
        x[None], y[None], np.ones((1, len(x)), bool), iterations
    )[0]


def batched_robust_affine_residuals(
    source_um: np.ndarray,
    target_um: np.ndarray,
    valid: np.ndarray,
    iterations: int = AFFINE_ITERATIONS,
) -> np.ndarray:
    """``robust_affine_residuals`` of B correspondences at once, each its own fit.

    Vectorised over the batch (normal equations of the 4-column design, solved by a batched
    eigendecomposition): thousands of correspondences take well under a second, where one fit at
    a time costs ~0.5 ms each. Inputs are not validated (``robust_affine_residuals`` does).
    numpy inputs: float64 on the host; jax arrays: float32, jit-able (the orientation search on
    an accelerator, ``fdnc_jax.orientation.device_orientation_choice``).

    Args:
      source_um: [B, K, 3] positions (µm), rows padded to a common K.
      target_um: [B, K, 3] positions (µm) of their partners.
      valid: [B, K] bool, the real pairs of each correspondence (padding: False).
      iterations: reweighting rounds (≥ 1).

    Returns:
      [B, K] residual distances (µm; float64, or float32 for jax inputs); NaN where not ``valid``
      (a row without pairs is all NaN). A correspondence of ≤ 4 pairs is fitted exactly (zeros).

    Example:
      >>> x = np.random.default_rng(0).uniform(0, 80, (2, 30, 3))  # [B=2, K=30, 3] µm
      >>> valid = np.ones((2, 30), bool); valid[1, 20:] = False  # the second has 20 pairs
      >>> r = batched_robust_affine_residuals(x, 2.0 * x + 1.0, valid)
      >>> bool(np.nanmax(r) < 1e-9), int(np.isnan(r).sum())
      (True, 10)
    """
    xp = _array_module(source_um, target_um, valid)
    dtype = np.float64 if xp is np else np.float32
    x = xp.asarray(source_um, dtype)  # [B, K, 3]
    y = xp.asarray(target_um, dtype)  # [B, K, 3]
    valid = xp.asarray(valid, bool)  # [B, K]
    x, y = xp.where(valid[..., None], x, 0.0), xp.where(valid[..., None], y, 0.0)  # no NaN padding
    count = valid.sum(axis=1)  # [B]
    centre = x.sum(axis=1) / xp.maximum(count, 1)[:, None]  # [B, 3]
    # The target centred as well: the same residuals (the fit has a translation), fewer float32
    # digits lost to positions far from the origin.
    y = xp.where(valid[..., None], y - (y.sum(axis=1) / xp.maximum(count, 1)[:, None])[:, None], 0.0)
    ones = xp.ones(x.shape[:2] + (1,), dtype)
    design = xp.concatenate([x - centre[:, None], ones], axis=2)  # [B, K, 4]
    design = xp.where(valid[..., None], design, 0.0)
    weights = valid.astype(dtype)  # [B, K]
    for _ in range(iterations):
        weighted = (design * weights[..., None]).transpose(0, 2, 1)  # [B, 4, K]
        coef = _symmetric_solve(weighted @ design, weighted @ y, RANK_RTOL[np.dtype(dtype)])
        residual = xp.linalg.norm(design @ coef - y, axis=2)  # [B, K]
        scale = xp.maximum(masked_median(residual, valid), MIN_SCALE_UM)  # [B]
        weights = xp.where(valid, 1.0 / (1.0 + (residual / scale[:, None]) ** 2), 0.0)
    return xp.where(valid, residual, np.nan)


def _symmetric_solve(a, b, rtol: float):
    """Least-norm solutions of a [B, D, D] @ x = b [B, D, C] for symmetric positive semi-definite
    ``a``: eigenvalues below ``rtol`` × the largest count as zero (a rank-deficient fit, e.g. ≤ 3
    pairs, gets the exact minimum-norm solution, as ``np.linalg.lstsq``)."""
    xp = _array_module(a, b)
    values, vectors = xp.linalg.eigh(a)  # [B, D], [B, D, D]
    keep = values > rtol * values.max(axis=1, keepdims=True)
    inverse = xp.where(keep, 1.0 / xp.where(keep, values, 1.0), 0.0)  # [B, D]
    return vectors @ (inverse[..., None] * (vectors.transpose(0, 2, 1) @ b))


def masked_median(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[B] the median of each row of ``values`` [B, K] over its ``valid`` [B, K] entries (as
    ``np.median``: the mean of the two middle ones for an even count); 0 for an empty row. numpy
    or jax arrays (jit-able).

    Example:
      >>> masked_median(np.array([[3.0, 1.0, 2.0, 9.0], [4.0, 2.0, 0.0, 0.0]]),
      ...               np.array([[True, True, True, False], [True, True, False, False]])).tolist()
      [2.0, 3.0]
    """
    xp = _array_module(values, valid)
    ordered = xp.sort(xp.where(valid, values, np.inf), axis=1)  # [B, K], padding last
    count = valid.sum(axis=1)  # [B]
    lo = xp.take_along_axis(ordered, xp.maximum(count - 1, 0)[:, None] // 2, axis=1)[:, 0]
    hi = xp.take_along_axis(ordered, (count // 2)[:, None].clip(max=values.shape[1] - 1), axis=1)
    return xp.where(count > 0, 0.5 * (lo + hi[:, 0]), 0.0)
