"""Calibrates the simulator's deformation against real across-animal variability.

Real: for every pair of WormND NeuroPAL animals (90 worms, 4 labs), the neurons named in both (names
marked uncertain and names repeated within a worm are left out) are aligned with the best similarity
transform (rotation + translation + isotropic scale, Umeyama), once with proper rotations only and
once allowing a reflection (a mirrored animal would need one), and with the best affine map. The
per-pair residual is the RMS (and the median) of the 3-D distances after the fit, in µm.

Simulated: pairs from ``make_pair_batch`` with every WormND worm as a source; the same fits between
the template and test copies of the surviving shared source neurons, converted back to µm
(× 200 px × 0.42 µm/px).

The real worms' centerline curvature (``straighten``'s polynomial) gives the bend range; the warp
amplitude is then swept and the default chosen so that the simulated median per-pair similarity RMS
matches the real across-animal one.

Run:
  FDNC_SHARED=/work/shared python benchmarks/calibrate_simulator.py [--pairs 1024] [--no-sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import os
import sys
import warnings

import jax
import numpy as np

from fdnc_jax.io import load_worm
from fdnc_jax.sim import transforms as T
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.sim.pairs import make_pair_batch, make_source_bank
from fdnc_jax.worm import Worm, to_model_units

UM_PER_UNIT = T.UM_PER_UNIT
MIN_SHARED = 15


# ---------------------------------------------------------------------------------------- fits


def similarity_fit(a: np.ndarray, b: np.ndarray, allow_reflection: bool = False) -> np.ndarray:
    """Umeyama: the s·R·a + t closest to b in least squares; returns the fitted a ([n, 3])."""
    ma, mb = a.mean(0), b.mean(0)
    da, db = a - ma, b - mb
    cov = db.T @ da / len(a)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(3)
    if not allow_reflection and np.linalg.det(u @ vt) < 0:
        d[-1] = -1
    r = u @ np.diag(d) @ vt
    s = (sig * d).sum() / da.var(0).sum()
    return s * da @ r.T + mb


def affine_fit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least-squares affine map of a onto b; returns the fitted a ([n, 3])."""
    ah = np.concatenate([a, np.ones((len(a), 1))], 1)
    m, *_ = np.linalg.lstsq(ah, b, rcond=None)
    return ah @ m


MIRROR_GAIN = 0.8  # a pair is "mirrored" when a reflection lowers the similarity RMS by > 20%


def residuals(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-pair statistics (µm) of a → b after each fit.

    ``sim`` is the similarity fit with a proper rotation, or with a reflection when the pair is
    mirrored (the reflection lowers the RMS by more than 20%); ``proper``/``refl`` keep both.
    """
    out = {}
    for name, fit in (
        ("proper", similarity_fit(a, b)),
        ("refl", similarity_fit(a, b, allow_reflection=True)),
        ("affine", affine_fit(a, b)),
    ):
        dist = np.linalg.norm(fit - b, axis=1)
        out[f"{name}_rms"] = float(np.sqrt(np.mean(dist**2)))
        out[f"{name}_med"] = float(np.median(dist))
    out["mirrored"] = out["refl_rms"] < MIRROR_GAIN * out["proper_rms"]
    pick = "refl" if out["mirrored"] else "proper"
    out["sim_rms"], out["sim_med"] = out[f"{pick}_rms"], out[f"{pick}_med"]
    return out


# ------------------------------------------------------------------------------------ real data


def load_worms(root: str) -> list[Worm]:
    files = sorted(glob.glob(os.path.join(root, "data", "wormnd", "*.npz")))
    if not files:
        sys.exit(f"no worms under {root}/data/wormnd (set FDNC_SHARED)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [load_worm(f) for f in files]


def named_positions(w: Worm) -> dict[str, np.ndarray]:
    """Name → position (µm) for confidently and uniquely named neurons."""
    uncertain = np.asarray(w.meta.get("uncertain", np.zeros(w.n, bool)), bool)
    names, counts = np.unique(w.names[(w.names != "")], return_counts=True)
    dup = set(names[counts > 1])
    xyz = w.xyz_um.astype(np.float64)
    if w.mirrored:
        xyz = xyz * np.array([-1.0, 1.0, -1.0])
    return {
        nm: xyz[i]
        for i, nm in enumerate(w.names)
        if nm and nm not in dup and not (len(uncertain) == w.n and uncertain[i])
    }


def real_pairs(worms: list[Worm]) -> list[dict]:
    named = [named_positions(w) for w in worms]
    labs = [w.meta.get("lab", "?") for w in worms]
    rows = []
    for i, j in itertools.combinations(range(len(worms)), 2):
        shared = sorted(set(named[i]) & set(named[j]))
        if len(shared) < MIN_SHARED:
            continue
        a = np.stack([named[i][n] for n in shared])
        b = np.stack([named[j][n] for n in shared])
        r = residuals(a, b)
        r.update(lab_a=labs[i], lab_b=labs[j], n=len(shared), i=i, j=j)
        rows.append(r)
    return rows


def real_curvature(worms: list[Worm], degree: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Curvature (1/mm) at the median and its change over 100 µm, from the straightening fit."""
    k0, k1 = [], []
    for w in worms:
        xyz = to_model_units(w)[0].astype(np.float64)
        d = xyz - xyz.mean(0)
        cov = d[:, :2].T @ d[:, :2]
        phi = 0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])
        c, s = np.cos(phi), np.sin(phi)
        x = c * d[:, 0] + s * d[:, 1]
        y = -s * d[:, 0] + c * d[:, 1]
        x = x - np.median(x)
        a = np.polynomial.polynomial.polyfit(x, y, degree)  # a0 + a1 x + a2 x² + a3 x³
        kappa0 = 2 * a[2] / (1 + a[1] ** 2) ** 1.5  # 1/unit
        kappa1 = 6 * a[3] if degree >= 3 else 0.0  # 1/unit², dκ/ds at 0
        k0.append(kappa0 * 1000 / UM_PER_UNIT)
        k1.append(kappa1 * (100 / UM_PER_UNIT) * 1000 / UM_PER_UNIT)
    return np.abs(np.array(k0)), np.abs(np.array(k1))


