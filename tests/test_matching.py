"""Tests for fdnc_jax.matching (host Hungarian matching, color term, device batched Hungarian)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.special import log_softmax, softmax

from fdnc_jax import matching as mt


def _log_probs(rng: np.random.Generator, m: int, n: int, scale: float = 3.0) -> np.ndarray:
    """Random row-wise log-softmax output [M, N+1] (last column = outlier)."""
    return log_softmax(scale * rng.normal(size=(m, n + 1)), axis=1).astype(np.float32)


def _brute_force(scores: np.ndarray) -> tuple[float, np.ndarray]:
    """Best total score and assignment over all one-to-one maximum-cardinality matchings."""
    m, n = scores.shape
    best, best_assign = -np.inf, None
    if m <= n:
        for cols in itertools.permutations(range(n), m):
            total = scores[np.arange(m), cols].sum()
            if total > best:
                best, best_assign = total, np.array(cols)
    else:
        for rows in itertools.permutations(range(m), n):
            total = scores[list(rows), np.arange(n)].sum()
            if total > best:
                best = total
                best_assign = np.full(m, -1)
                best_assign[list(rows)] = np.arange(n)
    return best, best_assign


def _scipy_assignment(scores: np.ndarray, row_valid: np.ndarray, col_valid: np.ndarray):
    m = scores.shape[0]
    ref = np.full(m, -1)
    rows, cols = np.flatnonzero(row_valid), np.flatnonzero(col_valid)
    if rows.size and cols.size:
        r, c = linear_sum_assignment(-scores[np.ix_(rows, cols)])
        ref[rows[r]] = cols[c]
    return ref


# ---------------------------------------------------------------------------------------------
# Hungarian correctness.


@pytest.mark.parametrize("m,n", [(1, 1), (2, 3), (3, 3), (4, 4), (3, 5), (4, 2), (5, 3)])
def test_match_equals_brute_force(m, n):
    rng = np.random.default_rng(m * 10 + n)
    for _ in range(5):
        lp = _log_probs(rng, m, n)
        result = mt.match(lp, top_k=1)
        scores = lp[:, :n].astype(np.float64)
        best, best_assign = _brute_force(scores)
        got = result.assignment
        total = scores[got >= 0, got[got >= 0]].sum()
        np.testing.assert_allclose(total, best, rtol=1e-6)
        np.testing.assert_array_equal(got, best_assign)


@pytest.mark.parametrize("m,n", [(30, 30), (25, 40), (40, 25)])
def test_match_equals_scipy_random(m, n):
    rng = np.random.default_rng(m + 7 * n)
    lp = _log_probs(rng, m, n)
    result = mt.match(lp)
    ref = _scipy_assignment(lp[:, :n], np.ones(m, bool), np.ones(n, bool))
    np.testing.assert_array_equal(result.assignment, ref)


def test_assignment_one_to_one_and_probabilities():
    rng = np.random.default_rng(0)
    m, n, k = 20, 24, 5
    lp = _log_probs(rng, m, n)
    res = mt.match(lp, top_k=k)
    assigned = res.assignment[res.assignment >= 0]
    assert assigned.size == m
    assert np.unique(assigned).size == assigned.size
    assert np.all((res.probability >= 0) & (res.probability <= 1))
    assert np.all((res.candidate_probs >= 0) & (res.candidate_probs <= 1))
    assert res.candidates.shape == (m, k) and res.candidate_probs.shape == (m, k)
    # Sorted by decreasing probability, and equal to the row softmax of L.
    assert np.all(np.diff(res.candidate_probs, axis=1) <= 0)
    probs = softmax(lp[:, :n].astype(np.float64), axis=1)
    np.testing.assert_allclose(
        res.candidate_probs, np.take_along_axis(probs, res.candidates, axis=1), rtol=1e-6
    )
    np.testing.assert_array_equal(res.candidates[:, 0], probs.argmax(axis=1))
    np.testing.assert_allclose(res.probability, probs[np.arange(m), res.assignment], rtol=1e-6)
    np.testing.assert_allclose(res.outlier_probability, np.exp(lp[:, n]), rtol=1e-6)
    assert res.num_assigned == m


def test_more_test_than_template_leaves_unmatched():
    rng = np.random.default_rng(1)
    m, n = 9, 5
    res = mt.match(_log_probs(rng, m, n), top_k=3)
    assert np.sum(res.assignment == -1) == m - n
    assert np.all(res.probability[res.assignment == -1] == 0)
    assigned = res.assignment[res.assignment >= 0]
    assert sorted(assigned.tolist()) == list(range(n))


def test_masks_padding_rows_and_columns():
    rng = np.random.default_rng(2)
    m, n = 8, 10
    lp = _log_probs(rng, m, n)
    t_mask = np.ones(n, bool)
    t_mask[[2, 7]] = False
    q_mask = np.ones(m, bool)
    q_mask[[0, 5]] = False
    res = mt.match(lp, template_mask=t_mask, test_mask=q_mask, top_k=8)
    assert np.all(res.assignment[~q_mask] == -1)
    assert np.all(res.probability[~q_mask] == 0)
    assert np.all(res.candidates[~q_mask] == -1)
    assert np.all(res.candidate_probs[~q_mask] == 0)
    assert np.all(res.outlier_probability[~q_mask] == 0)
    assert not np.isin(res.assignment, [2, 7]).any()
    assert not np.isin(res.candidates, [2, 7]).any()
    ref = _scipy_assignment(lp[:, :n], q_mask, t_mask)
    np.testing.assert_array_equal(res.assignment, ref)
    # Row probabilities renormalise over the valid template neurons only.
    np.testing.assert_allclose(res.candidate_probs[q_mask].sum(axis=1), 1.0, rtol=1e-6)


def test_minus_inf_template_columns_are_padding_and_never_candidates():
    rng = np.random.default_rng(3)
    m, n = 4, 6
    logits = rng.normal(size=(m, n + 1))
    logits[:, [1, 4]] = -np.inf
    # Make valid probabilities underflow to exactly 0 for most columns.
    logits[:, 0] = 2000.0
    lp = log_softmax(logits, axis=1).astype(np.float32)
    res = mt.match(lp, top_k=4)
    assert not np.isin(res.candidates, [1, 4]).any()
    assert not np.isin(res.assignment, [1, 4]).any()
    with pytest.raises(ValueError, match="top_k"):
        mt.match(lp, top_k=5)


def test_min_probability_thresholding():
    rng = np.random.default_rng(4)
    m, n = 12, 12
    lp = _log_probs(rng, m, n, scale=1.5)
    base = mt.match(lp)
    thr = float(np.median(base.probability))
    res = mt.match(lp, min_probability=thr)
    keep = base.probability >= thr
    np.testing.assert_array_equal(res.assignment[keep], base.assignment[keep])
    assert np.all(res.assignment[~keep] == -1)
    assert np.all(res.probability[~keep] == 0)
    np.testing.assert_array_equal(res.candidates, base.candidates)
    assert np.all(mt.match(lp, min_probability=1.0).assignment == -1)


def test_accepts_jax_arrays():
    rng = np.random.default_rng(5)
    lp = _log_probs(rng, 5, 6)
    a = mt.match(jnp.asarray(lp), template_mask=jnp.ones(6, bool))
    b = mt.match(lp)
    np.testing.assert_array_equal(a.assignment, b.assignment)


# ---------------------------------------------------------------------------------------------
# Color term.


def test_normalize_color():
    color = np.array([[1.0, 1.0, 2.0, 99.0], [0.0, 0.0, 0.0, 5.0], [3.0, 0.0, 0.0, 0.0]])
    out = mt.normalize_color(color)
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out[0], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(out[1], [1 / 3] * 3)  # all-zero neuron -> uniform, no NaN
    np.testing.assert_allclose(out[2], [1.0, 1e-5, 1e-5])  # clipped >= 1e-5


def test_color_log_likelihood_hand_computed():
    template = np.array([[1.0, 1.0, 2.0], [1.0, 0.0, 0.0]])  # x0=[.25,.25,.5], x1=[1,1e-5,1e-5]
    test = np.array([[2.0, 2.0, 4.0], [3.0, 3.0, 3.0]])  # y0=[.25,.25,.5], y1=[1/3]*3
    got = mt.color_log_likelihood(template, test)
    ln = np.log
    h0 = 0.25 * ln(0.25) + 0.25 * ln(0.25) + 0.5 * ln(0.5)
    h1 = ln(1 / 3)
    expected = np.array(
        [
            [0.0, 0.25 * ln(1.0) + 0.25 * ln(1e-5) + 0.5 * ln(1e-5) - h0],
            [(ln(0.25) + ln(0.25) + ln(0.5)) / 3 - h1, (ln(1.0) + 2 * ln(1e-5)) / 3 - h1],
        ]
    )
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.all(got <= 1e-12)


def test_uninformative_colors_change_nothing():
    rng = np.random.default_rng(6)
    m, n = 10, 12
    lp = _log_probs(rng, m, n)
    no_color = mt.match(lp)
    same = np.full((n, 4), 2.0)
    with_color = mt.match(lp, template_color=same, test_color=np.full((m, 4), 7.0))
    np.testing.assert_array_equal(with_color.assignment, no_color.assignment)
    np.testing.assert_array_equal(with_color.candidates, no_color.candidates)
    np.testing.assert_allclose(with_color.probability, no_color.probability, rtol=1e-6)
    np.testing.assert_allclose(with_color.candidate_probs, no_color.candidate_probs, rtol=1e-6)


def test_informative_colors_fix_a_swap():
    # Positions alone slightly prefer the swap 0<->1; colors identify the neurons.
    logits = np.array(
        [
            [1.0, 1.3, -3.0, -2.0],
            [1.3, 1.0, -3.0, -2.0],
            [-3.0, -3.0, 2.0, -2.0],
        ]
    )
    lp = log_softmax(logits, axis=1).astype(np.float32)
    colors = np.array([[5.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 5.0]])
    without = mt.match(lp, top_k=2)
    np.testing.assert_array_equal(without.assignment, [1, 0, 2])
    with_color = mt.match(lp, template_color=colors, test_color=colors * 3.0, top_k=2)
    np.testing.assert_array_equal(with_color.assignment, [0, 1, 2])
    assert np.all(with_color.probability > 0.99)
    # color_weight=0 switches the term off.
    off = mt.match(lp, template_color=colors, test_color=colors, color_weight=0.0, top_k=2)
    np.testing.assert_array_equal(off.assignment, [1, 0, 2])


def test_match_scores_adds_weighted_color_and_masks():
    rng = np.random.default_rng(7)
    m, n = 3, 4
    lp = _log_probs(rng, m, n)
    tc = rng.uniform(0.1, 2.0, size=(n, 3))
    qc = rng.uniform(0.1, 2.0, size=(m, 3))
    t_mask = np.array([True, False, True, True])
    s = mt.match_scores(
        lp, template_mask=t_mask, template_color=tc, test_color=qc, color_weight=2.5
    )
    assert s.shape == (m, n) and s.dtype == np.float32
    expected = lp[:, :n] + 2.5 * mt.color_log_likelihood(tc, qc)
    np.testing.assert_allclose(s[:, t_mask], expected[:, t_mask], rtol=1e-5)
    assert np.all(np.isneginf(s[:, ~t_mask]))


# ---------------------------------------------------------------------------------------------
# Device batched Hungarian.


def _scipy_accuracy(scores, targets, valid):
    out = []
    for s, t, v in zip(scores, targets, valid, strict=True):
        ref = _scipy_assignment(s, v, np.isfinite(s).any(axis=0))
        counted = v & (t >= 0)
        out.append(np.sum(counted & (ref == t)) / counted.sum() if counted.any() else np.nan)
    return np.array(out)


@pytest.mark.parametrize("m,n", [(1, 1), (4, 4), (3, 6), (6, 3), (7, 5), (8, 8)])
@pytest.mark.parametrize("spread", [1.0, 300.0])
def test_device_accuracy_matches_scipy(m, n, spread):
    rng = np.random.default_rng(100 * m + n + int(spread))
    b = 24
    scores = spread * rng.normal(size=(b, m, n)).astype(np.float32)
    col_valid = rng.random((b, n)) < 0.75
    col_valid[:, 0] = True
    scores = np.where(col_valid[:, None, :], scores, -np.inf).astype(np.float32)
    valid = rng.random((b, m)) < 0.8
    valid[0] = True  # one unpadded pair
    targets = rng.integers(-2, n, size=(b, m))
    # Make the targets mostly right so accuracies are not trivially 0.
    for i in range(b):
        ref = _scipy_assignment(scores[i], valid[i], col_valid[i])
        flip = rng.random(m) < 0.7
        targets[i] = np.where(flip & (ref >= 0), ref, targets[i])

    got = np.asarray(mt.hungarian_accuracy_batch(scores, targets, valid))
    want = _scipy_accuracy(scores, targets, valid)
    assert got.shape == (b,)
    np.testing.assert_allclose(got, want, atol=1e-6, equal_nan=True)

    assign = np.asarray(mt.hungarian_assignment_batch(scores, valid))
    for i in range(b):
        np.testing.assert_array_equal(
            assign[i], _scipy_assignment(scores[i], valid[i], col_valid[i])
        )


def test_device_accuracy_nan_when_nothing_counted_and_agrees_with_match():
    rng = np.random.default_rng(8)
    m, n = 6, 7
    lp = _log_probs(rng, m, n)
    t_mask = np.ones(n, bool)
    t_mask[3] = False
    q_mask = np.ones(m, bool)
    q_mask[5] = False
    s = mt.match_scores(lp, template_mask=t_mask, test_mask=q_mask)
    host = mt.match(lp, template_mask=t_mask, test_mask=q_mask)
    dev = np.asarray(mt.hungarian_assignment_batch(s[None], q_mask[None]))[0]
    np.testing.assert_array_equal(dev, host.assignment)

    targets = np.stack([host.assignment, np.full(m, -1)])
    acc = np.asarray(mt.hungarian_accuracy_batch(np.stack([s, s]), targets, np.stack([q_mask] * 2)))
    assert acc[0] == pytest.approx(1.0)
    assert np.isnan(acc[1])


# ---------------------------------------------------------------------------------------------
# Validation.

_LP = log_softmax(np.random.default_rng(9).normal(size=(4, 6)), axis=1).astype(np.float32)
_TC = np.ones((5, 3))
_QC = np.ones((4, 3))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"log_probs": np.where(np.eye(4, 6, dtype=bool), np.nan, _LP)}, "log_probs"),
        ({"log_probs": _LP[0]}, "log_probs"),
        ({"log_probs": _LP[None]}, "log_probs"),
        ({"log_probs": _LP[:, :1]}, "log_probs"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 6}, "top_k"),
        ({"top_k": 5, "template_mask": np.array([1, 1, 1, 1, 0], bool)}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_probability": -0.1}, "min_probability"),
        ({"min_probability": 1.5}, "min_probability"),
        ({"min_probability": float("nan")}, "min_probability"),
        ({"template_color": np.ones((5, 2)), "test_color": np.ones((4, 2))}, "template_color"),
        ({"template_color": _TC, "test_color": -_QC}, "test_color"),
        ({"template_color": -_TC, "test_color": _QC}, "template_color"),
        ({"template_color": _TC}, "test_color"),
        ({"test_color": _QC}, "template_color"),
        ({"template_color": np.ones((3, 3)), "test_color": _QC}, "template_color"),
        ({"template_color": _TC, "test_color": np.ones((2, 3))}, "test_color"),
        ({"template_color": _TC, "test_color": _QC, "color_weight": -1.0}, "color_weight"),
        ({"template_mask": np.ones(4, bool)}, "template_mask"),
        ({"test_mask": np.ones(5, bool)}, "test_mask"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "2"}, "temperature"),
    ],
)
def test_match_bad_inputs_raise(kwargs, name):
    kwargs = dict(kwargs)
    lp = kwargs.pop("log_probs", _LP)
    with pytest.raises(ValueError, match=name):
        mt.match(lp, **kwargs)


def test_color_functions_bad_inputs_raise():
    with pytest.raises(ValueError, match="color"):
        mt.normalize_color(np.ones((3, 2)))
    with pytest.raises(ValueError, match="color"):
        mt.normalize_color(-np.ones((3, 3)))
    with pytest.raises(ValueError, match="template_color"):
        mt.color_log_likelihood(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="test_color"):
        mt.color_log_likelihood(np.ones((3, 3)), np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="template_color"):
        mt.color_log_likelihood(np.ones(3), np.ones((3, 3)))


def test_batch_bad_inputs_raise():
    s = np.zeros((2, 3, 4), np.float32)
    v = np.ones((2, 3), bool)
    t = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match="scores"):
        mt.hungarian_accuracy_batch(s[0], t, v)
    with pytest.raises(ValueError, match="valid"):
        mt.hungarian_accuracy_batch(s, t, v[:, :2])
    with pytest.raises(ValueError, match="targets"):
        mt.hungarian_accuracy_batch(s, t[:1], v)
    with pytest.raises(ValueError, match="targets"):
        mt.hungarian_accuracy_batch(s, t.astype(np.float32), v)


def test_color_term_reads_rgb_only_so_rgbw_matches_rgb():
    rng = np.random.default_rng(3)
    rgb_t, rgb_q = rng.uniform(0.1, 1, (6, 3)), rng.uniform(0.1, 1, (5, 3))
    with_w = np.concatenate([rgb_q, rng.uniform(0, 9, (5, 1))], axis=1)  # RGBW test
    np.testing.assert_allclose(
        mt.color_log_likelihood(rgb_t, with_w), mt.color_log_likelihood(rgb_t, rgb_q)
    )


def test_top_k_indices_equals_stable_argsort_with_ties():
    from fdnc_jax.matching import top_k_indices

    rng = np.random.default_rng(0)
    for _ in range(500):
        m, n = rng.integers(1, 20), rng.integers(1, 30)
        key = rng.integers(0, 4, size=(m, n)).astype(float)  # Many ties.
        key[rng.random((m, n)) < 0.1] = np.inf
        key[rng.random((m, n)) < 0.05] = -np.inf
        key[:, rng.random(n) < 0.2] = np.nan  # Invalid template columns.
        k = int(rng.integers(1, n + 1))
        want = np.argsort(key, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(top_k_indices(key, k), want)


def test_match_batch_device_edge_cases():
    from fdnc_jax.matching import match_batch_device

    lp = np.log(np.array([[[0.5, 0.3, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]]]))  # [1, 2, 3 + 1]
    t_mask, s_mask = np.array([[True, True, False]]), np.ones((1, 2), bool)
    out = match_batch_device(lp, t_mask, s_mask, top_k=2)
    assert out["assignment"].tolist() == [[0, 1]]
    assert out["candidates"].tolist() == [[[0, 1], [1, 0]]]  # never the padded column 2
    with pytest.raises(ValueError, match="top_k"):
        match_batch_device(lp, t_mask, s_mask, top_k=3)  # only 2 real template neurons
    with pytest.raises(ValueError, match="color_weight"):
        match_batch_device(lp, t_mask, s_mask, top_k=1, color_weight=np.nan)
    lp_inf = lp.copy()
    lp_inf[0, 1, :3] = -np.inf  # A real test row without any finite template score.
    out = match_batch_device(lp_inf, t_mask, s_mask, top_k=1)
    assert np.isfinite(np.asarray(out["candidate_probs"])).all()
    assert out["assignment"].tolist() == [[0, -1]] and float(out["probability"][0, 1]) == 0.0


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_temperature_scales_probabilities_only(temperature):
    """softmax(scores / T): same assignment and candidate order, probabilities from scores / T."""
    rng = np.random.default_rng(3)
    lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(7, 9)) * 2.0), axis=-1)
    lp = np.asarray(lp, np.float64)
    raw = mt.match(lp, top_k=3)
    hot = mt.match(lp, top_k=3, temperature=temperature, min_probability=0.0)
    np.testing.assert_array_equal(hot.assignment, raw.assignment)
    np.testing.assert_array_equal(hot.candidates, raw.candidates)
    expected = mt.row_softmax(lp[:, :-1] / temperature)
    rows = np.arange(7)
    np.testing.assert_allclose(hot.probability, expected[rows, hot.assignment], rtol=1e-12)
    np.testing.assert_allclose(
        hot.candidate_probs, np.take_along_axis(expected, hot.candidates, 1), rtol=1e-12
    )
    np.testing.assert_allclose(hot.outlier_probability, raw.outlier_probability)
    # T > 1 flattens: the top probability of every row goes down (T < 1: up).
    assert ((hot.candidate_probs[:, 0] < raw.candidate_probs[:, 0]) == (temperature > 1)).all()
    dev = mt.match_batch_device(
        lp[None], np.ones((1, 8), bool), np.ones((1, 7), bool), top_k=3, temperature=temperature
    )
    np.testing.assert_allclose(np.asarray(dev["probability"])[0], hot.probability, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(dev["candidate_probs"])[0], hot.candidate_probs, atol=1e-5
    )
    with pytest.raises(ValueError, match="temperature"):
        mt.match_batch_device(lp[None], np.ones((1, 8), bool), np.ones((1, 7), bool), temperature=0)


def test_two_way_log_probs_hand_computed_batched_and_on_device():
    """(forward[:, :N] + reverse[:, :M]ᵀ) / 2 with forward's outlier column: numpy and jax alike,
    with leading batch axes; shapes that do not pair up raise."""
    rng = np.random.default_rng(7)
    m, n = 4, 6
    forward = log_softmax(rng.normal(size=(2, m, n + 1)), axis=-1)  # [B, M, N + 1]
    reverse = log_softmax(rng.normal(size=(2, n, m + 1)), axis=-1)  # [B, N, M + 1]
    got = mt.two_way_log_probs(forward, reverse)
    assert got.shape == (2, m, n + 1)
    for b in range(2):
        for i in range(m):
            for j in range(n):
                assert got[b, i, j] == pytest.approx(0.5 * (forward[b, i, j] + reverse[b, j, i]))
    np.testing.assert_array_equal(got[..., -1], forward[..., -1])
    on_device = mt.two_way_log_probs(jnp.asarray(forward), jnp.asarray(reverse))
    assert isinstance(on_device, jax.Array)
    np.testing.assert_allclose(np.asarray(on_device), got, atol=1e-6)
    np.testing.assert_allclose(mt.two_way_log_probs(forward[0], reverse[0]), got[0])
    with pytest.raises(ValueError, match="does not match forward"):
        mt.two_way_log_probs(forward, reverse[:, :, :-1])
    with pytest.raises(ValueError, match="does not match forward"):
        mt.two_way_log_probs(forward, np.swapaxes(forward, -1, -2))
