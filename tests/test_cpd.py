"""Tests for fdnc_jax.cpd: exact recovery, padding inertness, pycpd parity, vmap, matching, errors.

Clouds are small (30-50 points, model-unit scale ~0.5) so the whole file runs in well under a
minute on 2 CPU cores; shapes are shared between tests to reuse compilations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fdnc_jax import cpd

pycpd = pytest.importorskip("pycpd")

K = 40  # points per cloud
R_TRUE = Rotation.from_euler("xyz", [25.0, -15.0, 20.0], degrees=True).as_matrix()
S_TRUE = 1.15
T_TRUE = np.array([0.1, -0.05, 0.2])


def _cloud(seed: int, n: int = K) -> np.ndarray:
    """A random worm-head-like cloud in model units: ~1.2 long, centred."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3)) * [0.4, 0.2, 0.2]).astype(np.float32)


def _similarity(y: np.ndarray, s=S_TRUE, r=R_TRUE, t=T_TRUE) -> np.ndarray:
    return (s * y @ r.T + t).astype(np.float32)


def _warp(y: np.ndarray, amp: float = 0.1) -> np.ndarray:
    """A smooth non-rigid deformation."""
    return (y + amp * np.sin(2.0 * y[:, [1, 2, 0]])).astype(np.float32)


def _pad(pts: np.ndarray, size: int, seed: int, fill: float):
    """Scatters pts into `size` slots at random positions; other slots hold `fill`."""
    rng = np.random.default_rng(seed)
    slots = np.sort(rng.choice(size, pts.shape[0], replace=False))
    out = np.full((size, 3), fill, np.float32)
    out[slots] = pts
    mask = np.zeros(size, bool)
    mask[slots] = True
    return out, mask, slots


def _np(res: cpd.CPDResult) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in vars(res).items()}


# ------------------------------------------------------------------------------------ rigid


def test_rigid_recovers_known_similarity():
    y = _cloud(0)
    x = _similarity(y)
    r = _np(cpd.rigid_cpd(x, None, y, None))
    assert r["converged"] and 2 <= r["n_iter"] < 100
    np.testing.assert_allclose(r["R"], R_TRUE, atol=1e-3)
    np.testing.assert_allclose(r["s"], S_TRUE, atol=1e-3)
    np.testing.assert_allclose(r["t"], T_TRUE, atol=1e-3)
    np.testing.assert_allclose(r["B"], S_TRUE * R_TRUE, atol=1e-3)
    np.testing.assert_allclose(r["ty"], x, atol=1e-3)
    np.testing.assert_allclose(np.linalg.det(r["R"]), 1.0, atol=1e-5)
    assert r["ty"].dtype == np.float32 and r["P"].dtype == np.float32
    assert r["P"].shape == (K, K)
    # the posterior concentrates on the true partner
    np.testing.assert_array_equal(np.argmax(r["P"], axis=1), np.arange(K))


def test_rigid_padding_is_inert():
    y = _cloud(1)
    x = _similarity(y)
    ref = _np(cpd.rigid_cpd(x, None, y, None))
    # NaN padding in the template, huge values in the test cloud, scattered slots
    xp, xm, xs = _pad(x, 48, seed=2, fill=np.nan)
    yp, ym, ys = _pad(y, 44, seed=3, fill=1e3)
    r = _np(cpd.rigid_cpd(xp, xm, yp, ym))
    for k in ("R", "s", "t", "sigma2"):
        np.testing.assert_allclose(r[k], ref[k], atol=1e-5, err_msg=k)
    assert r["n_iter"] == ref["n_iter"]
    np.testing.assert_allclose(r["ty"][ys], ref["ty"], atol=1e-5)
    np.testing.assert_allclose(r["P"][np.ix_(ys, xs)], ref["P"], atol=1e-5)
    assert np.all(r["ty"][~ym] == 0.0)
    assert np.all(r["P"][~ym] == 0.0) and np.all(r["P"][:, ~xm] == 0.0)
    assert np.all(np.isfinite(r["P"])) and np.all(np.isfinite(r["ty"]))


