"""The Worm: one validated neuron cloud in µm, and its conversion to model units.

Letters: N neurons, C color channels.

Units at the boundary of the package are micrometres. This module is the only place that converts to the
model's units, exactly as the original fDNC did: pixels of 0.42 µm, minus the per-worm median, divided by
200 px, with x and z negated for a worm imaged lying on its other side (``mirrored``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

UM_PER_PX = 0.42  # µm per pixel of the original fDNC data.
MODEL_SCALE_PX = 200.0  # px per model unit.
MIN_NEURONS = 3
MIN_EXTENT_UM = 5.0
MAX_EXTENT_UM = 1000.0
_MIRROR = np.array([-1.0, 1.0, -1.0], np.float32)


def _as_xyz(value: Any, name: str) -> np.ndarray:
    """Checks a [N, 3] finite float array; returns float32."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - anything unconvertible is a user error here.
        raise TypeError(
            f"{name} must be an array of shape [N, 3], got {type(value).__name__}"
        ) from e
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3] (x, y, z per neuron), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
        raise ValueError(
            f"{name} contains non-finite values (NaN or inf) in rows {bad[:10].tolist()}"
        )
    return arr.astype(np.float32)


def _as_names(value: Any, n: int) -> np.ndarray:
    if value is None:
        return np.full((n,), "", dtype=str)
    if isinstance(value, str):
        raise TypeError("names must be a sequence of strings, one per neuron, not a single str")
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"names must be 1-D with one entry per neuron, got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(f"names has {len(arr)} entries but xyz_um has {n} neurons")
    if arr.size and not (arr.dtype.kind in "US" or arr.dtype == object):
        raise TypeError(f"names must be strings, got dtype {arr.dtype}")
    out = np.array(["" if v is None else str(v).strip() for v in arr.tolist()], dtype=str)
    if out.size == 0:
        out = np.zeros((0,), dtype="<U1")
    return out


