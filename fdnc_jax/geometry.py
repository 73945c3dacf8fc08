"""Host-side geometry of a proposed correspondence: how well one affine map explains it.

A correct neuron correspondence between two animals (or two volumes) is close to a smooth map: after
the best affine fit, matched pairs sit within a few µm of each other (across WormND animals, the
residual of shared names after a similarity fit has a median of ~4.5 µm). A correspondence under a
wrong 180° flip of the test's axes, or one that piles neurons onto the wrong side, is not.
``predict`` uses this to choose among orientation hypotheses (``fdnc_jax.orientation.orientation_key``).

Letters: K matched pairs.
"""

from __future__ import annotations

import numpy as np

# IRLS of the robust fit: Cauchy weights 1 / (1 + (r / s)²), s the median residual, floored so that a
# nearly exact fit does not give a handful of pairs all the weight.
AFFINE_ITERATIONS = 5
MIN_SCALE_UM = 1.0


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
    return batched_robust_affine_residuals(x[None], y[None], np.ones((1, len(x)), bool), iterations)[0]


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

    Args:
      source_um: [B, K, 3] positions (µm), rows padded to a common K.
      target_um: [B, K, 3] positions (µm) of their partners.
      valid: [B, K] bool, the real pairs of each correspondence (padding: False).
      iterations: reweighting rounds (≥ 1).

    Returns:
      [B, K] float64 residual distances (µm); NaN where not ``valid`` (a row without pairs is all
      NaN). A correspondence of ≤ 4 pairs is fitted exactly (zeros).

    Example:
      >>> x = np.random.default_rng(0).uniform(0, 80, (2, 30, 3))  # [B=2, K=30, 3] µm
      >>> valid = np.ones((2, 30), bool); valid[1, 20:] = False  # the second has 20 pairs
      >>> r = batched_robust_affine_residuals(x, 2.0 * x + 1.0, valid)
      >>> bool(np.nanmax(r) < 1e-9), int(np.isnan(r).sum())
      (True, 10)
    """
    x = np.asarray(source_um, np.float64)  # [B, K, 3]
    y = np.asarray(target_um, np.float64)  # [B, K, 3]
    valid = np.asarray(valid, bool)  # [B, K]
    count = valid.sum(axis=1)  # [B]
    centre = (x * valid[..., None]).sum(axis=1) / np.maximum(count, 1)[:, None]  # [B, 3]
    design = np.concatenate([x - centre[:, None], np.ones(x.shape[:2] + (1,))], axis=2)  # [B, K, 4]
    design = np.where(valid[..., None], design, 0.0)
    weights = valid.astype(np.float64)  # [B, K]
    for _ in range(iterations):
        weighted = (design * weights[..., None]).transpose(0, 2, 1)  # [B, 4, K]
        coef = _symmetric_solve(weighted @ design, weighted @ y)  # [B, 4, 3]
        residual = np.linalg.norm(design @ coef - y, axis=2)  # [B, K]
        scale = np.maximum(masked_median(residual, valid), MIN_SCALE_UM)  # [B]
        weights = np.where(valid, 1.0 / (1.0 + (residual / scale[:, None]) ** 2), 0.0)
    return np.where(valid, residual, np.nan)


def _symmetric_solve(a: np.ndarray, b: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """Least-norm solutions of a [B, D, D] @ x = b [B, D, C] for symmetric positive semi-definite
    ``a``: eigenvalues below ``rtol`` × the largest count as zero (a rank-deficient fit, e.g. ≤ 3
    pairs, gets the exact minimum-norm solution, as ``np.linalg.lstsq``)."""
    values, vectors = np.linalg.eigh(a)  # [B, D], [B, D, D]
    keep = values > rtol * values.max(axis=1, keepdims=True)
    inverse = np.where(keep, 1.0 / np.where(keep, values, 1.0), 0.0)  # [B, D]
    return vectors @ (inverse[..., None] * (vectors.transpose(0, 2, 1) @ b))


def masked_median(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[B] the median of each row of ``values`` [B, K] over its ``valid`` [B, K] entries (as
    ``np.median``: the mean of the two middle ones for an even count); 0 for an empty row.

    Example:
      >>> masked_median(np.array([[3.0, 1.0, 2.0, 9.0], [4.0, 2.0, 0.0, 0.0]]),
      ...               np.array([[True, True, True, False], [True, True, False, False]])).tolist()
      [2.0, 3.0]
    """
    ordered = np.sort(np.where(valid, values, np.inf), axis=1)  # [B, K], padding last
    count = valid.sum(axis=1)  # [B]
    lo = np.take_along_axis(ordered, np.maximum(count - 1, 0)[:, None] // 2, axis=1)[:, 0]
    hi = np.take_along_axis(ordered, (count // 2)[:, None].clip(max=values.shape[1] - 1), axis=1)
    return np.where(count > 0, 0.5 * (lo + hi[:, 0]), 0.0)
