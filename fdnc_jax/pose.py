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
        [1, 1, 1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1],  # identity and the 180° flips
        [-1, 1, 1], [1, -1, 1], [1, 1, -1], [-1, -1, -1],  # mirror images
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
    """``canonical_pose`` over a batch: xyz [B, P, 3], mask [B, P] → [B, P, 3]."""
    return jax.vmap(canonical_pose)(xyz, mask)
