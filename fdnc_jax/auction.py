"""Parallel auction with ε-scaling: one-to-one assignment of a batch on an accelerator.

Bertsekas' auction algorithm, written so that a round is a few small array operations: up to
``BIDDERS`` unassigned rows of every problem bid at once for their best column (value = score −
price), raising its price by the gap to their second-best column plus ε; each column goes to its
highest bidder and the previous holder bids again. A batch of thousands of score matrices
advances in lock-step with no per-row loop — unlike the Hungarian algorithm
(``optax.assignment.hungarian_algorithm``), which augments one row after another; its last
unfinished problems move on in smaller batches (``COMPACT_FACTOR``).

The problem solved is the asymmetric one (M rows, N columns): every valid row gets a column or,
when no more real pairs are possible, its private "dummy" object (no partner), whose benefit lies
far enough below every real score that the assignment has maximum cardinality, as
``scipy.optimize.linear_sum_assignment``. The side with fewer real entries bids (the matrix is
transposed per problem where needed): extra bidders would have to be priced out to their dummies
one ε at a time. ε-scaling: ε starts at ``EPS_START`` × the score range and shrinks by
``EPS_FACTOR`` per phase. A phase ends when every bidder holds an object; a reverse auction
(Bertsekas & Castañon 1992) then lowers the prices of objects nobody holds until none is above
the cheapest held object — with ε-complementary slackness this certifies ε-optimality for that
ε — and every bidder is verified against the next ε (kept while its object is within it of its
best). Each problem moves through its own phases: the loop ends when all have finished.

Optimality: the total score is within ``K · ε_final`` of the maximum (K = max(M, N)), where
ε_final = ``tolerance / K`` (default total gap ``DEFAULT_TOLERANCE``); ε is floored at
``EPS_FLOOR`` × the score range so that float32 prices still move, so only assignments whose
best and second-best totals differ by less than that may come out as the second best.
``tests/test_auction.py`` compares the results with scipy; ``benchmarks/matching_bench.py`` times
the auction against the Hungarian.

Letters: B batch, M rows (test neurons), N columns (template neurons), K = max(M, N),
S = ``BIDDERS``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "DEFAULT_TOLERANCE",
    "auction_assignment",
    "auction_batch",
    "auction_assignment_batch",
    "check_positive",
    "check_tolerance",
]

# Largest total score an assignment may lose to the optimum (units of the scores, e.g. nats).
DEFAULT_TOLERANCE = 1e-2
# ε starts at this fraction of the score range and shrinks by EPS_FACTOR per phase.
EPS_START = 0.01
EPS_FACTOR = 8.0
# ε never falls below this fraction of the score range: float32 prices must still move (a price
# at twice the range has an ulp of 2^-22 of it). With 2^-18 the color term's ~670-wide scores gave
# the second-best assignment of a real pair (0.002 below the best); tests/test_auction.py.
EPS_FLOOR = 2.0**-20
# Rows bidding (and free objects repriced) per round, at most: late rounds have only a few
# unassigned rows, so a round is [S, N] work instead of [M, N].
BIDDERS = 16
# Forward rounds per loop iteration, followed by one reverse round if any problem needs it
# (fewer loop-condition and branch round trips on accelerators).
UNROLL = 2
# Bound on rounds per problem; a problem that has not finished by then is reported as not
# converged (150-neuron tracking volumes take ~300–900 rounds; many exact score ties more).
MAX_ROUNDS = 20_000
# The batch advances in lock-step, so its rounds cost as many as its slowest problem's, over the
# whole batch: 150-neuron tracking volumes took a median of 632 rounds but up to 1,692 (1,024
# volumes, two-way scores of the bundled `default` model). So once at most 1 / COMPACT_FACTOR of
# a batch is unfinished, those problems move on in a batch of that size (gathered with their
# state: the same rounds, the same result), again and again down to COMPACT_MIN problems. Work
# (batch × rounds) on that distribution: 1.6× / 1.8× / 2.0× less at batch 256 / 1,024 / 8,192.
COMPACT_FACTOR = 4
COMPACT_MIN = 32

NO_LABEL = -1


def _benefit(scores: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Benefits [M, N] (scores shifted so the best real cell is 0; −inf off the real cells: non-finite
    scores and invalid rows), their range (≥ 0) and the benefit of a row's dummy object.

    The dummy lies 2 × range + 1 below the best cell: prices of held objects never differ by more
    than range + ε, so a row prefers its dummy only when no real column is left to it, and a dummy
    costs ≥ 1 more than any real pair (maximum cardinality when K · ε_final < 1: scores spanning
    less than 2^20 / K, e.g. ~5,000 for K = 208).
    """
    real = jnp.isfinite(scores) & valid[:, None]  # [M, N]
    hi = jnp.max(jnp.where(real, scores, -jnp.inf))
    lo = jnp.min(jnp.where(real, scores, jnp.inf))
    any_real = jnp.isfinite(hi)
    spread = jnp.where(any_real, hi - lo, 0.0)
    benefit = jnp.where(real, scores - jnp.where(any_real, hi, 0.0), -jnp.inf)  # [M, N]
    return benefit, spread, -(2.0 * spread + 1.0)


