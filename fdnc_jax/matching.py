"""From network log-probabilities to a one-to-one neuron matching (fDNC "Inference").

The network gives, for one (template, test) pair, ``log_probs`` [M, N+1]: row i is test
neuron i, columns 0..N-1 are the template neurons and column N is the "outlier" column; each
row is already log-softmaxed over the N+1 columns (padded template columns hold ``-inf`` or a
very negative number). Inference, following the reference code of Yu et al. (eLife 2021):

1. ``L = log_probs[:, :N]`` (the outlier column is dropped);
   With two-way scores (``predict``'s default) ``L`` is instead the mean of the two directions'
   log-probs, ``(log_probs[:, :N] + reverse[:, :M]ᵀ) / 2`` (:func:`two_way_log_probs`);
2. optionally ``L + color_weight * C`` with ``C`` the negative KL divergence between the
   normalised colors of test neuron i and template neuron j (:func:`color_log_likelihood`);
3. a one-to-one assignment maximising the summed score (Hungarian algorithm);
4. the probability of a pair is the softmax of the row of scores; the top-k candidates are
   reported by decreasing probability; ``exp(log_probs[:, N])`` is the outlier probability.

:func:`match` runs on the host (``scipy.optimize.linear_sum_assignment``) for one pair;
:func:`match_batch_device` does the same for a padded batch on the device (``predict_batch`` on
accelerators; ``optax``'s Hungarian or the parallel auction of :mod:`fdnc_jax.auction`);
:func:`hungarian_assignment_batch` / :func:`hungarian_accuracy_batch` run a batch on the device
with ``optax.assignment.hungarian_algorithm`` (jit + vmap) for evaluation in training.

Letters used in shapes: B batch, M test neurons, N template neurons, K top-k candidates,
C color channels. Template index ``-1`` means "no label" everywhere.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment

from fdnc_jax import auction

__all__ = [
    "Matching",
    "assign_batch_device",
    "check_device_solver",
    "color_log_likelihood",
    "device_color_log_likelihood",
    "hungarian_accuracy_batch",
    "hungarian_assignment_batch",
    "match",
    "match_batch_device",
    "match_scores",
    "normalize_color",
    "two_way_log_probs",
]

DEFAULT_COLOR_WEIGHT = 60.0
COLOR_FLOOR = 1e-5
NO_LABEL = -1


# ----------------------------------------------------------------------------------------------
# Validation helpers.


def _float_array(x: ArrayLike, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as err:  # e.g. a jax tracer
        raise ValueError(f"{name} must be a concrete array, got {type(x).__name__}") from err
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return arr


def _check_color(color: ArrayLike, name: str, rank: int | None = None) -> np.ndarray:
    arr = _float_array(color, name).astype(np.float64)
    if arr.ndim < 1 or (rank is not None and arr.ndim != rank):
        want = f"rank {rank}" if rank is not None else "at least rank 1"
        raise ValueError(f"{name} must have {want} [.., C], got shape {arr.shape}")
    if arr.shape[-1] < 3:
        raise ValueError(f"{name} must have at least 3 color channels, got {arr.shape[-1]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN/inf)")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative (negative color intensity found)")
    return arr


def _check_mask(mask: ArrayLike | None, size: int, name: str) -> np.ndarray:
    if mask is None:
        return np.ones(size, dtype=bool)
    arr = np.asarray(mask)
    if arr.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {arr.shape}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name} must be boolean (or 0/1), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _check_log_probs(log_probs: ArrayLike) -> np.ndarray:
    lp = _float_array(log_probs, "log_probs")
    if lp.ndim != 2:
        raise ValueError(f"log_probs must have rank 2 [M, N+1], got shape {lp.shape}")
    if lp.shape[1] < 2:
        raise ValueError(
            f"log_probs needs at least 2 columns (>= 1 template neuron + outlier), got {lp.shape}"
        )
    if np.any(np.isnan(lp)):
        raise ValueError("log_probs contains NaN")
    return lp


# ----------------------------------------------------------------------------------------------
# Color term.


def _normalize(color: np.ndarray) -> np.ndarray:
    rgb = color[..., :3]
    total = rgb.sum(axis=-1, keepdims=True)
    safe = np.where(total > 0, total, 1.0)
    norm = np.where(total > 0, rgb / safe, 1.0 / 3.0)
    return np.clip(norm, COLOR_FLOOR, None)


def normalize_color(color: ArrayLike) -> np.ndarray:
    """Normalises neuron colors per neuron over their first three channels.

    Each neuron's first three channels are divided by their sum and clipped to ``>= 1e-5``
    (as in the reference ``match_color_norm``). A neuron whose three channels are all zero
    gets the uniform color ``1/3`` instead of NaN.

    Args:
      color: [..., C] non-negative color intensities, C >= 3 (channels past the third are
        ignored).

    Returns:
      [..., 3] float64 normalised colors.

    Raises:
      ValueError: fewer than 3 channels, negative or non-finite values.

    Example:
      >>> normalize_color([[2.0, 1.0, 1.0, 9.0], [0.0, 0.0, 0.0, 1.0]]).round(4).tolist()
      [[0.5, 0.25, 0.25], [0.3333, 0.3333, 0.3333]]
    """
    return _normalize(_check_color(color, "color"))


def color_log_likelihood(template_color: ArrayLike, test_color: ArrayLike) -> np.ndarray:
    """Color similarity ``C[i, j] = -KL(y_i || x_j)`` between test and template neurons.

    With ``x = normalize_color(template_color)`` and ``y = normalize_color(test_color)``::

        C[i, j] = sum_c y[i, c] log x[j, c] - sum_c y[i, c] log y[i, c]

    so ``C <= 0`` with equality iff the normalised colors coincide.

    Args:
      template_color: [N, C] template neuron colors (C >= 3, non-negative).
      test_color: [M, C'] test neuron colors (C' >= 3; only R, G, B — the first three channels —
        are compared, so an RGBW worm matches an RGB one).

    Returns:
      [M, N] float64 color log-likelihood.

    Raises:
      ValueError: wrong rank, fewer than 3 channels, negative or non-finite values.

    Example:
      >>> c = color_log_likelihood([[1, 0, 0], [1, 1, 1]], [[2, 2, 2]])
      >>> c.shape, abs(float(c[0, 1])) < 1e-9, float(c[0, 0]) < 0  # same colors: KL = 0
      ((1, 2), True, True)
    """
    x_raw = _check_color(template_color, "template_color", rank=2)
    y_raw = _check_color(test_color, "test_color", rank=2)
    x = _normalize(x_raw)
    y = _normalize(y_raw)
    log_x = np.log(x)
    entropy_term = np.sum(y * np.log(y), axis=-1)  # [M]
    return y @ log_x.T - entropy_term[:, None]


# ----------------------------------------------------------------------------------------------
# Host matching.


def match_scores(
    log_probs: ArrayLike,
    template_mask: ArrayLike | None = None,
    test_mask: ArrayLike | None = None,
    template_color: ArrayLike | None = None,
    test_color: ArrayLike | None = None,
    color_weight: float = DEFAULT_COLOR_WEIGHT,
) -> np.ndarray:
    """Scores for the assignment: ``log_probs[:, :N] (+ color_weight * C)``.

    Args:
      log_probs: [M, N+1] row-wise log-softmax output of the network (last column = outlier).
      template_mask: optional [N] bool, valid template neurons (default all valid).
      test_mask: optional [M] bool, valid test neurons (default all valid).
      template_color: optional [N, C] template colors; give both colors or neither.
      test_color: optional [M, C] test colors.
      color_weight: weight of the color term (default 60, the reference value); >= 0.

    Returns:
      [M, N] scores (dtype of ``log_probs`` promoted to at least float32); columns of invalid
      template neurons and rows of invalid test neurons are ``-inf``.

    Raises:
      ValueError: see :func:`color_log_likelihood`; also NaN/rank problems in ``log_probs``,
        mask shapes, only one of the two colors given, color rows not matching M/N, or a
        negative / non-finite ``color_weight``.

    Example:
      >>> log_probs = np.log([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
      >>> match_scores(log_probs, template_mask=[True, False]).round(2).tolist()
      [[-0.36, -inf], [-2.3, -inf]]
    """
    lp = _check_log_probs(log_probs)
    m, n = lp.shape[0], lp.shape[1] - 1
    t_mask = _check_mask(template_mask, n, "template_mask")
    q_mask = _check_mask(test_mask, m, "test_mask")
    out_dtype = np.result_type(lp.dtype, np.float32)
    scores = lp[:, :n].astype(np.float64)

    if (template_color is None) != (test_color is None):
        missing = "template_color" if template_color is None else "test_color"
        raise ValueError(f"{missing} is missing: give both template_color and test_color or none")
    if template_color is not None:
        if not np.isfinite(color_weight) or color_weight < 0:
            raise ValueError(f"color_weight must be finite and >= 0, got {color_weight}")
        t_col = _check_color(template_color, "template_color", rank=2)
        q_col = _check_color(test_color, "test_color", rank=2)
        if t_col.shape[0] != n:
            raise ValueError(f"template_color must have N={n} rows, got shape {t_col.shape}")
        if q_col.shape[0] != m:
            raise ValueError(f"test_color must have M={m} rows, got shape {q_col.shape}")
        if color_weight != 0:
            scores = scores + color_weight * color_log_likelihood(t_col, q_col)

    scores = np.where(t_mask[None, :] & q_mask[:, None], scores, -np.inf)
    return scores.astype(out_dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Matching:
    """One-to-one matching of test neurons to template neurons (host numpy arrays).

    Attributes:
      assignment: [M] int64, template index of each test neuron, ``-1`` = no label (padded test
        neuron, left over when M > valid N, or below ``min_probability``).
      probability: [M] float64, softmax probability of the assigned pair; 0 where
        ``assignment == -1`` (the proposed pair's probability is still in the candidates).
      candidates: [M, K] int64, top-k template indices by decreasing probability; ``-1`` for
        padded test neurons.
      candidate_probs: [M, K] float64, their probabilities (0 for padded test neurons).
      outlier_probability: [M] float64, ``exp(log_probs[:, N])``; 0 for padded test neurons.

    Example:
      >>> m = match(np.log([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]), top_k=2)
      >>> m.assignment.tolist(), m.candidates.shape
      ([0, 1], (2, 2))
    """

    assignment: np.ndarray
    probability: np.ndarray
    candidates: np.ndarray
    candidate_probs: np.ndarray
    outlier_probability: np.ndarray

    @property
    def num_assigned(self) -> int:
        """Number of test neurons with a label (``assignment >= 0``).

        Example:
          >>> match(np.log([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]), top_k=1).num_assigned
          2
        """
        return int(np.sum(self.assignment >= 0))


def row_softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over each row (the last axis); rows without a finite entry give all zeros.

    Args:
      scores: [..., M, N] scores; ``-inf`` entries get probability 0.

    Returns:
      [..., M, N] float64 probabilities, each row summing to 1 (or all 0).

    Example:
      >>> row_softmax(np.array([[0.0, 0.0, -np.inf], [-np.inf, -np.inf, -np.inf]])).tolist()
      [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
    """
    row_max = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)
    finite_row = np.isfinite(row_max)
    shifted = np.where(np.isfinite(scores), scores - np.where(finite_row, row_max, 0.0), -np.inf)
    e = np.exp(shifted)
    total = e.sum(axis=-1, keepdims=True)
    return np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)


def top_k_indices(key: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` columns of ``np.argsort(key, axis=1, kind="stable")``, without a full sort.

    Selects each row's ``k`` smallest keys with ``np.partition`` (ties at the k-th key broken
    by lowest column, as a stable sort does), then sorts only those: ~5× faster than the full
    sort for 200 columns and k = 5. NaN keys sort last, as in ``np.argsort``.

    Args:
      key: [M, N] float keys (smaller first).
      k: 1 <= k <= N.

    Returns:
      [M, k] int64 column indices.

    Example:
      >>> top_k_indices(np.array([[3.0, 1.0, 1.0, 0.0, np.nan]]), 3).tolist()
      [[3, 1, 2]]
    """
    m, n = key.shape
    if k >= n:
        return np.argsort(key, axis=1, kind="stable")[:, :k].astype(np.int64)
    kth = np.partition(key, k - 1, axis=1)[:, k - 1 : k]  # [M, 1] the k-th smallest key
    if np.isnan(kth).any():  # Fewer than k non-NaN keys in some row: the plain sort.
        return np.argsort(key, axis=1, kind="stable")[:, :k].astype(np.int64)
    below = key < kth  # [M, N]
    tied = key == kth
    need = k - below.sum(axis=1, keepdims=True)  # [M, 1] ties to take, lowest column first
    chosen = below | (tied & (np.cumsum(tied, axis=1) <= need))  # exactly k per row
    cols = np.nonzero(chosen)[1].reshape(m, k)  # ascending column within each row
    within = np.argsort(np.take_along_axis(key, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, within, axis=1).astype(np.int64)


def _host_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``linear_sum_assignment`` on a cost with possible ``+inf`` (forbidden) entries.

    Forbidden entries get a finite cost so large that they are used only when the
    maximum-cardinality assignment cannot avoid them.
    """
    finite = np.isfinite(cost)
    if not np.all(finite):
        if np.any(finite):
            hi, lo = cost[finite].max(), cost[finite].min()
        else:
            hi = lo = 0.0
        big = hi + 1.0 + (hi - lo + 1.0) * (min(cost.shape) + 1)
        cost = np.where(finite, cost, big)
    return linear_sum_assignment(cost)


def check_temperature(temperature: object) -> float:
    """``temperature`` as a float; ValueError unless it is a finite number > 0.

    Example:
      >>> check_temperature(2)
      2.0
    """
    return auction.check_positive(temperature, "temperature")


def match(
    log_probs: ArrayLike,
    *,
    template_mask: ArrayLike | None = None,
    test_mask: ArrayLike | None = None,
    template_color: ArrayLike | None = None,
    test_color: ArrayLike | None = None,
    color_weight: float = DEFAULT_COLOR_WEIGHT,
    top_k: int = 5,
    min_probability: float = 0.0,
    temperature: float = 1.0,
) -> Matching:
    """Matches the test neurons of one pair to template neurons (host, scipy Hungarian).

    Template neurons whose ``log_probs`` column is ``-inf`` for every valid test neuron are
    treated as padding too (in addition to ``template_mask``). Pairs with a ``-inf`` score are
    never reported as an assignment.

    Args:
      log_probs: [M, N+1] row-wise log-softmax network output (last column = outlier).
      template_mask: optional [N] bool, valid template neurons.
      test_mask: optional [M] bool, valid test neurons; invalid ones get ``-1`` / probability 0.
      template_color: optional [N, C] template colors (C >= 3); needs ``test_color``.
      test_color: optional [M, C] test colors.
      color_weight: weight of the color log-likelihood (default 60).
      top_k: K, number of candidates per test neuron, 1 <= K <= number of valid template
        neurons.
      min_probability: assignments with probability below this become ``-1``; in [0, 1].
      temperature: T > 0; probabilities (assignment and candidates) are the row softmax of
        scores / T (``Model.temperature``); the assignment and candidate order do not change.

    Returns:
      The :class:`Matching`.

    Raises:
      ValueError: invalid arguments (the message names the argument).

    Example:
      >>> m = match(np.log([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]), top_k=2)
      >>> m.assignment.tolist()  # one-to-one: the second test neuron takes template neuron 1
      [0, 1]
      >>> m.outlier_probability.round(2).tolist()
      [0.1, 0.1]
    """
    scores = match_scores(
        log_probs,
        template_mask=template_mask,
        test_mask=test_mask,
        template_color=template_color,
        test_color=test_color,
        color_weight=color_weight,
    ).astype(np.float64)
    lp = np.asarray(log_probs)
    m, n = scores.shape
    q_valid = _check_mask(test_mask, m, "test_mask")
    t_valid = (
        np.isfinite(scores[q_valid]).any(axis=0)
        if q_valid.any()
        else _check_mask(template_mask, n, "template_mask")
    )
    n_valid = int(t_valid.sum())

    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
        raise ValueError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k <= 0 or top_k > n_valid:
        raise ValueError(
            f"top_k must be in [1, number of valid template neurons = {n_valid}], got {top_k}"
        )
    if not (0.0 <= float(min_probability) <= 1.0):  # also rejects NaN
        raise ValueError(f"min_probability must be in [0, 1], got {min_probability}")
    temperature = check_temperature(temperature)

    rows = np.flatnonzero(q_valid)
    cols = np.flatnonzero(t_valid)
    assignment = np.full(m, NO_LABEL, dtype=np.int64)
    if rows.size and cols.size:
        r, c = _host_assignment(-scores[np.ix_(rows, cols)])
        assignment[rows[r]] = cols[c]

    probs = row_softmax(scores / temperature)  # [M, N]; invalid columns / rows -> 0
    idx = np.arange(m)
    has = assignment >= 0
    pair_score = np.where(has, scores[idx, np.maximum(assignment, 0)], -np.inf)
    probability = np.where(has, probs[idx, np.maximum(assignment, 0)], 0.0)
    drop = has & (~np.isfinite(pair_score) | (probability < min_probability))
    assignment = np.where(drop, NO_LABEL, assignment)
    probability = np.where(drop, 0.0, probability)

    # Sort by score (same order as probability, but ties at probability 0 stay among valid
    # template neurons); invalid columns are NaN and therefore sorted last.
    order = top_k_indices(np.where(t_valid[None, :], -scores, np.nan), top_k)
    candidates = np.where(q_valid[:, None], order, NO_LABEL).astype(np.int64)
    candidate_probs = np.where(q_valid[:, None], np.take_along_axis(probs, order, axis=1), 0.0)

    outlier = np.where(q_valid, np.exp(lp[:, n].astype(np.float64)), 0.0)
    return Matching(
        assignment=assignment,
        probability=probability,
        candidates=candidates,
        candidate_probs=candidate_probs,
        outlier_probability=outlier,
    )


def two_way_log_probs(forward, reverse):
    """Two-way scores in the layout of ``forward``: the mean of both directions' log-probs.

    ``forward`` scores each test neuron's row over the template's neurons, ``reverse`` (the same
    pair matched the other way: the test as template) each template neuron's row over the test's.
    Their mean, log √(P(j | i) · P(i | j)), rewards pairs that both directions pick; its scale is
    one direction's, so the color weight and the model's temperature keep their meaning. The
    outlier column stays the forward one. Host (numpy) and device (jax) arrays alike, any leading
    batch axes; padded cells stay very negative when the inputs mark them so.

    Args:
      forward: [..., M, N + 1] log-probs, test rows (last column: outlier).
      reverse: [..., N, M + 1] log-probs, template rows.

    Returns:
      [..., M, N + 1]: ``(forward[..., :N] + reverse[..., :M]ᵀ) / 2``, then ``forward``'s outlier
      column.

    Example:
      >>> f = np.log([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])  # [M=2, N+1=3]: both rows prefer 0
      >>> r = np.log([[0.2, 0.7, 0.1], [0.8, 0.1, 0.1]])  # [N=2, M+1=3]
      >>> two_way_log_probs(f, r).argmax(axis=1).tolist()  # test 0 → template 1 both ways
      [1, 0]
    """
    m, n = reverse.shape[-1] - 1, forward.shape[-1] - 1
    if forward.shape[-2] != m or reverse.shape[-2] != n:
        raise ValueError(
            f"reverse {tuple(reverse.shape)} does not match forward {tuple(forward.shape)}: "
            "expected [..., N, M + 1] for forward [..., M, N + 1]"
        )
    xp = jnp if isinstance(forward, jax.Array) else np
    both = 0.5 * (forward[..., :n] + xp.swapaxes(reverse[..., :m], -1, -2))  # [..., M, N]
    return xp.concatenate([both, forward[..., n:]], axis=-1)


# ----------------------------------------------------------------------------------------------
# Device (batched) Hungarian.


def _assign_one(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Maximum-score one-to-one assignment of one padded [M, N] score matrix.

    Cells that are non-finite or in an invalid row are "padding": they all get the same cost
    ``P`` strictly above every real cost. Because padded rows / columns are then constant, an
    optimal assignment of the padded matrix restricted to real cells is a maximum-cardinality
    minimum-cost assignment of the real block (exchange argument: moving a real row from a
    padding cell to an unused real column saves at least ``P - max real cost > 0``), so no
    huge constant (and no float32 precision loss) is needed.
    """
    m, n = scores.shape
    if m == 0 or n == 0:
        return jnp.full((m,), NO_LABEL, jnp.int32)
    real = jnp.isfinite(scores) & valid[:, None]
    cost = jnp.where(real, -scores, 0.0)
    hi = jnp.max(jnp.where(real, cost, -jnp.inf))
    pad = jnp.where(jnp.isfinite(hi), hi + 1.0 + 1e-3 * jnp.abs(hi), 0.0)
    cost = jnp.where(real, cost, pad)
    row_idx, col_idx = optax.assignment.hungarian_algorithm(cost)
    assign = jnp.full((m,), NO_LABEL, jnp.int32).at[row_idx].set(col_idx.astype(jnp.int32))
    ok = (assign >= 0) & real[jnp.arange(m), jnp.maximum(assign, 0)]
    return jnp.where(ok, assign, NO_LABEL)


_assign_batch = jax.jit(jax.vmap(_assign_one))


def _check_batch(scores: ArrayLike, valid: ArrayLike) -> tuple[jax.Array, jax.Array]:
    scores = jnp.asarray(scores)
    valid = jnp.asarray(valid)
    if scores.ndim != 3:
        raise ValueError(f"scores must have rank 3 [B, M, N], got shape {scores.shape}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    if valid.shape != scores.shape[:2]:
        raise ValueError(f"valid must have shape {scores.shape[:2]} [B, M], got {valid.shape}")
    return scores, valid.astype(bool)


def hungarian_assignment_batch(scores: ArrayLike, valid: ArrayLike) -> jax.Array:
    """Batched one-to-one assignment on the device (``optax`` Hungarian, jit + vmap).

    Args:
      scores: [B, M, N] scores to maximise (e.g. stacked :func:`match_scores`); non-finite
        entries (``-inf`` padded template columns) are padding.
      valid: [B, M] bool, valid test neurons.

    Returns:
      [B, M] int32 template index per test neuron, ``-1`` for invalid rows, rows left over
      (more valid rows than valid columns) and rows that could only take a padding cell.
      On the real block this is the same assignment as ``scipy.optimize.linear_sum_assignment``
      up to ties (a ``-inf`` entry inside an otherwise valid column is treated as a padding
      cell, i.e. avoided as a strongly disfavoured pair rather than strictly forbidden).

    Raises:
      ValueError: wrong ranks or shapes.

    Example:
      >>> scores = jnp.array([[[0.9, 0.1], [0.8, 0.2]]])
      >>> hungarian_assignment_batch(scores, jnp.ones((1, 2), bool)).tolist()
      [[0, 1]]
    """
    scores, valid = _check_batch(scores, valid)
    return _assign_batch(scores, valid)


DEVICE_SOLVERS = ("hungarian", "auction")


def check_device_solver(solver: object, name: str = "solver") -> str:
    """``solver`` if it is one of ``DEVICE_SOLVERS``; ValueError naming ``name`` otherwise.

    Example:
      >>> check_device_solver("auction")
      'auction'
    """
    if solver not in DEVICE_SOLVERS:
        raise ValueError(f"{name} must be one of {DEVICE_SOLVERS}, got {solver!r}")
    return solver


def assign_batch_device(
    scores: jax.Array, valid: jax.Array, solver: str = "hungarian"
) -> jax.Array:
    """[B, M] one-to-one assignment of [B, M, N] scores (pure; for use inside ``jax.jit``).

    ``solver`` as in :func:`match_batch_device`. The auction's problems that did not finish within
    its round bound (score ties can take long) are solved again with the Hungarian algorithm — a
    real branch (the predicate is one scalar), taken only when needed. Non-finite scores and
    invalid rows [B, M] are padding, as in :func:`hungarian_assignment_batch`.

    Example:
      >>> scores = jnp.array([[[0.9, 0.1], [0.8, 0.2]]])
      >>> jax.jit(assign_batch_device, static_argnums=2)(scores, jnp.ones((1, 2), bool), "auction")
      Array([[0, 1]], dtype=int32)
    """
    if solver == "hungarian":
        return jax.vmap(_assign_one)(scores, valid)
    assignment, converged, _ = auction.auction_batch(scores, valid)  # [B, M], [B]
    return jax.lax.cond(
        jnp.all(converged),
        lambda: assignment,
        lambda: jnp.where(converged[:, None], assignment, jax.vmap(_assign_one)(scores, valid)),
    )


def device_color_log_likelihood(template_color: jax.Array, test_color: jax.Array) -> jax.Array:
    """``color_log_likelihood`` on the device, batched, for colors already normalised
    (``normalize_color``): y·log(x) − y·log(y) summed over channels, x template, y test.

    Args:
      template_color: [B, N, 3] normalised template colors (zero rows: padding).
      test_color: [B, M, 3] normalised test colors.

    Returns:
      [B, M, N] log-likelihoods (≤ 0 for real rows); padding rows stay finite (floored as
      ``normalize_color`` does).

    Example:
      >>> c = jnp.asarray(normalize_color(np.eye(3) + 0.1))[None]
      >>> ll = device_color_log_likelihood(c, c)
      >>> np.allclose(np.asarray(ll[0]), color_log_likelihood(np.eye(3) + 0.1, np.eye(3) + 0.1),
      ...             atol=1e-5)
      True
    """
    log_x = jnp.log(jnp.maximum(template_color, COLOR_FLOOR))  # [B, N, 3]
    y = jnp.maximum(test_color, COLOR_FLOOR)  # [B, M, 3]
    return jnp.einsum("bmc,bnc->bmn", y, log_x) - jnp.sum(y * jnp.log(y), -1)[..., None]


@functools.partial(jax.jit, static_argnames=("top_k", "solver"))
def _match_batch_device(
    log_probs,
    template_mask,
    test_mask,
    template_color,
    test_color,
    color_weight,
    temperature,
    *,
    top_k,
    solver,
):
    n = log_probs.shape[-1] - 1
    pair_ok = template_mask[:, None, :] & test_mask[:, :, None]  # [B, M, N]
    network = jnp.where(pair_ok, log_probs[..., :n], -jnp.inf)  # [B, M, N]
    scores = network
    if template_color is not None:
        color = device_color_log_likelihood(template_color, test_color)  # [B, M, N]
        scores = jnp.where(pair_ok, network + color_weight * color, -jnp.inf)
    assignment = assign_batch_device(scores, test_mask, solver)  # [B, M]
    has = assignment >= 0
    row_ok = jnp.any(jnp.isfinite(scores), axis=-1, keepdims=True)  # [B, M, 1]
    probs = jax.nn.softmax(jnp.where(row_ok, scores / temperature, 0.0), axis=-1)
    probs = jnp.where(row_ok, probs, 0.0)
    take = lambda table, idx: jnp.take_along_axis(table, idx, axis=-1)
    probability = jnp.where(has, take(probs, jnp.maximum(assignment, 0)[..., None])[..., 0], 0.0)
    masked = jnp.where(template_mask[:, None, :], scores, -jnp.inf)
    _, candidates = jax.lax.top_k(masked, top_k)  # [B, M, K]; ties: lower index first
    candidate_probs = jnp.where(test_mask[..., None], take(probs, candidates), 0.0)
    candidates = jnp.where(test_mask[..., None], candidates, NO_LABEL)
    outlier = jnp.where(test_mask, jnp.exp(log_probs[..., n]), 0.0)
    return {
        "assignment": assignment,
        "probability": probability,
        "candidates": candidates,
        "candidate_probs": candidate_probs,
        "outlier_probability": outlier,
    }


def match_batch_device(
    log_probs: ArrayLike,
    template_mask: ArrayLike,
    test_mask: ArrayLike,
    *,
    template_color: ArrayLike | None = None,
    test_color: ArrayLike | None = None,
    color_weight: float = DEFAULT_COLOR_WEIGHT,
    top_k: int = 5,
    temperature: float = 1.0,
    solver: str = "hungarian",
) -> dict[str, jax.Array]:
    """:func:`match` for a padded batch, entirely on the device (jit).

    For accelerators, where a host loop of scipy assignments would cap throughput: only the
    compact results ([B, M] and [B, M, K]) travel back. On a CPU :func:`match` is faster.
    Differences from :func:`match`: float32 (the host works in float64), so near-ties may resolve
    differently; ``min_probability`` is applied by the caller; template columns are padding only
    where ``template_mask`` says so (the host also drops columns that are ``-inf`` for every row).

    Args:
      log_probs: [B, M, N+1] network log-probabilities (padded; last column = outlier).
      template_mask: [B, N] bool, real template neurons.
      test_mask: [B, M] bool, real test neurons.
      template_color: optional [B, N, 3] *normalised* colors (:func:`normalize_color`).
      test_color: optional [B, M, 3] normalised colors (give both or neither).
      color_weight: weight of the color term.
      top_k: K candidates per test neuron (≤ real template neurons).
      temperature: T > 0 of the probabilities (softmax of scores / T), as :func:`match`.
      solver: the one-to-one assignment: "hungarian" (``optax.assignment.hungarian_algorithm``,
        exact, rows augmented one after another) or "auction" (:mod:`fdnc_jax.auction`: all rows
        of all volumes bid in parallel; total score within ``auction.DEFAULT_TOLERANCE`` of the
        optimum; problems it does not finish go to the Hungarian).

    Returns:
      dict of device arrays: ``assignment`` [B, M] int32 (−1: none), ``probability`` [B, M],
      ``candidates`` [B, M, K] int32, ``candidate_probs`` [B, M, K], ``outlier_probability``
      [B, M]; padded test rows get −1 / 0.

    Example:
      >>> lp = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]]))
      >>> out = match_batch_device(lp, jnp.ones((1, 2), bool), jnp.ones((1, 2), bool), top_k=1)
      >>> out["assignment"].tolist(), out["candidates"][..., 0].tolist()
      ([[0, 1]], [[0, 0]])
    """
    if (template_color is None) != (test_color is None):
        raise ValueError("give both template_color and test_color or none")
    if not np.isfinite(color_weight) or color_weight < 0:
        raise ValueError(f"color_weight must be finite and >= 0, got {color_weight}")
    check_device_solver(solver)
    n_valid = int(np.min(np.sum(np.asarray(template_mask), axis=-1), initial=np.iinfo(int).max))
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
        raise ValueError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k <= 0 or top_k > n_valid:
        raise ValueError(
            f"top_k must be in [1, number of valid template neurons = {n_valid}], got {top_k}"
        )
    return _match_batch_device(
        jnp.asarray(log_probs, jnp.float32),
        jnp.asarray(template_mask, bool),
        jnp.asarray(test_mask, bool),
        None if template_color is None else jnp.asarray(template_color, jnp.float32),
        None if test_color is None else jnp.asarray(test_color, jnp.float32),
        jnp.float32(color_weight),
        jnp.float32(check_temperature(temperature)),
        top_k=int(top_k),
        solver=solver,
    )


def hungarian_accuracy_batch(scores: ArrayLike, targets: ArrayLike, valid: ArrayLike) -> jax.Array:
    """Matching accuracy of the batched device Hungarian assignment.

    Args:
      scores: [B, M, N] scores to maximise; non-finite entries are padding.
      targets: [B, M] int, true template index per test neuron; ``< 0`` = not counted
        (unlabelled, outlier, padding).
      valid: [B, M] bool, valid test neurons (invalid ones are never counted).

    Returns:
      [B] float32 accuracy = correct / counted per pair, where counted = valid & targets >= 0;
      ``NaN`` for a pair with nothing counted (use ``jnp.nanmean`` to average).

    Raises:
      ValueError: wrong ranks or shapes.

    Example:
      >>> scores = jnp.array([[[0.9, 0.1], [0.8, 0.2]]])
      >>> hungarian_accuracy_batch(scores, jnp.array([[0, 0]]), jnp.ones((1, 2), bool)).tolist()
      [0.5]
    """
    scores, valid = _check_batch(scores, valid)
    targets = jnp.asarray(targets)
    if targets.shape != scores.shape[:2]:
        raise ValueError(f"targets must have shape {scores.shape[:2]} [B, M], got {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be an integer array, got dtype {targets.dtype}")
    assign = _assign_batch(scores, valid)
    counted = valid & (targets >= 0)
    correct = counted & (assign == targets)
    n_counted = counted.sum(axis=1)
    acc = correct.sum(axis=1) / jnp.maximum(n_counted, 1)
    return jnp.where(n_counted > 0, acc, jnp.nan).astype(jnp.float32)