def _as_color(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"color must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"color must have shape [N, C], got {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"color has {arr.shape[0]} rows but xyz_um has {n} neurons")
    if arr.shape[1] < 1:
        raise ValueError("color must have at least one channel")
    if not np.all(np.isfinite(arr)):
        raise ValueError("color contains non-finite values (NaN or inf)")
    return arr.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Worm:
    """One volume's segmented neurons.

    Attributes:
      xyz_um: [N, 3] float32, neuron centres in µm (x ≈ anterior–posterior in the image plane,
        y in-plane, z optical axis; the head may point anywhere in xy).
      names: [N] str, neuron identities; '' = unlabelled.
      color: optional [N, C] float32 NeuroPAL intensities (C ≥ 3 for the color term; R, G, B first).
      mirrored: the worm lies on its other side; x and z are negated when going to model units.
      meta: free-form metadata (source file, lab, licence, ...).

    Example:
      >>> w = Worm(xyz_um=np.random.default_rng(0).uniform(0, 100, (50, 3)))
      >>> w.n
      50
    """

    xyz_um: np.ndarray
    names: np.ndarray = None  # type: ignore[assignment]
    color: np.ndarray | None = None
    mirrored: bool = False
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        xyz = _as_xyz(self.xyz_um, "xyz_um")
        n = xyz.shape[0]
        if n < MIN_NEURONS:
            raise ValueError(
                f"xyz_um has {n} neurons; at least {MIN_NEURONS} are needed (a cloud of fewer points "
                "has no shape to match, and the median centring is degenerate)"
            )
        extent = float(np.max(np.ptp(xyz, axis=0)))
        if extent > MAX_EXTENT_UM:
            raise ValueError(
                f"xyz_um spans {extent:.0f} along its longest axis, implausible for a C. elegans head "
                f"in µm (> {MAX_EXTENT_UM:.0f} µm): are these pixels? Use Worm.from_pixels(xyz_px, "
                "um_per_px)"
            )
        if extent < MIN_EXTENT_UM:
            raise ValueError(
                f"xyz_um spans only {extent:.3g} along its longest axis (< {MIN_EXTENT_UM:.0f} µm), "
                "implausible for a C. elegans head in µm: are these normalised units or mm? "
                "Pass micrometres, or pixels through Worm.from_pixels(xyz_px, um_per_px)"
            )
        if not isinstance(self.mirrored, bool | np.bool_):
            raise TypeError(f"mirrored must be a bool, got {type(self.mirrored).__name__}")
        if not isinstance(self.meta, Mapping):
            raise TypeError(f"meta must be a mapping, got {type(self.meta).__name__}")
        names = _as_names(self.names, n)
        color = _as_color(self.color, n)
        _, counts = np.unique(xyz, axis=0, return_counts=True)
        if np.any(counts > 1):
            warnings.warn(
                f"xyz_um has {int(np.sum(counts[counts > 1] - 1))} duplicated identical points",
                stacklevel=3,
            )
        for arr in (xyz, names, color):
            if arr is not None:
                arr.setflags(write=False)
        object.__setattr__(self, "xyz_um", xyz)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "color", color)
        object.__setattr__(self, "mirrored", bool(self.mirrored))
        object.__setattr__(self, "meta", dict(self.meta))

    @classmethod
    def from_pixels(cls, xyz_px: Any, um_per_px: float | Sequence[float], **kwargs: Any) -> Worm:
        """Builds a Worm from voxel coordinates.

        Args:
          xyz_px: [N, 3] positions in pixels/voxels.
          um_per_px: µm per pixel, a scalar or one value per axis (x, y, z).
          **kwargs: names, color, mirrored, meta as for ``Worm``.

        Returns:
          The Worm with ``xyz_um`` [N, 3] = ``xyz_px * um_per_px`` (µm).

        Example:
          >>> w = Worm.from_pixels([[0, 0, 0], [100, 0, 0], [0, 50, 10]], um_per_px=0.5)
          >>> w.xyz_um[1].tolist()
          [50.0, 0.0, 0.0]
        """
        scale = np.asarray(um_per_px, np.float64)
        if scale.shape not in ((), (3,)):
            raise ValueError(f"um_per_px must be a scalar or 3 values, got shape {scale.shape}")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError(f"um_per_px must be positive and finite, got {scale.tolist()}")
        xyz = _as_xyz(xyz_px, "xyz_px").astype(np.float64)
        return cls(xyz_um=(xyz * scale).astype(np.float32), **kwargs)

    @property
    def n(self) -> int:
        """Number of neurons, N.

        Example:
          >>> Worm(xyz_um=np.random.default_rng(0).uniform(0, 100, (50, 3))).n
          50
        """
        return int(self.xyz_um.shape[0])

    @property
    def has_color(self) -> bool:
        """Whether the worm carries per-neuron color ([N, C] ``color`` is not None).

        Example:
          >>> Worm(xyz_um=[[0, 0, 0], [10, 0, 0], [0, 10, 0]]).has_color
          False
        """
        return self.color is not None

    @property
    def labelled(self) -> np.ndarray:
        """[N] bool, neurons with a name.

        Example:
          >>> w = Worm(xyz_um=[[0, 0, 0], [10, 0, 0], [0, 10, 0]], names=["AVAL", "", "AVAR"])
          >>> w.labelled.tolist()
          [True, False, True]
        """
        return self.names != ""

    @property
    def uniquely_named(self) -> np.ndarray:
        """[N] bool, neurons whose name labels no other neuron of this worm (a name given to two
        neurons is ambiguous: neither can be a correspondence).

        Example:
          >>> w = Worm(xyz_um=[[0, 0, 0], [10, 0, 0], [0, 10, 0]], names=["AVAL", "AVAL", "AVAR"])
          >>> w.uniquely_named.tolist()
          [False, False, True]
        """
        named, counts = np.unique(self.names[self.labelled], return_counts=True)
        return self.labelled & ~np.isin(self.names, named[counts > 1])

    def check_template(self) -> None:
        """Raises ValueError when non-empty names repeat (a template must name each neuron once).

        Raises:
          ValueError: a non-empty name labels more than one neuron.

        Example:
          >>> w = Worm(xyz_um=[[0, 0, 0], [10, 0, 0], [0, 10, 0]], names=["AVAL", "AVAL", ""])
          >>> w.check_template()
          Traceback (most recent call last):
          ...
          ValueError: template names are duplicated: ['AVAL']; each name may label one neuron only
        """
        named = self.names[self.labelled]
        uniq, counts = np.unique(named, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(
                f"template names are duplicated: {uniq[counts > 1][:10].tolist()}; each name may "
                "label one neuron only"
            )

    def color_for_matching(self, name: str = "worm") -> np.ndarray:
        """The color as non-negative intensities for the color term, validated.

        Real NeuroPAL intensities are often background-subtracted, so a few slightly negative values
        are clipped to 0 (as the original's normalisation did) with a warning. Colors that cannot be
        intensities (mostly negative: z-scored or log data) or carry no signal at all raise.

        Args:
          name: how to call this worm in messages ('template', 'test').

        Returns:
          [N, C] float32 ≥ 0.

        Raises:
          ValueError: no color, fewer than 3 channels, mostly negative values or no signal at all.

        Example:
          >>> w = Worm(xyz_um=[[0, 0, 0], [10, 0, 0], [0, 10, 0]], color=np.eye(3) + 0.5)
          >>> w.color_for_matching().shape
          (3, 3)
        """
        if self.color is None:
            raise ValueError(f"{name} has no color; pass use_color=False or give it color")
        c = self.color
        if c.shape[1] < 3:
            raise ValueError(
                f"{name} color has {c.shape[1]} channels; the color term needs ≥ 3 (R,G,B)"
            )
        neg = c < 0
        if neg.mean() > 0.25:
            raise ValueError(
                f"{name} color has negative values in {neg.mean():.0%} of entries: expected raw "
                "intensities ≥ 0, not z-scored or log values"
            )
        zero_rows = np.all(c[:, :3] <= 0, axis=1)
        if zero_rows.all():
            raise ValueError(f"{name} color rows are all zero or negative: no color signal")
        if neg.any() or zero_rows.any():
            warnings.warn(
                f"{name} color: {int(neg.any(axis=1).sum())} rows with negative values clipped to 0, "
                f"{int(zero_rows.sum())} rows without signal in R,G,B (treated as uninformative)",
                stacklevel=2,
            )
        return np.maximum(c, 0.0).astype(np.float32)

    def replace(self, **changes: Any) -> Worm:
        """A copy with fields replaced (validated again).

        Args:
          **changes: new values of ``xyz_um`` ([N, 3] µm), ``names`` ([N]), ``color`` ([N, C]),
            ``mirrored`` or ``meta``.

        Returns:
          The new Worm (the original is unchanged).

        Example:
          >>> w = Worm(xyz_um=[[0, 0, 0], [10, 0, 0], [0, 10, 0]])
          >>> w.replace(mirrored=True).mirrored
          True
        """
        return dataclasses.replace(self, **changes)

    def subset(self, index: Any) -> Worm:
        """The worm restricted to neurons ``index`` (bool mask or integer indices).

        Args:
          index: [N] bool mask or [K] integer indices of the neurons to keep (at least 3).

        Returns:
          A Worm with the selected neurons' positions (µm), names, color and per-neuron metadata.

        Example:
          >>> w = Worm(xyz_um=np.random.default_rng(0).uniform(0, 100, (50, 3)))
          >>> w.subset(np.arange(10)).n
          10
        """
        idx = np.asarray(index)
        meta = dict(self.meta)
        if "uncertain" in meta:  # Per-neuron flags follow the neurons.
            meta["uncertain"] = np.asarray(meta["uncertain"], bool)[idx].tolist()
        return Worm(
            xyz_um=self.xyz_um[idx],
            names=self.names[idx],
            color=None if self.color is None else self.color[idx],
            mirrored=self.mirrored,
            meta=meta,
        )

    def __repr__(self) -> str:
        c = "none" if self.color is None else f"{self.color.shape[1]} channels"
        return (
            f"Worm(n={self.n}, labelled={int(self.labelled.sum())}, color={c}, "
            f"mirrored={self.mirrored})"
        )


def as_worm_list(worms: Any) -> list[Worm]:
    """``worms`` as a list, every element checked to be a Worm.

    Raises:
      TypeError: naming the first element that is not a Worm (``worms[i] is a ...``).

    Example:
      >>> w = Worm(xyz_um=[[0, 0, 0], [10, 0, 0], [0, 10, 0]])
      >>> len(as_worm_list((w, w)))
      2
    """
    worms = list(worms)
    for i, w in enumerate(worms):
        if not isinstance(w, Worm):
            raise TypeError(f"worms[{i}] is a {type(w).__name__}, expected a Worm")
    return worms


def to_model_units(worm: Worm) -> tuple[np.ndarray, np.ndarray]:
    """Converts a worm to model units: (µm / 0.42 − median) / 200, mirrored if needed.

    Args:
      worm: the Worm.

    Returns:
      xyz: [N, 3] float32 in model units (a ~100 µm head spans ~1.2 units).
      center_px: [3] float32, the per-axis median in px (before mirroring), for ``from_model_units``.

    Example:
      >>> xyz, center_px = to_model_units(Worm(xyz_um=[[0, 0, 0], [84, 0, 0], [0, 42, 0]]))
      >>> xyz.round(2).tolist()
      [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]
    """
    px = worm.xyz_um.astype(np.float64) / UM_PER_PX
    center = np.median(px, axis=0)
    xyz = (px - center) / MODEL_SCALE_PX
    if worm.mirrored:
        xyz = xyz * _MIRROR
    return xyz.astype(np.float32), center.astype(np.float32)


def to_model_units_padded(worms: Sequence[Worm], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``to_model_units`` of many worms at once, padded: the same numbers, vectorised (one sort of
    the batch instead of a median per worm, in place: ~60 → ~9 µs per 150-neuron volume on a 2-core
    CPU).

    Args:
      worms: B Worms of at most ``size`` neurons each.
      size: the padded length.

    Returns:
      xyz: [B, size, 3] float32 model units (zero rows past each worm's neurons).
      mask: [B, size] bool, True for real neurons.

    Example:
      >>> a = Worm(xyz_um=[[0, 0, 0], [84, 0, 0], [0, 42, 0]])
      >>> b = Worm(xyz_um=[[0, 0, 0], [84, 0, 0], [0, 42, 0], [84, 42, 0]])
      >>> xyz, mask = to_model_units_padded([a, b], 5)
      >>> bool((xyz[0, :3] == to_model_units(a)[0]).all()), mask.sum(1).tolist()
      (True, [3, 4])
    """
    n = np.array([w.n for w in worms], np.int64)  # [B]
    if len(n) and n.max() > size:
        raise ValueError(f"a worm of {n.max()} neurons does not fit size={size}")
    px = np.full((len(n), size, 3), np.inf)  # [B, size, 3]; +inf sorts after every neuron
    for j, w in enumerate(worms):
        px[j, : w.n] = w.xyz_um
    px /= UM_PER_PX
    ordered = np.sort(px, axis=1)
    lo = np.take_along_axis(ordered, np.maximum(n - 1, 0)[:, None, None] // 2, axis=1)  # [B, 1, 3]
    hi = np.take_along_axis(ordered, n[:, None, None] // 2, axis=1)
    del ordered
    mask = np.arange(size)[None, :] < n[:, None]  # [B, size]
    # In place, in to_model_units' order of operations (the same float64 numbers): the batch's
    # arrays are MBs, and each fresh temporary costs its page faults.
    px -= (lo + hi) / 2
    px /= MODEL_SCALE_PX
    mirrored = np.array([w.mirrored for w in worms], bool)
    px *= np.where(mirrored[:, None], _MIRROR, 1.0)[:, None, :]  # [B, 1, 3] of ±1
    px[~mask] = 0.0
    return px.astype(np.float32), mask


def from_model_units(xyz: Any, center_px: Any, mirrored: bool = False) -> np.ndarray:
    """Inverse of ``to_model_units``.

    Args:
      xyz: [N, 3] model units.
      center_px: [3] the median (px) returned by ``to_model_units``.
      mirrored: whether the worm was mirrored.

    Returns:
      [N, 3] float32 µm.

    Example:
      >>> w = Worm(xyz_um=[[0, 0, 0], [84, 0, 0], [0, 42, 0]])
      >>> from_model_units(*to_model_units(w)).round(3).tolist()
      [[0.0, 0.0, 0.0], [84.0, 0.0, 0.0], [0.0, 42.0, 0.0]]
    """
    xyz = np.asarray(xyz, np.float64)
    if mirrored:
        xyz = xyz * _MIRROR
    return ((xyz * MODEL_SCALE_PX + np.asarray(center_px, np.float64)) * UM_PER_PX).astype(
        np.float32
    )
