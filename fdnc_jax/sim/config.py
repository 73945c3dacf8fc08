"""The simulator's knobs: one frozen, hashable dataclass (a static argument under jit).

Units: lengths are given in µm or in pixels of 0.42 µm (as in the original fDNC) and converted to
model units (200 px = 84 µm per unit) inside the transforms; angles in radians; probabilities in
[0, 1).

Calibration (``benchmarks/calibrate_simulator.py``; 90 WormND NeuroPAL worms, 4 labs, every pair of
animals sharing ≥ 15 confidently named neurons; see ``benchmarks/CALIBRATION.md``). Per-pair
residual of the shared neurons after the best similarity fit (rotation + translation + scale; a
reflection only for mirrored pairs), µm, median [IQR] over pairs:
                                           RMS                  median distance
  real, within lab (1151 pairs)        5.99 [5.02-7.79]        3.80 [3.25-4.98]
  real, across labs (2797 pairs)       6.90 [5.92-8.05]        4.70 [4.05-5.43]
  real, all across-animal (3948)       6.67 [5.57-8.01]        4.49 [3.75-5.40]
  simulated, these defaults (1024)     5.93 [4.63-7.64]        4.67 [3.71-5.86]
  (after an affine fit: real 6.07 [5.03-7.25] / 3.98; simulated 5.05 [3.94-6.55] / 3.76)
Warp sweep at these bends (similarity RMS / median distance): 3.5 µm → 4.92 / 3.87, 4.5 → 5.83 /
4.66, 5.5 → 6.74 / 5.42; no warp: 3.02 / 2.07. The default matches the real median distance (robust
to the naming errors that fatten the real RMS tail). Bend: the real worms' centerline curvature at
the median is |κ0| 6.3/mm median (90th pct 11.4/mm), so κ0 ~ U(±10/mm); the cubic term of real worms
is dominated by anatomy, not posture, so the curvature change is kept small (moving worms: ~1/mm per
100 µm). Mirroring: 37 of 38 SF worms and 5 of 21 SK1 worms are mirror images of the EY/NP worms (a
reflection cuts their similarity RMS by ~40%); the simulator never mirrors. (``Worm.mirrored`` is the
original's "other side", a 180° rotation, and does not undo a reflection: negate one axis instead.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """All simulator settings (frozen and hashable: pass it as a static jit argument).

    Every field has a one-line comment below. ``validate()`` runs on construction and raises
    ValueError naming the offending field.

    Lengths are in µm (``*_um``) or 0.42 µm pixels (``*_px``), curvatures in 1/mm, angles in
    radians; the simulator converts them to model units.

    Example:
      >>> cfg = SimConfig(warp_amplitude_um=2.0)
      >>> cfg = SimConfig.from_dict({"p_drop": (0.1, 0.2), "max_outliers": 10})
      >>> cfg.max_outliers, cfg.p_drop
      (10, (0.1, 0.2))
    """

    # Straighten each source first (PCA of the points → AP on x, then subtract a polynomial
    # y(x), z(x)).
    straighten_sources: bool = True
    # Degree of the polynomial centerline y(x), z(x) removed by ``straighten``.
    straighten_degree: int = 3
    # Max |curvature| (1/mm) of the random bend at the worm's median; κ0 ~ U(−v, v).
    bend_curvature_per_mm: float = 10.0
    # Max |change of curvature| (1/mm) over 100 µm of body; κ(s) = κ0 + κ1·s/100 µm, κ1 ~ U(−v, v).
    bend_curvature_change_per_mm: float = 2.0
    # Samples of the centerline used to integrate the bent curve (accuracy only).
    bend_grid_size: int = 64
    # RMS per-axis displacement (µm) of the random smooth warp (sum of Gaussian bumps), per copy.
    warp_amplitude_um: float = 4.5
    # Width σ (µm) of each Gaussian bump (21 µm = 0.25 model units, the original CPD β).
    warp_length_um: float = 21.0
    # Number of Gaussian bumps, centred uniformly in the valid points' bounding box.
    warp_num_bumps: int = 16
    # Max |angle| (rad) of the rotation about the AP (x) axis; θ ~ U(−v, v).
    rotate_yz_max: float = 0.45 * math.pi
    # Max |off-diagonal| of the yz shear applied with that rotation; each ~ U(−v, v).
    shear_yz: float = 0.1
    # Max |angle| (rad) of the in-plane rotation about z; π means any heading, θ ~ U(−v, v).
    rotate_xy_max: float = math.pi
    # Max |off-diagonal| of the xy shear; each ~ U(−v, v).
    shear_xy: float = 0.1
    # Per-axis scale 1 + U(−v, v).
    scale: float = 0.05
    # Range (lo, hi) of the drop probability p ~ U(lo, hi); each neuron kept with probability 1 − p.
    p_drop: tuple[float, float] = (0.05, 0.25)
    # Never keep fewer than this many neurons after dropping.
    min_points: int = 3
    # Slots reserved for outliers; k ~ randint(max(1, min(max_outliers, ⌊n·p⌋))) are added.
    max_outliers: int = 20
    # Candidate outlier positions drawn per worm (the first k accepted are kept; no while loop).
    # About 83% are accepted on WormND worms, so 40 fall short of 19 accepted with probability
    # < 1e-5.
    outlier_candidates: int = 40
    # Candidates closer than this (px, in xy) to a neuron are rejected.
    outlier_min_dist_px: float = 5.0
    # Outlier box: the neurons' bounding box grown by these margins (px) in x, y, z (≈ the original
    # x ∈ [−50, 250], y, z ∈ [−60, 60] px box around a straightened head ~60 px thick).
    outlier_margin_px: tuple[float, float, float] = (50.0, 30.0, 30.0)
    # Std (µm) of independent Gaussian position noise per neuron and axis (0 = off, as the
    # original).
    jitter_um: float = 0.0
    # Per-channel multiplicative color jitter per copy: channel c scaled by 1 + U(−v, v).
    color_jitter: float = 0.1
    # Per-neuron, per-channel multiplicative color noise: 1 + U(−v, v) (0 = off).
    color_neuron_jitter: float = 0.0
    # Randomly permute the slots of each copy (the model must not see identities in the order).
    shuffle: bool = True
    # Fraction of pairs whose test is a copy of a *different* real animal of the bank (template
    # and test both simulated on top); targets from the annotated names (needs a bank built with
    # ``with_identity=True``). 0 = the original's pairs: two copies of one animal.
    real_pair_fraction: float = 0.0

    def __post_init__(self):
        for field in ("p_drop", "outlier_margin_px"):  # lists (from configs) become tuples
            value = getattr(self, field)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"SimConfig.{field}={value!r}: must be a tuple of numbers") from e
            object.__setattr__(self, field, value)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first invalid field.

        Raises:
          ValueError: a field of the wrong type or out of its range.

        Example:
          >>> SimConfig().validate()  # the defaults are valid
          >>> SimConfig(p_drop=(0.3, 0.1))
          Traceback (most recent call last):
          ...
          ValueError: SimConfig.p_drop=(0.3, 0.1): lo > hi
        """

        def bad(field: str, why: str):
            raise ValueError(f"SimConfig.{field}={getattr(self, field)!r}: {why}")

        for f in ("straighten_sources", "shuffle"):
            if not isinstance(getattr(self, f), bool):
                bad(f, "must be a bool")
        ints = {
            "straighten_degree": 0,
            "bend_grid_size": 3,
            "warp_num_bumps": 1,
            "min_points": 1,
            "max_outliers": 0,
            "outlier_candidates": 0,
        }
        for f, lo in ints.items():
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(f, "must be an int")
            if v < lo:
                bad(f, f"must be ≥ {lo}")
        if not 0.0 <= float(self.real_pair_fraction) <= 1.0:
            bad("real_pair_fraction", "must be in [0, 1]")
        nonneg = (
            "bend_curvature_per_mm",
            "bend_curvature_change_per_mm",
            "warp_amplitude_um",
            "rotate_yz_max",
            "shear_yz",
            "rotate_xy_max",
            "shear_xy",
            "scale",
            "outlier_min_dist_px",
            "jitter_um",
            "color_jitter",
            "color_neuron_jitter",
        )
        for f in nonneg + ("warp_length_um",):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                bad(f, "must be a finite number")
            if v < 0:
                bad(f, "must be ≥ 0")
        if self.warp_length_um <= 0:
            bad("warp_length_um", "must be > 0")
        for f in ("scale", "color_jitter", "color_neuron_jitter"):
            if getattr(self, f) >= 1:
                bad(f, "must be < 1 (a factor 1 ± v must stay positive)")
        if len(self.p_drop) != 2:
            bad("p_drop", "must be a pair (lo, hi)")
        lo, hi = self.p_drop
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad("p_drop", "must be finite")
        if lo < 0:
            bad("p_drop", "probabilities must be ≥ 0")
        if hi >= 1:
            bad("p_drop", "the upper drop probability must be < 1")
        if lo > hi:
            bad("p_drop", "lo > hi")
        if len(self.outlier_margin_px) != 3 or any(
            not math.isfinite(v) or v < 0 for v in self.outlier_margin_px
        ):
            bad("outlier_margin_px", "must be three finite margins ≥ 0 (x, y, z)")
        if self.max_outliers > 0 and self.outlier_candidates < self.max_outliers:
            bad("outlier_candidates", f"must be ≥ max_outliers ({self.max_outliers})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any) -> SimConfig:
        """Builds a config from a mapping or an ``ml_collections.ConfigDict``.

        Args:
          d: field name → value; missing fields keep their defaults; lists become tuples.

        Returns:
          The validated SimConfig.

        Raises:
          ValueError: for an unknown key or an invalid value.

        Example:
          >>> SimConfig.from_dict({"p_drop": [0.1, 0.2]}).p_drop  # lists become tuples
          (0.1, 0.2)
        """
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        if not isinstance(d, Mapping):
            raise TypeError(f"SimConfig.from_dict needs a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown SimConfig keys {unknown}; valid keys: {sorted(names)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for ml_collections configs and logs).

        Example:
          >>> d = SimConfig().to_dict()
          >>> d["warp_amplitude_um"], SimConfig.from_dict(d) == SimConfig()
          (4.5, True)
        """
        return dataclasses.asdict(self)