def test_rigid_with_missing_points_in_both_clouds():
    y = _cloud(4)
    x = _similarity(y)
    xm = np.ones(K, bool)
    ym = np.ones(K, bool)
    xm[[0, 7, 13, 21, 30]] = False  # neurons not detected in the template
    ym[[3, 18, 33]] = False  # ... and others missing from the test worm
    r = _np(cpd.rigid_cpd(x, xm, y, ym))
    np.testing.assert_allclose(r["R"], R_TRUE, atol=1e-3)
    np.testing.assert_allclose(r["s"], S_TRUE, atol=1e-3)
    np.testing.assert_allclose(r["t"], T_TRUE, atol=1e-3)
    np.testing.assert_allclose(r["ty"][ym], x[ym], atol=1e-3)
    # also with the missing points physically removed from one cloud (different N)
    r2 = _np(cpd.rigid_cpd(x[xm], None, y, None))
    np.testing.assert_allclose(r2["R"], R_TRUE, atol=1e-3)
    np.testing.assert_allclose(r2["t"], T_TRUE, atol=1e-3)


def test_rigid_without_scale_and_no_reflection():
    y = _cloud(5)
    x = _similarity(y, s=1.0)
    cfg = cpd.CPDConfig(with_scale=False)
    r = _np(cpd.rigid_cpd(x, None, y, None, cfg))
    assert r["s"] == 1.0
    np.testing.assert_allclose(r["R"], R_TRUE, atol=1e-3)
    np.testing.assert_allclose(r["ty"], x, atol=1e-3)
    # a mirrored cloud cannot be fitted by a reflection: R stays a proper rotation
    mirrored = (y * np.array([1.0, 1.0, -1.0])).astype(np.float32)
    r = _np(cpd.rigid_cpd(mirrored, None, y, None))
    np.testing.assert_allclose(np.linalg.det(r["R"]), 1.0, atol=1e-4)


# ----------------------------------------------------------------------------- affine, nonrigid


def test_affine_recovers_known_map():
    y = _cloud(6)
    b_true = R_TRUE @ np.array([[1.2, 0.1, 0.0], [0.0, 0.9, -0.15], [0.05, 0.0, 1.1]])
    x = (y @ b_true.T + T_TRUE).astype(np.float32)
    r = _np(cpd.affine_cpd(x, None, y, None))
    assert r["converged"]
    np.testing.assert_allclose(r["B"], b_true, atol=1e-3)
    np.testing.assert_allclose(r["t"], T_TRUE, atol=1e-3)
    np.testing.assert_allclose(r["ty"], x, atol=1e-3)
    np.testing.assert_array_equal(r["R"], np.eye(3))  # no rigid stage
    np.testing.assert_array_equal(r["W"], 0.0)


def test_nonrigid_reduces_residual_of_smooth_warp():
    x = _cloud(7)
    y = _warp(x)
    cfg = cpd.CPDConfig(beta=0.5, lam=2.0)
    before = np.linalg.norm(y - x, axis=1).mean()
    r = _np(cpd.nonrigid_cpd(x, None, y, None, cfg))
    after = np.linalg.norm(r["ty"] - x, axis=1).mean()
    aff = _np(cpd.affine_cpd(x, None, y, None, cfg))
    after_affine = np.linalg.norm(aff["ty"] - x, axis=1).mean()
    assert after < 0.05 * before, (before, after)
    assert after < 0.2 * after_affine, (after_affine, after)
    np.testing.assert_array_equal(r["B"], np.eye(3))
    np.testing.assert_array_equal(r["t"], 0.0)
    # ty = y + G W
    g = np.exp(-((y[:, None] - y[None]) ** 2).sum(-1) / (2 * cfg.beta**2))
    np.testing.assert_allclose(r["ty"], y + g @ r["W"], atol=1e-4)


