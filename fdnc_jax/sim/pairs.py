"""Semi-synthetic training pairs: the transforms composed per copy, batched with ``jit(vmap(...))``.

Letters: B pairs, S source worms, P source slots, R = ``cfg.max_outliers`` reserved outlier slots,
Q = P + R slots of a synthetic copy, C color channels.

A pair is two independent semi-synthetic copies (template, test) of one real source worm, so the
identity of every surviving neuron is known: ``target[b, m]`` is the template slot holding the same
source neuron as test point m, −1 when that neuron was dropped from the template, −2 for an outlier
and −3 for an empty slot.

Example:
  >>> bank = make_source_bank([fd.load_worm(p) for p in paths])  # doctest: +SKIP
  >>> batch = make_pair_batch(jax.random.key(0), bank, 64, SimConfig())  # doctest: +SKIP
  >>> batch.test_xyz.shape  # [64, P + 20, 3]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdnc_jax import matching
from fdnc_jax.sim import transforms as T
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.types import OUTLIER, PADDING, UNLABELLED, PairBatch, SourceBank
from fdnc_jax.worm import MIN_NEURONS, Worm, as_worm_list, to_model_units

Array = jax.Array
NUM_COLOR_CHANNELS = 3  # R, G, B: the channels the color term uses.
_COLOR_FLOOR = matching.COLOR_FLOOR


def normalize_color(color: np.ndarray) -> np.ndarray:
    """Per-neuron color normalisation, exactly as inference does it (``matching.normalize_color``),
    after clipping background-subtracted negative intensities to 0.

    Args:
      color: [N, C'] raw intensities, C' ≥ 3.

    Returns:
      [N, 3] float32 rows summing to ~1, clipped ≥ 1e-5 (rows without signal: uniform).

    Example:
      >>> c = normalize_color(np.array([[2.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]))  # [N, 3] float32
      >>> c.astype(float).round(3).tolist()
      [[0.5, 0.25, 0.25], [0.333, 0.333, 0.333]]
    """
    return matching.normalize_color(np.maximum(np.asarray(color, np.float64), 0.0)).astype(
        np.float32
    )


def name_identities(worms: Sequence[Worm]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A shared name list and, per worm, each neuron's index in it (−1 unnamed or ambiguous).

    A name that labels several neurons of one worm is ambiguous there and gets −1 in that worm.

    Returns:
      names [K] sorted str; per worm an [N] int32 array.

    Example:
      >>> w = Worm(xyz_um=np.eye(3) * 10, names=["AVAL", "", "AVAR"])
      >>> names, ids = name_identities([w])
      >>> names.tolist(), ids[0].tolist()
      (['AVAL', 'AVAR'], [0, -1, 1])
    """
    unique_per_worm = [set(w.names[w.uniquely_named].tolist()) for w in worms]
    names = np.array(sorted(set().union(*unique_per_worm)), dtype=str)
    index = {n: k for k, n in enumerate(names)}
    ids = [
        np.array([index[n] if n in ok else -1 for n in w.names], np.int32)
        for w, ok in zip(worms, unique_per_worm, strict=True)
    ]
    return names, ids


def make_source_bank(
    worms: Sequence[Worm],
    num_points: int | None = None,
    use_color: bool = False,
    with_identity: bool = False,
) -> SourceBank:
    """Converts real worms to model units and pads them to a common size (host side).

    Args:
      worms: the source worms (µm; mirrored ones are mirrored by ``to_model_units``).
      num_points: P, slots per worm; default: the largest worm rounded up to a multiple of 16.
      use_color: carry per-neuron colors, normalised over the first 3 channels (every worm needs ≥
      3).
      with_identity: carry each neuron's name index (``name_identities``) so that pairs across
        animals have targets (``SimConfig.real_pair_fraction``).

    Returns:
      SourceBank with xyz [S, P, 3] model units, mask [S, P], color [S, P, 3] or None.

    Raises:
      ValueError: no worms, a worm larger than ``num_points``, or missing color with ``use_color``.

    Example:
      >>> w = Worm(xyz_um=np.random.default_rng(0).uniform(0, 100, (20, 3)))  # 20 neurons, µm
      >>> bank = make_source_bank([w, w])  # P = 20 rounded up to 32
      >>> bank.xyz.shape, bank.mask.shape
      ((2, 32, 3), (2, 32))
    """
    worms = as_worm_list(worms)
    if not worms:
        raise ValueError("make_source_bank needs at least one source worm, got an empty list")
    largest = max(w.n for w in worms)
    if num_points is None:
        num_points = -(-largest // 16) * 16
    if isinstance(num_points, bool) or not isinstance(num_points, int | np.integer):
        raise TypeError(f"num_points must be an int, got {type(num_points).__name__}")
    num_points = int(num_points)
    if num_points < MIN_NEURONS:
        raise ValueError(
            f"num_points={num_points} is too small: a worm needs ≥ {MIN_NEURONS} slots"
        )
    s = len(worms)
    xyz = np.zeros((s, num_points, 3), np.float32)
    mask = np.zeros((s, num_points), bool)
    color = np.zeros((s, num_points, NUM_COLOR_CHANNELS), np.float32) if use_color else None
    identity = np.full((s, num_points), -1, np.int32) if with_identity else None
    ids = name_identities(worms)[1] if with_identity else None
    for i, w in enumerate(worms):
        if w.n > num_points:
            raise ValueError(
                f"worms[{i}] has {w.n} neurons, more than num_points={num_points}; raise num_points"
            )
        xyz[i, : w.n] = to_model_units(w)[0]
        mask[i, : w.n] = True
        if ids is not None:
            identity[i, : w.n] = ids[i]
        if use_color:
            if w.color is None or w.color.shape[1] < NUM_COLOR_CHANNELS:
                have = "no color" if w.color is None else f"{w.color.shape[1]} color channels"
                raise ValueError(
                    f"worms[{i}] has {have}; use_color=True needs ≥ {NUM_COLOR_CHANNELS} (R, G, B)"
                )
            color[i, : w.n] = normalize_color(w.color)
    return SourceBank(
        xyz=jnp.asarray(xyz),
        mask=jnp.asarray(mask),
        color=None if color is None else jnp.asarray(color),
        identity=None if identity is None else jnp.asarray(identity),
    )


def _jitter_color(u: Array, color: Array, cfg: SimConfig) -> Array:
    """Multiplicative per-channel (and optional per-neuron) color jitter, rows renormalised.

    u: [C (+ Q·C with per-neuron jitter)] uniforms; color: [Q, C].
    """
    q, c = color.shape
    per_neuron = cfg.color_neuron_jitter > 0
    channel = 1.0 + (2.0 * u[:c] - 1.0) * cfg.color_jitter  # [C]
    out = color * channel[None, :]
    if per_neuron:
        out = out * (1.0 + (2.0 * u[c:].reshape(q, c) - 1.0) * cfg.color_neuron_jitter)
    out = out / jnp.maximum(jnp.sum(out, axis=1, keepdims=True), _COLOR_FLOOR)
    return jnp.maximum(out, _COLOR_FLOOR)


def _draw_sizes(p: int, channels: int, cfg: SimConfig) -> dict[str, int]:
    """How many random 32-bit words each step of ``_synthesize`` takes (P slots, C channels)."""
    r = cfg.max_outliers
    q = p + r
    per_neuron = channels > 0 and cfg.color_neuron_jitter > 0
    return {
        "warp": T.warp_draws(cfg),
        "rotate_yz": 3,
        "rate": 1,
        "drop": q,
        "outliers": T.outlier_draws(cfg),
        "bend": T.BEND_DRAWS,
        "scale": 3,
        "shear_xy": 2,
        "rotate_xy": 1,
        "jitter": T.jitter_draws(q, cfg),
        "shuffle": q if cfg.shuffle else 1,
        "color": channels + (q * channels if per_neuron else 0),
        "donors": max(r, 1) if channels > 0 else 0,
    }


def _synthesize(
    bits: Array, pts: Array, mask: Array, color: Array | None, cfg: SimConfig
) -> tuple[Array, Array, Array, Array | None]:
    """``synthesize`` of an already straightened (or never straightened) source given transposed,
    pts [3, P]; returns xyz [Q, 3] as ``synthesize``. All the copy's randomness comes from bits,
    [sum of ``_draw_sizes``] uint32 random words, sliced."""
    p, r = pts.shape[1], cfg.max_outliers
    labels = jnp.where(mask, jnp.arange(p, dtype=jnp.int32), PADDING)  # [P]
    # [3, Q], ... with the R empty slots reserved for outliers (mask == (labels != PADDING)
    # throughout). Padding first also makes XLA materialise the source (a gather from the bank)
    # instead of recomputing it inside the [Q, K] warp.
    pts = jnp.concatenate([jnp.where(mask[None, :], pts, 0.0), jnp.zeros((3, r), pts.dtype)], 1)
    mask = jnp.concatenate([mask, jnp.zeros((r,), bool)])
    labels = jnp.concatenate([labels, jnp.full((r,), PADDING, jnp.int32)])
    src_mask = mask
    c = 0 if color is None else color.shape[1]
    sizes = _draw_sizes(p, c, cfg)
    u_all = T.bits_to_uniform(bits)
    u, b, start = {}, {}, 0
    for name, size in sizes.items():  # over draw groups (static), not points
        u[name], b[name] = u_all[start : start + size], bits[start : start + size]
        start += size
    cloud = (pts, mask, labels)
    cloud = T._smooth_warp(u["warp"], *cloud, cfg)
    cloud = (T._apply_linear(cloud[0], T._rotate_yz_matrix(u["rotate_yz"], cfg)),) + cloud[1:]
    lo, hi = cfg.p_drop
    rate = lo + u["rate"][0] * (hi - lo)  # U(p_drop), shared by drop and outliers
    cloud = T._drop_points(u["drop"], *cloud, cfg, rate)
    if T.outlier_draws(cfg):
        # Candidates checked against the P source slots only (the R outlier slots are empty).
        pts, mask = cloud[0][:, :p], cloud[1][:p]
        points, n_out = T._outlier_points(u["outliers"], pts, mask, cfg, rate)  # [3, R], []
        if cfg.shuffle:  # Slot order is shuffled away: the reserved slots take the outliers.
            put = jnp.arange(r) < n_out  # [R]
            cloud = (
                jnp.concatenate([pts, jnp.where(put[None, :], points, 0.0)], axis=1),
                jnp.concatenate([mask, put]),
                jnp.concatenate([cloud[2][:p], jnp.where(put, OUTLIER, PADDING)]),
            )
        else:  # as add_outliers: into the first empty slots
            cloud = T._place_outliers(points, n_out, *cloud, cfg)
    cloud = T._random_bend(u["bend"], *cloud, cfg)
    # scale → shear_xy → rotate_xy, composed into one linear map.
    linear = T._rotate_xy_matrix(u["rotate_xy"], cfg) @ T._shear_xy_matrix(u["shear_xy"], cfg)
    linear = linear * T._scale_factors(u["scale"], cfg)[None, :]
    cloud = (T._apply_linear(cloud[0], linear),) + cloud[1:]
    cloud = T._jitter(u["jitter"], *cloud, cfg)
    is_out = cloud[2] == OUTLIER  # [Q]
    (xyz, mask, labels), order = T._recenter_shuffle(b["shuffle"], *cloud, cfg)  # xyz [Q, 3]
    if color is not None:
        color = jnp.concatenate([color, jnp.zeros((r, c), color.dtype)])  # [Q, C]
        # Outliers borrow the color of a random source neuron (donor j for the j-th outlier slot).
        donors = T.select_valid(u["donors"], src_mask)  # [R]
        out_rank = jnp.clip(jnp.cumsum(is_out.astype(jnp.int32)) - 1, 0, max(r, 1) - 1)  # [Q]
        color = jnp.where(is_out[:, None], color[donors[out_rank]], color)
        color = _jitter_color(u["color"], color, cfg)
        if order is not None:
            color = color[order]
        color = jnp.where(mask[:, None], color, 0.0)
    xyz = jnp.where(mask[:, None], xyz, 0.0)
    return xyz, mask, labels, color


def synthesize(
    key: Array, xyz: Array, mask: Array, color: Array | None, cfg: SimConfig
) -> tuple[Array, Array, Array, Array | None]:
    """One semi-synthetic copy of one source worm.

    Order (the original's, with the bend applied where it re-bent onto a centerline): [straighten] →
    smooth_warp → rotate_yz (+ yz shear) → drop_points → add_outliers → random_bend → scale →
    shear_xy → rotate_xy → jitter → recenter → shuffle. The drop probability p ~ U(p_drop) is
    shared by drop_points and add_outliers (k < min(max_outliers, n·p)). Empty slots come back
    zeroed.

    Args:
      key: PRNG key.
      xyz: [P, 3] float32 source positions, model units.
      mask: [P] bool, valid source slots.
      color: optional [P, C] normalised colors (carried; outliers borrow a random neuron's
        color; per-channel multiplicative jitter, rows renormalised).
      cfg: the SimConfig (static).

    Returns:
      xyz: [Q, 3] float32 model units, Q = P + cfg.max_outliers.
      mask: [Q] bool.
      labels: [Q] int32, source slot (≥ 0), −2 outlier, −3 empty.
      color: [Q, C] float32 or None.

    Example:
      >>> w = Worm(xyz_um=np.random.default_rng(0).uniform(0, 100, (20, 3)))  # 20 neurons, µm
      >>> bank, synth = make_source_bank([w]), jax.jit(synthesize, static_argnames="cfg")
      >>> out = synth(jax.random.key(0), bank.xyz[0], bank.mask[0], None, cfg=SimConfig())
      >>> xyz, mask, labels, color = out
      >>> xyz.shape  # Q = P + cfg.max_outliers = 32 + 20
      (52, 3)
    """
    pts = T._straighten(xyz.T, mask, cfg) if cfg.straighten_sources else xyz.T
    channels = 0 if color is None else color.shape[1]
    bits = T.random_bits(key, sum(_draw_sizes(xyz.shape[0], channels, cfg).values()))
    return _synthesize(bits, pts, mask, color, cfg)


def template_targets(template_labels: Array, test_labels: Array, num_sources: int) -> Array:
    """For each test slot, the template slot holding the same source neuron.

    Args:
      template_labels: [N] int32 source index (≥ 0) or a negative code.
      test_labels: [M] int32 source index (≥ 0) or a negative code.
      num_sources: P, source slots (labels are < P).

    Returns:
      [M] int32: template slot (≥ 0); −1 when the neuron is absent from the template; the test's own
      negative code (−2 outlier, −3 empty) otherwise.

    Example:
      >>> template_labels, test_labels = jnp.array([2, 0, -3]), jnp.array([0, 1, 2, -2])
      >>> template_targets(template_labels, test_labels, num_sources=3).tolist()
      [1, -1, 0, -2]
    """
    n = template_labels.shape[0]
    # [N] source index; out of range (→ dropped by the scatter) for outliers and empty slots.
    idx = jnp.where(template_labels >= 0, template_labels, num_sources)
    inverse = jnp.full((num_sources,), UNLABELLED, jnp.int32)
    inverse = inverse.at[idx].set(jnp.arange(n, dtype=jnp.int32), mode="drop")  # [P]
    found = inverse[jnp.clip(test_labels, 0, num_sources - 1)]  # [M]
    return jnp.where(test_labels >= 0, found, test_labels).astype(jnp.int32)


def identity_targets(
    template_labels: Array, template_identity: Array, test_labels: Array, test_identity: Array
) -> Array:
    """Test → template correspondence between copies of two different animals, through names.

    Args:
      template_labels: [N] int32 source slot of the template animal (≥ 0) or a negative code.
      template_identity: [P] int32 name index of each slot of the template animal (−1 unnamed).
      test_labels: [M] int32 source slot of the test animal (≥ 0) or a negative code.
      test_identity: [P'] int32 name index of each slot of the test animal (−1 unnamed).

    Returns:
      [M] int32: the template slot with the same name (≥ 0); −1 when the test neuron is unnamed or
      its name is not in the template; −2 outlier and −3 empty as in ``test_labels``.

    Example:
      >>> t_labels, t_identity = jnp.array([0, 1, -2]), jnp.array([0, 1, -1])
      >>> s_labels, s_identity = jnp.array([1, 0, 2, -3]), jnp.array([1, 0, 2])
      >>> identity_targets(t_labels, t_identity, s_labels, s_identity).tolist()
      [0, 1, -1, -3]
    """
    t_id = jnp.where(template_labels >= 0, template_identity[jnp.maximum(template_labels, 0)], -1)
    s_id = jnp.where(test_labels >= 0, test_identity[jnp.maximum(test_labels, 0)], -1)  # [M]
    same = (s_id[:, None] == t_id[None, :]) & (s_id >= 0)[:, None]  # [M, N]
    found = jnp.where(jnp.any(same, axis=1), jnp.argmax(same, axis=1), UNLABELLED)
    return jnp.where(test_labels >= 0, found, test_labels).astype(jnp.int32)


# Copies per independent vmap in ``_pair_batch``. On 2 cores, B = 256 pairs (512 copies), median
# ms per batch: 1 vmap of 512 copies 14.7, 2 of 256 11.7, 4 of 128 10.6, 8 of 64 11.4.
_COPIES_PER_CHAIN = 128
_MAX_CHAINS = 8


def _pair_batch(key: Array, sources: SourceBank, batch_size: int, cfg: SimConfig) -> PairBatch:
    """``make_pair_batch``: the 2·B copies (templates, then tests) synthesized by a few vmaps."""
    src_key, pair_key, cross_key, other_key = jax.random.split(key, 4)
    num_sources, p = sources.xyz.shape[:2]
    index = jax.random.randint(src_key, (batch_size,), 0, num_sources)  # [B]
    other, cross = index, jnp.zeros((batch_size,), bool)
    across = cfg.real_pair_fraction > 0 and sources.identity is not None and num_sources > 1
    if across:  # A different animal (uniform over the others) for a real_pair_fraction of pairs.
        shift = jax.random.randint(other_key, (batch_size,), 1, num_sources)  # [B]
        cross = jax.random.uniform(cross_key, (batch_size,)) < cfg.real_pair_fraction
        other = jnp.where(cross, (index + shift) % num_sources, index)
    bank_pts = jnp.swapaxes(sources.xyz, 1, 2)  # [S, 3, P]
    straighten = jax.vmap(lambda x, m: T._straighten(x, m, cfg))
    # Straighten whichever is fewer: the whole bank once, or the sources of the B pairs (each
    # once: a pair of copies of one animal shares it).
    straighten_bank = cfg.straighten_sources and num_sources < batch_size * (2 if across else 1)
    if straighten_bank:
        bank_pts = straighten(bank_pts, sources.mask)
    per_pair = cfg.straighten_sources and not straighten_bank
    src = jnp.concatenate([index, other])  # [2B] source of each copy
    mask = sources.mask[src]  # [2B, P]
    if per_pair and across:
        pts = straighten(bank_pts[src], mask)
    elif per_pair:
        pts = jnp.tile(straighten(bank_pts[index], sources.mask[index]), (2, 1, 1))
    else:
        pts = bank_pts[src]  # [2B, 3, P]
    color = None if sources.color is None else sources.color[src]
    # [2B, D] random words of the copies (templates, then tests): one threefry call for the batch.
    draws = sum(_draw_sizes(p, 0 if color is None else color.shape[2], cfg).values())
    bits = T.random_bits(pair_key, 2 * batch_size * draws).reshape(2 * batch_size, draws)
    synth = jax.vmap(lambda w, x, m, c: _synthesize(w, x, m, c, cfg))
    # On CPU, the 2B copies as several independent vmaps of ~_COPIES_PER_CHAIN copies: XLA's CPU
    # runtime runs independent op chains concurrently, and smaller ops keep their arrays in cache.
    # At most _MAX_CHAINS (the program grows with each); one vmap on accelerators. Each copy's
    # bits are its own slice of one draw, so the split does not change the batch.
    n = 1
    if jax.default_backend() == "cpu":
        n = min(max(2, round(2 * batch_size / _COPIES_PER_CHAIN)), _MAX_CHAINS, 2 * batch_size)
    cuts = [round(i * 2 * batch_size / n) for i in range(n + 1)]
    parts = [
        synth(bits[i:j], pts[i:j], mask[i:j], None if color is None else color[i:j])
        for i, j in zip(cuts[:-1], cuts[1:], strict=True)  # over chunks of the batch (a few)
    ]
    joined = [None if a[0] is None else jnp.concatenate(a) for a in zip(*parts, strict=True)]
    halves = [
        [None if a is None else a[h] for a in joined]
        for h in (slice(0, batch_size), slice(batch_size, 2 * batch_size))
    ]
    (t_xyz, t_mask, t_lab, t_col), (s_xyz, s_mask, s_lab, s_col) = halves
    target = jax.vmap(lambda t, s: template_targets(t, s, p))(t_lab, s_lab)  # [B, Q]
    if across:
        ident = sources.identity
        cross_targets = jax.vmap(identity_targets)(t_lab, ident[index], s_lab, ident[other])
        target = jnp.where(cross[:, None], cross_targets, target)
    return PairBatch(
        template_xyz=t_xyz,  # [B, Q, 3]
        template_mask=t_mask,
        test_xyz=s_xyz,
        test_mask=s_mask,
        target=target,
        template_color=t_col,
        test_color=s_col,
    )


_pair_batch_jit = jax.jit(_pair_batch, static_argnames=("batch_size", "cfg"))


def make_pair_batch(
    key: Array, sources: SourceBank, batch_size: int, cfg: SimConfig | None = None
) -> PairBatch:
    """A batch of semi-synthetic (template, test) pairs: 2 · batch_size synthetic worms.

    Each pair takes a source uniformly at random and synthesizes two independent copies
    (``synthesize``). With ``cfg.real_pair_fraction`` > 0 and a bank carrying ``identity``, that
    fraction of pairs takes the test copy from another animal of the bank instead: a real
    across-animal pair (real deformations, real annotation), simulated on top, whose targets come
    from the shared names (``identity_targets``).
    Jitted once per (batch_size, S, P, cfg); same key → same batch. Callable inside another jit.

    Args:
      key: PRNG key (``jax.random.key``).
      sources: the SourceBank (xyz [S, P, 3] model units).
      batch_size: B, number of pairs.
      cfg: SimConfig (static); default ``SimConfig()``.

    Returns:
      PairBatch with template/test xyz [B, Q, 3] (Q = P + cfg.max_outliers), masks [B, Q], target
      [B, Q] int32 (template slot, −1 absent from the template, −2 outlier, −3 empty), colors
      [B, Q, 3] or None.

    Raises:
      ValueError: a bad batch size, an empty source bank, too few slots, or an invalid config.

    Example:
      >>> w = Worm(xyz_um=np.random.default_rng(0).uniform(0, 100, (20, 3)))  # 20 neurons, µm
      >>> batch = make_pair_batch(jax.random.key(0), make_source_bank([w, w]), 2, SimConfig())
      >>> batch.test_xyz.shape, batch.target.shape  # [B, Q, 3], [B, Q] with Q = 32 + 20
      ((2, 52, 3), (2, 52))
    """
    cfg = SimConfig() if cfg is None else cfg
    if not isinstance(cfg, SimConfig):
        raise TypeError(f"cfg must be a SimConfig, got {type(cfg).__name__}")
    cfg.validate()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not isinstance(sources, SourceBank):
        raise TypeError(f"sources must be a SourceBank, got {type(sources).__name__}")
    if sources.xyz.ndim != 3 or sources.xyz.shape[-1] != 3:
        raise ValueError(f"sources.xyz must have shape [S, P, 3], got {sources.xyz.shape}")
    if sources.mask.shape != sources.xyz.shape[:2]:
        raise ValueError(
            f"sources.mask {sources.mask.shape} does not match sources.xyz {sources.xyz.shape}"
        )
    if sources.xyz.shape[0] == 0:
        raise ValueError("the source bank is empty (S = 0): no worm to synthesize from")
    if cfg.real_pair_fraction > 0 and sources.identity is None:
        raise ValueError(
            f"cfg.real_pair_fraction={cfg.real_pair_fraction} needs name identities: build the bank "
            "with make_source_bank(..., with_identity=True)"
        )
    if sources.xyz.shape[1] < MIN_NEURONS:
        raise ValueError(
            f"sources have P={sources.xyz.shape[1]} slots; at least {MIN_NEURONS} are needed"
        )
    return _pair_batch_jit(key, sources, batch_size=int(batch_size), cfg=cfg)
