"""Loss and accuracy against hand-computed values."""

import jax.numpy as jnp
import numpy as np

from fdnc_jax import losses


def test_loss_hand_computed():
    # One pair, template of 2 slots + outlier column, 4 test points:
    # matched to slot 1, outlier, unlabelled, padding.
    p = np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]], np.float32)
    log_probs = jnp.log(p)[None]
    target = jnp.array([[1, -2, -1, 0]])
    mask = jnp.array([[True, True, True, False]])
    out = losses.match_loss(log_probs, target, mask)
    nll = -(np.log(0.7) + np.log(0.8)) / 2
    entropy = -np.sum(p[2] * np.log(p[2]))
    np.testing.assert_allclose(out["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(out["entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], nll + 0.1 * entropy, rtol=1e-5)
    assert int(out["n_supervised"]) == 2 and int(out["n_unlabelled"]) == 1


def test_masked_template_columns_do_not_make_nan():
    log_probs = jnp.array([[[0.0, -jnp.inf, -1e9]]])  # prob 1 on slot 0; slot 1 padded.
    out = losses.match_loss(log_probs, jnp.array([[-1]]), jnp.array([[True]]))
    assert np.isfinite(out["loss"]) and float(out["entropy"]) == 0.0


def test_topk():
    p = np.array([[0.1, 0.6, 0.2, 0.1], [0.5, 0.2, 0.1, 0.2], [0.3, 0.3, 0.3, 0.1]], np.float32)
    log_probs = jnp.log(p)[None]
    target = jnp.array([[1, 2, -2]])
    out = losses.topk_correct(log_probs, target, jnp.ones((1, 3), bool), ks=(1, 2, 3))
    assert int(out["count"]) == 2
    assert (int(out["top1"]), int(out["top2"]), int(out["top3"])) == (1, 1, 2)