def test_nonrigid_padding_is_inert():
    x = _cloud(8)
    y = _warp(x)
    cfg = cpd.CPDConfig(beta=0.5, lam=2.0)
    ref = _np(cpd.nonrigid_cpd(x, None, y, None, cfg))
    xp, xm, xs = _pad(x, 48, seed=9, fill=np.nan)
    yp, ym, ys = _pad(y, 44, seed=10, fill=-7.0)
    r = _np(cpd.nonrigid_cpd(xp, xm, yp, ym, cfg))
    np.testing.assert_allclose(r["ty"][ys], ref["ty"], atol=1e-4)
    np.testing.assert_allclose(r["sigma2"], ref["sigma2"], rtol=1e-3)
    assert np.all(r["W"][~ym] == 0.0) and np.all(r["ty"][~ym] == 0.0)


def test_rigid_then_nonrigid_chain():
    x = _cloud(11)
    y = _warp(x, amp=0.05)
    y = (((y - T_TRUE) @ R_TRUE) / S_TRUE).astype(np.float32)  # move it away rigidly too
    cfg = cpd.CPDConfig(beta=0.5, lam=2.0)
    rig = _np(cpd.rigid_cpd(x, None, y, None, cfg))
    both = _np(cpd.register(x, None, y, None, "rigid+nonrigid", cfg))
    for k in ("R", "s", "t", "B"):
        np.testing.assert_allclose(both[k], rig[k], atol=1e-6, err_msg=k)
    err_rigid = np.linalg.norm(rig["ty"] - x, axis=1).mean()
    err_both = np.linalg.norm(both["ty"] - x, axis=1).mean()
    assert err_both < 0.2 * err_rigid, (err_rigid, err_both)
    assert both["n_iter"] > rig["n_iter"]
    # ty = ỹ + G(ỹ) W with ỹ the rigidly moved cloud
    yt = y @ both["B"].T + both["t"]
    g = np.exp(-((yt[:, None] - yt[None]) ** 2).sum(-1) / (2 * cfg.beta**2))
    np.testing.assert_allclose(both["ty"], yt + g @ both["W"], atol=1e-4)


# ------------------------------------------------------------------------------- pycpd parity


def _pycpd_problem(seed: int):
    """Noisy, shuffled, rigidly moved copy with a few outliers (M != N)."""
    rng = np.random.default_rng(seed)
    y = _cloud(seed, 36)
    x = _similarity(_warp(y, 0.03), s=1.05)[rng.permutation(36)]
    x = x + 0.01 * rng.normal(size=x.shape)
    x = np.concatenate([x, rng.uniform(-0.6, 0.6, size=(4, 3))]).astype(np.float32)
    return x, y


@pytest.mark.parametrize(
    "method, cfg",
    [
        ("rigid", cpd.CPDConfig(w=0.1)),
        ("affine", cpd.CPDConfig(w=0.2)),
        ("nonrigid", cpd.CPDConfig(w=0.1, beta=2.0, lam=2.0)),
        ("nonrigid", cpd.CPDConfig(w=0.1, beta=0.25, lam=4e3)),
    ],
)
def test_matches_pycpd(method, cfg):
    """Same EM steps as pycpd (float64) for a fixed number of iterations."""
    x, y = _pycpd_problem(12)
    iters = 40
    kw = dict(X=x.astype(np.float64), Y=y.astype(np.float64), w=cfg.w, tolerance=0.0)
    kw["max_iterations"] = iters
    if method == "rigid":
        reg = pycpd.RigidRegistration(**kw)
    elif method == "affine":
        reg = pycpd.AffineRegistration(**kw)
    else:
        reg = pycpd.DeformableRegistration(alpha=cfg.lam, beta=cfg.beta, **kw)
    sigma2_0 = reg.sigma2
    ty_ref, params = reg.register()
    assert reg.iteration <= iters  # pycpd may stop early at an exact fixed point (diff == 0)
    ours = cpd.CPDConfig(w=cfg.w, beta=cfg.beta, lam=cfg.lam, max_iter=iters, tol=0.0)
    r = _np(cpd.register(x, None, y, None, method, ours))
    assert r["n_iter"] <= iters  # tol=0 still stops when the objective stops changing
    np.testing.assert_allclose(r["ty"], ty_ref, atol=1e-3)
    np.testing.assert_allclose(r["sigma2"], reg.sigma2, rtol=2e-2)
    # initial sigma² as in the paper / pycpd
    init = cpd._initial_sigma2(
        jnp.asarray(x), jnp.ones(len(x), bool), jnp.asarray(y), jnp.ones(len(y), bool)
    )
    np.testing.assert_allclose(float(init), sigma2_0, rtol=1e-5)
    if method == "rigid":  # pycpd stores the transpose: TY = s Y R + t
        s, rot, t = params
        np.testing.assert_allclose(r["R"], rot.T, atol=1e-4)
        np.testing.assert_allclose(r["s"], s, atol=1e-4)
        np.testing.assert_allclose(r["t"], np.ravel(t), atol=1e-4)
    elif method == "affine":
        b, t = params
        np.testing.assert_allclose(r["B"], b.T, atol=1e-3)
        np.testing.assert_allclose(r["t"], np.ravel(t), atol=1e-3)
    # pycpd's P is from the last E-step (before the last M-step); ours is at the final transform
    reg.expectation()
    np.testing.assert_allclose(r["P"], reg.P, atol=2e-3)


