"""A statistical atlas of named neurons, built from many labelled animals, usable as a template.

Any single labelled worm is a poor template: it lacks some neurons, has its own pose and its own
annotation errors. The atlas is the generalized-Procrustes mean shape of many animals: each worm is
aligned (rotation, translation, optionally isotropic scale; reflection allowed because some
microscopes image a mirror image) to the current mean on the names it shares with it, the mean is
recomputed per name, and both steps repeat until the mean stops moving. After a few plain passes the
alignment and the mean become robust: each observation gets a Tukey biweight from its distance to
the name's mean (scaled by a robust per-name spread), so a few mislabelled neurons barely move the
atlas.

Letters: W animals, K names, C color channels. All positions are µm.

Example:
  >>> import fdnc_jax as fd
  >>> atlas = fd.load_atlas()  # the bundled head atlas, a Worm with one neuron per name
  >>> pred = fd.predict(fd.load_pretrained(), atlas, fd.load_demo_pair()[1])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fdnc_jax.io import WormFileError, atomic_write, load_worm, write_npz
from fdnc_jax.matching import normalize_color
from fdnc_jax.metrics import uncertain_mask
from fdnc_jax.worm import Worm, as_worm_list

BUNDLED_ATLAS = "atlas_head.npz"
ATLAS_FORMAT = 1
_CHI3_MEDIAN = 1.5382  # Median of the distance |x| for x ~ N(0, I_3): σ ≈ median distance / this.


@dataclasses.dataclass(frozen=True)
class AtlasConfig:
    """How an atlas is built.

    Attributes:
      min_animals: drop names annotated in fewer animals than this (count).
      min_fraction: ... or in fewer than this fraction of the animals (0–1); the larger bar wins.
      scale: fit an isotropic scale per animal (animals differ in size); the atlas keeps the size
        of the median animal.
      allow_reflection: let an animal be mirrored onto the mean (a microscope that images a mirror
        image); the atlas keeps the handedness of the majority of animals.
      robust: Tukey-biweight the observations after ``warmup`` plain iterations.
      tukey_c: biweight cut-off in robust standard deviations (observations farther get weight 0).
      warmup: plain (unweighted) iterations before the robust weights start.
      max_iter: iteration limit.
      tol_um: converged when no atlas position moves more than this (µm) in one iteration.
      min_shared: an animal must share at least this many names with the atlas (count).
      max_scale_ratio: an animal whose fitted scale is off the median by more than this factor is an
        error (pixels mixed with µm, or a different species of coordinate).
      skip_uncertain: leave out names the annotator marked uncertain ('?').

    Example:
      >>> AtlasConfig(min_fraction=0.25).min_animals
      3
    """

    min_animals: int = 3
    min_fraction: float = 0.1
    scale: bool = True
    allow_reflection: bool = True
    robust: bool = True
    tukey_c: float = 4.685
    warmup: int = 5
    max_iter: int = 1000
    tol_um: float = 1e-4
    min_shared: int = 10
    max_scale_ratio: float = 1.6
    skip_uncertain: bool = True

    def __post_init__(self):
        if self.min_animals < 1:
            raise ValueError(f"min_animals must be ≥ 1, got {self.min_animals}")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in [0, 1], got {self.min_fraction}")
        if self.tukey_c <= 0 or self.tol_um <= 0 or self.max_scale_ratio <= 1.0:
            raise ValueError("tukey_c and tol_um must be > 0 and max_scale_ratio > 1")
        if self.min_shared < 4:
            raise ValueError(
                f"min_shared must be ≥ 4 (a 3-D similarity fit), got {self.min_shared}"
            )


# ----------------------------------------------------------------------------------------------
# Procrustes.


@dataclasses.dataclass(frozen=True)
class SimilarityTransform:
    """``y = scale · x @ rotation.T + translation``.

    Attributes:
      rotation: [3, 3] orthogonal (det −1 when the fit mirrored the points).
      scale: isotropic factor.
      translation: [3] µm.

    Example:
      >>> t = SimilarityTransform(rotation=np.eye(3), scale=2.0, translation=np.ones(3))
      >>> t.apply([[1.0, 0.0, 0.0]]).tolist()
      [[3.0, 1.0, 1.0]]
    """

    rotation: np.ndarray
    scale: float
    translation: np.ndarray

    @property
    def reflected(self) -> bool:
        """Whether the transform mirrors (det rotation < 0).

        Example:
          >>> SimilarityTransform(np.diag([1.0, 1.0, -1.0]), 1.0, np.zeros(3)).reflected
          True
        """
        return bool(np.linalg.det(self.rotation) < 0)

    def apply(self, xyz: Any) -> np.ndarray:
        """[N, 3] → [N, 3] transformed points.

        Example:
          >>> SimilarityTransform(np.eye(3), 1.0, np.zeros(3)).apply(np.ones((2, 3))).shape
          (2, 3)
        """
        return self.scale * np.asarray(xyz, np.float64) @ self.rotation.T + self.translation


def _fit_batch(
    source: np.ndarray, target: np.ndarray, weights: np.ndarray, scale: bool, reflection: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted similarity fits of many point sets at once (Umeyama 1991).

    Args:
      source: [W, K, 3] points to move (any value where the weight is 0).
      target: [W, K, 3] or [K, 3] points to reach.
      weights: [W, K] ≥ 0.
      scale, reflection: allow an isotropic scale / an improper rotation.

    Returns:
      rotation [W, 3, 3], scale [W], translation [W, 3] minimising Σ w |s R x + t − y|².
    """
    w = weights[..., None]  # [W, K, 1]
    x = np.where(w > 0, source, 0.0)
    y = np.where(w > 0, np.broadcast_to(target, source.shape), 0.0)
    total = np.maximum(w.sum(axis=1), 1e-300)  # [W, 1]
    mx = (w * x).sum(axis=1) / total  # [W, 3]
    my = (w * y).sum(axis=1) / total
    xc = np.where(w > 0, x - mx[:, None], 0.0)
    yc = np.where(w > 0, y - my[:, None], 0.0)
    cross = np.einsum("wk,wki,wkj->wij", weights, yc, xc)  # [W, 3, 3] Σ w y xᵀ
    u, s, vt = np.linalg.svd(cross)
    d = np.ones((source.shape[0], 3))
    if not reflection:
        d[:, 2] = np.sign(np.linalg.det(u @ vt))
        d[d == 0] = 1.0
    rotation = np.einsum("wij,wj,wjk->wik", u, d, vt)
    var_x = np.einsum("wk,wki,wki->w", weights, xc, xc)
    if scale:
        factor = np.einsum("wi,wi->w", s, d) / np.maximum(var_x, 1e-300)
    else:
        factor = np.ones((source.shape[0],))
    translation = my - factor[:, None] * np.einsum("wij,wj->wi", rotation, mx)
    return rotation, factor, translation


