"""Tests for fdnc_jax.sim: config, per-worm transforms, synthesize, source banks, pair batches."""

from __future__ import annotations

import dataclasses
import functools
import glob
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdnc_jax.sim import pairs
from fdnc_jax.sim import transforms as T
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.types import OUTLIER, PADDING, UNLABELLED, PairBatch, SourceBank
from fdnc_jax.worm import Worm

P = 48  # slots of the small test worms
N = 36  # valid points of the small test worms
CFG = SimConfig()


def _cloud(seed: int, n: int = N, p: int = P) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A worm-like cloud (model units) in the first n of p slots; padding holds garbage."""
    r = np.random.default_rng(seed)
    xyz = np.stack([r.uniform(-0.6, 0.6, p), r.normal(0, 0.08, p), r.normal(0, 0.06, p)], 1)
    xyz[n:] = r.normal(0, 5.0, (p - n, 3))  # garbage in empty slots: must stay inert
    mask = np.arange(p) < n
    labels = np.where(mask, np.arange(p), PADDING)
    return jnp.asarray(xyz, jnp.float32), jnp.asarray(mask), jnp.asarray(labels, jnp.int32)


def _worm(seed: int, n: int = 40, color: bool = False) -> Worm:
    r = np.random.default_rng(seed)
    xyz = np.stack([r.uniform(0, 120, n), r.normal(40, 7, n), r.normal(15, 5, n)], 1)
    c = r.uniform(0.1, 1.0, (n, 4)) if color else None
    return Worm(xyz_um=xyz, color=c)


ALL = {
    "straighten": T.straighten,
    "random_bend": T.random_bend,
    "smooth_warp": T.smooth_warp,
    "rotate_yz": T.rotate_yz,
    "rotate_xy": T.rotate_xy,
    "scale": T.scale,
    "shear_xy": T.shear_xy,
    "drop_points": T.drop_points,
    "add_outliers": T.add_outliers,
    "jitter": T.jitter,
    "recenter": T.recenter,
    "shuffle": T.shuffle,
}
JITTER_CFG = dataclasses.replace(CFG, jitter_um=1.0)


def _assert_cloud_equal(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=atol, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[2]))


# ------------------------------------------------------------------------------------- config


def test_config_defaults_are_valid_and_hashable():
    cfg = SimConfig()
    cfg.validate()
    assert hash(cfg) == hash(SimConfig())
    assert cfg == SimConfig()
    assert cfg.p_drop == (0.05, 0.25) and cfg.max_outliers == 20
    assert np.isclose(cfg.rotate_yz_max, 0.45 * np.pi)


@pytest.mark.parametrize(
    "field, value",
    [
        ("p_drop", (0.3, 0.2)),
        ("p_drop", (0.1, 1.0)),
        ("p_drop", (-0.1, 0.2)),
        ("shear_yz", -0.1),
        ("scale", 1.0),
        ("warp_length_um", 0.0),
        ("warp_amplitude_um", float("nan")),
        ("max_outliers", -1),
        ("outlier_candidates", 5),
        ("warp_num_bumps", 0),
        ("shuffle", 1),
        ("straighten_degree", 2.5),
        ("outlier_margin_px", (1.0, 2.0)),
        ("p_drop", 0.2),
        ("p_drop", ("a", 0.2)),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SimConfig(**{field: value})


def test_config_from_dict():
    cfg = SimConfig.from_dict({"p_drop": [0.1, 0.2], "max_outliers": 5, "outlier_candidates": 8})
    assert cfg.p_drop == (0.1, 0.2) and cfg.max_outliers == 5
    assert SimConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SimConfig keys"):
        SimConfig.from_dict({"warp_amplitude": 3.0})
    ml_collections = pytest.importorskip("ml_collections")
    cd = ml_collections.ConfigDict({"jitter_um": 0.5})
    assert SimConfig.from_dict(cd).jitter_um == 0.5


# ------------------------------------------------------------------------- jit / vmap per transform


@pytest.mark.parametrize("name", sorted(ALL))
def test_transform_jit_equals_eager_and_vmap_equals_loop(name):
    f = functools.partial(ALL[name], cfg=JITTER_CFG)
    keys = jax.random.split(jax.random.key(1), 3)
    clouds = [_cloud(s) for s in range(3)]
    eager = [f(k, *c) for k, c in zip(keys, clouds, strict=True)]
    jitted = jax.jit(f)
    for k, c, e in zip(keys, clouds, eager, strict=True):
        _assert_cloud_equal(jitted(k, *c), e)
    stacked = [jnp.stack(a) for a in zip(*clouds, strict=True)]
    batched = jax.jit(jax.vmap(f))(keys, *stacked)
    for i, e in enumerate(eager):
        _assert_cloud_equal([b[i] for b in batched], e)


@pytest.mark.parametrize("name", sorted(set(ALL) - {"straighten", "recenter"}))
def test_random_transforms_depend_on_key_only_through_key(name):
    f = functools.partial(ALL[name], cfg=JITTER_CFG)
    c = _cloud(0)
    a, b = f(jax.random.key(3), *c), f(jax.random.key(3), *c)
    _assert_cloud_equal(a, b, atol=0)
    other = f(jax.random.key(4), *c)
    differs = not np.allclose(np.asarray(a[0]), np.asarray(other[0])) or not np.array_equal(
        np.asarray(a[1]), np.asarray(other[1])
    )
    assert differs, f"{name} ignores its key"


@pytest.mark.parametrize("name", sorted(ALL))
def test_padding_is_inert(name):
    """Valid outputs do not depend on what empty slots hold."""
    f = jax.jit(functools.partial(ALL[name], cfg=JITTER_CFG))
    xyz, mask, labels = _cloud(5)
    other = jnp.where(mask[:, None], xyz, 123.0)
    key = jax.random.key(7)
    a, b = f(key, xyz, mask, labels), f(key, other, mask, labels)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[2]))
    m = np.asarray(a[1])
    np.testing.assert_allclose(np.asarray(a[0])[m], np.asarray(b[0])[m], atol=1e-6)


# ----------------------------------------------------------------------------------- invariants


def _pdist(x):
    x = np.asarray(x, np.float64)
    return np.linalg.norm(x[:, None] - x[None], axis=-1)


@pytest.mark.parametrize("name", ["rotate_xy", "rotate_yz"])
def test_rotations_keep_pairwise_distances(name):
    cfg = dataclasses.replace(CFG, shear_yz=0.0)
    xyz, mask, labels = _cloud(0)
    for seed in range(5):
        out = ALL[name](jax.random.key(seed), xyz, mask, labels, cfg)[0]
        np.testing.assert_allclose(_pdist(out[:N]), _pdist(xyz[:N]), atol=1e-5)


def test_rotate_xy_keeps_z_and_covers_all_headings():
    xyz, mask, labels = _cloud(0)
    f = jax.jit(jax.vmap(lambda k: T.rotate_xy(k, xyz, mask, labels, CFG)[0]))
    out = np.asarray(f(jax.random.split(jax.random.key(0), 200)))
    np.testing.assert_allclose(
        out[:, :, 2], np.broadcast_to(xyz[:, 2], out[:, :, 2].shape), atol=1e-6
    )
    v = out[:, 1] - out[:, 0]  # a fixed segment's heading
    angles = np.arctan2(v[:, 1], v[:, 0])
    assert np.histogram(angles, bins=4, range=(-np.pi, np.pi))[0].min() > 20


def test_rotate_yz_angle_and_shear_ranges():
    """The recovered linear map is S·Rx(θ) with |θ| ≤ 0.45π and shear entries within ±0.1."""
    xyz, mask, labels = _cloud(0)
    thetas = []
    for seed in range(30):
        out = T.rotate_yz(jax.random.key(seed), xyz, mask, labels, CFG)[0]
        m, *_ = np.linalg.lstsq(
            np.asarray(xyz, np.float64), np.asarray(out, np.float64), rcond=None
        )
        m = m.T  # out = m @ x
        np.testing.assert_allclose(m[0], [1, 0, 0], atol=1e-5)
        # m[1:, 1:] = [[1, a], [b, 1]] @ [[c, -s], [s, c]]
        a_c_b = np.linalg.solve(np.array([[1.0, 0.0], [0.0, 1.0]]), m[1:, 1:])
        thetas.append(np.arctan2(a_c_b[1, 0] - 0.0, a_c_b[0, 0]))
    assert np.max(np.abs(thetas)) <= 0.45 * np.pi + 0.15  # shear tilts the estimate slightly
    assert np.max(np.abs(thetas)) > 0.25 * np.pi


def test_scale_and_shear_ranges():
    xyz, mask, labels = _cloud(0)
    for seed in range(20):
        out = np.asarray(T.scale(jax.random.key(seed), xyz, mask, labels, CFG)[0])
        ratio = out[:N] / np.asarray(xyz[:N])
        f = np.median(ratio, axis=0)
        np.testing.assert_allclose(ratio, np.broadcast_to(f, ratio.shape), rtol=1e-5)
        assert np.all(np.abs(f - 1) <= 0.05 + 1e-6)
        out = np.asarray(T.shear_xy(jax.random.key(seed), xyz, mask, labels, CFG)[0])
        m, *_ = np.linalg.lstsq(np.asarray(xyz, np.float64), out.astype(np.float64), rcond=None)
        m = m.T
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-5)
        np.testing.assert_allclose(m[2], [0, 0, 1], atol=1e-5)
        assert abs(m[0, 1]) <= 0.1 + 1e-5 and abs(m[1, 0]) <= 0.1 + 1e-5


def test_straighten_undoes_a_known_polynomial_bend():
    r = np.random.default_rng(0)
    n = 150
    x = np.sort(r.uniform(-0.7, 0.7, n))
    straight = np.stack([x, r.normal(0, 0.04, n), r.normal(0, 0.03, n)], 1)
    bent = straight.copy()
    bent[:, 1] += 0.25 * x**2 - 0.15 * x**3 + 0.05 * x
    bent[:, 2] += 0.1 * x**2
    # Arbitrary heading and offset in xy, as real worms lie.
    phi = 2.1
    rot = np.array([[np.cos(phi), -np.sin(phi), 0], [np.sin(phi), np.cos(phi), 0], [0, 0, 1]])
    moved = bent @ rot.T + np.array([0.3, -0.2, 0.05])
    mask = jnp.ones(n, bool)
    labels = jnp.arange(n, dtype=jnp.int32)
    out = np.asarray(T.straighten(None, jnp.asarray(moved, jnp.float32), mask, labels, CFG)[0])
    ref = np.asarray(T.straighten(None, jnp.asarray(straight, jnp.float32), mask, labels, CFG)[0])
    if np.corrcoef(out[:, 0], ref[:, 0])[0, 1] < 0:  # the AP sign is arbitrary
        out = out * np.array([-1.0, -1.0, 1.0])
    err = np.abs(out - ref)
    assert err[:, 0].max() < 0.02, err[:, 0].max()  # ≤ 1.7 µm along the worm
    assert err[:, 1:].max() < 0.01, err[:, 1:].max()  # ≤ 0.8 µm across


def test_straighten_is_deterministic_and_puts_the_long_axis_on_x():
    xyz, mask, labels = _cloud(2)
    rot = jnp.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = np.asarray(T.straighten(None, xyz @ rot.T, mask, labels, CFG)[0])[:N]
    assert out[:, 0].std() > 3 * out[:, 1].std()
    np.testing.assert_allclose(out.mean(0)[1:], 0.0, atol=1e-4)


def test_random_bend_is_smooth_and_keeps_arc_length():
    x = jnp.linspace(-0.7, 0.7, 41)
    line = jnp.stack([x, jnp.zeros_like(x), jnp.zeros_like(x)], 1)
    mask, labels = jnp.ones(41, bool), jnp.arange(41, dtype=jnp.int32)
    cfg = dataclasses.replace(CFG, bend_curvature_per_mm=15.0)
    for seed in range(5):
        out = np.asarray(T.random_bend(jax.random.key(seed), line, mask, labels, cfg)[0])
        steps = np.linalg.norm(np.diff(out, axis=0), axis=1)
        np.testing.assert_allclose(steps, 1.4 / 40, rtol=2e-3)  # arc length kept
        np.testing.assert_allclose(out[20], 0.0, atol=1e-6)  # pivot at x = 0
    off = dataclasses.replace(CFG, bend_curvature_per_mm=0.0, bend_curvature_change_per_mm=0.0)
    xyz, mask, labels = _cloud(0)
    out = T.random_bend(jax.random.key(0), xyz, mask, labels, off)[0]
    np.testing.assert_allclose(np.asarray(out)[:N], np.asarray(xyz)[:N], atol=1e-5)


def test_smooth_warp_rms_is_the_configured_amplitude():
    xyz, mask, labels = _cloud(0)
    for amp in (1.0, 4.5):
        cfg = dataclasses.replace(CFG, warp_amplitude_um=amp)
        out = T.smooth_warp(jax.random.key(1), xyz, mask, labels, cfg)[0]
        d = (np.asarray(out) - np.asarray(xyz))[:N] * T.UM_PER_UNIT
        np.testing.assert_allclose(np.sqrt(np.mean(d**2)), amp, rtol=1e-4)
        # Smooth: close neurons move alike (much less than the amplitude apart).
        near = _pdist(xyz[:N]) < T.um_to_units(3.0)
        np.fill_diagonal(near, False)
        if near.any():
            dd = np.linalg.norm(d[:, None] - d[None], axis=-1)[near]
            assert np.median(dd) < 0.5 * amp * np.sqrt(3)


def test_drop_rate_in_range_and_min_points():
    xyz, mask, labels = _cloud(0, n=40)
    f = jax.jit(jax.vmap(lambda k: T.drop_points(k, xyz, mask, labels, CFG)))
    _, keep, lab = f(jax.random.split(jax.random.key(0), 400))
    keep, lab = np.asarray(keep), np.asarray(lab)
    rate = 1 - keep.sum(1) / 40
    assert 0.05 <= rate.mean() + 0.03 and rate.mean() - 0.03 <= 0.25
    assert 0.12 < rate.mean() < 0.18  # E[p] = 0.15
    assert not keep[:, 40:].any()
    np.testing.assert_array_equal(lab[keep], np.broadcast_to(np.arange(P), keep.shape)[keep])
    assert np.all(lab[~keep] == PADDING)
    # Never below min_points, even with an extreme rate.
    tiny = jnp.arange(P) < 4
    k2 = T.drop_points(jax.random.key(0), xyz, tiny, labels, CFG, rate=0.999)[1]
    assert int(k2.sum()) >= 3
    three = jnp.arange(P) < 3
    assert int(T.drop_points(jax.random.key(0), xyz, three, labels, CFG, rate=0.999)[1].sum()) == 3


def test_outlier_counts_distances_and_box():
    xyz, mask, labels = _cloud(0, n=N, p=N + CFG.max_outliers)
    f = jax.jit(jax.vmap(lambda k, r: T.add_outliers(k, xyz, mask, labels, CFG, rate=r)))
    keys = jax.random.split(jax.random.key(0), 300)
    rates = jnp.linspace(0.05, 0.25, 300)
    out, m, lab = (np.asarray(a) for a in f(keys, rates))
    is_out = lab == OUTLIER
    counts = is_out.sum(1)
    hi = np.maximum(1, np.minimum(CFG.max_outliers, np.floor(N * np.asarray(rates)))).astype(int)
    assert np.all(counts >= 0) and np.all(counts < hi)  # randint(hi): 0 ≤ k < hi
    assert counts.max() >= 5 and (counts == 0).any()
    assert np.all(m[is_out]) and np.all(m.sum(1) == N + counts)
    # Valid neurons untouched.
    v = np.asarray(xyz)[:N]
    np.testing.assert_array_equal(out[:, :N], np.broadcast_to(v, out[:, :N].shape))
    np.testing.assert_array_equal(lab[:, :N], np.broadcast_to(np.arange(N), lab[:, :N].shape))
    # ≥ 5 px from every neuron in xy, inside the bounding box + margins.
    v = np.asarray(xyz)[:N]
    pts = out[is_out]
    dxy = np.linalg.norm(pts[:, None, :2] - v[None, :, :2], axis=-1).min(1) * 200
    assert dxy.min() >= 5.0 - 1e-3
    margin = np.array(CFG.outlier_margin_px) / 200
    assert np.all(pts >= v.min(0) - margin - 1e-6) and np.all(pts <= v.max(0) + margin + 1e-6)


def test_outliers_only_fill_empty_slots():
    xyz, mask, labels = _cloud(0, n=N, p=N + 2)  # only two free slots
    for seed in range(20):
        _, m, lab = T.add_outliers(jax.random.key(seed), xyz, mask, labels, CFG, rate=0.25)
        assert int((np.asarray(lab) == OUTLIER).sum()) <= 2
        np.testing.assert_array_equal(np.asarray(m)[:N], True)


def test_jitter_std_and_off_by_default():
    xyz, mask, labels = _cloud(0)
    assert CFG.jitter_um == 0
    out = T.jitter(jax.random.key(0), xyz, mask, labels, CFG)[0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(xyz))
    cfg = dataclasses.replace(CFG, jitter_um=2.0)
    f = jax.vmap(lambda k: T.jitter(k, xyz, mask, labels, cfg)[0])
    d = (np.asarray(f(jax.random.split(jax.random.key(0), 50))) - np.asarray(xyz))[:, :N]
    np.testing.assert_allclose(d.std() * T.UM_PER_UNIT, 2.0, rtol=0.05)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 35, 48])
def test_recenter_subtracts_the_masked_median(n):
    xyz, _, labels = _cloud(1)
    mask = jnp.arange(P) < n
    out = np.asarray(T.recenter(None, xyz, mask, labels, CFG)[0])
    expect = np.asarray(xyz) - np.median(np.asarray(xyz)[:n], axis=0)
    np.testing.assert_allclose(out[:n], expect[:n], atol=1e-6)
    np.testing.assert_allclose(np.median(out[:n], axis=0), 0.0, atol=1e-6)


def test_masked_median_matches_numpy_with_ties_and_empty():
    r = np.random.default_rng(0)
    f = jax.jit(T.masked_median)
    for _ in range(30):
        x = np.round(r.normal(size=(40, 3)) * r.choice([1e-3, 1.0, 50.0]), 1).astype(np.float32)
        m = r.random(40) < r.uniform(0.05, 1)
        if m.any():
            np.testing.assert_allclose(np.asarray(f(x, m)), np.median(x[m], 0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(f(np.ones((5, 3), np.float32), np.zeros(5, bool))), 0)


def test_shuffle_is_a_permutation_of_slots():
    xyz, mask, labels = _cloud(0)
    key = jax.random.key(9)
    out, m, lab = (np.asarray(a) for a in T.shuffle(key, xyz, mask, labels, CFG))
    order = np.asarray(T.shuffle_order(key, P))
    assert sorted(order.tolist()) == list(range(P))
    assert not np.array_equal(order, np.arange(P))
    np.testing.assert_array_equal(out, np.asarray(xyz)[order])
    np.testing.assert_array_equal(m, np.asarray(mask)[order])
    np.testing.assert_array_equal(lab, np.asarray(labels)[order])
    same = T.shuffle(key, xyz, mask, labels, dataclasses.replace(CFG, shuffle=False))
    _assert_cloud_equal(same, (xyz, mask, labels), atol=0)


# ------------------------------------------------------------------------------- source banks


def test_make_source_bank_pads_and_normalises_color():
    worms = [_worm(0, 40, color=True), _worm(1, 20, color=True)]
    bank = pairs.make_source_bank(worms, use_color=True)
    assert isinstance(bank, SourceBank)
    assert bank.xyz.shape == (2, 48, 3) and bank.mask.shape == (2, 48)
    assert bank.color.shape == (2, 48, 3)
    np.testing.assert_array_equal(np.asarray(bank.mask).sum(1), [40, 20])
    c = np.asarray(bank.color)[0, :40]
    np.testing.assert_allclose(c.sum(1), 1.0, atol=1e-4)
    raw = worms[0].color[:, :3]
    np.testing.assert_allclose(c, raw / raw.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(np.median(np.asarray(bank.xyz)[0, :40], 0), 0.0, atol=1e-6)
    assert pairs.make_source_bank(worms).color is None
    assert pairs.make_source_bank(worms, num_points=41).num_points == 41


def test_normalize_color_clips():
    c = pairs.normalize_color(np.array([[1.0, -1.0, 1.0, 9.0], [0.0, 0.0, 0.0, 1.0]]))
    np.testing.assert_allclose(c[0], [0.5, 1e-5, 0.5], rtol=1e-5)
    np.testing.assert_allclose(c[1], 1 / 3, rtol=1e-5)


def test_make_source_bank_errors():
    with pytest.raises(ValueError, match="empty"):
        pairs.make_source_bank([])
    with pytest.raises(ValueError, match="num_points"):
        pairs.make_source_bank([_worm(0, 40)], num_points=30)
    with pytest.raises(ValueError, match="too small"):
        pairs.make_source_bank([_worm(0, 40)], num_points=2)
    with pytest.raises(ValueError, match="color"):
        pairs.make_source_bank([_worm(0, 40)], use_color=True)
    with pytest.raises(TypeError):
        pairs.make_source_bank([np.zeros((4, 3))])


def test_mirrored_worm_is_mirrored_in_the_bank():
    w = _worm(0, 40)
    a = np.asarray(pairs.make_source_bank([w]).xyz)[0, :40]
    b = np.asarray(pairs.make_source_bank([w.replace(mirrored=True)]).xyz)[0, :40]
    np.testing.assert_allclose(b, a * np.array([-1, 1, -1]), atol=1e-6)


# ------------------------------------------------------------------------- synthesize and pairs


def _tagged_bank(num: int = 3, n: int = 40) -> SourceBank:
    """Sources whose color encodes the slot index (an identity tag that rides through the sim)."""
    worms = []
    for s in range(num):
        idx = np.arange(n, dtype=np.float64)
        color = np.stack([idx + 1.0, np.full(n, 7.0), (idx % 5) + 1.0, np.ones(n)], 1)
        worms.append(_worm(s, n).replace(color=color))
    return pairs.make_source_bank(worms, use_color=True)


NO_COLOR_JITTER = dataclasses.replace(CFG, color_jitter=0.0)


def _tag(color: np.ndarray) -> np.ndarray:
    """Recovers the slot index from a tagged color (ratio of channel 0 to channel 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tag = np.rint(color[..., 0] / color[..., 1] * 7.0 - 1.0)
    return np.where(np.isfinite(tag), tag, -99).astype(int)


def test_synthesize_shapes_labels_and_color_ride_along():
    bank = _tagged_bank(1)
    xyz, mask, color = bank.xyz[0], bank.mask[0], bank.color[0]
    q = bank.num_points + CFG.max_outliers
    for seed in range(5):
        out, m, lab, col = (
            np.asarray(a)
            for a in pairs.synthesize(jax.random.key(seed), xyz, mask, color, NO_COLOR_JITTER)
        )
        assert out.shape == (q, 3) and m.shape == (q,) and lab.shape == (q,) and col.shape == (q, 3)
        assert lab.dtype == np.int32
        assert set(np.unique(lab[~m])) <= {PADDING}
        assert np.all(out[~m] == 0) and np.all(col[~m] == 0)
        real = m & (lab >= 0)
        assert len(np.unique(lab[real])) == real.sum()  # each source neuron at most once
        np.testing.assert_array_equal(_tag(col[real]), lab[real])  # color permuted with slots
        np.testing.assert_allclose(np.median(out[m], 0), 0.0, atol=1e-6)  # recentred
        keep = real.sum() / 40
        assert 0.5 <= keep <= 1.0


@functools.cache
def _plain_synthesize():
    """One jitted synthesize of a fixed 40-neuron source without color (shared by tests)."""
    bank = pairs.make_source_bank([_worm(0, 40)])
    return bank, jax.jit(lambda k: pairs.synthesize(k, bank.xyz[0], bank.mask[0], None, CFG))


def test_synthesize_without_color_and_vmap_equals_loop():
    bank, f = _plain_synthesize()
    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.jit(
        jax.vmap(lambda k: pairs.synthesize(k, bank.xyz[0], bank.mask[0], None, CFG))
    )(keys)
    assert batched[3] is None
    for i in range(3):
        single = f(keys[i])
        assert single[3] is None
        _assert_cloud_equal([b[i] for b in batched[:3]], single[:3])


def test_template_targets():
    tmpl = jnp.array([3, -2, 0, -3, 1], jnp.int32)
    test = jnp.array([0, 1, 2, 3, -2, -3], jnp.int32)
    out = np.asarray(pairs.template_targets(tmpl, test, 4))
    np.testing.assert_array_equal(out, [2, 4, UNLABELLED, 0, OUTLIER, PADDING])


@pytest.fixture(scope="module")
def tagged_batch() -> tuple[SourceBank, PairBatch]:
    bank = _tagged_bank(3)
    return bank, pairs.make_pair_batch(jax.random.key(0), bank, 16, NO_COLOR_JITTER)


def test_pair_batch_shapes_and_codes(tagged_batch):
    bank, b = tagged_batch
    q = bank.num_points + CFG.max_outliers
    assert isinstance(b, PairBatch)
    for a in (b.template_xyz, b.test_xyz):
        assert a.shape == (16, q, 3) and a.dtype == jnp.float32
    assert b.target.shape == (16, q) and b.target.dtype == jnp.int32
    assert b.template_color.shape == (16, q, 3)
    t = np.asarray(b.target)
    assert set(np.unique(t)) <= set(range(q)) | {UNLABELLED, OUTLIER, PADDING}
    np.testing.assert_array_equal(t == PADDING, ~np.asarray(b.test_mask))
    assert (t == UNLABELLED).any() and (t == OUTLIER).any() and (t >= 0).any()


def test_pair_batch_target_consistency(tagged_batch):
    """Every target ≥ 0 points at the template slot holding the same source neuron (color tags)."""
    _, b = tagged_batch
    t = np.asarray(b.target)
    tc, sc = np.asarray(b.template_color), np.asarray(b.test_color)
    tm = np.asarray(b.template_mask)
    for i in range(t.shape[0]):
        ok = t[i] >= 0
        assert tm[i][t[i][ok]].all()
        np.testing.assert_array_equal(_tag(tc[i][t[i][ok]]), _tag(sc[i][ok]))
        assert len(np.unique(t[i][ok])) == ok.sum()  # one-to-one


def test_copy_labels_and_targets_agree():
    """With the labels of two copies: ≥ 0 same neuron, −1 absent from the template, −2 outlier."""
    bank, syn = _plain_synthesize()
    for seed in range(10):
        _, tm, tl, _ = (np.asarray(a) if a is not None else None for a in syn(jax.random.key(seed)))
        _, sm, sl, _ = (
            np.asarray(a) if a is not None else None for a in syn(jax.random.key(seed + 100))
        )
        t = np.asarray(pairs.template_targets(jnp.asarray(tl), jnp.asarray(sl), bank.num_points))
        ok = t >= 0
        np.testing.assert_array_equal(tl[t[ok]], sl[ok])
        absent = t == UNLABELLED
        assert np.all(sl[absent] >= 0) and not np.isin(sl[absent], tl[tm]).any()
        np.testing.assert_array_equal(t == OUTLIER, sl == OUTLIER)
        np.testing.assert_array_equal(t == PADDING, ~sm)


def test_pair_batch_geometry_is_plausible(tagged_batch):
    """Matched neurons of the two copies differ by a similarity map plus a few µm."""
    _, b = tagged_batch
    t = np.asarray(b.target)
    for i in range(4):
        ok = t[i] >= 0
        a = np.asarray(b.template_xyz[i])[t[i][ok]].astype(np.float64) * T.UM_PER_UNIT
        c = np.asarray(b.test_xyz[i])[ok].astype(np.float64) * T.UM_PER_UNIT
        da, dc = a - a.mean(0), c - c.mean(0)
        u, s, vt = np.linalg.svd(dc.T @ da)
        d = np.diag([1, 1, np.sign(np.linalg.det(u @ vt))])
        r = u @ d @ vt
        scale = np.trace(np.diag(s) @ d) / (da**2).sum()
        rms = np.sqrt(np.mean(np.sum((scale * da @ r.T - dc) ** 2, 1)))
        assert 0.5 < rms < 25.0, rms


def test_pair_batch_determinism_and_no_retrace(tagged_batch):
    bank, first = tagged_batch
    again = pairs.make_pair_batch(jax.random.key(0), bank, 16, NO_COLOR_JITTER)
    chex.assert_trees_all_equal(first, again)
    other = pairs.make_pair_batch(jax.random.key(1), bank, 16, NO_COLOR_JITTER)
    assert not np.array_equal(np.asarray(first.test_xyz), np.asarray(other.test_xyz))
    size = pairs._pair_batch_jit._cache_size()
    for seed in range(3):
        equal_cfg = dataclasses.replace(NO_COLOR_JITTER)  # a new but equal config
        pairs.make_pair_batch(jax.random.key(seed + 5), bank, 16, equal_cfg)
    assert pairs._pair_batch_jit._cache_size() == size


def test_pair_batch_traces_once():
    bank = pairs.make_source_bank([_worm(0, 30), _worm(1, 25)])
    counted = chex.assert_max_traces(pairs._pair_batch, n=1)
    f = jax.jit(counted, static_argnames=("batch_size", "cfg"))
    for seed in range(3):
        out = f(jax.random.key(seed), bank, batch_size=2, cfg=SimConfig())
    assert out.template_color is None


def test_pair_batch_inside_jit():
    bank = pairs.make_source_bank([_worm(0, 30), _worm(1, 25)])

    @jax.jit
    def step(key):
        batch = pairs.make_pair_batch(key, bank, 2, SimConfig())
        return jnp.sum(batch.target >= 0)

    assert int(step(jax.random.key(0))) > 0


def test_pair_batch_errors():
    bank = pairs.make_source_bank([_worm(0, 30)])
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="batch_size"):
        pairs.make_pair_batch(key, bank, 0)
    with pytest.raises(TypeError, match="batch_size"):
        pairs.make_pair_batch(key, bank, 2.0)
    empty = SourceBank(xyz=jnp.zeros((0, 32, 3)), mask=jnp.zeros((0, 32), bool))
    with pytest.raises(ValueError, match="empty"):
        pairs.make_pair_batch(key, empty, 2)
    small = SourceBank(xyz=jnp.zeros((1, 2, 3)), mask=jnp.ones((1, 2), bool))
    with pytest.raises(ValueError, match="slots"):
        pairs.make_pair_batch(key, small, 2)
    with pytest.raises(ValueError, match="p_drop"):
        pairs.make_pair_batch(key, bank, 2, SimConfig(p_drop=(0.5, 0.1)))
    with pytest.raises(TypeError, match="SimConfig"):
        pairs.make_pair_batch(key, bank, 2, {"p_drop": (0.1, 0.2)})


