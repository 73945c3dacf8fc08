"""Orientation search: which 180° flip (or mirror image) of a test worm's canonical pose to keep.

Canonical-pose models see each cloud in its principal axes (``fdnc_jax.pose``), whose signs are
ambiguous. Inference therefore matches the test under several sign patterns (hypotheses,
``orientation_hypotheses``) and keeps the one whose correspondence is most self-consistent: its
one-to-one assignments in both directions (test → template and template → test) agree, and one
affine map explains it (``orientation_key``). This module holds those hypotheses and their scoring,
on the host (numpy, scipy) and on the device (``device_one_to_one``); ``fdnc_jax.predict`` runs the
forwards and the search over them.

Letters: M test neurons, N template neurons, K hypotheses, b a batch of (test, hypothesis) pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdnc_jax import matching
from fdnc_jax.geometry import batched_robust_affine_residuals, masked_median
from fdnc_jax.model.fdnc import Model
from fdnc_jax.pose import SIGN_FLIPS

ORIENTATIONS = ("auto", "auto+mirror", "fixed")
# ``orientation_key`` weighs the median affine residual of a hypothesis' correspondence against its
# cycle consistency: 6 µm of median residual cost as much as every test neuron coming back (~ the
# spacing of neighbouring head neurons; fixed beforehand, not swept).
RESIDUAL_UM = 6.0


def orientation_hypotheses(model: Model, orientation: str) -> np.ndarray:
    """[K, 3] sign patterns tried on the test's canonical axes (see ``fdnc_jax.pose``).

    ``"auto"``: the 4 proper 180° flips for canonical-pose models (one hypothesis otherwise);
    ``"auto+mirror"``: also their mirror images, for worms whose side (handedness) is unknown;
    ``"fixed"``: the canonical pose only.

    Example:
      >>> import fdnc_jax as fd
      >>> orientation_hypotheses(fd.load_pretrained(), "auto+mirror").shape
      (8, 3)
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation={orientation!r} must be one of {ORIENTATIONS}")
    if not model.config.canonical_pose or orientation == "fixed":
        return SIGN_FLIPS[:1]
    return SIGN_FLIPS[:4] if orientation == "auto" else SIGN_FLIPS


def one_to_one(log_probs: np.ndarray) -> np.ndarray:
    """[M] template index of each test row in the Hungarian assignment of ``log_probs`` [M, N + 1]
    (outlier column left out), −1 for rows left over.

    Example:
      >>> lp = np.log(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]))  # [M=2, N+1=3]
      >>> one_to_one(lp).tolist()
      [1, 0]
    """
    rows, cols = matching._host_assignment(-log_probs[:, :-1])
    assignment = np.full(log_probs.shape[0], -1, np.int64)
    assignment[rows] = cols
    return assignment


def mean_assigned(log_probs: np.ndarray, assignment: np.ndarray) -> float:
    """Mean of ``log_probs`` [M, N + 1] over the assigned cells of ``assignment`` [M] (−1: none).

    Example:
      >>> lp = np.log(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]))  # [M=2, N+1=3]
      >>> round(mean_assigned(lp, np.array([1, -1])), 4)  # log 0.8
      -0.2231
    """
    rows = np.flatnonzero(assignment >= 0)
    return float(np.mean(log_probs[rows, assignment[rows]]))


def with_color(log_probs: np.ndarray, color: np.ndarray | None) -> np.ndarray:
    """``log_probs`` [R, C + 1] with ``color`` [R, C] (the weighted color term) added to the
    non-outlier columns; unchanged when ``color`` is None.

    Example:
      >>> with_color(np.zeros((2, 3)), np.ones((2, 2))).tolist()
      [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    """
    if color is None:
        return log_probs
    return np.concatenate([log_probs[:, :-1] + color, log_probs[:, -1:]], axis=1)


