"""Simulator throughput: jitted ``make_pair_batch`` vs a per-worm numpy loop of the same transforms.

Counts semi-synthetic *worms*: a batch of B pairs is 2·B worms (template + test copy of one source).
The numpy version below follows the original fDNC's style (one worm at a time, a while loop drawing
outliers until enough are accepted) and does the same steps with the same SimConfig, without CPD.
Both produce padded arrays ([Q, 3], mask, labels, targets) so the work compared is the same.

Sources: every worm in ``$FDNC_SHARED/data/wormnd`` when present, else 64 random clouds
of 150 points.

Run:
  FDNC_SHARED=/work/shared python benchmarks/simulate_bench.py
The last line is ``simulate worms_per_s=<float> batch=256 speedup_vs_numpy=<float>``.
"""

from __future__ import annotations

import glob
import os
import statistics
import time
import warnings

import jax
import numpy as np

from fdnc_jax.io import load_worm
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.sim.pairs import make_pair_batch, make_source_bank
from fdnc_jax.worm import MODEL_SCALE_PX, UM_PER_PX, Worm

UM_PER_UNIT = UM_PER_PX * MODEL_SCALE_PX
BATCHES = (64, 256, 1024)
GPU_BATCHES = (64, 256, 1024, 4096, 16384)
NUMPY_MAX_BATCH = 1024  # The numpy loop's rate does not depend on the batch: larger ones reuse it.
REPEATS = 5


def load_sources(rng: np.random.Generator) -> tuple[list[Worm], str]:
    root = os.environ.get("FDNC_SHARED", "")
    files = sorted(glob.glob(os.path.join(root, "data", "wormnd", "*.npz"))) if root else []
    if files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [load_worm(f) for f in files], f"{len(files)} WormND worms"
    worms = []
    for _ in range(64):
        xyz = rng.normal(size=(150, 3)) * np.array([30.0, 8.0, 6.0]) + 60.0
        worms.append(Worm(xyz_um=xyz))
    return worms, "64 random clouds of 150 points"


# ------------------------------------------------------------------ numpy, one worm at a time


def _rot_x(t):
    c, s = np.cos(t), np.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(t):
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def np_straighten(xyz, cfg):
    d = xyz - xyz.mean(0)
    cov = d[:, :2].T @ d[:, :2]
    phi = 0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])
    out = d @ _rot_z(-phi).T
    coef = np.polyfit(out[:, 0], out[:, 1:], cfg.straighten_degree)
    fit = np.stack([np.polyval(coef[:, j], out[:, 0]) for j in range(2)], 1)
    out[:, 1:] -= fit
    return out


