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
    design = np.concatenate([x - x.mean(axis=0), np.ones((len(x), 1))], axis=1)  # [K, 4]
    weights = np.ones(len(x))  # [K]
    for _ in range(iterations):
        root = np.sqrt(weights)[:, None]
        coef, *_ = np.linalg.lstsq(design * root, y * root, rcond=None)  # [4, 3]
        residual = np.linalg.norm(design @ coef - y, axis=1)  # [K]
        scale = max(float(np.median(residual)), MIN_SCALE_UM)
        weights = 1.0 / (1.0 + (residual / scale) ** 2)
    return residual