def test_real_worms_simulate_plausibly(shared_data):
    from fdnc_jax.io import load_worm

    files = sorted(glob.glob(str(shared_data / "data" / "wormnd" / "*.npz")))[::15]
    assert files, "no WormND worms under the shared data folder"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worms = [load_worm(f) for f in files]
    bank = pairs.make_source_bank(worms, use_color=True)
    b = jax.device_get(pairs.make_pair_batch(jax.random.key(0), bank, 16, SimConfig()))
    t = b.target
    kept = (t >= 0).sum(1) / np.maximum(b.test_mask.sum(1), 1)
    assert 0.5 < np.median(kept) < 1.0
    extent_um = np.ptp(b.test_xyz[0][b.test_mask[0]], axis=0).max() * T.UM_PER_UNIT
    assert 60 < extent_um < 300


# ------------------------------------------------------------------ real pairs across animals


def _named_tagged_bank(num: int = 3, n: int = 40) -> SourceBank:
    """Animals naming overlapping subsets of 50 names in their own order (some neurons unnamed);
    each neuron's color encodes its *name* index, so a correct target joins equal tags."""
    worms = []
    for s in range(num):
        r = np.random.default_rng(50 + s)
        k = r.permutation(50)[:n].astype(np.float64)
        names = np.array([f"N{int(i)}" for i in k])
        unnamed = r.random(n) < 0.15
        names[unnamed] = ""
        tag = np.where(unnamed, 100.0 + k, k)  # tags ≥ 100: unnamed neurons
        color = np.stack([tag + 1.0, np.full(n, 7.0), np.ones(n), np.ones(n)], 1)
        worms.append(_worm(s, n).replace(color=color, names=names))
    return pairs.make_source_bank(worms, use_color=True, with_identity=True)