def np_synthesize(rng, xyz, cfg):
    """One copy: xyz [n, 3] valid points (straightened) → positions [k, 3], labels [k]."""
    n = len(xyz)
    labels = np.arange(n)
    # Smooth warp: Gaussian bumps at random neurons.
    centres = xyz[rng.integers(n, size=cfg.warp_num_bumps)]
    ell = cfg.warp_length_um / UM_PER_UNIT
    g = np.exp(-0.5 * ((xyz[:, None] - centres[None]) ** 2).sum(-1) / ell**2)
    field = g @ rng.normal(size=(cfg.warp_num_bumps, 3))
    field *= cfg.warp_amplitude_um / UM_PER_UNIT / np.sqrt((g * g).sum(1).mean())
    xyz = xyz + field
    # Rotation about x + yz shear.
    shear = np.eye(3)
    shear[1, 2], shear[2, 1] = rng.uniform(-cfg.shear_yz, cfg.shear_yz, 2)
    xyz = xyz @ (shear @ _rot_x(rng.uniform(-cfg.rotate_yz_max, cfg.rotate_yz_max))).T
    # Drop.
    p = rng.uniform(*cfg.p_drop)
    keep = rng.random(n) >= p
    if keep.sum() < cfg.min_points:
        keep[: cfg.min_points] = True
    xyz, labels = xyz[keep], labels[keep]
    # Outliers: the original's rejection loop.
    k = rng.integers(max(1, min(cfg.max_outliers, int(len(xyz) * p))))
    margin = np.array(cfg.outlier_margin_px) / MODEL_SCALE_PX
    lo, hi = xyz.min(0) - margin, xyz.max(0) + margin
    outliers, tries = [], 0
    while len(outliers) < k and tries < cfg.outlier_candidates:
        tries += 1
        cand = rng.uniform(lo, hi)
        if np.min(((xyz[:, :2] - cand[:2]) ** 2).sum(1)) >= (cfg.outlier_min_dist_px / 200) ** 2:
            outliers.append(cand)
    if outliers:
        xyz = np.concatenate([xyz, np.array(outliers)])
        labels = np.concatenate([labels, np.full(len(outliers), -2)])
    # Bend along κ(s) = κ0 + κ1 s.
    k0 = rng.uniform(-1, 1) * cfg.bend_curvature_per_mm * UM_PER_UNIT / 1000
    k1 = rng.uniform(-1, 1) * cfg.bend_curvature_change_per_mm * UM_PER_UNIT / 1000
    k1 = k1 / (100 / UM_PER_UNIT)
    half = np.abs(xyz[:, 0]).max() + 1e-3
    s = np.linspace(-half, half, cfg.bend_grid_size | 1)
    th = k0 * s + 0.5 * k1 * s**2
    tan = np.stack([np.cos(th), np.sin(th)], 1)
    curve = np.concatenate([[[0, 0]], np.cumsum(0.5 * (tan[1:] + tan[:-1]) * (s[1] - s[0]), 0)])
    curve -= curve[len(s) // 2]
    x, y = xyz[:, 0], xyz[:, 1]
    tp = k0 * x + 0.5 * k1 * x**2
    cx, cy = np.interp(x, s, curve[:, 0]), np.interp(x, s, curve[:, 1])
    xyz = np.stack([cx - y * np.sin(tp), cy + y * np.cos(tp), xyz[:, 2]], 1)
    # Scale, xy shear, xy rotation, jitter.
    xyz = xyz * (1 + rng.uniform(-cfg.scale, cfg.scale, 3))
    m = np.eye(3)
    m[0, 1], m[1, 0] = rng.uniform(-cfg.shear_xy, cfg.shear_xy, 2)
    xyz = xyz @ m.T
    xyz = xyz @ _rot_z(rng.uniform(-cfg.rotate_xy_max, cfg.rotate_xy_max)).T
    if cfg.jitter_um:
        xyz = xyz + rng.normal(size=xyz.shape) * cfg.jitter_um / UM_PER_UNIT
    xyz = xyz - np.median(xyz, 0)
    perm = rng.permutation(len(xyz))
    return xyz[perm], labels[perm]


def np_make_pair_batch(rng, sources, batch_size, cfg, q):
    out_t = np.zeros((batch_size, q, 3), np.float32)
    out_s = np.zeros((batch_size, q, 3), np.float32)
    mask_t = np.zeros((batch_size, q), bool)
    mask_s = np.zeros((batch_size, q), bool)
    target = np.full((batch_size, q), -3, np.int32)
    for b in range(batch_size):
        src = sources[rng.integers(len(sources))]
        straight = np_straighten(src, cfg) if cfg.straighten_sources else src
        t_xyz, t_lab = np_synthesize(rng, straight, cfg)
        s_xyz, s_lab = np_synthesize(rng, straight, cfg)
        where = {int(lab): j for j, lab in enumerate(t_lab) if lab >= 0}
        out_t[b, : len(t_xyz)], mask_t[b, : len(t_xyz)] = t_xyz, True
        out_s[b, : len(s_xyz)], mask_s[b, : len(s_xyz)] = s_xyz, True
        target[b, : len(s_xyz)] = [where.get(int(lab), -1) if lab >= 0 else lab for lab in s_lab]
    return out_t, mask_t, out_s, mask_s, target


# ----------------------------------------------------------------------------------------- main


def _median_time(fn, repeats=REPEATS):
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    rng = np.random.default_rng(0)
    worms, what = load_sources(rng)
    cfg = SimConfig()
    bank = make_source_bank(worms)
    q = bank.num_points + cfg.max_outliers
    np_sources = [np.asarray(x)[np.asarray(m)] for x, m in zip(bank.xyz, bank.mask, strict=True)]
    print(f"sources: {what}; P={bank.num_points}, Q={q}; {jax.devices()[0].platform} "
          f"({os.cpu_count()} cores); median of {REPEATS} repeats, compile/warm-up excluded")
    print("worms = 2 x pairs (template + test copy)")
    header = (
        f"{'batch (pairs)':>13} {'worms':>6} {'jax worms/s':>12} {'numpy worms/s':>14} "
        f"{'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    result = {}
    t_np_per_worm = None
    for b in GPU_BATCHES if jax.default_backend() == "gpu" else BATCHES:
        key = jax.random.key(0)
        jax.block_until_ready(make_pair_batch(key, bank, b, cfg))  # compile + warm-up
        t_jax = _median_time(
            lambda i, b=b: jax.block_until_ready(
                make_pair_batch(jax.random.key(i + 1), bank, b, cfg)
            )
        )
        if b <= NUMPY_MAX_BATCH:
            np_reps = REPEATS if b <= 256 else 3
            np_make_pair_batch(rng, np_sources, 8, cfg, q)  # warm-up
            t_np = _median_time(
                lambda i, b=b: np_make_pair_batch(rng, np_sources, b, cfg, q), np_reps
            )
            t_np_per_worm = t_np / (2 * b)
        wj, wn = 2 * b / t_jax, 1.0 / t_np_per_worm
        result[b] = (wj, wn)
        note = "" if b <= NUMPY_MAX_BATCH else f"  (numpy rate of batch {NUMPY_MAX_BATCH})"
        print(f"{b:>13} {2 * b:>6} {wj:>12.0f} {wn:>14.0f} {wj / wn:>7.1f}x{note}")
    wj, wn = result[256]
    print(f"simulate worms_per_s={wj:.1f} batch=256 speedup_vs_numpy={wj / wn:.2f}")


if __name__ == "__main__":
    main()