def orientation_key(
    forward: np.ndarray,
    reverse: np.ndarray,
    test_um: np.ndarray,
    template_um: np.ndarray,
    color: np.ndarray | None = None,
) -> tuple[float, float]:
    """How well a hypothesis explains the pair, compared as a tuple: (cycle consistency − median
    affine residual / ``RESIDUAL_UM``, mean score both ways).

    Cycle consistency = the fraction of test neurons whose one-to-one assignment (``forward``
    [M, N + 1]) is assigned back to them by the reverse one (``reverse`` [N, M + 1]). The affine
    residual: the median distance (µm) between the assigned template neurons (``template_um``
    [N, 3]) and the robust affine image of their test neurons (``test_um`` [M, 3]) — a right
    orientation gives a correspondence one smooth map explains (``fdnc_jax.geometry``).
    ``color`` [M, N]: the weighted color term, added to both directions' scores when the
    prediction uses it (the kept flip is the one whose matching the color term agrees with).

    Measured with ``benchmarks/orientation_study.py`` on within-lab pairs of the 4 WormND labs
    (90 per lab), against the cycle consistency of the network alone (the criterion before):
    ``small`` + color term 27.9 / 35.4 / 46.8 / 30.4 → 30.8 / 40.9 / 55.0 / 31.8 % (EY / NP / SF /
    SK1), ``default`` + color term 55.1 / 53.0 / 57.8 / 46.0 → 55.2 / 53.3 / 65.2 / 46.5 %,
    ``color`` 81.7 / 59.3 / 76.8 / 55.9 → 81.3 / 59.4 / 80.2 / 56.5 %.

    Example:
      >>> xyz = np.random.default_rng(0).normal(size=(20, 3)) * 10.0  # [M, 3] µm, test = template
      >>> sure = np.log(np.hstack([np.eye(20) * 0.9 + 0.004, np.full((20, 1), 0.02)]))  # [M, N + 1]
      >>> cycle, mean = orientation_key(sure, sure, xyz, xyz)
      >>> round(cycle, 3), round(mean, 3)  # all come back, no residual; 2 × log 0.904
      (1.0, -0.202)
    """
    return reverse_key(forward_side(forward, test_um, template_um, color), reverse, color)


def forward_side(
    forward: np.ndarray, test_um: np.ndarray, template_um: np.ndarray, color: np.ndarray | None
) -> tuple[np.ndarray, float, float]:
    """The forward half of ``orientation_key``: (one-to-one assignment [M], its mean score, its
    median affine residual in µm) of ``forward`` [M, N + 1] (+ ``color`` [M, N]).

    Example:
      >>> xyz = np.random.default_rng(0).normal(size=(20, 3)) * 10.0  # [M, 3] µm
      >>> sure = np.log(np.hstack([np.eye(20) * 0.9 + 0.004, np.full((20, 1), 0.02)]))
      >>> a_f, mean, residual_um = forward_side(sure, xyz, 2.0 * xyz + 1.0, None)
      >>> a_f[:3].tolist(), round(residual_um, 6)  # an affine image: no residual
      ([0, 1, 2], 0.0)
    """
    a_f, mean = forward_assignment(forward, color)
    return a_f, mean, assignment_residual(a_f, test_um, template_um)


def forward_assignment(forward: np.ndarray, color: np.ndarray | None) -> tuple[np.ndarray, float]:
    """(one-to-one assignment [M], its mean score) of ``forward`` [M, N + 1] (+ ``color``
    [M, N]): ``forward_side`` without the residual, for a vectorised ``assignment_residuals``.

    Example:
      >>> sure = np.log(np.hstack([np.eye(3) * 0.9 + 0.004, np.full((3, 1), 0.02)]))
      >>> a_f, mean = forward_assignment(sure, None)
      >>> a_f.tolist(), round(mean, 4)
      ([0, 1, 2], -0.1009)
    """
    scores = with_color(forward, color)
    a_f = one_to_one(scores)
    return a_f, mean_assigned(scores, a_f)


def reverse_key(
    side: tuple[np.ndarray, float, float], reverse: np.ndarray, color: np.ndarray | None
) -> tuple[float, float]:
    """``orientation_key`` from the forward half ``side`` (``forward_side``) and the reverse
    log-probs [N, M + 1] (+ ``color`` [M, N], transposed).

    Example:
      >>> xyz = np.random.default_rng(0).normal(size=(20, 3)) * 10.0  # [M, 3] µm
      >>> sure = np.log(np.hstack([np.eye(20) * 0.9 + 0.004, np.full((20, 1), 0.02)]))
      >>> round(reverse_key(forward_side(sure, xyz, xyz, None), sure, None)[0], 6)
      1.0
    """
    a_f, mean_f, residual = side
    scores = with_color(reverse, _transposed(color))
    a_r = one_to_one(scores)
    return cycle_key(a_f, a_r, mean_f + mean_assigned(scores, a_r), residual)


def _transposed(color: np.ndarray | None) -> np.ndarray | None:
    return None if color is None else color.T


