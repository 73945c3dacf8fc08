"""Canonical pose: a centerline-free, data-derived orientation for a neuron cloud (pure jax.numpy).

Worms arrive in arbitrary orientation. Rather than asking the network to learn rotation invariance
from scratch, each cloud can be rotated to its own principal axes (x = longest extent ≈ anterior–
posterior, y = second, z = third), with the sign of each axis fixed by the skewness of the point
density along it, and the third axis chosen so that the rotation is proper (chirality is kept: a
left–right mirror image stays a mirror image). Only positions are used — never annotated axes.

The sign choice is ambiguous when a skewness is near zero; ``SIGN_FLIPS`` lists the 4 proper
180° flips (and, with mirroring, all 8 sign patterns) that inference may search over.

Letters: P points.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Sign patterns applied to canonical coordinates: first the 4 proper rotations (det +1), then the 4
# mirror images (det −1).
SIGN_FLIPS = np.array(
    [
        [1, 1, 1],
        [-1, -1, 1],
        [-1, 1, -1],
        [1, -1, -1],  # identity and the 180° flips
        [-1, 1, 1],
        [1, -1, 1],
        [1, 1, -1],
        [-1, -1, -1],  # mirror images
    ],
    np.float32,
)


def canonical_pose(xyz: jax.Array, mask: jax.Array) -> jax.Array:
    """Rotates one cloud to its principal axes, signs fixed by skewness; proper rotation.

    Args:
      xyz: [P, 3] positions (model units), valid where ``mask``.
      mask: [P] bool.

    Returns:
      [P, 3] canonical coordinates centred on the valid points' mean; padded rows are 0.

    Example:
      >>> xyz = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)) * [1.0, 3.0, 2.0])
      >>> c = canonical_pose(xyz, jnp.ones(10, bool))
      >>> bool(jnp.all(jnp.diff(jnp.var(c, axis=0)) < 0))  # x has the largest spread
      True
    """
    w = mask.astype(xyz.dtype)  # [P]
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(xyz * w[:, None], axis=0) / n  # [3]
    centred = (xyz - mean[None, :]) * w[:, None]  # [P, 3]
    cov = centred.T @ centred / n  # [3, 3]
    _, vecs = jnp.linalg.eigh(cov)  # ascending eigenvalues; columns are eigenvectors
    axes = vecs[:, ::-1]  # [3, 3], columns: largest variance first
    proj = centred @ axes  # [P, 3]
    skew = jnp.sum(proj**3 * w[:, None], axis=0)  # [3]
    sign = jnp.where(skew[:2] >= 0, 1.0, -1.0)  # [2]
    third = jnp.linalg.det(axes) * sign[0] * sign[1]  # keeps det(R) = +1
    rotation = axes * jnp.concatenate([sign, third[None]])[None, :]  # [3, 3]
    return (centred @ rotation) * w[:, None]


def canonical_pose_batch(xyz: jax.Array, mask: jax.Array) -> jax.Array:
    """``canonical_pose`` over a batch: xyz [B, P, 3], mask [B, P] → [B, P, 3].

    Args:
      xyz: [B, P, 3] positions (model units), valid where ``mask``.
      mask: [B, P] bool.

    Returns:
      [B, P, 3] canonical coordinates, one cloud at a time.

    Example:
      >>> canonical_pose_batch(jnp.ones((2, 5, 3)), jnp.ones((2, 5), bool)).shape
      (2, 5, 3)
    """
    return jax.vmap(canonical_pose)(xyz, mask)


def oracle_signs(
    template_xyz: jax.Array,
    template_mask: jax.Array,
    test_xyz: jax.Array,
    test_mask: jax.Array,
    target: jax.Array,
) -> jax.Array:
    """For training: the proper sign flip of the test's canonical axes that best aligns it with the
    template, using the known correspondence (inference searches the same flips without it).

    Args:
      template_xyz: [B, N, 3], template_mask: [B, N]; test_xyz: [B, M, 3], test_mask: [B, M].
      target: [B, M] int, template slot of each test point (≥ 0) or a negative code.

    Returns:
      [B, 3] ±1 signs, one of ``SIGN_FLIPS[:4]`` per pair.

    Example:
      >>> xyz = jnp.asarray(np.random.default_rng(0).normal(size=(1, 10, 3)))
      >>> mask = jnp.ones((1, 10), bool)
      >>> oracle_signs(xyz, mask, xyz, mask, jnp.arange(10)[None]).tolist()
      [[1.0, 1.0, 1.0]]
    """
    t = canonical_pose_batch(template_xyz, template_mask)  # [B, N, 3]
    s = canonical_pose_batch(test_xyz, test_mask)  # [B, M, 3]
    matched = (test_mask & (target >= 0)).astype(s.dtype)  # [B, M]
    partner = jnp.take_along_axis(t, jnp.maximum(target, 0)[..., None], axis=1)  # [B, M, 3]
    flips = jnp.asarray(SIGN_FLIPS[:4])  # [4, 3]
    # [B, 4, M, 3] residuals of every flipped test point to its partner.
    residual = s[:, None, :, :] * flips[None, :, None, :] - partner[:, None, :, :]
    error = jnp.sum(jnp.sum(residual**2, axis=-1) * matched[:, None, :], axis=-1)  # [B, 4]
    return flips[jnp.argmin(error, axis=1)]