def _best_two(values: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row of [S, J] values: best column [S], best value [S], second-best value [S]."""
    best = jnp.argmax(values, axis=1)  # [S]
    v1 = jnp.take_along_axis(values, best[:, None], axis=1)[:, 0]  # [S]
    others = jnp.where(jnp.arange(values.shape[1])[None, :] == best[:, None], -jnp.inf, values)
    return best, v1, jnp.max(others, axis=1)


def _first(flags: jax.Array, s: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the first ``s`` True entries of ``flags`` [L] → ([s] int32, L where fewer; [s] bool)."""
    size = flags.shape[0]
    place = jnp.cumsum(flags) - 1  # [L]
    idx = (
        jnp.full((s,), size, jnp.int32)
        .at[jnp.where(flags, place, s)]
        .set(jnp.arange(size, dtype=jnp.int32), mode="drop")
    )
    return idx, idx < size


class _Problem(NamedTuple):
    """Loop constants of one problem. Objects: the N columns, then one private dummy per row
    (object N + i, benefit ``dummy``, for row i only)."""

    benefit: jax.Array  # [M, N] (−inf: not a pair)
    benefit_t: jax.Array  # [N, M]
    dummy: jax.Array  # scalar benefit of a row's dummy
    scale: jax.Array  # scalar: range of the benefits + 1
    valid: jax.Array  # [M] rows that take part
    exists: jax.Array  # [N + M] objects some valid row can take
    eps_final: jax.Array  # scalar


class _State(NamedTuple):
    prices: jax.Array  # [N + M]
    owner: jax.Array  # [N + M] row holding each object, −1 free
    held: jax.Array  # [M] object held by each row, −1 none
    unverified: jax.Array  # [M] rows to verify against the current ε
    eps: jax.Array  # scalar
    backward: jax.Array  # scalar bool: in the reverse auction
    lam: jax.Array  # scalar λ of the reverse auction
    done: jax.Array  # scalar bool
    rounds: jax.Array  # scalar int32


def _setup(
    benefit: jax.Array, spread: jax.Array, dummy: jax.Array, valid: jax.Array, tolerance: jax.Array
) -> tuple[_Problem, _State]:
    """Constants and initial state (all prices 0, nothing held, ε = ε₀) of one problem."""
    m, n = benefit.shape
    scale = spread + 1.0
    eps_final = jnp.maximum(tolerance / max(m, n), EPS_FLOOR * scale)
    eps0 = jnp.maximum(scale * EPS_START, eps_final)
    exists = jnp.concatenate([jnp.any(jnp.isfinite(benefit), axis=0), valid])
    problem = _Problem(benefit, benefit.T, dummy, scale, valid, exists, eps_final)
    state = _State(
        prices=jnp.zeros((n + m,), benefit.dtype),
        owner=jnp.full((n + m,), NO_LABEL, jnp.int32),
        held=jnp.full((m,), NO_LABEL, jnp.int32),
        unverified=jnp.zeros((m,), bool),
        eps=eps0.astype(benefit.dtype),
        backward=jnp.bool_(False),
        lam=jnp.zeros((), benefit.dtype),
        done=~jnp.any(valid),
        rounds=jnp.int32(0),
    )
    return problem, state


def _profits(p: _Problem, st: _State) -> jax.Array:
    """[M] value (benefit − price) of each row's held object; +inf for rows holding nothing."""
    m, n = p.benefit.shape
    obj = jnp.clip(st.held, 0, n + m - 1)
    own = jnp.where(st.held < n, p.benefit[jnp.arange(m), jnp.minimum(obj, n - 1)], p.dummy)
    return jnp.where(p.valid & (st.held >= 0), own - st.prices[obj], jnp.inf)


def _forward_round(p: _Problem, st: _State, s: int) -> _State:
    """One forward round: up to S rows that hold nothing or are to be verified keep their object
    (verified: within ε of their best) or bid; then the phase logic."""
    m, n = p.benefit.shape
    n_obj = n + m
    prices, owner, held, unverified, eps = st.prices, st.owner, st.held, st.unverified, st.eps
    free = p.valid & (held < 0)
    sel, active = _first(free | (p.valid & unverified), s)  # [S]
    row = jnp.minimum(sel, m - 1)
    values = jnp.concatenate(
        [p.benefit[row] - prices[None, :n], (p.dummy - prices[n + row])[:, None]], axis=1
    )  # [S, N + 1]; column N = the row's own dummy
    best, v1, v2 = _best_two(values)
    v2 = jnp.maximum(v2, v1 - p.scale)  # only one finite option: a bounded bid
    target = jnp.where(best == n, n + row, best)  # [S] object
    own = held[row]  # [S]
    own_obj = jnp.clip(own, 0, n_obj - 1)
    own_value = jnp.where(own < n, p.benefit[row, jnp.minimum(own_obj, n - 1)], p.dummy)
    keep = active & (own >= 0) & (v1 - (own_value - prices[own_obj]) <= eps)
    bidding = active & ~keep
    release = bidding & (own >= 0)  # failed verification: let the object go
    owner = owner.at[jnp.where(release, own, n_obj)].set(NO_LABEL, mode="drop")
    held = held.at[jnp.where(release, sel, m)].set(NO_LABEL, mode="drop")
    unverified = unverified.at[jnp.where(active, sel, m)].set(False, mode="drop")
    bid = v1 + prices[target] - v2 + eps  # [S]: benefit of target − v2 + ε
    top = (
        jnp.full((n_obj,), -jnp.inf, prices.dtype).at[target].max(jnp.where(bidding, bid, -jnp.inf))
    )  # [N + M]
    wins = bidding & (bid >= top[target])
    winner = jnp.full((n_obj,), m, jnp.int32).at[target].min(jnp.where(wins, sel, m))
    sold = winner < m  # [N + M]
    prices = jnp.where(sold, top, prices)
    held = held.at[jnp.where(sold & (owner >= 0), owner, m)].set(NO_LABEL, mode="drop")
    held = held.at[jnp.where(sold, winner, m)].set(jnp.arange(n_obj, dtype=jnp.int32), mode="drop")
    owner = jnp.where(sold, winner, owner)
    st = st._replace(prices=prices, owner=owner, held=held, unverified=unverified)

    # Phase end: every valid row holds a verified object. Free dummies rise to the cheapest held
    # object (they must stay unattractive), or drop to it where their row would not gain more
    # than ε from them. Free objects still priced above it go to the reverse auction (after every
    # phase: its price wars are short at the early phases' large ε, and the last phase then frees
    # few objects; lowering them directly between phases left long reverse wars to the last one).
    settled = ~st.done & ~st.backward & ~jnp.any(p.valid & ((held < 0) | unverified))
    taken = owner >= 0
    low = jnp.min(jnp.where(taken, prices, jnp.inf))
    free_obj = p.exists & ~taken
    is_dummy = jnp.arange(n_obj) >= n
    dummy_gain = jnp.concatenate([jnp.full((n,), jnp.inf), p.dummy - _profits(p, st)])
    lower = free_obj & is_dummy & (dummy_gain <= low + eps)
    prices = jnp.where(settled & free_obj & is_dummy, jnp.maximum(prices, low), prices)
    prices = jnp.where(settled & lower, jnp.minimum(prices, low), prices)
    stale = settled & jnp.any(free_obj & (prices > low))
    st = st._replace(
        prices=prices,
        backward=st.backward | stale,
        lam=jnp.where(settled, low, st.lam),
        rounds=st.rounds + (~st.done & ~st.backward).astype(jnp.int32),
    )
    return _complete_phase(p, st, settled & ~stale)


def _complete_phase(p: _Problem, st: _State, where: jax.Array) -> _State:
    """Where ``where``: the phase is certified; shrink ε and verify every row, or finish."""
    next_phase = where & (st.eps > p.eps_final)
    return st._replace(
        unverified=jnp.where(next_phase, p.valid, st.unverified),
        eps=jnp.where(next_phase, jnp.maximum(st.eps / EPS_FACTOR, p.eps_final), st.eps),
        done=st.done | (where & ~next_phase),
    )


def _reverse_round(p: _Problem, st: _State, s: int) -> _State:
    """One reverse round (Bertsekas & Castañon): up to S free objects priced above λ are lowered
    to λ when no row would gain more than ε from them, else offered to their best row at
    max(λ, second best − ε); a row takes its best offer and frees its old object."""
    m, n = p.benefit.shape
    n_obj = n + m
    rows = jnp.arange(m, dtype=jnp.int32)
    slots = jnp.arange(s)
    prices, owner, held, lam, eps = st.prices, st.owner, st.held, st.lam, st.eps
    on = st.backward & ~st.done
    stale = on & p.exists & (owner < 0) & (prices > lam)  # [N + M]
    sel, active = _first(stale, s)  # [S]
    obj = jnp.minimum(sel, n_obj - 1)
    column = jnp.where(
        (obj < n)[:, None],
        p.benefit_t[jnp.minimum(obj, n - 1)],
        jnp.where(rows[None, :] == (obj - n)[:, None], p.dummy, -jnp.inf),
    )  # [S, M] benefit of each row for the object
    best, beta, omega = _best_two(column - _profits(p, st)[None, :])
    lower_only = active & (lam >= beta - eps)
    offer = active & ~lower_only
    price = jnp.where(lower_only, lam, jnp.maximum(lam, omega - eps))  # [S]
    gain = jnp.where(offer, column[slots, best] - price, -jnp.inf)  # [S]
    top = jnp.full((m,), -jnp.inf, prices.dtype).at[best].max(gain)  # [M]
    first = (
        jnp.full((m,), s, jnp.int32).at[best].min(jnp.where(offer & (gain >= top[best]), slots, s))
    )
    accept = offer & (first[best] == slots)  # one object per row: its best offer
    prices = prices.at[jnp.where(lower_only | accept, sel, n_obj)].set(price, mode="drop")
    owner = owner.at[jnp.where(accept, held[best], n_obj)].set(NO_LABEL, mode="drop")
    owner = owner.at[jnp.where(accept, sel, n_obj)].set(best.astype(jnp.int32), mode="drop")
    held = held.at[jnp.where(accept, best, m)].set(sel, mode="drop")
    finished = on & ~jnp.any(p.exists & (owner < 0) & (prices > lam))
    st = st._replace(
        prices=prices,
        owner=owner,
        held=held,
        backward=st.backward & ~finished,
        rounds=st.rounds + on.astype(jnp.int32),
    )
    return _complete_phase(p, st, finished)


def _solve_batch(
    benefit: jax.Array,
    spread: jax.Array,
    dummy: jax.Array,
    valid: jax.Array,
    tolerance: jax.Array,
    max_rounds: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Forward auction with ε-scaling, then the reverse auction where needed, on a batch.

    The loop runs over the batch (not ``vmap`` of a per-problem loop) so that the reverse step,
    which few problems need and only at the end, is a real branch taken only in rounds where some
    problem is in it.

    Args:
      benefit: [B, M, N]; spread, dummy: [B]; valid: [B, M]; tolerance: scalar.

    Returns:
      ([B, M] column per row, −1 for its dummy or an invalid row; [B] finished; [B] rounds).
    """
    b, m, n = benefit.shape
    s = min(BIDDERS, m)
    problem, state = jax.vmap(_setup, in_axes=(0, 0, 0, 0, None))(
        benefit, spread, dummy, valid, tolerance
    )
    state, _ = _solve_compacted(problem, state, jnp.int32(0), s, max_rounds)
    held = state.held
    assign = jnp.where(valid & (held >= 0) & (held < n), held, NO_LABEL)
    return assign, state.done, state.rounds


def _compacted_sizes(b: int) -> tuple[int, ...]:
    """The batch sizes the unfinished problems of a batch of ``b`` move on in, largest first.

    Example:
      >>> _compacted_sizes(8192)
      (2048, 512, 128, 32)
    """
    sizes = []
    while b // COMPACT_FACTOR >= COMPACT_MIN:
        b //= COMPACT_FACTOR
        sizes.append(b)
    return tuple(sizes)


def _solve_compacted(
    problem: _Problem, state: _State, count: jax.Array, s: int, max_rounds: int
) -> tuple[_State, jax.Array]:
    """Rounds on the batch [B] until at most the next compacted size (``_compacted_sizes``) of
    its problems are unfinished; those then go on alone, gathered with their state, and are put
    back. ``count``: loop rounds so far (all levels together stay within ``max_rounds``)."""
    b = state.done.shape[0]
    sizes = _compacted_sizes(b)
    smaller = sizes[0] if sizes else 0
    forward = jax.vmap(functools.partial(_forward_round, s=s))
    reverse = jax.vmap(functools.partial(_reverse_round, s=s))

    def body(carry):
        st, count = carry
        for _ in range(UNROLL):
            st = forward(problem, st)  # a no-op for problems in the reverse auction
        st = jax.lax.cond(jnp.any(st.backward & ~st.done), lambda: reverse(problem, st), lambda: st)
        return st, count + UNROLL

    def cond(carry):
        st, count = carry
        return (jnp.sum(~st.done) > smaller) & (count < max_rounds)

    state, count = jax.lax.while_loop(cond, body, (state, count))
    if not smaller:
        return state, count
    idx, ok = _first(~state.done, smaller)  # [b'] the unfinished problems, padded
    take = functools.partial(jnp.take, indices=jnp.minimum(idx, b - 1), axis=0)
    part = jax.tree.map(take, state)
    part = part._replace(done=part.done | ~ok)  # padding slots: nothing to do
    part, count = _solve_compacted(jax.tree.map(take, problem), part, count, s, max_rounds)
    put = jnp.where(ok, idx, b)  # padding slots dropped
    state = jax.tree.map(lambda full, new: full.at[put].set(new, mode="drop"), state, part)
    return state, count


def auction_batch(
    scores: jax.Array,
    valid: jax.Array,
    tolerance: float | jax.Array = DEFAULT_TOLERANCE,
    max_rounds: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`auction_assignment` of a batch, unchecked (pure: for use inside ``jax.jit``).

    Args:
      scores: [B, M, N] scores to maximise; non-finite cells are never assigned.
      valid: [B, M] bool, valid rows.
      tolerance: total-score tolerance per problem.
      max_rounds: static bound on rounds (default ``MAX_ROUNDS``).

    Returns:
      ([B, M] int32 assignment, −1 for none; [B] bool finished; [B] int32 rounds used).

    Example:
      >>> scores = jnp.array([[[0.9, 0.1], [0.8, 0.2]]])
      >>> assign, done, _ = jax.jit(auction_batch)(scores, jnp.ones((1, 2), bool))
      >>> assign.tolist(), done.tolist()
      ([[0, 1]], [True])
    """
    max_rounds = MAX_ROUNDS if max_rounds is None else int(max_rounds)
    tolerance = jnp.asarray(tolerance, jnp.float32)
    b, m, n = scores.shape
    if m == 0 or n == 0:
        return (
            jnp.full((b, m), NO_LABEL, jnp.int32),
            jnp.ones((b,), bool),
            jnp.zeros((b,), jnp.int32),
        )
    # Square [K, K], and the bidders on the side with fewer real entries (per problem): with more
    # rows than columns, the rows left over would have to be priced out to their dummies, one ε
    # at a time (thousands of rounds for one extra row); the other way round they simply stay free.
    k = max(m, n)
    real = jnp.isfinite(scores) & valid[..., None]  # [B, M, N]
    square = jnp.full((b, k, k), -jnp.inf, jnp.float32)
    square = square.at[:, :m, :n].set(jnp.where(real, scores, -jnp.inf).astype(jnp.float32))
    real_rows = jnp.zeros((b, k), bool).at[:, :m].set(jnp.any(real, axis=2))  # [B, K]
    real_cols = jnp.zeros((b, k), bool).at[:, :n].set(jnp.any(real, axis=1))  # [B, K]
    flip = real_rows.sum(1) > real_cols.sum(1)  # [B]
    bidders = jnp.where(flip[:, None, None], jnp.swapaxes(square, 1, 2), square)  # [B, K, K]
    bidder_valid = jnp.where(flip[:, None], real_cols, real_rows)  # [B, K]
    benefit, spread, dummy = jax.vmap(_benefit)(bidders, bidder_valid)
    won, finished, rounds = _solve_batch(
        benefit, spread, dummy, bidder_valid, tolerance, max_rounds
    )  # [B, K] object (row or column) won by each bidder
    inverse = jax.vmap(
        lambda w: (
            jnp.full((k,), NO_LABEL, jnp.int32)
            .at[jnp.where(w >= 0, w, k)]
            .set(jnp.arange(k, dtype=jnp.int32), mode="drop")
        )
    )(won)  # [B, K] bidder holding each object
    assign = jnp.where(flip[:, None], inverse, won)[:, :m]  # [B, M] column per row
    return jnp.where(valid & (assign < n), assign, NO_LABEL), finished, rounds


def auction_assignment(
    scores: jax.Array,
    valid: jax.Array,
    tolerance: float | jax.Array = DEFAULT_TOLERANCE,
    max_rounds: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Maximum-score one-to-one assignment of one padded [M, N] score matrix (pure; jit/vmap it).

    Args:
      scores: [M, N] float scores to maximise (e.g. log-probabilities); non-finite cells and
        cells of invalid rows are never assigned (padding, forbidden pairs).
      valid: [M] bool, valid rows.
      tolerance: the total score is within this of the optimum (ε-optimality) unless that is
        below float32 resolution of the score range (module docstring).
      max_rounds: static bound on auction rounds (default ``MAX_ROUNDS``).

    Returns:
      ([M] int32 column per row, −1 for none; bool scalar, finished within ``max_rounds``).
      Among all assignments, it uses the most real cells (maximum cardinality).

    Example:
      >>> scores = jnp.array([[0.9, 0.1, 0.2], [0.8, 0.2, -jnp.inf]])  # row 1 may not take col 2
      >>> assign, done = auction_assignment(scores, jnp.ones(2, bool))
      >>> assign.tolist(), bool(done)
      ([0, 1], True)
    """
    assign, converged, _ = auction_batch(scores[None], valid[None], tolerance, max_rounds)
    return assign[0], converged[0]


@functools.partial(jax.jit, static_argnames=("max_rounds",))
def _auction_batch(scores, valid, tolerance, max_rounds):
    return auction_batch(scores, valid, tolerance, max_rounds)[:2]


def check_positive(value: object, name: str) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a finite number > 0.

    Example:
      >>> check_positive(2, "temperature")
      2.0
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def check_tolerance(tolerance: object) -> float:
    """``tolerance`` as a float; ValueError unless it is a finite number > 0.

    Example:
      >>> check_tolerance(1)
      1.0
    """
    return check_positive(tolerance, "tolerance")


def auction_assignment_batch(
    scores: ArrayLike,
    valid: ArrayLike,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_rounds: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`auction_assignment` over a batch (jit + vmap).

    Args:
      scores: [B, M, N] scores to maximise; non-finite cells are never assigned.
      valid: [B, M] bool, valid rows.
      tolerance: total-score tolerance per problem (> 0).
      max_rounds: bound on rounds per problem (static; default ``MAX_ROUNDS``).

    Returns:
      ([B, M] int32 assignment, −1 for none; [B] bool converged).

    Raises:
      ValueError: wrong ranks or shapes, or ``tolerance`` not a finite number > 0.

    Example:
      >>> scores = jnp.array([[[0.9, 0.1], [0.8, 0.2]]])
      >>> assign, ok = auction_assignment_batch(scores, jnp.ones((1, 2), bool))
      >>> assign.tolist(), ok.tolist()
      ([[0, 1]], [True])
    """
    scores = jnp.asarray(scores)
    valid = jnp.asarray(valid)
    if scores.ndim != 3:
        raise ValueError(f"scores must have rank 3 [B, M, N], got shape {scores.shape}")
    if valid.shape != scores.shape[:2]:
        raise ValueError(f"valid must have shape {scores.shape[:2]} [B, M], got {valid.shape}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    return _auction_batch(
        scores,
        valid.astype(bool),
        jnp.float32(check_tolerance(tolerance)),
        max_rounds,
    )