def assignment_residual(a_f: np.ndarray, test_um: np.ndarray, template_um: np.ndarray) -> float:
    """Median robust-affine residual (µm) of the assignment ``a_f`` [M] (template index, −1 none)
    from ``test_um`` [M, 3] to ``template_um`` [N, 3]; 0 when nothing is assigned.

    Example:
      >>> xyz = np.random.default_rng(0).normal(size=(20, 3)) * 10.0  # [M, 3] µm
      >>> round(assignment_residual(np.arange(20), xyz, 2.0 * xyz + 1.0), 6)
      0.0
      >>> assignment_residual(np.arange(20)[::-1], xyz, xyz) > 5.0  # scrambled: tens of µm
      True
    """
    return float(assignment_residuals([a_f], [test_um], template_um)[0])


# assignment_residuals fits this many correspondences per vectorised block (bounds its memory:
# ~10 MB per 1,000 correspondences of 150 neurons).
RESIDUAL_BLOCK = 2048


def assignment_residuals(
    assignments: Sequence[np.ndarray], tests_um: Sequence[np.ndarray], template_um: np.ndarray
) -> np.ndarray:
    """``assignment_residual`` of many assignments to one template, vectorised
    (``fdnc_jax.geometry.batched_robust_affine_residuals``; the orientation search of thousands of
    volumes would otherwise spend ~0.5 ms of host time on each).

    Args:
      assignments: B assignments [M_i] (template index, −1 none).
      tests_um: the B test positions [M_i, 3] (µm), e.g. the same worm under every hypothesis.
      template_um: [N, 3] template positions (µm).

    Returns:
      [B] float64 median residuals (µm); 0 where nothing is assigned.

    Example:
      >>> xyz = np.random.default_rng(0).normal(size=(20, 3)) * 10.0  # [M, 3] µm
      >>> r = assignment_residuals([np.arange(20), np.arange(20)[::-1]], [xyz, xyz], 2.0 * xyz)
      >>> bool(r[0] < 1e-6), bool(r[1] > 5.0)
      (True, True)
    """
    template_um = np.asarray(template_um, np.float64)
    out = np.zeros(len(assignments))
    for start in range(0, len(assignments), RESIDUAL_BLOCK):
        block = range(start, min(start + RESIDUAL_BLOCK, len(assignments)))
        width = max(len(assignments[i]) for i in block)
        index = np.full((len(block), width), -1, np.int64)  # [b, M_max] template index, −1 none
        source = np.zeros((len(block), width, 3))  # [b, M_max, 3] µm
        for j, i in enumerate(block):
            index[j, : len(assignments[i])] = assignments[i]
            source[j, : len(tests_um[i])] = tests_um[i]
        out[start : start + len(block)] = _median_residuals(index, source, template_um)
    return out


def _median_residuals(index, source_um, template_um):
    """[b] median robust-affine residual (µm) of each padded assignment ``index`` [b, M]
    (template index, −1 none) from ``source_um`` [b, M, 3] to ``template_um`` [N, 3]; 0 where
    nothing is assigned. numpy arrays (float64, the host search) or jax arrays (float32, under
    jit: ``device_orientation_choice``)."""
    valid = index >= 0  # [b, M]
    target = template_um[index.clip(min=0)]  # [b, M, 3] µm
    return masked_median(batched_robust_affine_residuals(source_um, target, valid), valid)


def cycle_key(
    a_f: np.ndarray, a_r: np.ndarray, mean_log_prob: float, residual_um: float
) -> tuple[float, float]:
    """(fraction of the assigned test neurons that ``a_r`` [N] maps back to themselves through
    ``a_f`` [M] − ``residual_um`` / ``RESIDUAL_UM``, ``mean_log_prob``): the key of
    ``orientation_key``.

    Example:
      >>> cycle_key(np.array([1, 0, -1]), np.array([1, 0]), -0.5, 3.0)  # both come back
      (0.5, -0.5)
    """
    back = np.flatnonzero(a_f >= 0)
    cycle = float(np.mean(a_r[a_f[back]] == back)) if back.size else 0.0
    return cycle - residual_um / RESIDUAL_UM, float(mean_log_prob)