# ------------------------------------------------------------------------------------ simulated


def simulated_pairs(bank, cfg: SimConfig, num_pairs: int, seed: int = 0) -> list[dict]:
    rows = []
    batch = 256
    for step in range(-(-num_pairs // batch)):
        pb = jax.device_get(make_pair_batch(jax.random.key(seed * 1000 + step), bank, batch, cfg))
        for b in range(batch):
            tgt = pb.target[b]
            ok = tgt >= 0
            if ok.sum() < MIN_SHARED:
                continue
            a = pb.template_xyz[b][tgt[ok]] * UM_PER_UNIT
            bb = pb.test_xyz[b][ok] * UM_PER_UNIT
            r = residuals(a.astype(np.float64), bb.astype(np.float64))
            r["n"] = int(ok.sum())
            rows.append(r)
    return rows[:num_pairs]


# ---------------------------------------------------------------------------------------- table


def _q(values) -> str:
    v = np.asarray(values)
    q1, q2, q3 = np.percentile(v, [25, 50, 75])
    return f"{q2:5.2f} [{q1:5.2f}-{q3:5.2f}]"


HEADER = (
    f"{'pairs':<30} {'n':>5} {'shared':>6} {'mirr':>5}  {'similarity RMS':>20} "
    f"{'similarity median':>20} {'affine RMS':>20} {'affine median':>20}"
)


def row(name: str, rows: list[dict]) -> str:
    if not rows:
        return f"{name:<30} {0:>5}"
    return (
        f"{name:<30} {len(rows):>5} {int(np.median([r['n'] for r in rows])):>6} "
        f"{sum(r['mirrored'] for r in rows):>5}  "
        f"{_q([r['sim_rms'] for r in rows]):>20} {_q([r['sim_med'] for r in rows]):>20} "
        f"{_q([r['affine_rms'] for r in rows]):>20} {_q([r['affine_med'] for r in rows]):>20}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=1024, help="simulated pairs per setting")
    ap.add_argument("--no-sweep", action="store_true", help="only the default SimConfig")
    ap.add_argument("--warp-grid", type=float, nargs="+", default=[0, 2, 4, 5, 6, 7, 8],
                    help="warp amplitudes (µm) to sweep")
    ap.add_argument("--bend", type=float, nargs=2, default=None, metavar=("K0", "K1"),
                    help="override bend_curvature_per_mm and bend_curvature_change_per_mm")
    args = ap.parse_args(argv)
    root = os.environ.get("FDNC_SHARED")
    if not root:
        sys.exit("set FDNC_SHARED to the shared folder (holding data/wormnd)")
    worms = load_worms(root)
    labs = sorted({w.meta.get("lab", "?") for w in worms})

    print(f"{len(worms)} WormND worms, labs {labs}; ≥ {MIN_SHARED} shared names per pair; "
          "per-pair residual (µm), median [IQR] over pairs")
    real = real_pairs(worms)
    within = [r for r in real if r["lab_a"] == r["lab_b"]]
    across = [r for r in real if r["lab_a"] != r["lab_b"]]
    print(HEADER)
    print("-" * len(HEADER))
    for lab in labs:
        print(row(f"real within {lab}", [r for r in within if r["lab_a"] == lab]))
    print(row("real within lab (all)", within))
    print(row("real across labs", across))
    print(row("real all across-animal", real))

    print(row("real, not mirrored", [r for r in real if not r["mirrored"]]))
    print(row("real all, proper rotation only",
              [dict(r, sim_rms=r["proper_rms"], sim_med=r["proper_med"]) for r in real]))
    print(f"\nmirror check (mirr): a reflection lowers the similarity RMS by > 20% in "
          f"{sum(r['mirrored'] for r in real)}/{len(real)} pairs")
    for la, lb in itertools.combinations_with_replacement(labs, 2):
        sel = [r for r in real if {r["lab_a"], r["lab_b"]} == {la, lb}]
        if sel:
            gain = np.median([r["refl_rms"] / r["proper_rms"] for r in sel])
            print(f"  {la:>3}-{lb:<3} pairs {len(sel):4d}  median RMS ratio reflect/proper "
                  f"{gain:.3f}  mirrored {sum(r['mirrored'] for r in sel)}")
    # Per worm: mirrored relative to the EY + NP worms (mutually consistent) in most of its pairs?
    ref = {i for i, w in enumerate(worms) if w.meta.get("lab") in ("EY", "NP")}
    flipped = []
    for i, w in enumerate(worms):
        sel = [
            r for r in real if (r["i"] == i and r["j"] in ref) or (r["j"] == i and r["i"] in ref)
        ]
        if sel and np.mean([r["mirrored"] for r in sel]) > 0.5:
            flipped.append(str(w.meta.get("worm", i)))
    by_lab = {lab: sum(f.startswith(lab + "_") for f in flipped) for lab in labs}
    by_lab = {k: f"{v}/{sum(w.meta.get('lab') == k for w in worms)}" for k, v in by_lab.items()}
    print(f"  worms mirrored relative to the EY/NP worms: {len(flipped)} {by_lab}; not SF: "
          + " ".join(f for f in flipped if not f.startswith("SF_")))

    k0, k1 = real_curvature(worms)
    print(f"\nreal centerline curvature |κ0| (1/mm): median {np.median(k0):.2f}, "
          f"90th pct {np.percentile(k0, 90):.2f}; |dκ/ds| per 100 µm (1/mm): median "
          f"{np.median(k1):.2f}, 90th pct {np.percentile(k1, 90):.2f}")
    print(f"  → a uniform U(±v) has median |κ| = v/2: v ≈ {2 * np.median(k0):.1f} and "
          f"{2 * np.median(k1):.1f}")

    bank = make_source_bank(worms)
    base = SimConfig()
    if args.bend is not None:
        base = dataclasses.replace(
            base, bend_curvature_per_mm=args.bend[0], bend_curvature_change_per_mm=args.bend[1]
        )
    print(f"\nsimulated ({args.pairs} pairs per setting; sources = the same {len(worms)} worms; "
          "similarity = proper rotation)")
    print(HEADER)
    print("-" * len(HEADER))
    print(row(f"sim default (warp {base.warp_amplitude_um:g} µm)",
              simulated_pairs(bank, base, args.pairs)))
    if not args.no_sweep:
        for warp in args.warp_grid:
            cfg = dataclasses.replace(base, warp_amplitude_um=warp)
            print(row(f"sim warp {warp:g} µm", simulated_pairs(bank, cfg, args.pairs, seed=1)))
        for name, cfg in (
            ("sim no bend", dataclasses.replace(
                base, bend_curvature_per_mm=0.0, bend_curvature_change_per_mm=0.0)),
            ("sim bend ×2", dataclasses.replace(
                base, bend_curvature_per_mm=2 * base.bend_curvature_per_mm,
                bend_curvature_change_per_mm=2 * base.bend_curvature_change_per_mm)),
            ("sim no shear/scale", dataclasses.replace(base, shear_xy=0.0, shear_yz=0.0,
                                                      scale=0.0)),
            ("sim unstraightened sources", dataclasses.replace(base, straighten_sources=False)),
        ):
            print(row(name, simulated_pairs(bank, cfg, args.pairs, seed=2)))


if __name__ == "__main__":
    main()
