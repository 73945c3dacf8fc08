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
    return matching.normalize_color(np.maximum(np.asarray(color, np.float64), 0.0)).astype(np.float32)


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


def _jitter_color(key: Array, color: Array, cfg: SimConfig) -> Array:
    """Multiplicative per-channel (and optional per-neuron) color jitter, rows renormalised."""
    q, c = color.shape
    per_neuron = cfg.color_neuron_jitter > 0
    u = jax.random.uniform(key, (c + (q * c if per_neuron else 0),))
    channel = 1.0 + (2.0 * u[:c] - 1.0) * cfg.color_jitter  # [C]
    out = color * channel[None, :]
    if per_neuron:
        out = out * (1.0 + (2.0 * u[c:].reshape(q, c) - 1.0) * cfg.color_neuron_jitter)
    out = out / jnp.maximum(jnp.sum(out, axis=1, keepdims=True), _COLOR_FLOOR)
    return jnp.maximum(out, _COLOR_FLOOR)


def _synthesize(
    key: Array,
    xyz: Array,
    mask: Array,
    color: Array | None,
    cfg: SimConfig,
    straighten_first: bool,
) -> tuple[Array, Array, Array, Array | None]:
    """``synthesize`` with the straightening made explicit (pairs straighten once per source)."""
    p, r = xyz.shape[0], cfg.max_outliers
    labels = jnp.where(mask, jnp.arange(p, dtype=jnp.int32), PADDING)  # [P]
    # [Q, ...] with R empty slots reserved for outliers.
    xyz = jnp.concatenate([jnp.where(mask[:, None], xyz, 0.0), jnp.zeros((r, 3), xyz.dtype)])
    mask = jnp.concatenate([mask, jnp.zeros((r,), bool)])
    labels = jnp.concatenate([labels, jnp.full((r,), PADDING, jnp.int32)])
    src_mask = mask
    ks = jax.random.split(key, 13)
    cloud = (xyz, mask, labels)
    if straighten_first:
        cloud = T.straighten(None, *cloud, cfg)
    cloud = T.smooth_warp(ks[0], *cloud, cfg)
    cloud = T.rotate_yz(ks[1], *cloud, cfg)
    lo, hi = cfg.p_drop
    rate = jax.random.uniform(ks[2], (), minval=lo, maxval=hi)  # shared by drop and outliers
    cloud = T.drop_points(ks[3], *cloud, cfg, rate=rate)
    cloud = T.add_outliers(ks[4], *cloud, cfg, rate=rate)
    cloud = T.random_bend(ks[5], *cloud, cfg)
    cloud = T.scale(ks[6], *cloud, cfg)
    cloud = T.shear_xy(ks[7], *cloud, cfg)
    cloud = T.rotate_xy(ks[8], *cloud, cfg)
    cloud = T.jitter(ks[9], *cloud, cfg)
    cloud = T.recenter(None, *cloud, cfg)
    xyz, mask, labels = T.shuffle(ks[10], *cloud, cfg)
    if color is not None:
        color = jnp.concatenate([color, jnp.zeros((r, color.shape[1]), color.dtype)])  # [Q, C]
        c_key, o_key = ks[11], ks[12]
        # Outliers borrow the color of a random source neuron (donor j for the j-th outlier slot).
        is_out = cloud[2] == OUTLIER  # [Q]
        donors = T.select_valid(jax.random.uniform(o_key, (max(r, 1),)), src_mask)  # [R]
        out_rank = jnp.clip(jnp.cumsum(is_out.astype(jnp.int32)) - 1, 0, max(r, 1) - 1)  # [Q]
        color = jnp.where(is_out[:, None], color[donors[out_rank]], color)
        color = _jitter_color(c_key, color, cfg)
        if cfg.shuffle:
            color = color[T.shuffle_order(ks[10], p + r)]
        color = jnp.where(mask[:, None], color, 0.0)
    xyz = jnp.where(mask[:, None], xyz, 0.0)
    labels = jnp.where(mask, labels, PADDING)
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
    return _synthesize(key, xyz, mask, color, cfg, cfg.straighten_sources)


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