# --------------------------------------------------------------------------------- vmap / jit


@pytest.mark.parametrize(
    "method, cfg",
    [
        ("rigid", cpd.CPDConfig()),
        ("rigid+nonrigid", cpd.CPDConfig.fdnc()),  # runs both the rigid and non-rigid loops
    ],
)
def test_batched_equals_loop(method, cfg):
    # (Non-rigid settings where lam * sigma² collapses far below G's scale are float32-sensitive:
    # batched and single solves then drift apart by ~1e-4 units; the fDNC setting is not.)
    xs, xms, ys, yms = [], [], [], []
    for b, (nx, ny) in enumerate([(40, 40), (33, 38), (40, 30)]):
        y = _cloud(20 + b)
        noise = 0.01 * np.random.default_rng(b).normal(size=y.shape)
        x = (_similarity(_warp(y, 0.03)) + noise).astype(np.float32)
        xp, xm, _ = _pad(x[:nx], 44, seed=30 + b, fill=np.nan)
        yp, ym, _ = _pad(y[:ny], 42, seed=40 + b, fill=0.0)
        xs.append(xp)
        xms.append(xm)
        ys.append(yp)
        yms.append(ym)
    xs, xms, ys, yms = map(np.stack, (xs, xms, ys, yms))
    batch = _np(cpd.batched_register(xs, xms, ys, yms, method, cfg))
    assert batch["ty"].shape == (3, 42, 3) and batch["P"].shape == (3, 42, 44)
    for b in range(3):
        single = _np(cpd.register(xs[b], xms[b], ys[b], yms[b], method, cfg))
        for k, v in single.items():
            np.testing.assert_allclose(batch[k][b], v, atol=1e-5, err_msg=f"{k}[{b}]")
    if method != "rigid":
        return
    # a caller may also lift the single-pair entry point with jax.vmap (tracer-safe validation)
    lifted = jax.jit(jax.vmap(lambda a, am, c, cm: cpd.register(a, am, c, cm, method, cfg)))
    lifted = _np(lifted(xs, xms, ys, yms))
    np.testing.assert_allclose(lifted["ty"], batch["ty"], atol=1e-5)


def test_result_is_pytree_and_config_hashable():
    assert hash(cpd.CPDConfig()) == hash(cpd.CPDConfig(w=0.1, max_iter=np.int64(100)))
    assert cpd.CPDConfig.fdnc().lam == 4e3 and cpd.CPDConfig.fdnc(w=0.0).w == 0.0
    y = _cloud(0)
    r = cpd.rigid_cpd(_similarity(y), None, y, None)
    assert len(jax.tree_util.tree_leaves(r)) == 10


# ---------------------------------------------------------------------------------- matching


