"""Tests of fdnc_jax.orientation: the orientation hypotheses and their scoring.

The search that uses them (forwards, branch and bound, device path) is tested in test_predict.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import fdnc_jax as fd
from fdnc_jax import orientation
from fdnc_jax.model.fdnc import Model, ModelConfig
from fdnc_jax.orientation import RESIDUAL_UM, orientation_key
from fdnc_jax.pose import SIGN_FLIPS


def test_orientation_hypotheses_per_mode_and_model():
    """4 proper flips ("auto"), all 8 sign patterns ("auto+mirror"), the identity ("fixed" or a model
    without canonical pose); another mode is a clear error."""
    canonical = fd.load_pretrained("small")
    assert canonical.config.canonical_pose
    np.testing.assert_array_equal(
        orientation.orientation_hypotheses(canonical, "auto"), SIGN_FLIPS[:4]
    )
    assert np.all(np.prod(orientation.orientation_hypotheses(canonical, "auto"), axis=1) == 1)
    assert orientation.orientation_hypotheses(canonical, "auto+mirror").shape == (8, 3)
    np.testing.assert_array_equal(
        orientation.orientation_hypotheses(canonical, "fixed"), [[1, 1, 1]]
    )
    plain = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
    assert not plain.config.canonical_pose
    assert orientation.orientation_hypotheses(plain, "auto+mirror").shape == (1, 3)
    with pytest.raises(ValueError, match="orientation='sideways' must be one of"):
        orientation.orientation_hypotheses(canonical, "sideways")


def test_orientation_key_prefers_cycle_consistent_hypotheses():
    """The kept hypothesis is the one whose forward and reverse assignments agree (then the mean
    log-prob both ways): a confident but inconsistent reverse loses to a consistent one. (Four
    neurons: any correspondence is affine, so the residual term is 0 here.)"""
    xyz = np.random.default_rng(0).uniform(0, 50, (4, 3))
    outlier = np.full((4, 1), -9.0)
    diagonal = np.concatenate([np.full((4, 4), -6.0) + np.eye(4) * 5.9, outlier], axis=1)
    shifted = np.concatenate([np.full((4, 4), -6.0) + np.roll(np.eye(4), 1, 1) * 5.9, outlier], 1)

    def key(forward, reverse):
        return orientation_key(forward, reverse, xyz, xyz)

    consistent = key(diagonal, diagonal)
    assert consistent[0] == pytest.approx(1.0)
    assert key(diagonal, shifted)[0] == pytest.approx(0.0)  # template i -> test i+1 -> no way back
    assert consistent > key(diagonal, shifted)
    soft = np.concatenate([np.full((4, 4), -2.0) + np.eye(4) * 1.0, outlier], axis=1)
    assert consistent > key(soft, soft)  # same cycle, lower log-prob
    assert key(soft, soft)[0] == pytest.approx(1.0)


def _confident(perm: np.ndarray, margin: float = 5.9) -> np.ndarray:
    """[K, K + 1] log-prob-like table whose one-to-one assignment is ``perm`` (row i -> perm[i])."""
    k = len(perm)
    table = np.full((k, k + 1), -6.0)
    table[np.arange(k), perm] += margin
    table[:, -1] = -9.0
    return table


def test_orientation_key_prefers_a_correspondence_one_affine_map_explains():
    """Two hypotheses equally confident and cycle-consistent: the one whose correspondence an affine
    map explains (the template is a sheared, shifted copy of the test) wins over a scrambled one;
    the key's first entry drops by the median residual / RESIDUAL_UM."""
    rng = np.random.default_rng(1)
    test_um = rng.uniform(0, 80, (20, 3))
    template_um = test_um @ np.array([[1.1, 0.2, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 1.0]]) + 7.0
    identity, scrambled = np.arange(20), rng.permutation(20)
    right = orientation_key(_confident(identity), _confident(identity), test_um, template_um)
    inverse = np.argsort(scrambled)
    wrong = orientation_key(_confident(scrambled), _confident(inverse), test_um, template_um)
    assert right[0] == pytest.approx(1.0)  # cycle-consistent, residual ~0
    assert right[1] == pytest.approx(wrong[1])  # same confidence
    assert wrong[0] < 1.0 - 10.0 / RESIDUAL_UM  # median residual of tens of µm
    assert right > wrong


def test_orientation_key_counts_the_color_term_when_given():
    """With the color term (strongly for the identity) the hypothesis' assignment follows the color,
    and its affine residual with it: the same network scores get a better key."""
    rng = np.random.default_rng(2)
    xyz = rng.uniform(0, 80, (20, 3))
    scrambled = rng.permutation(20)
    forward, reverse = _confident(scrambled, 1.0), _confident(np.argsort(scrambled), 1.0)
    color = np.where(np.eye(20, dtype=bool), 0.0, -60.0)  # [M, N]
    plain = orientation_key(forward, reverse, xyz, xyz)
    with_color = orientation_key(forward, reverse, xyz, xyz, color)
    assert with_color[0] == pytest.approx(1.0)  # identity both ways, exact geometry
    assert plain[0] < with_color[0]