def procrustes(
    source: Any,
    target: Any,
    weights: Any | None = None,
    *,
    scale: bool = True,
    allow_reflection: bool = False,
) -> SimilarityTransform:
    """The similarity transform that best maps ``source`` onto ``target`` (weighted least squares).

    Args:
      source: [N, 3] points (µm), N ≥ 3 with non-zero weight.
      target: [N, 3] corresponding points (µm).
      weights: optional [N] non-negative weights (default 1).
      scale: fit an isotropic scale (else scale = 1).
      allow_reflection: allow a mirror image (det R = −1) when it fits better.

    Returns:
      The SimilarityTransform; ``transform.apply(source) ≈ target``.

    Example:
      >>> x = np.random.default_rng(0).normal(size=(20, 3))
      >>> t = procrustes(x, 2.0 * x + 1.0)
      >>> round(t.scale, 6)
      2.0
    """
    src = np.asarray(source, np.float64)
    dst = np.asarray(target, np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or dst.shape != src.shape:
        raise ValueError(f"source and target must both be [N, 3], got {src.shape} and {dst.shape}")
    w = np.ones(src.shape[0]) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (src.shape[0],) or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be [{src.shape[0]}] finite and ≥ 0, got shape {w.shape}")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise ValueError("source and target must be finite (no NaN or inf)")
    if np.count_nonzero(w) < 3:
        raise ValueError(f"need ≥ 3 points with non-zero weight, got {np.count_nonzero(w)}")
    r, s, t = _fit_batch(src[None], dst[None], w[None], scale, allow_reflection)
    return SimilarityTransform(rotation=r[0], scale=float(s[0]), translation=t[0])


# ----------------------------------------------------------------------------------------------
# The atlas.


@dataclasses.dataclass(frozen=True, eq=False)
class Atlas:
    """Per-name statistics of many aligned animals.

    Attributes:
      names: [K] str, sorted.
      xyz_um: [K, 3] mean position (µm; x = longest axis of the mean shape, centred).
      cov_um2: [K, 3, 3] positional covariance after alignment (µm², biweight-weighted).
      n_animals: [K] int, animals that annotate each name.
      color: [K, 3] mean normalised NeuroPAL color (R, G, B summing to 1), or None.
      meta: build record (config, command, animals used with their content hashes, fits).

    Example:
      >>> atlas = Atlas.load(bundled_atlas_path())
      >>> atlas.cov_um2.shape == (atlas.n, 3, 3)
      True
    """

    names: np.ndarray
    xyz_um: np.ndarray
    cov_um2: np.ndarray
    n_animals: np.ndarray
    color: np.ndarray | None
    meta: Mapping[str, Any]

    @property
    def n(self) -> int:
        """Number of names K.

        Example:
          >>> Atlas.load(bundled_atlas_path()).n
          194
        """
        return int(self.names.shape[0])

    def to_worm(self) -> Worm:
        """The atlas as a template ``Worm`` (one neuron per name at its mean position).

        Example:
          >>> Atlas.load(bundled_atlas_path()).to_worm().labelled.all()
          np.True_
        """
        return Worm(
            xyz_um=self.xyz_um.astype(np.float32),
            names=self.names,
            color=None if self.color is None else self.color.astype(np.float32),
            meta={"atlas": True, "worm": self.meta.get("id", "atlas")},
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the atlas to ``.npz`` atomically; the bytes depend only on the atlas.

        The file is also a worm file: ``load_worm(path)`` reads it as the template Worm.

        Example:
          >>> atlas.save("my_atlas.npz")  # doctest: +SKIP
        """
        p = Path(path)
        if p.suffix.lower() != ".npz":
            raise ValueError(f"path must end in .npz, got {os.fspath(path)!r}")
        arrays = {
            "xyz_um": self.xyz_um.astype(np.float32),
            "names": self.names.astype(str),
            "cov_um2": self.cov_um2.astype(np.float32),
            "n_animals": self.n_animals.astype(np.int32),
            "mirrored": np.asarray(False),
            "meta": np.asarray(json.dumps(dict(self.meta), sort_keys=True)),
        }
        if self.color is not None:
            arrays["rgb"] = self.color.astype(np.float32)
        atomic_write(p, lambda f: write_npz(f, arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Atlas:
        """Reads an atlas written by ``Atlas.save`` (raises WormFileError naming the file).

        Example:
          >>> Atlas.load(bundled_atlas_path()).n
          194
        """
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as d:
                arrays = {k: d[k] for k in d.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise WormFileError(f"{os.fspath(p)}: not a readable atlas file ({e})") from e
        missing = {"xyz_um", "names", "cov_um2", "n_animals", "meta"} - set(arrays)
        if missing:
            raise WormFileError(f"{os.fspath(p)}: not an atlas file, missing {sorted(missing)}")
        return cls(
            names=arrays["names"].astype(str),
            xyz_um=arrays["xyz_um"].astype(np.float64),
            cov_um2=arrays["cov_um2"].astype(np.float64),
            n_animals=arrays["n_animals"].astype(np.int64),
            color=arrays["rgb"].astype(np.float64) if "rgb" in arrays else None,
            meta=_load_meta(p, arrays["meta"]),
        )


def _load_meta(path: Path, raw: np.ndarray) -> dict[str, Any]:
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as e:
        raise WormFileError(f"{os.fspath(path)}: the atlas 'meta' is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise WormFileError(f"{os.fspath(path)}: the atlas 'meta' is not a JSON object")
    return meta


def bundled_atlas_path() -> Path:
    """Path of the atlas shipped in ``fdnc_jax/data`` (built from CC-BY-4.0 NeuroPAL worms).

    Example:
      >>> bundled_atlas_path().name
      'atlas_head.npz'
    """
    return Path(os.fspath(importlib.resources.files("fdnc_jax") / "data" / BUNDLED_ATLAS))


def load_atlas(path: str | os.PathLike | None = None) -> Worm:
    """The atlas as a template Worm, ready for ``predict``: one neuron per name at its mean position.

    Args:
      path: an atlas ``.npz`` (``fdnc-atlas build``); None = the bundled head atlas.

    Returns:
      A Worm with unique names, mean positions (µm) and mean normalised color [K, 3].

    Example:
      >>> atlas = load_atlas()
      >>> bool(atlas.labelled.all())
      True
    """
    p = bundled_atlas_path() if path is None else Path(path)
    worm = load_worm(p)
    return worm.replace(meta={**worm.meta, "worm": worm.meta.get("id", p.stem)})


# ----------------------------------------------------------------------------------------------
# Building.


def worm_digest(worm: Worm) -> str:
    """sha256 (first 16 hex digits) of a worm's positions, names and color: its content identity.

    Example:
      >>> from fdnc_jax.datasets import load_bundled_worm
      >>> len(worm_digest(load_bundled_worm("NP_11_YAaLR")))
      16
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(worm.xyz_um, np.float32).tobytes())
    h.update("\x00".join(worm.names.tolist()).encode())
    if worm.color is not None:
        h.update(np.ascontiguousarray(worm.color, np.float32).tobytes())
    return h.hexdigest()[:16]


def _observations(
    worms: Sequence[Worm], ids: Sequence[str], cfg: AtlasConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-animal positions of the kept names.

    Returns:
      names [K]; positions [W, K, 3] (NaN where absent); present [W, K] bool; colors [W, K, 3]
      normalised (NaN where absent or colorless), or None when no worm has color.
    """
    per_worm: list[dict[str, int]] = []
    for w, wid in zip(worms, ids, strict=True):
        usable = w.uniquely_named  # A name on two neurons is ambiguous: dropped.
        if cfg.skip_uncertain:
            usable = usable & ~uncertain_mask(w)
        per_worm.append({w.names[i]: int(i) for i in np.flatnonzero(usable)})
        if not per_worm[-1]:
            raise ValueError(
                f"worm {wid!r} has no usable neuron names: an atlas needs labelled worms"
            )
    seen: dict[str, int] = {}
    for d in per_worm:
        for n in d:
            seen[n] = seen.get(n, 0) + 1
    bar = max(cfg.min_animals, math.ceil(cfg.min_fraction * len(worms)))
    names = np.array(sorted(n for n, c in seen.items() if c >= bar), dtype=str)
    if names.size < cfg.min_shared:
        raise ValueError(
            f"only {names.size} names are annotated in ≥ {bar} of the {len(worms)} animals; lower "
            "min_animals/min_fraction or give more animals"
        )
    index = {n: k for k, n in enumerate(names)}
    pos = np.full((len(worms), names.size, 3), np.nan)
    color = None
    if any(w.has_color for w in worms):
        color = np.full((len(worms), names.size, 3), np.nan)
    for i, (w, d) in enumerate(zip(worms, per_worm, strict=True)):
        rows = [(index[n], j) for n, j in d.items() if n in index]
        if not rows:
            continue
        k, j = np.array(rows).T
        pos[i, k] = w.xyz_um[j]
        if color is not None and w.has_color and w.color.shape[1] >= 3:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Clipping is reported when the worm is used.
                    c = w.color_for_matching(f"worm {ids[i]!r}")
            except ValueError as e:  # Positions are still usable: the worm adds no color.
                warnings.warn(
                    f"atlas: color of {e}; its positions are used, its color is not", stacklevel=3
                )
                continue
            color[i, k] = normalize_color(c[j])
    return names, pos, np.isfinite(pos[..., 0]), color


def _biweights(residual: np.ndarray, present: np.ndarray, c: float) -> np.ndarray:
    """[W, K] Tukey biweights of the distances ``residual`` to the per-name mean.

    The spread σ of each name is its median distance / 1.538 (the median of a 3-D standard normal's
    norm), floored at the spread of all observations, so rare names are not over-trusted.
    """
    r = np.where(present, residual, np.nan)
    sigma_all = np.nanmedian(r) / _CHI3_MEDIAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # All-NaN names (never happens once kept).
        sigma = np.fmax(np.nanmedian(r, axis=0) / _CHI3_MEDIAN, sigma_all)  # [K]
    u = r / (c * np.maximum(sigma, 1e-9))
    w = np.where(u < 1.0, (1.0 - u**2) ** 2, 0.0)
    return np.where(present, w, 0.0)


def _usable_weights(weights: np.ndarray, present: np.ndarray) -> np.ndarray:
    """[W, K] ``weights``, except for names whose weights all vanished: equal weights over the
    animals where ``present`` (so their statistics fall back to plain ones)."""
    return np.where(np.sum(weights, axis=0) > 0, weights, present.astype(np.float64))


def _weighted_mean(values: np.ndarray, weights: np.ndarray, present: np.ndarray) -> np.ndarray:
    """[K, D] mean over animals of ``values`` [W, K, D] (``_usable_weights``)."""
    w = _usable_weights(weights, present)  # [W, K]
    v = np.where(w[..., None] > 0, values, 0.0)
    return np.sum(w[..., None] * v, axis=0) / np.maximum(np.sum(w, axis=0), 1e-300)[:, None]


def _principal_frame(mean: np.ndarray) -> np.ndarray:
    """[3, 3] proper rotation whose rows are the principal axes of ``mean`` [K, 3] (longest first),
    each axis pointing towards the heavier tail (positive third moment), z completing a right hand."""
    centred = mean - mean.mean(axis=0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    axes = vecs[:, ::-1].T.copy()  # rows: longest → shortest
    for a in range(2):
        if np.sum((centred @ axes[a]) ** 3) < 0:
            axes[a] = -axes[a]
    axes[2] = np.cross(axes[0], axes[1])
    return axes


def _check_worms(worms: Sequence[Worm], ids: Sequence[str] | None) -> list[str]:
    if isinstance(worms, Worm) or not isinstance(worms, Sequence):
        raise TypeError(f"worms must be a sequence of Worms, got {type(worms).__name__}")
    as_worm_list(worms)
    if len(worms) < 3:
        raise ValueError(
            f"an atlas needs at least 3 labelled animals, got {len(worms)}: with fewer, a mean "
            "shape and its spread are not defined"
        )
    if ids is None:
        ids = [
            str(w.meta.get("worm") or Path(str(w.meta.get("file", f"worm{i}"))).stem)
            for i, w in enumerate(worms)
        ]
        if len(set(ids)) != len(ids):  # Derived ids collide (copies of one file): number them.
            ids = [f"{wid}#{i}" for i, wid in enumerate(ids)]
    ids = [str(i) for i in ids]
    if len(ids) != len(worms):
        raise ValueError(f"ids has {len(ids)} entries for {len(worms)} worms")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique (one per animal)")
    return ids


def build_atlas(
    worms: Sequence[Worm],
    config: AtlasConfig = AtlasConfig(),
    *,
    ids: Sequence[str] | None = None,
    command: str | None = None,
) -> Atlas:
    """Builds an atlas from labelled animals by robust generalized Procrustes analysis.

    Deterministic: the same worms in the same order give the same atlas, bit for bit.

    Args:
      worms: ≥ 3 labelled Worms (µm). Names seen in too few animals (``config``) are dropped.
      config: the AtlasConfig.
      ids: one id per worm for the record (default ``meta['worm']`` or the file stem).
      command: how the atlas was built, stored in ``meta['command']``.

    Returns:
      The Atlas (``atlas.to_worm()`` is a template for ``predict``).

    Raises:
      ValueError: fewer than 3 animals, a worm without names, a worm sharing fewer than
        ``config.min_shared`` names with the others, or a worm whose size is off by more than
        ``config.max_scale_ratio`` (pixels mixed with µm).

    Example:
      >>> from fdnc_jax.datasets import bundled_worm_paths
      >>> from fdnc_jax.io import load_worm
      >>> atlas = build_atlas([load_worm(p) for p in bundled_worm_paths()])
      >>> atlas.xyz_um.shape[1]
      3
    """
    ids = _check_worms(worms, ids)
    cfg = config
    names, pos, present, color = _observations(worms, ids, cfg)
    ref = int(np.argmax(present.sum(axis=1)))  # The most complete animal fixes the initial frame.
    mean = pos[ref] - np.nanmean(pos[ref], axis=0)  # [K, 3], NaN for names it lacks
    few = np.flatnonzero((present & present[ref][None, :]).sum(axis=1) < cfg.min_shared)
    if few.size:
        raise ValueError(
            f"worm {ids[few[0]]!r} shares only {int((present[few[0]] & present[ref]).sum())} names "
            f"with the most complete animal {ids[ref]!r}; at least {cfg.min_shared} are needed to "
            "align it"
        )
    weights = present.astype(np.float64)  # [W, K]
    for iteration in range(cfg.max_iter):
        aligned, factor, _ = _align(pos, mean, weights, cfg.scale, cfg.allow_reflection)
        if cfg.robust and iteration >= cfg.warmup:
            residual = np.linalg.norm(aligned - np.nan_to_num(mean)[None], axis=-1)  # [W, K]
            weights = _biweights(residual, present, cfg.tukey_c)
        new = _weighted_mean(aligned, weights, present)
        new -= new.mean(axis=0)
        if cfg.scale:
            new /= np.median(factor)  # The atlas keeps the size of the median animal.
        moved = float(np.max(np.linalg.norm(new - np.nan_to_num(mean), axis=-1)))
        mean = new
        if moved < cfg.tol_um and iteration > (cfg.warmup if cfg.robust else 0):
            break
    else:
        warnings.warn(
            f"atlas alignment did not converge in {cfg.max_iter} iterations", stacklevel=2
        )
    _, _, reflected = _align(pos, mean, weights, cfg.scale, cfg.allow_reflection)
    if reflected.sum() * 2 > len(worms):  # Keep the handedness of the majority of animals.
        mean = mean * np.array([1.0, 1.0, -1.0])
    mean = (mean - mean.mean(axis=0)) @ _principal_frame(mean).T
    aligned, factor, reflected = _align(pos, mean, weights, cfg.scale, cfg.allow_reflection)
    _, size, _ = _align(pos, mean, present.astype(np.float64), True, cfg.allow_reflection)
    _check_scales(size, ids, cfg.max_scale_ratio)
    return _summarise(
        names,
        mean,
        aligned,
        weights,
        present,
        color,
        record={
            "format": ATLAS_FORMAT,
            "config": dataclasses.asdict(cfg),
            "command": command,
            "iterations": iteration + 1,
            "animals": [
                {
                    "id": wid,
                    "digest": worm_digest(w),
                    "names_used": int(present[i].sum()),
                    "reflected": bool(reflected[i]),
                    "scale": round(float(size[i]), 4),
                    "rms_um": round(float(_rms(aligned[i], mean, present[i])), 3),
                }
                for i, (w, wid) in enumerate(zip(worms, ids, strict=True))
            ],
        },
    )


def _align(
    pos: np.ndarray, mean: np.ndarray, weights: np.ndarray, scale: bool, reflection: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aligns every animal to ``mean`` [K, 3] (NaN rows = names not in the mean yet).

    Returns:
      aligned [W, K, 3] (NaN where absent), scale [W], reflected [W] bool.
    """
    known = np.isfinite(mean[:, 0])  # [K]
    target = np.where(known[:, None], mean, 0.0)
    rot, factor, shift = _fit_batch(pos, target, weights * known[None], scale, reflection)
    aligned = factor[:, None, None] * np.einsum("wij,wkj->wki", rot, pos) + shift[:, None]
    return aligned, factor, np.linalg.det(rot) < 0


def _rms(aligned: np.ndarray, mean: np.ndarray, present: np.ndarray) -> float:
    """Root-mean-square distance (µm) of one animal's aligned neurons to their means."""
    d = aligned[present] - mean[present]
    return float(np.sqrt(np.mean(np.sum(d**2, axis=-1)))) if d.size else float("nan")


def _check_scales(size: np.ndarray, ids: Sequence[str], max_ratio: float) -> None:
    """Raises when an animal's fitted scale is far off the median: units mixed up."""
    ratio = size / np.median(size)
    bad = np.flatnonzero((ratio > max_ratio) | (ratio < 1.0 / max_ratio))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"worm {ids[i]!r} must be scaled by {ratio[i]:.2f}× to match the median animal "
            f"(allowed 1/{max_ratio:g}–{max_ratio:g}×): are its positions in pixels while the others "
            "are in µm? Convert with Worm.from_pixels(xyz_px, um_per_px)"
        )


def _summarise(
    names: np.ndarray,
    mean: np.ndarray,
    aligned: np.ndarray,
    weights: np.ndarray,
    present: np.ndarray,
    color: np.ndarray | None,
    record: dict[str, Any],
) -> Atlas:
    """The per-name statistics of the aligned animals."""
    w = _usable_weights(weights, present)  # [W, K]
    dev = np.where(present[..., None], aligned - mean[None], 0.0)  # [W, K, 3]
    cov = (
        np.einsum("wk,wki,wkj->kij", w, dev, dev) / np.maximum(w.sum(axis=0), 1e-300)[:, None, None]
    )
    mean_color = None
    if color is not None:
        has = np.isfinite(color[..., 0])  # [W, K]
        cw = _usable_weights(np.where(has, w, 0.0), has)
        mean_color = np.sum(cw[..., None] * np.nan_to_num(color), axis=0)
        total = mean_color.sum(axis=-1, keepdims=True)
        mean_color = np.where(total > 0, mean_color / np.maximum(total, 1e-300), 1.0 / 3.0)
    return Atlas(
        names=names,
        xyz_um=mean,
        cov_um2=cov,
        n_animals=present.sum(axis=0).astype(np.int64),
        color=mean_color,
        meta=record,
    )


# Neurons whose cell bodies lie in the anterior head (pharynx and anterior ganglion), used only to
# point the anterior–posterior axis of a labelled worm.
_ANTERIOR = re.compile(r"^(IL1|IL2|OLQ|CEP|URY|URA|I[1-6]|M[1-5]|MI|MC|NSM)")
_DORSAL_VENTRAL = re.compile(r"^(.+)D([LR]?)$")


def anatomical_handedness(worm: Worm) -> int:
    """Whether a labelled worm's coordinates show the animal or its mirror image.

    From the names alone: the anterior–posterior axis (principal axis, pointing to the anterior
    ganglion and pharynx neurons), the left vector (mean of XL − XR over left/right pairs) and the
    dorsal vector (mean of XD − XV over dorsal/ventral pairs such as RMED/RMEV, SMDDL/SMDVL). An
    animal has det[anterior, left, dorsal] > 0 (a right-handed body frame; so do the OpenWorm
    canonical positions). Microscopes whose z stack runs the other way record a mirror image: in
    the shared WormND data, the EY, NP and most SK1 animals are mirror images, the SF ones are not.

    Args:
      worm: a Worm with names (µm).

    Returns:
      +1 anatomical handedness, −1 mirror image, 0 undetermined (fewer than 3 left/right pairs,
      2 dorsal/ventral pairs or 3 anterior neurons, or axes too close to coplanar).

    Example:
      >>> from fdnc_jax.datasets import load_bundled_worm
      >>> w = load_bundled_worm("NP_11_YAaLR")
      >>> anatomical_handedness(w), anatomical_handedness(mirror_image(w))
      (-1, 1)
    """
    named = worm.uniquely_named
    pos = {
        n: worm.xyz_um[i].astype(np.float64)
        for i, n in zip(np.flatnonzero(named), worm.names[named], strict=True)
    }
    left = [pos[n] - pos[n[:-1] + "R"] for n in pos if n.endswith("L") and n[:-1] + "R" in pos]
    dorsal = []
    for n in pos:
        m = _DORSAL_VENTRAL.match(n)
        if m and f"{m.group(1)}V{m.group(2)}" in pos:
            dorsal.append(pos[n] - pos[f"{m.group(1)}V{m.group(2)}"])
    anterior = [x for n, x in pos.items() if _ANTERIOR.match(n)]
    if len(left) < 3 or len(dorsal) < 2 or len(anterior) < 3:
        return 0
    xyz = worm.xyz_um.astype(np.float64)
    centre = xyz.mean(axis=0)
    axis = np.linalg.svd(xyz - centre, full_matrices=False)[2][0]
    if (np.mean(anterior, axis=0) - centre) @ axis < 0:
        axis = -axis
    unit = lambda v: v / max(float(np.linalg.norm(v)), 1e-12)
    det = float(np.linalg.det(np.stack([axis, unit(np.mean(left, 0)), unit(np.mean(dorsal, 0))])))
    if abs(det) < 0.3:
        return 0
    return 1 if det > 0 else -1


def mirror_image(worm: Worm) -> Worm:
    """The worm reflected through its xy plane (z negated, µm): its mirror image.

    Example:
      >>> w = Worm(xyz_um=[[0, 0, 1], [10, 0, 2], [0, 10, 3]])
      >>> mirror_image(w).xyz_um[:, 2].tolist()
      [-1.0, -2.0, -3.0]
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Warnings were shown when the worm was loaded.
        return worm.replace(xyz_um=worm.xyz_um * np.array([1.0, 1.0, -1.0], np.float32))


def in_convention(worm: Worm, convention: int, handedness: int | None = None) -> Worm:
    """``worm`` in the handedness ``convention`` (+1 / −1; 0 = unknown: unchanged): its mirror image
    when its own handedness (``handedness``, else read by ``anatomical_handedness``) is the other.

    Example:
      >>> w = Worm(xyz_um=[[0, 0, 1], [10, 0, 2], [0, 10, 3]])
      >>> in_convention(w, -1, handedness=+1).xyz_um[:, 2].tolist()
      [-1.0, -2.0, -3.0]
      >>> in_convention(w, +1, handedness=+1) is w
      True
    """
    h = anatomical_handedness(worm) if handedness is None else handedness
    return mirror_image(worm) if h and convention and h != convention else worm


def alignable(worms: Sequence[Worm], config: AtlasConfig = AtlasConfig()) -> list[int]:
    """Indices of the worms named well enough to be aligned into an atlas: at least
    ``config.min_shared`` uniquely named neurons (``build_atlas`` refuses the others).

    Example:
      >>> w = Worm(xyz_um=[[0, 0, 1], [10, 0, 2], [0, 10, 3]])
      >>> alignable([w])
      []
    """
    return [i for i, w in enumerate(worms) if w.uniquely_named.sum() >= config.min_shared]


def unify_handedness(
    worms: Sequence[Worm], config: AtlasConfig = AtlasConfig()
) -> tuple[list[Worm], np.ndarray]:
    """Mirrors the animals whose neurons are the mirror image of the majority (z negated).

    Microscopes differ in which handedness they record (in WormND, the 38 SF and 5 SK1 animals are
    mirror images of the EY, NP and other SK1 ones; ``anatomical_handedness`` says SF is the animal's
    own). Real pairs across such animals cannot be matched by any rotation; training on them would
    teach the network to swap left and right. The handedness of each animal is read from a robust
    Procrustes fit to the atlas of all labelled ones (``build_atlas``, reflection allowed); animals
    without usable names are left as they are.

    Args:
      worms: Worms (µm); ≥ 3 of them labelled.
      config: how the atlas used for the decision is built.

    Returns:
      (worms with the minority mirrored, [W] bool which ones were mirrored).

    Raises:
      ValueError: the labelled worms cannot be aligned (naming the worm and what to change).

    Example:
      >>> from fdnc_jax.datasets import bundled_worm_paths
      >>> worms = [load_worm(p) for p in bundled_worm_paths()]
      >>> _, flipped = unify_handedness(worms)
      >>> int(flipped.sum())  # the two SF animals
      2
    """
    labelled = alignable(worms, config)
    try:
        atlas = build_atlas([worms[i] for i in labelled], config)
    except ValueError as e:
        raise ValueError(
            f"cannot unify the handedness of the sources (an atlas fit of the labelled ones, done "
            f"for sim.real_pair_fraction > 0; turn off with data.unify_handedness=False): {e}"
        ) from e
    flipped = np.zeros((len(worms),), bool)
    flipped[labelled] = [a["reflected"] for a in atlas.meta["animals"]]
    out = [mirror_image(w) if f else w for w, f in zip(worms, flipped, strict=True)]
    return out, flipped