def test_cpd_match_recovers_permutation():
    rng = np.random.default_rng(50)
    template = _cloud(50, 44)
    perm = rng.permutation(44)
    test = _similarity(template)[perm] + 0.003 * rng.normal(size=(44, 3))
    test = test.astype(np.float32)
    tp, tm, ts = _pad(template, 48, seed=51, fill=np.nan)
    qp, qm, qs = _pad(test, 46, seed=52, fill=0.0)
    match = cpd.cpd_match(tp, tm, qp, qm, method="rigid")
    assert match.shape == (46,) and match.dtype == np.int64
    np.testing.assert_array_equal(match[~qm], -1)
    np.testing.assert_array_equal(match[qs], ts[perm])  # identity recovered through the padding
    valid = match[match >= 0]
    assert len(np.unique(valid)) == len(valid) == 44  # one-to-one
    # batched input gives one row per pair, and more test than template points leaves some -1
    extra = np.concatenate([test, rng.uniform(-1, 1, size=(2, 3))]).astype(np.float32)
    extra_mask = np.ones(46, bool)
    batch = cpd.cpd_match(
        np.stack([tp, tp]),
        np.stack([tm, tm]),
        np.stack([qp, extra]),
        np.stack([qm, extra_mask]),
        method="rigid",
    )
    assert batch.shape == (2, 46)
    np.testing.assert_array_equal(batch[0], match)
    np.testing.assert_array_equal(batch[1][:44], ts[perm])
    assert np.sum(batch[1] >= 0) == 44
    # a posterior threshold drops matches
    assert np.all(cpd.cpd_match(tp, tm, qp, qm, method="rigid", min_prob=1.0) == -1)


# ------------------------------------------------------------------------------- bad inputs

_Y = _cloud(60, 10)
_M = np.ones(10, bool)


def _nan_x():
    x = _Y.copy()
    x[2, 1] = np.nan
    return x


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=_Y[:, 0]), r"x must have shape \[K, 3\]"),
        (dict(y=_Y[:, :2]), r"y must have shape \[K, 3\]"),
        (dict(x=_Y[None]), r"x must have shape"),
        (dict(x_mask=_M[:9]), r"x_mask must have shape \(10,\)"),
        (dict(y_mask=np.ones(10, np.float32)), r"y_mask must be boolean"),
        (dict(x=_nan_x()), r"x has NaN or inf"),
        (dict(y=np.full((10, 3), np.inf, np.float32)), r"y has NaN or inf"),
        (dict(y_mask=np.arange(10) < 2), r"y_mask: each cloud needs at least 3 valid points"),
        (dict(method="similarity"), r"method must be one of"),
        (dict(cfg="rigid"), r"cfg must be a CPDConfig"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(x=_Y, x_mask=_M, y=_Y, y_mask=_M, method="rigid", cfg=cpd.CPDConfig())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cpd.register(**args)


def test_nan_in_padding_is_allowed_and_masked_nan_ignored():
    x = _nan_x()
    mask = np.ones(10, bool)
    mask[2] = False
    r = cpd.rigid_cpd(x, mask, _Y, None)
    assert np.all(np.isfinite(np.asarray(r.ty)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(w=1.0), r"CPDConfig.w \(outlier weight\) must be in \[0, 1\)"),
        (dict(w=-0.1), r"CPDConfig.w"),
        (dict(beta=0.0), r"CPDConfig.beta"),
        (dict(lam=-1.0), r"CPDConfig.lam"),
        (dict(max_iter=0), r"CPDConfig.max_iter"),
        (dict(max_iter=2.5), r"CPDConfig.max_iter"),
        (dict(tol=-1e-3), r"CPDConfig.tol"),
        (dict(beta=float("nan")), r"CPDConfig.beta must be finite"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cpd.CPDConfig(**kwargs)


def test_bad_batch_and_match_args_raise():
    xb = np.stack([_Y, _Y])
    mb = np.stack([_M, _M])
    with pytest.raises(ValueError, match="same batch size"):
        cpd.batched_register(xb, mb, xb[:1], mb[:1])
    with pytest.raises(ValueError, match=r"x must have shape \[B, K, 3\]"):
        cpd.batched_register(_Y, _M, _Y, _M)
    with pytest.raises(ValueError, match="min_prob"):
        cpd.cpd_match(_Y, _M, _Y, _M, min_prob=2.0)
    with pytest.raises(ValueError, match="x_mask"):
        cpd.cpd_match(_Y, _M[:5], _Y, _M)