@pytest.mark.parametrize("transpose", [False, True])
def test_device_one_to_one_equals_the_host_assignment_and_mean(transpose):
    """The device assignment and mean assigned score of a padded chunk equal the host's
    ``one_to_one`` / ``mean_assigned`` on each unpadded item, with the color term added (transposed
    for the reverse direction)."""
    rng = np.random.default_rng(4)
    b, rows, cols, sizes = 3, 12, 10, [(12, 10), (7, 9), (5, 5)]
    lp = np.log(rng.dirichlet(np.ones(cols + 1), size=(b, rows))).astype(np.float32)
    row_mask = np.arange(rows)[None] < np.array([r for r, _ in sizes])[:, None]  # [b, R]
    col_mask = np.arange(cols)[None] < np.array([c for _, c in sizes])[:, None]  # [b, C]
    # The color term is [b, M, N]: rows are the test for the forward direction, columns otherwise.
    n, m = (rows, cols) if transpose else (cols, rows)
    t_color = rng.dirichlet(np.ones(3), size=(b, n)).astype(np.float32)
    s_color = rng.dirichlet(np.ones(3), size=(b, m)).astype(np.float32)
    a, mean = orientation.device_one_to_one(
        jnp.asarray(lp),
        row_mask,
        col_mask,
        t_color,
        s_color,
        2.0,
        solver="hungarian",
        transpose_color=transpose,
    )
    for j, (r, c) in enumerate(sizes):
        color = 2.0 * fd.matching.color_log_likelihood(
            t_color[j, : (r if transpose else c)], s_color[j, : (c if transpose else r)]
        )  # [M, N]
        table = np.concatenate([lp[j, :r, :c], lp[j, :r, -1:]], axis=1).astype(np.float64)
        scores = orientation.with_color(table, color.T if transpose else color)
        host = orientation.one_to_one(scores)
        np.testing.assert_array_equal(np.asarray(a)[j, :r], host)
        assert float(mean[j]) == pytest.approx(orientation.mean_assigned(scores, host), rel=1e-4)


def test_device_orientation_choice_equals_the_host_keys():
    """device_orientation_choice keeps, per test, the hypothesis of the host's largest
    cycle_key (cycle consistency − median affine residual / RESIDUAL_UM, then the mean score; the
    first on an exact tie), for partial, scrambled and empty assignments of ragged tests."""
    rng = np.random.default_rng(3)
    k, tests, m, n = 4, 6, 40, 36
    template_um = rng.uniform(-40, 40, (n, 3))  # [N, 3] µm
    sizes = [40, 33, 20, 3, 40, 40]
    test_um = np.zeros((tests, m, 3))
    for t, size in enumerate(sizes):
        test_um[t, :size] = template_um[rng.permutation(n)[: min(size, n)]].repeat(2, 0)[:size]
        test_um[t, :size] += rng.normal(0, 1.0, (size, 3)) + 200.0  # a translated noisy copy
    a_f = np.full((tests * k, m), -1)
    a_r = np.full((tests * k, n), -1)
    for j in range(tests * k):
        t, h = divmod(j, k)
        size = sizes[t]
        rows = rng.permutation(size)[: min(size, n) - h]  # fewer rows assigned per hypothesis
        a_f[j, rows] = rng.permutation(n)[: len(rows)]
        back = rng.random(len(rows)) < 0.5 + 0.1 * h
        a_r[j, a_f[j, rows[back]]] = rows[back]
    a_f[4 * k + 1] = -1  # nothing assigned
    mean = rng.normal(size=(tests * k,))
    a_f[5 * k + 1 : 5 * k + 3] = -1  # two empty ones: key (0, mean), above scrambled ones, tied
    mean[5 * k + 2] = mean[5 * k + 1] + 1.0  # on the first entry: the larger mean score wins
    got = orientation.device_orientation_choice(
        jnp.asarray(a_f),
        jnp.asarray(a_r),
        jnp.asarray(mean, jnp.float32),
        jnp.zeros(tests * k),
        jnp.asarray(test_um, jnp.float32),
        jnp.asarray(template_um, jnp.float32),
        k=k,
    )
    residual = orientation.assignment_residuals(
        [a_f[j, : sizes[j // k]] for j in range(tests * k)],
        [test_um[j // k, : sizes[j // k]] for j in range(tests * k)],
        template_um,
    )
    keys = [
        orientation.cycle_key(a_f[j, : sizes[j // k]], a_r[j], mean[j], residual[j])
        for j in range(tests * k)
    ]
    want = [max(range(k), key=lambda h, t=t: keys[t * k + h]) for t in range(tests)]
    np.testing.assert_array_equal(np.asarray(got), want)
    assert len(set(want)) > 1 and want[5] == 2
    with pytest.raises(ValueError, match="whole tests"):
        orientation.device_orientation_choice(
            jnp.asarray(a_f[:6]),
            jnp.asarray(a_r[:6]),
            jnp.zeros(6),
            jnp.zeros(6),
            jnp.asarray(test_um[:2], jnp.float32),
            jnp.asarray(template_um, jnp.float32),
            k=4,
        )