def test_identity_targets():
    t_lab = jnp.array([2, -2, 0, 1], jnp.int32)  # template slots → source slots of animal A
    t_ident = jnp.array([5, 7, 9], jnp.int32)  # A's names: slot 0 = name 5, 1 = 7, 2 = 9
    s_lab = jnp.array([0, 1, 2, -2, -3], jnp.int32)
    s_ident = jnp.array([9, -1, 4], jnp.int32)  # B: slot 0 = name 9, slot 1 unnamed, 2 = name 4
    out = np.asarray(pairs.identity_targets(t_lab, t_ident, s_lab, s_ident))
    np.testing.assert_array_equal(out, [0, UNLABELLED, UNLABELLED, OUTLIER, PADDING])


def test_real_pairs_across_animals_follow_the_names():
    bank = _named_tagged_bank()
    ident = np.asarray(bank.identity)
    assert ident.shape == (3, 48) and (ident[:, 40:] == -1).all() and (ident[:, :40] == -1).any()
    cfg = dataclasses.replace(NO_COLOR_JITTER, real_pair_fraction=1.0)
    b = pairs.make_pair_batch(jax.random.key(1), bank, 16, cfg)
    t, tc, sc = np.asarray(b.target), np.asarray(b.template_color), np.asarray(b.test_color)
    matched = 0
    for i in range(16):
        ok = t[i] >= 0
        np.testing.assert_array_equal(_tag(tc[i][t[i][ok]]), _tag(sc[i][ok]))  # same name
        assert len(np.unique(t[i][ok])) == ok.sum()
        matched += ok.sum()
        # Different animals: the tags of the test are not the template's own slots.
        assert not np.array_equal(
            np.sort(_tag(tc[i][np.asarray(b.template_mask[i])])),
            np.sort(_tag(sc[i][np.asarray(b.test_mask[i])])),
        )
    assert matched > 16 * 10
    # Unnamed test neurons are never supervised as matches.
    assert (t == UNLABELLED).sum() > 0
    # Fraction 0 (or a bank without identity) gives the original pairs, bit for bit.
    plain = pairs.make_pair_batch(jax.random.key(1), bank, 16, NO_COLOR_JITTER)
    no_id = pairs.make_pair_batch(
        jax.random.key(1), dataclasses.replace(bank, identity=None), 16, NO_COLOR_JITTER
    )
    np.testing.assert_array_equal(np.asarray(plain.target), np.asarray(no_id.target))
    half = pairs.make_pair_batch(
        jax.random.key(2), bank, 64, dataclasses.replace(cfg, real_pair_fraction=0.5)
    )
    # Same-animal pairs still match unnamed neurons (slot identity); pairs across animals never do.
    ht, htc = np.asarray(half.target), np.asarray(half.template_color)
    same = [(_tag(htc[i][ht[i][ht[i] >= 0]]) >= 100).any() for i in range(64)]
    assert 16 <= 64 - sum(same) <= 48
    cross_tags = [_tag(tc[i][t[i][t[i] >= 0]]) for i in range(16)]
    assert all((c < 100).all() for c in cross_tags)


def test_real_pair_fraction_is_validated():
    with pytest.raises(ValueError, match="real_pair_fraction"):
        SimConfig(real_pair_fraction=1.5)


def test_real_pairs_need_identities():
    bank = pairs.make_source_bank([_worm(0, 40), _worm(1, 40)])
    with pytest.raises(ValueError, match="with_identity=True"):
        pairs.make_pair_batch(jax.random.key(0), bank, 2, SimConfig(real_pair_fraction=0.5))


def test_chunked_copies_equal_one_vmap(monkeypatch):
    """On CPU the copies of a batch run as a few independent vmaps: the batch is the same."""
    bank, cfg, key = _tagged_bank(), SimConfig(), jax.random.key(11)
    batch = functools.partial(jax.jit, static_argnames=("batch_size", "cfg"))
    chunked = batch(pairs._pair_batch)(key, bank, batch_size=8, cfg=cfg)
    monkeypatch.setattr(pairs, "_MAX_CHAINS", 1)
    single = batch(pairs._pair_batch)(key, bank, batch_size=8, cfg=cfg)
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
