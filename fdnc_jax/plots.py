"""Figures (matplotlib, headless-safe).

Figures are built with ``matplotlib.figure.Figure`` directly, so no backend is selected or required
at import; ``fig.savefig`` renders with Agg.

Letters: P source slots, Q slots of a synthetic copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

OUTLIER_LABEL = -2


def plot_simulated_copies(
    source_xyz: Any,
    copies: Sequence[Sequence[Any]],
    path: str | os.PathLike | None = None,
    *,
    source_mask: Any | None = None,
    titles: Sequence[str] | None = None,
) -> Figure:
    """A source worm and semi-synthetic copies of it, in xy and xz projections.

    Each neuron keeps one color across panels (by source slot), so matched identities can be
    followed; outliers (label −2) are black crosses; empty slots are not drawn.

    Args:
      source_xyz: [P, 3] source positions (model units, or any unit: panels are independent).
      copies: sequence of copies, each ``(xyz [Q, 3], mask [Q], labels [Q], ...)`` as returned by
        ``fdnc_jax.sim.pairs.synthesize`` (extra items such as color are ignored). Labels ≥ 0 are
        source slots.
      path: optional file to save the figure to (format from the suffix, e.g. ``.png``).
      source_mask: optional [P] bool, valid source slots (default: all).
      titles: optional titles for the copies.

    Returns:
      The matplotlib Figure (2 rows: xy, xz; one column per worm).

    Example:
      >>> fig = plot_simulated_copies(source_xyz, copies_xyz, labels)  # doctest: +SKIP
    """
    src = np.asarray(source_xyz, np.float64)
    if src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(f"source_xyz must have shape [P, 3], got {src.shape}")
    p = src.shape[0]
    smask = np.ones(p, bool) if source_mask is None else np.asarray(source_mask, bool)
    if smask.shape != (p,):
        raise ValueError(f"source_mask must have shape [{p}], got {smask.shape}")
    panels = [(src[smask], np.flatnonzero(smask), "source")]
    for i, c in enumerate(copies):
        if len(c) < 3:
            raise ValueError(f"copies[{i}] must be (xyz, mask, labels, ...), got {len(c)} items")
        xyz, mask, labels = (np.asarray(a) for a in c[:3])
        if xyz.ndim != 2 or xyz.shape[1] != 3 or mask.shape != (xyz.shape[0],):
            raise ValueError(
                f"copies[{i}]: xyz must be [Q, 3] and mask [Q], got {xyz.shape}, {mask.shape}"
            )
        name = titles[i] if titles is not None and i < len(titles) else f"copy {i}"
        panels.append((xyz[mask], labels[mask], name))

    cmap = _identity_colors(p)
    fig = Figure(figsize=(3.2 * len(panels), 5.6), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False)
    for col, (xyz, labels, name) in enumerate(panels):
        known = labels >= 0
        out = labels == OUTLIER_LABEL
        for row, (a, b, axis_names) in enumerate(((0, 1, "xy"), (0, 2, "xz"))):
            ax = axes[row, col]
            ax.scatter(xyz[known, a], xyz[known, b], s=9, c=cmap[labels[known]], linewidths=0)
            if out.any():
                ax.scatter(
                    xyz[out, a],
                    xyz[out, b],
                    s=16,
                    c="k",
                    marker="x",
                    linewidths=0.8,
                    label=f"outliers ({int(out.sum())})",
                )
                if row == 0:
                    ax.legend(loc="upper right", fontsize=6, frameon=False)
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_xlabel(axis_names[0], fontsize=8)
            ax.set_ylabel(axis_names[1], fontsize=8)
            ax.tick_params(labelsize=6)
            if row == 0:
                ax.set_title(f"{name} (n={int(known.sum())})", fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _identity_colors(n: int) -> np.ndarray:
    """[n, 4] RGBA, neighbouring slots far apart in hue (golden-ratio spacing)."""
    from matplotlib import colormaps

    hue = (np.arange(n) * 0.618033988749895) % 1.0
    return colormaps["hsv"](hue)


# ----------------------------------------------------------------------------------------------
# Evaluation figures (fdnc_jax.evaluate): accuracy box plots, calibration, matched clouds.

_METHOD_COLORS = {
    "fdnc": "#1f77b4",
    "fdnc+color": "#9467bd",
    "cpd": "#ff7f0e",
    "none": "#7f7f7f",
}


def _save_figure(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        parent = os.path.dirname(os.fspath(path))
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, dpi=150)
    return fig


def _strip_offsets(n: int, seed: int, width: float) -> np.ndarray:
    """Deterministic horizontal offsets in [−width, width] for a strip plot (no RNG needed)."""
    u = np.mod(0.5 + np.arange(n) * 0.618033988749895 + 0.1 * seed, 1.0)
    return (2.0 * u - 1.0) * width


def plot_accuracy_box(
    per_pair: Any,
    path: str | os.PathLike | None = None,
    title: str = "Top-1 accuracy per pair",
) -> Figure:
    """Box plot plus a jittered strip of per-pair accuracies, one per method (as the paper's).

    Args:
      per_pair: mapping method → per-pair accuracies (fractions 0–1; NaNs are dropped).
      path: optional file to save the figure to (format from the suffix, e.g. ``.png``).
      title: the axes title.

    Returns:
      The matplotlib Figure (the mean of each method is written above its box).

    Example:
      >>> fig = plot_accuracy_box({"fdnc": [0.6, 0.7], "cpd": [0.3, 0.5]})
      >>> fig.axes[0].get_ylabel()
      'accuracy (%)'
    """
    methods = list(per_pair)
    data = []
    for m in methods:
        v = np.asarray(per_pair[m], np.float64).reshape(-1)
        data.append(100.0 * v[np.isfinite(v)])
    fig = Figure(figsize=(1.2 + 1.3 * max(1, len(methods)), 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(1, len(methods) + 1)
    nonempty = [i for i, d in enumerate(data) if d.size]
    if nonempty:
        ax.boxplot(
            [data[i] for i in nonempty],
            positions=pos[nonempty],
            widths=0.55,
            showfliers=False,
            medianprops={"color": "black"},
        )
    for i, (m, d) in enumerate(zip(methods, data, strict=True)):
        color = _METHOD_COLORS.get(m, f"C{i}")
        ax.scatter(
            pos[i] + _strip_offsets(d.size, i, 0.18), d, s=12, alpha=0.6, color=color, zorder=3
        )
        if d.size:
            ax.text(pos[i], 101.5, f"{np.mean(d):.1f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos)
    ax.set_xticklabels([f"{m}\n(n={d.size})" for m, d in zip(methods, data, strict=True)])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 108)
    ax.set_xlim(0.4, len(methods) + 0.6)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


def plot_calibration(
    bins: Any,
    path: str | os.PathLike | None = None,
    title: str = "Calibration of the match probability",
) -> Figure:
    """Reliability diagram: mean confidence vs fraction correct per confidence bin.

    Args:
      bins: one calibration (``fdnc_jax.evaluate.calibration_bins``: {"bins": [...], "ece": ...}),
        its list of bins ({"lo", "hi", "count", "confidence", "accuracy"}), or a mapping method →
        calibration (one curve per method, as in ``calibration.json``).
      path: optional file to save the figure to.
      title: the axes title.

    Returns:
      The matplotlib Figure (left: reliability curves and the diagonal; right: neurons per bin).

    Example:
      >>> from fdnc_jax.evaluate import calibration_bins
      >>> fig = plot_calibration({"fdnc": calibration_bins([0.9, 0.2], [True, False])})
    """
    if hasattr(bins, "keys") and "bins" in bins:
        curves = {"": bins}
    elif hasattr(bins, "keys"):
        curves = dict(bins)
    else:
        curves = {"": {"bins": list(bins)}}
    fig = Figure(figsize=(9.0, 4.0), layout="constrained")
    ax, axc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect")
    share = 1.0 / max(1, len(curves))
    for i, (name, cal) in enumerate(curves.items()):
        rows = list(cal["bins"])
        col = lambda key, rows=rows: np.array([r[key] for r in rows], np.float64)
        conf, acc, lo, hi, count = (col(k) for k in ("confidence", "accuracy", "lo", "hi", "count"))
        ok = np.isfinite(conf) & np.isfinite(acc)
        color = _METHOD_COLORS.get(name, f"C{i}")
        label = name or "model"
        ece = cal.get("ece")
        if ece is not None and np.isfinite(ece):
            label += f" (ECE {ece:.3f})"
        ax.plot(conf[ok], acc[ok], marker="o", color=color, label=label)
        step = (hi - lo) * share
        axc.bar(lo + i * step, count, width=step, align="edge", color=color, alpha=0.7)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction correct")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    axc.set_xlabel("predicted probability")
    axc.set_ylabel("test neurons")
    axc.set_xlim(0, 1)
    axc.set_title("neurons per bin")
    return _save_figure(fig, path)


def plot_matches(
    template: Any,
    test: Any,
    prediction: Any,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    max_labels: int = 200,
) -> Figure:
    """The template and the test worm in two projections (xy, xz) with the predicted names.

    Positions are in µm from each worm's median (raw frames: the two worms need not be aligned).
    Template neurons carry their names; test neurons the predicted name, colored green (correct) or
    red (wrong) when the test is annotated with a name that is in the template, grey otherwise
    (not scorable); all blue when the test has no names.

    Args:
      template: the template ``Worm``.
      test: the test ``Worm``.
      prediction: its ``Prediction`` (``labels`` [M] str).
      path: optional file to save the figure to.
      title: figure title (default: the accuracy when the test is annotated).
      max_labels: write at most this many text labels per panel.

    Returns:
      The matplotlib Figure (2 × 2 axes: rows template, test; columns xy, xz).

    Example:
      >>> fig = plot_matches(template, test, fd.predict(model, template, test))  # doctest: +SKIP
    """
    labels = np.asarray(prediction.labels, dtype=str)
    if labels.shape != (test.n,):
        raise ValueError(f"prediction has {labels.shape[0]} labels, the test worm {test.n} neurons")
    t_xyz = template.xyz_um - np.median(template.xyz_um, axis=0)
    s_xyz = test.xyz_um - np.median(test.xyz_um, axis=0)
    annotated = bool(np.any(test.names != ""))
    scorable = np.isin(test.names, template.names[template.names != ""]) & (test.names != "")
    correct = scorable & (labels == test.names)
    colors = np.full((test.n,), "0.55" if annotated else "#1f77b4", dtype=object)
    colors[correct] = "#2ca02c"
    colors[scorable & ~correct] = "#d62728"
    fig = Figure(figsize=(12.0, 8.0), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False)
    for c, (i, j, plane) in enumerate([(0, 1, "xy"), (0, 2, "xz")]):
        for r, (xyz, text, point_colors, what) in enumerate(
            [
                (
                    t_xyz,
                    template.names,
                    ["#1f77b4"] * template.n,
                    f"template, {template.n} neurons",
                ),
                (s_xyz, labels, list(colors), f"test, {test.n} neurons, predicted names"),
            ]
        ):
            ax = axes[r, c]
            ax.scatter(xyz[:, i], xyz[:, j], s=14, c=point_colors, alpha=0.85)
            for k in range(min(len(text), max_labels)):
                if text[k]:
                    ax.annotate(
                        text[k],
                        (xyz[k, i], xyz[k, j]),
                        fontsize=5,
                        color=point_colors[k],
                        xytext=(2, 2),
                        textcoords="offset points",
                    )
            ax.set_title(f"{what} ({plane})", fontsize=9)
            ax.set_xlabel(f"{plane[0]} (µm from median)", fontsize=8)
            ax.set_ylabel(f"{plane[1]} (µm from median)", fontsize=8)
            ax.set_aspect("equal", adjustable="datalim")
    if title is None and annotated and scorable.any():
        title = (
            f"{int(correct.sum())}/{int(scorable.sum())} correct "
            f"({correct.sum() / scorable.sum():.1%}); green correct, red wrong, "
            "grey not scored"
        )
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def _ellipse_path(center: np.ndarray, cov: np.ndarray, n_sigma: float, n: int = 40) -> np.ndarray:
    """[n, 2] points on the ``n_sigma`` contour of a 2-D Gaussian (center [2], cov [2, 2])."""
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0.0, 2.0 * np.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)  # [n, 2]
    return center + n_sigma * (circle * np.sqrt(np.maximum(vals, 0.0))) @ vecs.T


def plot_atlas(
    atlas: Any = None,
    path: str | os.PathLike | None = None,
    *,
    names: bool = True,
    n_sigma: float = 1.0,
) -> Figure:
    """The atlas in three projections: mean positions in their mean NeuroPAL color, names, and the
    ``n_sigma`` covariance ellipse of each name (how far it moves between animals).

    Args:
      atlas: an ``fdnc_jax.atlas.Atlas``, a path to an atlas ``.npz``, or None for the bundled one.
      path: optional file to save the figure to.
      names: write each neuron's name next to it.
      n_sigma: ellipse size in standard deviations (1 = 39 % of animals inside in 2-D).

    Returns:
      The matplotlib Figure (axes in µm: x = the atlas's longest axis).

    Example:
      >>> fig = plot_atlas()  # the bundled head atlas
      >>> len(fig.axes)
      3
    """
    from fdnc_jax.atlas import Atlas, bundled_atlas_path

    if atlas is None or isinstance(atlas, str | os.PathLike):
        atlas = Atlas.load(bundled_atlas_path() if atlas is None else atlas)
    if not isinstance(atlas, Atlas):
        raise TypeError(f"atlas must be an Atlas, a path or None, got {type(atlas).__name__}")
    xyz, cov = atlas.xyz_um, atlas.cov_um2
    if atlas.color is not None:
        rgb = atlas.color / np.maximum(atlas.color.max(axis=1, keepdims=True), 1e-9)
    else:
        rgb = np.tile([0.2, 0.2, 0.2], (atlas.n, 1))
    views = [
        ((0, 1), "x (µm)", "y (µm)"),
        ((0, 2), "x (µm)", "z (µm)"),
        ((1, 2), "y (µm)", "z (µm)"),
    ]
    fig = Figure(figsize=(12.0, 5.6), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[4.5, 1.0])
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[:, 1])]
    for ax, ((a, b), xl, yl) in zip(axes, views, strict=True):
        for k in range(atlas.n):
            e = _ellipse_path(xyz[k, [a, b]], cov[k][np.ix_([a, b], [a, b])], n_sigma)
            ax.plot(e[:, 0], e[:, 1], color=rgb[k], lw=0.6, alpha=0.6)
        ax.scatter(xyz[:, a], xyz[:, b], c=rgb, s=14, edgecolors="black", linewidths=0.3, zorder=3)
        if names:
            for k in range(atlas.n):
                ax.annotate(
                    atlas.names[k],
                    xyz[k, [a, b]],
                    fontsize=4.5,
                    xytext=(2, 2),
                    textcoords="offset points",
                )
        ax.set_aspect("equal")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    n_animals = len(atlas.meta.get("animals", [])) or int(atlas.n_animals.max())
    fig.suptitle(
        f"atlas: {atlas.n} neurons, {n_animals} animals; ellipses = {n_sigma:g} σ of position "
        "across animals"
    )
    return _save_figure(fig, path)
