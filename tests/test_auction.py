"""fdnc_jax.auction: the parallel auction against scipy's exact assignment, and its use in
matching.match_batch_device (solver="auction")."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.special import log_softmax

from fdnc_jax import auction
from fdnc_jax import matching as mt

TOL = auction.DEFAULT_TOLERANCE


def _scipy_best(scores: np.ndarray, valid: np.ndarray) -> tuple[int, float]:
    """(number of real pairs, total score) of scipy's maximum-cardinality maximum-score matching
    of the real cells (finite scores in valid rows)."""
    real = np.isfinite(scores) & valid[:, None]
    if not real.any():
        return 0, 0.0
    sub = np.where(real, scores, np.nan).astype(np.float64)
    big = np.nanmax(-sub) + 1.0 + (np.nanmax(sub) - np.nanmin(sub) + 1.0) * (min(sub.shape) + 1)
    r, c = linear_sum_assignment(np.where(real, -sub, big))
    ok = real[r, c]
    return int(ok.sum()), float(sub[r[ok], c[ok]].sum())


def _check_against_scipy(scores: np.ndarray, valid: np.ndarray, assign: np.ndarray) -> float:
    """Asserts a valid one-to-one, maximum-cardinality, ε-optimal assignment; returns its gap."""
    rows = np.flatnonzero(assign >= 0)
    cols = assign[rows]
    assert len(set(cols.tolist())) == len(cols), "not one-to-one"
    assert valid[rows].all() and np.isfinite(scores[rows, cols]).all(), "assigned a non-real cell"
    card, best = _scipy_best(scores, valid)
    assert len(rows) == card, (len(rows), card)
    total = float(scores[rows, cols].astype(np.float64).sum())
    gap = best - total
    assert gap <= TOL + 1e-5 * (1.0 + abs(best)), gap
    return gap


def _random_problems(rng: np.random.Generator, b: int, m: int, n: int):
    """[B, M, N] scores of four kinds (uniform, integer ties, peaked log-probs, wide normal) with
    random sizes inside the padded shape, forbidden (−inf) and NaN cells, invalid rows."""
    scores = np.full((b, m, n), -np.inf, np.float32)
    valid = np.zeros((b, m), bool)
    for i in range(b):
        mi, ni = int(rng.integers(1, m + 1)), int(rng.integers(1, n + 1))
        kind = i % 4
        if kind == 0:
            s = rng.random((mi, ni))
        elif kind == 1:
            s = rng.integers(0, 4, (mi, ni)).astype(float)  # many exact ties
        elif kind == 2:
            s = log_softmax(4.0 * rng.normal(size=(mi, ni + 1)), axis=1)[:, :ni]
        else:
            s = 30.0 * rng.normal(size=(mi, ni))
        s[rng.random((mi, ni)) < 0.15] = -np.inf
        if i % 7 == 0:
            s[rng.random((mi, ni)) < 0.05] = np.nan
        scores[i, :mi, :ni] = s
        valid[i, :mi] = rng.random(mi) < 0.9
    return scores, valid


@pytest.mark.parametrize("shape", [(20, 26), (26, 20)])  # fewer / more rows than columns
def test_auction_is_epsilon_optimal_with_maximum_cardinality(shape):
    rng = np.random.default_rng(sum(shape))
    scores, valid = _random_problems(rng, 96, *shape)
    assign, converged = auction.auction_assignment_batch(scores, valid)
    assign, converged = np.asarray(assign), np.asarray(converged)
    assert converged.all()
    gaps = [_check_against_scipy(scores[i], valid[i], assign[i]) for i in range(len(scores))]
    assert max(gaps) <= TOL
    assert np.mean(np.asarray(gaps) <= 1e-6) > 0.8  # mostly the optimum itself
    assert (assign[~valid] == -1).all()


@pytest.mark.parametrize("max_rounds", [None, 40])
def test_compacted_batch_equals_lock_step_batch(monkeypatch, max_rounds):
    """Moving the unfinished problems on in smaller batches (here 128 → 32 → 8) changes nothing:
    the same assignments, finished flags and rounds per problem as the whole batch in lock-step,
    also when ``max_rounds`` stops the auction midway."""
    rng = np.random.default_rng(11)
    scores, valid = _random_problems(rng, 128, 20, 26)

    def solve(compact_min: int):
        monkeypatch.setattr(auction, "COMPACT_MIN", compact_min)  # read when traced
        fn = jax.jit(lambda s, v: auction.auction_batch(s, v, max_rounds=max_rounds))
        return [np.asarray(x) for x in fn(scores, valid)]

    assert auction._compacted_sizes(128) == (32,)  # the default: down to 32 problems
    monkeypatch.setattr(auction, "COMPACT_MIN", 4)
    assert auction._compacted_sizes(128) == (32, 8)
    compacted, lock_step = solve(4), solve(10**6)
    for got, want in zip(compacted, lock_step, strict=True):
        np.testing.assert_array_equal(got, want)
    assign, done, rounds = compacted
    if max_rounds is None:
        assert done.all() and len(set(rounds.tolist())) > 10  # problems finish at many rounds
        for i in range(len(scores)):
            _check_against_scipy(scores[i], valid[i], assign[i])
    else:
        assert not done.all() and done.any() and rounds.max() <= max_rounds


def test_auction_equals_scipy_on_network_scores():
    """The bundled model's log-probs on the demo pair (194 × 194, padded; a 120-neuron subset of
    the test worm; with the color term, whose range is ~20× larger): the very assignment scipy
    finds."""
    import fdnc_jax as fd

    predict_mod = importlib.import_module("fdnc_jax.predict")
    template, test = fd.load_demo_pair()
    model = fd.load_pretrained()
    found = predict_mod._hypothesis_log_probs(model, template, [test], np.ones((1, 3), np.float32))
    lp = found[0, 0][:, :-1]  # [194, 194]
    color = mt.match_scores(
        found[0, 0], template_color=template.color, test_color=test.color
    ).astype(np.float32)
    scores = np.full((3, 208, 208), -np.inf, np.float32)
    valid = np.zeros((3, 208), bool)
    scores[0, :194, :194], valid[0, :194] = lp, True
    scores[1, :120, :194], valid[1, :120] = lp[:120], True
    scores[2, :194, :194], valid[2, :194] = color, True
    assign, converged = auction.auction_assignment_batch(scores, valid)
    assert np.asarray(converged).all()
    for i, (s, rows) in enumerate(((lp, 194), (lp, 120), (color, 194))):
        r, c = linear_sum_assignment(-s[:rows].astype(np.float64))
        want = np.full(208, -1)
        want[r] = c
        np.testing.assert_array_equal(np.asarray(assign)[i], want)


def test_auction_degenerate_problems():
    one = auction.auction_assignment_batch(np.array([[[3.0]]]), np.ones((1, 1), bool))
    assert np.asarray(one[0]).tolist() == [[0]] and bool(one[1][0])
    nothing = np.full((2, 3, 4), -np.inf, np.float32)
    assign, converged = auction.auction_assignment_batch(nothing, np.ones((2, 3), bool))
    assert (np.asarray(assign) == -1).all() and np.asarray(converged).all()
    scores = np.ones((1, 3, 4), np.float32)  # all rows invalid
    assign, converged = auction.auction_assignment_batch(scores, np.zeros((1, 3), bool))
    assert (np.asarray(assign) == -1).all() and bool(converged[0])
    empty = auction.auction_assignment(jnp.zeros((0, 4)), jnp.zeros((0,), bool))
    assert empty[0].shape == (0,) and bool(empty[1])
    ties = np.zeros((1, 5, 5), np.float32)  # every assignment is optimal
    assign = np.asarray(auction.auction_assignment_batch(ties, np.ones((1, 5), bool))[0])[0]
    assert sorted(assign.tolist()) == [0, 1, 2, 3, 4]


def test_auction_is_vmappable_and_jittable_as_a_pure_function():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(3, 6, 6)).astype(np.float32)
    fn = jax.jit(jax.vmap(auction.auction_assignment))
    got, _ = fn(jnp.asarray(scores), jnp.ones((3, 6), bool))
    for i in range(3):
        r, c = linear_sum_assignment(-scores[i].astype(np.float64))
        np.testing.assert_array_equal(np.asarray(got)[i][r], c)


def test_unfinished_auctions_are_reported_and_match_batch_device_falls_back(monkeypatch):
    rng = np.random.default_rng(2)
    lp = log_softmax(3.0 * rng.normal(size=(4, 9, 12)), axis=-1).astype(np.float32)  # [B, M, N+1]
    t_mask, s_mask = np.ones((4, 11), bool), np.ones((4, 9), bool)
    _, converged = auction.auction_assignment_batch(lp[..., :-1], s_mask, max_rounds=2)
    assert not np.asarray(converged).any()
    monkeypatch.setattr(auction, "MAX_ROUNDS", 2)  # read when the device matching is traced
    got = mt.match_batch_device(lp, t_mask, s_mask, top_k=2, solver="auction")
    want = mt.match_batch_device(lp, t_mask, s_mask, top_k=2, solver="hungarian")
    np.testing.assert_array_equal(np.asarray(got["assignment"]), np.asarray(want["assignment"]))


@pytest.mark.parametrize("with_color", [False, True])
def test_match_batch_device_auction_agrees_with_hungarian(with_color):
    rng = np.random.default_rng(int(with_color))
    b, m, n = 12, 10, 13
    lp = log_softmax(4.0 * rng.normal(size=(b, m, n + 1)), axis=-1).astype(np.float32)
    t_mask = rng.random((b, n)) < 0.8
    t_mask[:, :3] = True
    s_mask = rng.random((b, m)) < 0.85
    colors = {}
    if with_color:
        colors = {
            "template_color": mt.normalize_color(rng.random((b * n, 3))).reshape(b, n, 3),
            "test_color": mt.normalize_color(rng.random((b * m, 3))).reshape(b, m, 3),
        }
    kwargs = dict(top_k=3, temperature=1.5, **colors)
    hun = mt.match_batch_device(lp, t_mask, s_mask, solver="hungarian", **kwargs)
    auc = mt.match_batch_device(lp, t_mask, s_mask, solver="auction", **kwargs)
    for key in ("candidates", "candidate_probs", "outlier_probability"):
        np.testing.assert_array_equal(np.asarray(auc[key]), np.asarray(hun[key]))
    same = np.asarray(auc["assignment"]) == np.asarray(hun["assignment"])
    assert same.mean() > 0.95
    # Where they differ, both are optimal (ties within the tolerance): equal totals.
    scores = np.where(t_mask[:, None, :] & s_mask[:, :, None], lp[..., :n], -np.inf)
    if with_color:
        c = np.einsum("bmc,bnc->bmn", colors["test_color"], np.log(colors["template_color"]))
        c -= np.sum(colors["test_color"] * np.log(colors["test_color"]), -1)[..., None]
        scores = scores + mt.DEFAULT_COLOR_WEIGHT * c
    for i in range(b):
        _check_against_scipy(scores[i], s_mask[i], np.asarray(auc["assignment"])[i])


def test_bad_arguments():
    scores, valid = np.zeros((1, 2, 2), np.float32), np.ones((1, 2), bool)
    with pytest.raises(ValueError, match="rank 3"):
        auction.auction_assignment_batch(scores[0], valid)
    with pytest.raises(ValueError, match="valid must have shape"):
        auction.auction_assignment_batch(scores, valid[:, :1])
    for bad in (0.0, -1.0, np.nan, np.inf, "1e-2", True):
        with pytest.raises(ValueError, match="tolerance"):
            auction.auction_assignment_batch(scores, valid, tolerance=bad)
    lp = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="solver"):
        mt.match_batch_device(lp, valid, valid, top_k=1, solver="greedy")


def test_auction_equals_scipy_on_real_color_scores(shared_data):
    """Real NeuroPAL pairs with the color term (score range ~670): a pair whose second-best
    assignment is only 0.002 below the best (25 of 194 neurons swapped) came out second best
    while ε was floored at 2^-18 × the range; with the floor at 2^-20 it is the optimum."""
    import warnings

    import fdnc_jax as fd
    from fdnc_jax.datasets import resolve_worm_files
    from fdnc_jax.evaluate import _unique_template

    predict_mod = importlib.import_module("fdnc_jax.predict")
    files = resolve_worm_files(str(shared_data / "data" / "wormnd" / "NP_*.npz"))[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template, *tests = [_unique_template(fd.load_worm(p))[0] for p in files]
    model = fd.load_pretrained()
    signs = predict_mod.orientation_hypotheses(model, "auto")
    lps, _ = predict_mod._log_probs(model, template, tests, signs)
    size = predict_mod.bucket_size(max(template.n, *(t.n for t in tests)))
    scores = np.full((len(tests), size, size), -np.inf, np.float32)
    valid = np.zeros((len(tests), size), bool)
    for i, (lp, test) in enumerate(zip(lps, tests, strict=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = mt.match_scores(lp, template_color=template.color, test_color=test.color)
        scores[i, : test.n, : template.n], valid[i, : test.n] = s, True
    assign, converged = auction.auction_assignment_batch(scores, valid)
    assert np.asarray(converged).all()
    for i, test in enumerate(tests):
        r, c = linear_sum_assignment(-scores[i, : test.n, : template.n].astype(np.float64))
        np.testing.assert_array_equal(np.asarray(assign)[i, r], c)