def _one_pair(
    key: Array,
    xyz: Array,
    mask: Array,
    color: Array | None,
    identity: Array | None,
    other: int | Array,
    cross: bool | Array,
    cfg: SimConfig,
    straighten: bool,
    bank: tuple[Array, Array, Array | None, Array | None],
) -> PairBatch:
    """Two independent copies: the template of source ``xyz``, the test of bank source ``other``
    (the same animal, or when ``cross`` another one whose names give the correspondence through
    ``identity``), and the test → template correspondence."""
    p = xyz.shape[0]
    k_tmpl, k_test = jax.random.split(key)
    b_xyz, b_mask, b_color, b_identity = bank
    if identity is None:  # Two copies of one animal (the original's pairs): straighten it once.
        if straighten:
            xyz = _straighten(xyz, mask, cfg)
        o_xyz, o_mask, o_color = xyz, mask, color
    else:
        o_xyz, o_mask = b_xyz[other], b_mask[other]
        o_color = None if b_color is None else b_color[other]
        if straighten:
            xyz, o_xyz = _straighten(xyz, mask, cfg), _straighten(o_xyz, o_mask, cfg)
    t_xyz, t_mask, t_lab, t_col = _synthesize(k_tmpl, xyz, mask, color, cfg, False)
    s_xyz, s_mask, s_lab, s_col = _synthesize(k_test, o_xyz, o_mask, o_color, cfg, False)
    target = template_targets(t_lab, s_lab, p)
    if identity is not None:
        across = identity_targets(t_lab, identity, s_lab, b_identity[other])
        target = jnp.where(cross, across, target)
    return PairBatch(
        template_xyz=t_xyz,
        template_mask=t_mask,
        test_xyz=s_xyz,
        test_mask=s_mask,
        target=target,
        template_color=t_col,
        test_color=s_col,
    )


def _straighten(xyz: Array, mask: Array, cfg: SimConfig) -> Array:
    return T.straighten(None, xyz, mask, jnp.zeros(mask.shape, jnp.int32), cfg)[0]


def _pair_batch(key: Array, sources: SourceBank, batch_size: int, cfg: SimConfig) -> PairBatch:
    src_key, pair_key, cross_key, other_key = jax.random.split(key, 4)
    num_sources = sources.xyz.shape[0]
    index = jax.random.randint(src_key, (batch_size,), 0, num_sources)  # [B]
    other, cross = index, jnp.zeros((batch_size,), bool)
    across = cfg.real_pair_fraction > 0 and sources.identity is not None and num_sources > 1
    if across:  # A different animal (uniform over the others) for a real_pair_fraction of pairs.
        shift = jax.random.randint(other_key, (batch_size,), 1, num_sources)  # [B]
        cross = jax.random.uniform(cross_key, (batch_size,)) < cfg.real_pair_fraction
        other = jnp.where(cross, (index + shift) % num_sources, index)
    keys = jax.random.split(pair_key, batch_size)
    bank_xyz = sources.xyz
    # Straighten whichever is fewer: the whole bank once, or the B chosen sources (two per pair).
    straighten_bank = cfg.straighten_sources and num_sources < batch_size * (2 if across else 1)
    if straighten_bank:
        bank_xyz = jax.vmap(lambda x, m: _straighten(x, m, cfg))(bank_xyz, sources.mask)
    per_pair = cfg.straighten_sources and not straighten_bank
    color = None if sources.color is None else sources.color[index]
    identity = sources.identity[index] if across else None
    bank = (bank_xyz, sources.mask, sources.color, sources.identity if across else None)
    pair = lambda k, x, m, c, i, o, cr: _one_pair(k, x, m, c, i, o, cr, cfg, per_pair, bank)
    return jax.vmap(pair)(keys, bank_xyz[index], sources.mask[index], color, identity, other, cross)


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