@functools.partial(jax.jit, static_argnames="k")
def device_orientation_choice(a_f, a_r, mean_f, mean_r, test_um, template_um, *, k: int):
    """The orientation search's choice on the device: ``orientation_key`` of every hypothesis of a
    chunk from both directions' assignments (``device_one_to_one``), and the best per test.

    Rows ``k·t … k·t + k − 1`` of the chunk are test t's k hypotheses, in order; the first best
    key wins, as ``max(range(k), key=...)`` on the host. The key is ``cycle_key``'s, with the
    affine residual fitted on the device (``fdnc_jax.geometry``, float32), so nothing waits for
    the host between the forwards and the final matching.

    Args:
      a_f: [b, M] forward assignment (template index per test row, −1 none or padding).
      a_r: [b, N] reverse assignment (test row per template neuron, −1 none).
      mean_f, mean_r: [b] mean assigned score of each direction.
      test_um: [b / k, M, 3] each test's positions (µm; padding rows: any finite value).
      template_um: [N, 3] the template's positions (µm; padding rows: any finite value).
      k: hypotheses per test (static).

    Returns:
      [b / k] int32 index of each test's kept hypothesis.

    Example:
      >>> xyz = jnp.asarray(np.random.default_rng(0).normal(size=(1, 20, 3)) * 10.0)  # [1, M, 3]
      >>> right, wrong = jnp.arange(20), jnp.arange(20)[::-1]  # the second scrambles the pairs
      >>> a_f = jnp.stack([wrong, right])  # [b = 2 hypotheses of one test, M]
      >>> kept = device_orientation_choice(a_f, a_f, jnp.zeros(2), jnp.zeros(2), xyz, xyz[0], k=2)
      >>> kept.tolist()
      [1]
    """
    b, m = a_f.shape
    if b % k:
        raise ValueError(f"a chunk of {b} rows does not hold whole tests of {k} hypotheses")
    median = _median_residuals(a_f, jnp.repeat(test_um, k, axis=0), template_um)  # [b] µm
    valid = a_f >= 0  # [b, M]
    back = jnp.take_along_axis(a_r, jnp.maximum(a_f, 0), axis=1)  # [b, M] a_r[a_f[r]]
    agree = valid & (back == jnp.arange(m)[None, :])
    count = valid.sum(axis=1)
    cycle = jnp.where(count > 0, agree.sum(axis=1) / jnp.maximum(count, 1), 0.0)  # [b]
    first = (cycle - median / RESIDUAL_UM).reshape(-1, k)  # [b / k, k]
    second = (mean_f + mean_r).reshape(-1, k)
    tied = first == first.max(axis=1, keepdims=True)
    return jnp.argmax(jnp.where(tied, second, -jnp.inf), axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("solver", "transpose_color"))
def device_one_to_one(
    log_probs,
    row_mask,
    col_mask,
    template_color,
    test_color,
    color_weight,
    *,
    solver,
    transpose_color,
):
    """Device ``one_to_one`` and ``mean_assigned`` of a chunk: [b, R, C + 1] log-probs (last
    column the outlier), row / column masks [b, R], [b, C] → ([b, R] int32 column per row, −1
    none; [b] mean score of the assigned cells). With colors (normalised, template [b, N, 3] and
    test [b, M, 3]), ``color_weight`` × the color term [b, M, N] is added to the scores first,
    transposed to [b, N, M] for the reverse direction (``transpose_color``).

    Example:
      >>> lp = jnp.log(jnp.array([[[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]]))  # [b=1, R=2, C+1=3]
      >>> ok = jnp.ones((1, 2), bool)
      >>> a, mean = device_one_to_one(
      ...     lp, ok, ok, None, None, 0.0, solver="hungarian", transpose_color=False)
      >>> a.tolist()
      [[1, 0]]
    """
    c = log_probs.shape[-1] - 1
    ok = row_mask[:, :, None] & col_mask[:, None, :]
    scores = log_probs[..., :c]  # [b, R, C]
    if template_color is not None:
        color = matching.device_color_log_likelihood(template_color, test_color)  # [b, M, N]
        scores = scores + color_weight * (jnp.swapaxes(color, 1, 2) if transpose_color else color)
    scores = jnp.where(ok, scores, -jnp.inf)
    assignment = matching.assign_batch_device(scores, row_mask, solver)  # [b, R]
    has = assignment >= 0
    picked = jnp.take_along_axis(scores, jnp.maximum(assignment, 0)[..., None], -1)[..., 0]
    total = jnp.sum(jnp.where(has, picked, 0.0), axis=-1)
    return assignment, total / jnp.maximum(jnp.sum(has, axis=-1), 1)
