"""The fDNC training loss and accuracy metrics (pure jax.numpy, no Flax).

Letters: B batch, M test points, N template points (log-probs carry N + 1 columns, the last = outlier).
Targets: ≥ 0 template slot, −1 unlabelled (identity not in the template), −2 outlier, −3 padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ENTROPY_WEIGHT = 0.1


def match_loss(
    log_probs: jax.Array, target: jax.Array, test_mask: jax.Array
) -> dict[str, jax.Array]:
    """Match NLL + outlier NLL, averaged over those points, + 0.1 × mean entropy of unlabelled rows.

    Args:
      log_probs: [B, M, N + 1] log-softmax over template slots and the outlier column.
      target: [B, M] int, codes as in the module docstring.
      test_mask: [B, M] bool.

    Returns:
      dict with ``loss`` (scalar), ``nll`` and ``entropy`` (scalars, nats), and the counts used
      (``n_supervised``, ``n_unlabelled``).

    Example:
      >>> lp = jax.nn.log_softmax(jnp.array([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]]), axis=-1)
      >>> out = match_loss(lp, jnp.array([[0, 1]]), jnp.array([[True, True]]))
      >>> round(float(out["loss"]), 4), int(out["n_supervised"])
      (0.0134, 2)
    """
    n = log_probs.shape[-1] - 1
    matched = test_mask & (target >= 0)  # [B, M]
    outlier = test_mask & (target == -2)
    unlabelled = test_mask & (target == -1)
    column = jnp.where(matched, target, n)  # [B, M], outliers (and unused rows) → outlier column.
    picked = jnp.take_along_axis(log_probs, column[..., None], axis=-1)[..., 0]  # [B, M]
    supervised = matched | outlier
    n_supervised = jnp.sum(supervised)
    nll = -jnp.sum(jnp.where(supervised, picked, 0.0)) / jnp.maximum(n_supervised, 1)
    probs = jnp.exp(log_probs)
    row_entropy = -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)  # [B, M]
    n_unlabelled = jnp.sum(unlabelled)
    entropy = jnp.sum(jnp.where(unlabelled, row_entropy, 0.0)) / jnp.maximum(n_unlabelled, 1)
    return {
        "loss": nll + ENTROPY_WEIGHT * entropy,
        "nll": nll,
        "entropy": entropy,
        "n_supervised": n_supervised,
        "n_unlabelled": n_unlabelled,
    }


def topk_correct(
    log_probs: jax.Array, target: jax.Array, test_mask: jax.Array, ks: tuple[int, ...] = (1, 5)
) -> dict[str, jax.Array]:
    """Counts of matched test points whose true template slot is among the top-k template columns.

    The outlier column is excluded (as at inference). Only points with target ≥ 0 are counted.

    Args:
      log_probs: [B, M, N + 1] log-softmax over template slots and the outlier column.
      target: [B, M] int, codes as in the module docstring.
      test_mask: [B, M] bool.
      ks: the k values to count.

    Returns:
      dict with ``count`` (scalar) and ``top{k}`` (scalar correct counts) for each k.

    Example:
      >>> lp = jax.nn.log_softmax(jnp.array([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]]), axis=-1)
      >>> out = topk_correct(lp, jnp.array([[0, 0]]), jnp.array([[True, True]]), ks=(1, 2))
      >>> {k: int(v) for k, v in out.items()}
      {'count': 2, 'top1': 1, 'top2': 2}
    """
    counted = test_mask & (target >= 0)  # [B, M]
    scores = log_probs[..., :-1]  # [B, M, N]
    true = jnp.take_along_axis(scores, jnp.maximum(target, 0)[..., None], axis=-1)  # [B, M, 1]
    rank = jnp.sum(scores > true, axis=-1)  # [B, M], 0 = best.
    out = {"count": jnp.sum(counted)}
    for k in ks:
        out[f"top{k}"] = jnp.sum(counted & (rank < k))
    return out
