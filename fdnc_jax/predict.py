"""Inference: match the neurons of test worms to a template worm.

Letters: B batch of test worms, N template neurons, M test neurons, K top-k candidates.

The forward pass is jitted once per size bucket: N and M are padded up to the next size in
``SIZE_BUCKETS`` (masks keep padding inert) and ``predict_batch`` pads the batch to a power of
two ≤ ``BATCH_CHUNK`` (fewer on CPU), so a recording of thousands of volumes compiles a handful
of times, never once per volume. The template is sent once per chunk, unbatched, and broadcast
inside the compiled forward. The one-to-one assignment (Hungarian), the optional color term,
top-k and thresholds run on the host (``fdnc_jax.matching.match``, a thread pool for many volumes),
or batched on the device (``matching.match_batch_device``) for large batches on GPU/TPU
(``match_on``, ``DEVICE_MATCH_MIN_ROWS``). Canonical-pose models try several flips of each test
(``fdnc_jax.orientation``) and keep the most self-consistent one. By default the matching scores
are two-way (``matching.two_way_log_probs``): the mean of the forward log-probs and those of the
same pair matched the other way, which the orientation search computes anyway.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdnc_jax import matching
from fdnc_jax.io import atomic_write
from fdnc_jax.model.fdnc import Model
from fdnc_jax.orientation import (
    RESIDUAL_UM,
    assignment_residuals,
    device_one_to_one,
    device_orientation_choice,
    forward_assignment,
    orientation_hypotheses,
    reverse_key,
)
from fdnc_jax.worm import Worm, to_model_units, to_model_units_padded

# Steps of 16 up to 256 (heads have ~100–200 neurons: padding adds at most ~15 % tokens), coarser
# above. The forward's cost grows with N + M, so a finer grid trades compiles (~0.8 s each for
# the paper-size model on a 2-core CPU) for speed on every call.
SIZE_BUCKETS = (*range(64, 256, 16), 256, 288, 320, 384, 448, 512, 640, 768, 1024)
# predict_batch runs at most this many volumes per call (a power of two ≤ it). On an H100 the
# paper-size forward ran at 0.7 k volumes/s in calls of 1, 13.5 k in calls of 64, 18.6 k in calls of
# 1,024; the device matching (a sequential Hungarian, launch-bound) at 1.1 k / 3.2 k / 9.2 k / 12.3 k
# volumes/s in calls of 256 / 1,024 / 4,096 / 16,384, so predict_batch of 4,096 volumes ran at 971,
# 2,359 and 3,212 volumes/s with chunks of 256, 1,024 and 2,048. With the auction (H200, 8,192
# volumes): 4,391 / 5,451 / 5,357 / 5,389 volumes/s with chunks of 1,024 / 2,048 / 4,096 / 8,192.
BATCH_CHUNK = 2048
# On accelerators a chunk keeps its attention logits, weights and feed-forward activations (an
# overestimate: 9 MB per volume of 150 + 150 neurons, where XLA used ~6.6 MB) under a third of the
# device's memory (``memory_stats()["bytes_limit"]``), or under this size where the device does not
# report it (256 volumes of 200 neurons; 8 of 1,000).
ACCELERATOR_CHUNK_BYTES = 4 << 30
MATCH_ON = ("auto", "host", "device")
# match_on="auto" matches on the device only for at least this many (volume, orientation) rows: the
# device Hungarian's cost per call hardly depends on the batch, so small batches are faster on the
# host (H100: one pair with the 4-way orientation search took 460 ms with device matching, where
# one host assignment took 2.4 ms; predict_batch of 256 volumes 876 vs 858 volumes/s, of 1,024 930 vs
# 795 with chunks of 256).
DEVICE_MATCH_MIN_ROWS = 1024
# The device matching's default assignment solver (``matching.DEVICE_SOLVERS``; ``predict_batch``'s
# ``device_solver`` chooses per call). The parallel auction (``fdnc_jax.auction``) replaces the
# Hungarian's sequential row loop by ~500–1,500 rounds of [16, N] work per volume, all volumes at
# once. On an H200 (2026-11-27, ``benchmarks/matching_bench.py``, 150-neuron tracking volumes) it
# matched 3.4× / 2.9× / 1.8× / 1.6× as many volumes per second as the Hungarian at batch 256 /
# 1,024 / 4,096 / 16,384 (25.1 k vs 15.5 k volumes/s at 16,384), with the Hungarian's very
# assignment for 99.9 % of volumes (total score ≤ 4.5e-5 below the optimum); ``predict_batch`` of
# 8,192 volumes (``predict_bench.py --accelerator_sweep_only``, chunks of 2,048) ran at 5,451 vs
# 3,307 volumes/s (before its stragglers were compacted, ``auction.COMPACT_FACTOR``). On a 2-core
# CPU it is 1.3× the Hungarian at batch 256, but there the matching runs on the
# host unless ``match_on="device"`` is forced.
DEVICE_SOLVER = "auction"
# On CPU, larger chunks are slower per volume: activations of tens of MB miss the caches and are
# page-faulted afresh on every call. There a chunk keeps its large activations (one head's attention
# weights and the feed-forward hidden layer, per volume) under this size: measured best on a 2-core
# Xeon for both the paper-size model (4 volumes of 194 neurons) and the small one (16 of 150).
CPU_CHUNK_BYTES = 20 << 20


def bucket_size(n: int, what: str = "worm") -> int:
    """The padded size used for a worm of ``n`` neurons: the smallest of ``SIZE_BUCKETS`` ≥ n.

    Inputs are padded to buckets so that jit compiles once per bucket, not once per worm size.

    Raises:
      ValueError: n exceeds the largest bucket (no silent crop).

    Example:
      >>> bucket_size(150)
      160
      >>> bucket_size(194)
      208
    """
    for b in SIZE_BUCKETS:
        if n <= b:
            return b
    raise ValueError(
        f"{what} has {n} neurons, more than the largest supported size {SIZE_BUCKETS[-1]}; "
        "split the volume or filter false detections first"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Prediction:
    """The matching of one test worm to a template.

    Attributes:
      assignment: [M] int, template neuron index per test neuron, −1 = no label.
      labels: [M] str, template name of the assigned neuron ('' when unassigned or unnamed).
      probability: [M] float, probability of the assigned match (0 when unassigned).
      candidates: [M, K] int, top-k template indices by decreasing probability.
      candidate_probs: [M, K] float, their probabilities.
      outlier_probability: [M] float, probability that the test neuron is a false detection / has
        no partner, from the network's outlier column.
      template_names: [N] str, the template's names (to turn candidate indices into names).
      orientation: [3] ±1, the sign pattern of the test's canonical axes that was kept
        (canonical-pose models; a negative product means the test was matched as a mirror image).

    Example:
      >>> import fdnc_jax as fd
      >>> template, test = fd.load_demo_pair()
      >>> pred = fd.predict(fd.load_pretrained(), template, test, top_k=3)
      >>> pred.candidates.shape == (test.n, 3)
      True
    """

    assignment: np.ndarray
    labels: np.ndarray
    probability: np.ndarray
    candidates: np.ndarray
    candidate_probs: np.ndarray
    outlier_probability: np.ndarray
    template_names: np.ndarray
    orientation: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(3, np.float32))

    @property
    def candidate_labels(self) -> np.ndarray:
        """[M, K] str, names of the top-k candidates ('' for an unnamed template neuron).

        Example:
          >>> pred.candidate_labels[0]  # doctest: +SKIP
          array(['AVAL', 'AVAR', 'AVEL'], dtype='<U5')
        """
        names = np.append(self.template_names, "")
        return names[np.where(self.candidates >= 0, self.candidates, len(self.template_names))]

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per test neuron: index, assignment, label, probability, outlier probability,
        and the top-k candidate names/probabilities (';'-joined).

        Example:
          >>> sorted(pred.to_records()[0])  # doctest: +SKIP
          ['assignment', 'candidate_probs', 'candidates', 'label', 'outlier_probability', ...]
        """
        cand_labels = self.candidate_labels
        out = []
        for i in range(len(self.assignment)):
            out.append(
                {
                    "test_index": i,
                    "assignment": int(self.assignment[i]),
                    "label": str(self.labels[i]),
                    "probability": float(self.probability[i]),
                    "outlier_probability": float(self.outlier_probability[i]),
                    "candidates": ";".join(cand_labels[i][cand_labels[i] != ""].tolist())
                    if np.any(self.template_names != "")
                    else ";".join(str(c) for c in self.candidates[i] if c >= 0),
                    "candidate_probs": ";".join(f"{p:.4f}" for p in self.candidate_probs[i]),
                }
            )
        return out

    def to_csv(self, path: str | Path) -> None:
        """Writes ``to_records()`` as CSV, one row per test neuron (atomic: no partial file).

        Example:
          >>> pred.to_csv("names.csv")  # doctest: +SKIP
        """
        records = self.to_records()
        _write_records(path, list(records[0]), records)

    def to_dataframe(self):
        """``to_records()`` as a pandas DataFrame (needs pandas).

        Example:
          >>> pred.to_dataframe().head()  # doctest: +SKIP
        """
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("to_dataframe needs pandas: pip install pandas") from e
        return pd.DataFrame.from_records(self.to_records())


def save_predictions(
    predictions: Sequence[Prediction], path: str | Path, volumes: Sequence[int] | None = None
) -> None:
    """Writes the predictions of a recording's volumes to one CSV (atomic): a ``volume`` column,
    then ``Prediction.to_records()``'s columns, one row per neuron of every volume.

    Args:
      predictions: one Prediction per volume (``predict_batch``'s result).
      path: the CSV to write.
      volumes: each volume's number (default 0, 1, ...; ``[w.meta["volume"] for w in
        load_recording(path)]`` keeps a recording's own numbers).

    Raises:
      ValueError: no predictions, or not one volume number per prediction.
      TypeError: something else than Predictions, or volume numbers that are not integers.

    Example:
      >>> import fdnc_jax as fd, pathlib, tempfile
      >>> template, test = fd.load_demo_pair()
      >>> preds = fd.predict_batch(fd.load_pretrained("small"), template, [test, test])
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_predictions(preds, pathlib.Path(d) / "tracks.csv", volumes=[10, 11])
      ...     lines = (pathlib.Path(d) / "tracks.csv").read_text().splitlines()
      >>> lines[0].split(",")[:4], len(lines) == 1 + 2 * test.n
      (['volume', 'test_index', 'assignment', 'label'], True)
    """
    if isinstance(predictions, Prediction):
        raise TypeError("predictions must be a list of Predictions (one per volume), got one")
    predictions = list(predictions)
    if not predictions:
        raise ValueError("predictions is empty: nothing to write")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, Prediction):
            raise TypeError(f"predictions[{i}] is a {type(pred).__name__}, expected a Prediction")
    if volumes is None:
        volumes = range(len(predictions))
    elif isinstance(volumes, str) or not isinstance(volumes, Sequence | np.ndarray):
        raise TypeError(f"volumes must be a sequence of integers, got {type(volumes).__name__}")
    volumes = list(volumes)
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in volumes):
        raise TypeError(f"volumes must be integers (volume numbers), got {volumes[:5]}")
    if len(volumes) != len(predictions):
        raise ValueError(
            f"volumes has {len(volumes)} numbers for {len(predictions)} predictions; give one each"
        )
    records = (  # One volume's records at a time: a long recording never sits in memory as dicts.
        {"volume": v, **record}
        for v, pred in zip(volumes, predictions, strict=True)
        for record in pred.to_records()
    )
    _write_records(path, ["volume", *predictions[0].to_records()[0]], records)


def track_matrix(predictions: Sequence[Prediction]) -> np.ndarray:
    """[T, N] int: for every volume t and template neuron j, the index of the volume's neuron
    assigned to j (−1: none) — the tracks of a recording matched to one reference volume, e.g. to
    read each reference neuron's activity trace out of per-volume ROI tables.

    Args:
      predictions: one Prediction per volume, all against the same template (N neurons).

    Raises:
      ValueError: no predictions, or predictions against templates of different sizes.

    Example:
      >>> import fdnc_jax as fd
      >>> template, test = fd.load_demo_pair()
      >>> preds = fd.predict_batch(fd.load_pretrained("small"), template, [template, test])
      >>> tracks = track_matrix(preds)
      >>> tracks.shape, bool((tracks[0] == np.arange(template.n)).mean() > 0.9)
      ((2, 194), True)
    """
    predictions = list(predictions)
    if not predictions:
        raise ValueError("predictions is empty: no volumes to track")
    sizes = {len(p.template_names) for p in predictions}
    if len(sizes) > 1:
        raise ValueError(f"predictions against templates of different sizes {sorted(sizes)}")
    out = np.full((len(predictions), sizes.pop()), -1, np.int64)  # [T, N]
    for t, pred in enumerate(predictions):
        rows = np.flatnonzero(pred.assignment >= 0)
        out[t, pred.assignment[rows]] = rows
    return out


def _write_records(path: str | Path, fields: list[str], records: Iterable[dict[str, Any]]) -> None:
    """``records`` (dicts with the keys ``fields``) as a CSV at ``path``, atomically."""

    def write(f):
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(records)

    atomic_write(path, write, binary=False)


@functools.lru_cache(maxsize=8)
def _compiled_forward(model: Model):
    """A jitted forward for ``model``; jax caches one executable per input shape (bucket)."""

    def forward(params, t_xyz, t_mask, s_xyz, s_mask, t_color, s_color, s_signs):
        # One template ([N, 3], [N], [N, C]) for the whole batch of tests ([B, M, ...]), or one
        # template per test ([B, N, ...]: the reverse direction of the orientation search).
        b = s_xyz.shape[0]
        if t_xyz.ndim == 2:
            t_xyz, t_mask = (jnp.broadcast_to(x, (b,) + x.shape) for x in (t_xyz, t_mask))
            if t_color is not None:
                t_color = jnp.broadcast_to(t_color, (b,) + t_color.shape)
        return model.module(params)(
            t_xyz, t_mask, s_xyz, s_mask, t_color, s_color, test_signs=s_signs
        )

    return jax.jit(forward)


def compile_count(model: Model) -> int:
    """How many executables the forward of ``model`` has compiled (one per bucket/batch shape).

    Example:
      >>> compile_count(model)  # after matching worms of 150 and 170 neurons  # doctest: +SKIP
      2
    """
    return _compiled_forward(model)._cache_size()


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size,) + x.shape[1:], np.float32)
    out[: len(x)] = x
    return out


def _model_inputs(
    worm: Worm, size: int, with_color: bool, name: str = "worm"
) -> tuple[np.ndarray, ...]:
    """Padded model-unit positions [size, 3], mask [size] and, ``with_color``, normalised colors
    [size, 3] (zero rows as padding; None otherwise); ``name`` ('template', 'test') for messages."""
    xyz, _ = to_model_units(worm)
    mask = np.zeros((size,), bool)
    mask[: worm.n] = True
    return _pad(xyz, size), mask, _model_color(worm, size, name) if with_color else None


def _model_color(worm: Worm, size: int, name: str = "worm") -> np.ndarray:
    """Padded per-neuron normalised colors [size, 3] (zero rows as padding)."""
    return _pad(matching.normalize_color(worm.color_for_matching(name)), size)


def _check_inputs(
    model: Model, template: Worm, tests: Sequence[Worm], use_color, top_k, min_probability
):
    if not isinstance(model, Model):
        raise TypeError(
            "model must be a fdnc_jax Model (load_pretrained/load_checkpoint), got "
            f"{type(model).__name__}"
        )
    if not isinstance(template, Worm):
        raise TypeError(f"template must be a Worm, got {type(template).__name__}")
    for i, t in enumerate(tests):
        if not isinstance(t, Worm):
            raise TypeError(f"test worm {i} must be a Worm, got {type(t).__name__}")
    template.check_template()
    _check_top_k(top_k, template.n, "the template's neurons")
    if not 0.0 <= float(min_probability) <= 1.0:
        raise ValueError(f"min_probability={min_probability} must be in [0, 1]")
    both_color = template.has_color and all(t.has_color for t in tests)
    if use_color is None:
        # A model that reads color as input already weighs it: the term after it double-counts
        # (real NP pairs, bundled "color" weights: 56 % without the term, 43 % with it).
        use_color = both_color and not model.uses_color
    if use_color:
        if not template.has_color:
            raise ValueError("use_color=True but the template has no color")
        for i, t in enumerate(tests):
            if not t.has_color:
                raise ValueError(f"use_color=True but test worm {i} has no color")
            # Channel counts may differ (RGB vs RGBW): the color term reads R, G, B only.
    if model.uses_color and not both_color:
        raise ValueError("this model takes color as input: template and test worms need color")
    return bool(use_color)


def _check_top_k(top_k: object, n: int, what: str) -> None:
    """TypeError unless ``top_k`` is an int, ValueError unless 1 ≤ top_k ≤ n (``what``: n's)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k <= 0 or top_k > n:
        raise ValueError(f"top_k={top_k} must be between 1 and the {n} {what}")


def _max_chunk(model: Model, n_bucket: int, m_bucket: int) -> int:
    """Most volumes per forward call: ≤ BATCH_CHUNK, within CPU_CHUNK_BYTES on CPU (one head's
    [L, L] weights + the [L, F] hidden layer per volume) or ACCELERATOR_CHUNK_BYTES elsewhere (all
    heads' logits and weights + the hidden layer); at least 1."""
    tokens = n_bucket + m_bucket
    cfg = model.config
    if jax.default_backend() == "cpu":
        budget, per_volume = CPU_CHUNK_BYTES, 4 * tokens * (tokens + cfg.ff_width)
    else:
        budget, per_volume = (
            _accelerator_budget(),
            4 * tokens * (2 * cfg.heads * tokens + cfg.ff_width),
        )
    fit = max(budget // per_volume, 1)
    return min(BATCH_CHUNK, 1 << (fit.bit_length() - 1))


def _accelerator_budget() -> int:
    """Bytes of activations one forward call may use on an accelerator: a third of the device's
    memory limit, or ``ACCELERATOR_CHUNK_BYTES`` where the device does not report one."""
    try:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
    except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
        limit = 0
    return int(limit) // 3 if limit else ACCELERATOR_CHUNK_BYTES


def _chunk_size(n: int, limit: int) -> int:
    """The batch a chunk of ``n`` tests is padded to: the next power of two, ≤ ``limit``."""
    return min(limit, 1 << max(n - 1, 0).bit_length())


def _reverse_chunks(
    model: Model,
    template: Worm,
    tests: Sequence[Worm],
    signs: np.ndarray,
    color_term: bool = False,
    items: Sequence[tuple[int, int]] | None = None,
    per_test: int = 1,
):
    """The reverse direction of every hypothesis h of every test i (or of the (i, h) ``items``
    only; ``per_test`` as ``_padded_tests``): the template's neurons
    matched to test i, test i as template and the template flipped by ``signs[h]`` — the same
    relative pose as hypothesis h (each flip is its own inverse). Batched: one forward call per
    chunk of (test, hypothesis) pairs, each with its own template (on an accelerator, one call per
    test would be launch-bound).

    Yields ``(part, (row_mask [b, N_b], col_mask [b, M_b], row_color, col_color), log_probs)`` per
    chunk: ``part`` the (test index, hypothesis index) of each row, the colors the normalised
    template [b, N_b, 3] and test [b, M_b, 3] colors when the model reads color or ``color_term``
    (else None), ``log_probs`` the device array [b, N_b, M_b + 1] (rows: template neurons),
    dispatched but not waited for.
    """
    n_color = model.config.color_features
    with_color = bool(n_color) or color_term
    n_bucket = bucket_size(template.n, "template")
    s_xyz, s_mask, s_color = _model_inputs(template, n_bucket, with_color, "template")
    forward = _compiled_forward(model)
    groups = _hypothesis_groups(tests, signs, items=items)
    for part, t_xyz, t_mask, t_color, b_signs in _padded_tests(
        model, tests, groups, n_bucket, signs, with_color, per_test
    ):
        b = len(t_xyz)
        batch = lambda x, b=b: None if x is None else np.broadcast_to(x, (b,) + x.shape)  # noqa: E731
        colors = (t_color, batch(s_color)) if n_color else (None, None)  # network color input
        lp = forward(model.params, t_xyz, t_mask, batch(s_xyz), batch(s_mask), *colors, b_signs)
        yield part, (batch(s_mask), t_mask, batch(s_color), t_color), lp


def _reverse_log_probs(
    model: Model,
    template: Worm,
    tests: Sequence[Worm],
    signs: np.ndarray,
    items: Sequence[tuple[int, int]] | None = None,
) -> dict[tuple[int, int], np.ndarray]:
    """[N, M_i + 1] log-probs of the reverse direction (``_reverse_chunks``) of every hypothesis h
    of every test i (or of the (i, h) ``items`` only), keyed ``(i, h)``."""
    chunks = _reverse_chunks(model, template, tests, signs, items=items)
    return _unpadded_log_probs(chunks, lambda i: template.n, lambda i: tests[i].n)


def _unpadded_log_probs(chunks, rows_of, cols_of) -> dict[tuple[int, int], np.ndarray]:
    """Fetches the padded [b, R_b, C_b + 1] log-probs of every chunk ``(part, _, lp)`` and keeps
    item (i, h)'s [rows_of(i), cols_of(i) + 1] block (last column: the outlier), keyed ``(i, h)``."""
    found: dict[tuple[int, int], np.ndarray] = {}

    def collect(part: list[tuple[int, int]], lp_device: jax.Array) -> None:
        lp = np.asarray(lp_device)
        for j, (i, h) in enumerate(part):
            r, c = rows_of(i), cols_of(i)
            found[i, h] = np.concatenate([lp[j, :r, :c], lp[j, :r, -1:]], axis=1)

    _pipelined(chunks, lambda part, _, lp: lp, collect)
    return found


def _searched_chunks(
    model: Model,
    template: Worm,
    tests: Sequence[Worm],
    signs: np.ndarray,
    solver: str,
    use_color: bool = False,
    color_weight: float = matching.DEFAULT_COLOR_WEIGHT,
    two_way: bool = False,
):
    """The orientation search on the device, a chunk at a time, and each test's kept hypothesis.

    Every (test, hypothesis) pair runs in both directions (``_forward_chunks``,
    ``_reverse_chunks``; chunks hold whole tests); both directions' one-to-one assignments
    (``device_one_to_one``, ``solver``, with the color term when ``use_color``) score each
    hypothesis and the best per test is kept (``device_orientation_choice``: the host's
    ``orientation_key``), and the kept rows' log-probs (two-way with ``two_way``) are gathered from
    the chunk's — all on the device, with nothing run twice and no wait for the host.

    Yields ``(part, inputs, log_probs, kept)`` per chunk: ``part`` the (test index, None) of each
    row (the hypothesis is chosen on the device), ``inputs`` as ``_forward_chunks``' (t_mask
    [N_b], s_mask [b', M_b], t_color [N_b, 3], s_color [b', M_b, 3] or None), ``log_probs``
    [b', M_b, N_b + 1] and ``kept`` [b'] (each row's hypothesis index) on the device; b' a power
    of two (rows past ``part`` are padding, their mask all False).
    """
    k = len(signs)
    n_bucket = bucket_size(template.n, "template")
    template_um = jnp.asarray(_pad(template.xyz_um, n_bucket))  # [N_b, 3] µm
    forward = _forward_chunks(model, template, tests, signs, use_color, per_test=k)
    reverse = _reverse_chunks(model, template, tests, signs, use_color, per_test=k)
    for part, inputs, (lp_f, lp_r) in _paired_chunks(forward, reverse):
        t_mask, s_mask, t_color, s_color = inputs
        b, m_bucket = s_mask.shape
        t_mask_b = np.broadcast_to(t_mask, (b,) + t_mask.shape)
        colors = (
            (np.broadcast_to(t_color, (b,) + t_color.shape), s_color) if use_color else (None, None)
        )
        a_f, mean_f = device_one_to_one(
            lp_f, s_mask, t_mask_b, *colors, color_weight, solver=solver, transpose_color=False
        )
        a_r, mean_r = device_one_to_one(
            lp_r, t_mask_b, s_mask, *colors, color_weight, solver=solver, transpose_color=True
        )
        # Rows k·t … k·t + k − 1 hold test t's hypotheses (b is a multiple of k).
        test_part = [i for i, _ in part[::k]]
        test_um = np.zeros((b // k, m_bucket, 3), np.float32)  # [b / k, M_b, 3] µm
        for t, i in enumerate(test_part):
            test_um[t, : tests[i].n] = tests[i].xyz_um
        kept = device_orientation_choice(a_f, a_r, mean_f, mean_r, test_um, template_um, k=k)
        lp = _gathered_log_probs(lp_f, lp_r, kept, k, two_way)  # [b / k, M_b, N_b + 1]
        kept_inputs = (t_mask, s_mask[::k], t_color, None if s_color is None else s_color[::k])
        yield [(i, None) for i in test_part], kept_inputs, lp, kept


@functools.partial(jax.jit, static_argnames=("k", "two_way"))
def _gathered_log_probs(lp_f, lp_r, kept, k: int, two_way: bool):
    """[b / k, M_b, N_b + 1] the kept rows ``k·t + kept[t]`` of a chunk's forward log-probs
    ``lp_f`` [b, M_b, N_b + 1], as two-way scores with its reverse ``lp_r`` [b, N_b, M_b + 1]
    when ``two_way``."""
    rows = jnp.arange(kept.shape[0]) * k + kept  # [b / k]
    lp = lp_f[rows]
    return matching.two_way_log_probs(lp, lp_r[rows]) if two_way else lp


def _item_residuals(
    assignments: dict[tuple[int, int], np.ndarray], template: Worm, tests: Sequence[Worm]
) -> dict[tuple[int, int], float]:
    """The median affine residual (µm, ``orientation.assignment_residual``) of each forward
    assignment [M_i] keyed (test index, hypothesis index), in one vectorised fit."""
    items = list(assignments)
    values = assignment_residuals(
        [assignments[item] for item in items], [tests[i].xyz_um for i, _ in items], template.xyz_um
    )
    return dict(zip(items, values.tolist(), strict=True))


def _choose_orientations(
    model: Model,
    template: Worm,
    tests: Sequence[Worm],
    signs: np.ndarray,
    forward: dict[tuple[int, int], np.ndarray],
    use_color: bool = False,
    color_weight: float = matching.DEFAULT_COLOR_WEIGHT,
) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """([B] index of the kept hypothesis per test (``fdnc_jax.orientation.orientation_key``),
    the reverse log-probs [N, M_i + 1] of each kept hypothesis keyed ``(i, h)``), given the
    forward log-probs ``forward[i, h]`` [M_i, N + 1]. With one hypothesis: all 0, and no reverse
    direction runs (the dict is empty). ``use_color``: the color term (× ``color_weight``) enters
    the hypotheses' assignments, as in the final matching.

    Branch and bound over the reverse forwards, exact: the key's first entry is at most
    1 − residual / ``RESIDUAL_UM`` (cycle consistency ≤ 1) and the residual needs only
    the forward direction, so the hypotheses' reverse directions run in order of increasing
    residual (one batched round per rank, all tests at once) and a hypothesis whose bound is
    below the best key found is never run. The choice is the full search's (tested); on the
    within-lab pairs of ``benchmarks/orientation_study.py`` 1.8 (``default``), 2.2 (``color``) and
    1.9 (``small``) of the 4 reverse forwards ran per pair on average."""
    k = len(signs)
    if k == 1:
        return np.zeros((len(tests),), np.int64), {}
    colors = [_color_term(template, t, use_color, color_weight) for t in tests]
    items = [(i, h) for i in range(len(tests)) for h in range(k)]
    found = _host_map(lambda it: forward_assignment(forward[it], colors[it[0]]), items)
    assigned = dict(zip(items, found, strict=True))  # (assignment [M_i], mean score) per item
    residuals = _item_residuals({item: a_f for item, (a_f, _) in assigned.items()}, template, tests)
    sides = [[(*assigned[i, h], residuals[i, h]) for h in range(k)] for i in range(len(tests))]
    keys: dict[tuple[int, int], tuple[float, float]] = {}
    reverses: dict[int, np.ndarray] = {}  # per test: the reverse log-probs of its best so far

    def next_hypothesis(i: int) -> int | None:
        """The unexamined hypothesis of test i with the smallest residual that could still win."""
        best = max((keys[i, h][0] for h in range(k) if (i, h) in keys), default=-np.inf)
        open_ = [h for h in range(k) if (i, h) not in keys]
        bound = {h: 1.0 - sides[i][h][2] / RESIDUAL_UM for h in open_}
        live = [h for h in open_ if bound[h] >= best]
        return min(live, key=lambda h: sides[i][h][2]) if live else None

    def choose(i: int) -> int:
        return max((h for h in range(k) if (i, h) in keys), key=lambda h: keys[i, h])

    pending = [(i, h) for i in range(len(tests)) if (h := next_hypothesis(i)) is not None]
    while pending:
        reverse = _reverse_log_probs(model, template, tests, signs, items=pending)
        for i, h in pending:
            keys[i, h] = reverse_key(sides[i][h], reverse[i, h], colors[i])
            if choose(i) == h:  # a new best: keep its reverse log-probs only
                reverses[i] = reverse[i, h]
        pending = [(i, h) for i, _ in pending if (h := next_hypothesis(i)) is not None]

    chosen = np.asarray([choose(i) for i in range(len(tests))], np.int64)
    return chosen, {(i, int(h)): reverses[i] for i, h in enumerate(chosen)}


def _color_term(
    template: Worm, test: Worm, use_color: bool, color_weight: float
) -> np.ndarray | None:
    """[M, N] the weighted color log-likelihood added to the network's scores, None without color."""
    colors = _color_kwargs(template, test, use_color, color_weight)
    if not colors:
        return None
    return color_weight * matching.color_log_likelihood(
        colors["template_color"], colors["test_color"]
    )


def _forward_chunks(
    model: Model,
    template: Worm,
    tests: Sequence[Worm],
    signs: np.ndarray,
    color_term: bool = False,
    per_test: int = 1,
):
    """The forward of every (test, hypothesis) pair, batched per bucket and chunk (``per_test`` as
    ``_padded_tests``).

    Yields ``(part, inputs, log_probs)`` per chunk: ``part`` the (test index, hypothesis index)
    of each row, ``inputs`` the padded host arrays (t_mask [N_b], s_mask [b, M_b], and the
    normalised colors t_color [N_b, 3], s_color [b, M_b, 3] when the model reads color or
    ``color_term``, else None) and ``log_probs`` the device array [b, M_b, N_b + 1], dispatched
    but not waited for.
    """
    n_color = model.config.color_features
    with_color = bool(n_color) or color_term
    n_bucket = bucket_size(template.n, "template")
    groups = _hypothesis_groups(tests, signs)
    t_xyz, t_mask, t_color = _model_inputs(template, n_bucket, with_color, "template")
    forward = _compiled_forward(model)
    for part, s_xyz, s_mask, s_color, s_signs in _padded_tests(
        model, tests, groups, n_bucket, signs, with_color, per_test
    ):
        colors = (t_color, s_color) if n_color else (None, None)  # network color input
        lp = forward(model.params, t_xyz, t_mask, s_xyz, s_mask, *colors, s_signs)
        yield part, (t_mask, s_mask, t_color, s_color), lp


def _hypothesis_groups(
    tests: Sequence[Worm],
    signs: np.ndarray,
    items: Sequence[tuple[int, int]] | None = None,
) -> dict[int, list[tuple[int, int]]]:
    """(test index, hypothesis index) items grouped by the tests' size bucket: every hypothesis of
    ``signs`` [K, 3] (a test's together, in order), or exactly ``items``."""
    if items is None:
        items = [(i, h) for i in range(len(tests)) for h in range(len(signs))]
    groups: dict[int, list[tuple[int, int]]] = {}
    for i, h in items:
        groups.setdefault(bucket_size(tests[i].n, f"test worm {i}"), []).append((i, h))
    return groups


def _padded_tests(
    model: Model,
    tests: Sequence[Worm],
    groups: dict[int, list[tuple[int, int]]],
    n_bucket: int,
    signs: np.ndarray,
    with_color: bool,
    per_test: int = 1,
):
    """The test side of every chunk, per bucket M_b (the template padded to ``n_bucket``): yields
    ``(part, xyz [b, M_b, 3], mask [b, M_b], color [b, M_b, 3] or None, signs [b, 3])`` with
    ``b`` a power of two (``_chunk_size``; rows past ``part`` are padding). Positions are
    normalised a chunk at a time (``to_model_units_padded``), colors once per test. Chunks hold
    whole runs of ``per_test`` items (a test's hypotheses, listed together in ``groups``): their
    limit is rounded up to a multiple of it."""
    for m_bucket, items in groups.items():
        limit = -(-_max_chunk(model, n_bucket, m_bucket) // per_test) * per_test
        colors: dict[int, np.ndarray] = {}  # per test, shared by its hypotheses
        for start in range(0, len(items), limit):
            part = items[start : start + limit]
            b = _chunk_size(len(part), limit)
            xyz = np.zeros((b, m_bucket, 3), np.float32)
            mask = np.zeros((b, m_bucket), bool)
            xyz[: len(part)], mask[: len(part)] = to_model_units_padded(
                [tests[i] for i, _ in part], m_bucket
            )  # [len(part), M_b, 3], [len(part), M_b]
            b_signs = np.ones((b, 3), np.float32)
            b_signs[: len(part)] = signs[[h for _, h in part]]
            color = None
            if with_color:
                color = np.zeros((b, m_bucket, 3), np.float32)
                for j, (i, _) in enumerate(part):
                    if i not in colors:
                        colors[i] = _model_color(tests[i], m_bucket, "test")
                    color[j] = colors[i]
            yield part, xyz, mask, color, b_signs


def _pipelined(chunks, dispatch, collect) -> None:
    """For each chunk: ``dispatch`` (device work, async), then ``collect`` the previous one's
    results on the host — host work overlaps the device."""
    pending = None
    for chunk in chunks:
        out = dispatch(*chunk)
        if pending is not None:
            collect(*pending)
        pending = (chunk[0], out)
    if pending is not None:
        collect(*pending)


def _hypothesis_log_probs(
    model: Model, template: Worm, tests: Sequence[Worm], signs: np.ndarray
) -> dict[tuple[int, int], np.ndarray]:
    """Network log-probs [M_i, N + 1] (unpadded) of every test worm i under every orientation
    hypothesis h (``signs`` [K, 3]), keyed ``(i, h)``; batched per bucket and chunk."""
    chunks = _forward_chunks(model, template, tests, signs)
    return _unpadded_log_probs(chunks, lambda i: tests[i].n, lambda i: template.n)


def _log_probs(
    model: Model,
    template: Worm,
    tests: Sequence[Worm],
    signs: np.ndarray,
    use_color: bool = False,
    color_weight: float = matching.DEFAULT_COLOR_WEIGHT,
    two_way: bool = False,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Network log-probs [M_i, N + 1] per test worm (unpadded) under its best orientation
    hypothesis (one of ``signs`` [K, 3], chosen with the color term when ``use_color``), batched
    per bucket; and the chosen hypothesis per test. ``two_way``: the two-way scores
    (``matching.two_way_log_probs``) instead; the orientation search has run the reverse direction
    of every kept hypothesis already, except with one hypothesis, where it runs here."""
    found = _hypothesis_log_probs(model, template, tests, signs)
    chosen, reverse = _choose_orientations(
        model, template, tests, signs, found, use_color, color_weight
    )
    kept = [(i, int(h)) for i, h in enumerate(chosen)]
    if not two_way:
        return [found[item] for item in kept], chosen
    missing = [item for item in kept if item not in reverse]
    if missing:
        reverse.update(_reverse_log_probs(model, template, tests, signs, items=missing))
    return [matching.two_way_log_probs(found[item], reverse[item]) for item in kept], chosen


def _device_predictions(
    model: Model,
    template: Worm,
    tests: Sequence[Worm],
    signs: np.ndarray,
    use_color: bool,
    color_weight: float,
    top_k: int,
    min_probability: float,
    solver: str,
    two_way: bool = False,
    advance=lambda n: None,
) -> list[Prediction]:
    """``predict_batch`` with the matching on the device (``matching.match_batch_device``): only
    [M]- and [M, K]-sized results per test come back to the host. With several orientation
    hypotheses the kept one is chosen first, also on the device (``_searched_chunks``: both
    directions' one-to-one assignments; no host round trip), and its log-probs (two-way with
    ``two_way``), kept from the search, are matched (with the color term if asked)."""

    def dispatch(part, inputs, lp, kept=None):
        t_mask, s_mask, t_color, s_color = inputs
        b = lp.shape[0]
        colors = {}
        if use_color:
            colors = {
                "template_color": np.broadcast_to(t_color, (b,) + t_color.shape),
                "test_color": s_color,
            }
        return kept, matching.match_batch_device(
            lp,
            np.broadcast_to(t_mask, (b,) + t_mask.shape),
            s_mask,
            color_weight=color_weight,
            top_k=top_k,
            temperature=model.temperature,
            solver=solver,
            **colors,
        )

    preds: list[Prediction | None] = [None] * len(tests)

    def collect(part, out):  # runs while the device works on the next chunk
        kept, found = jax.device_get(out)  # kept: the hypotheses chosen on the device, or None
        hypotheses = [h for _, h in part] if kept is None else kept[: len(part)]
        found = _device_chunk_predictions(
            found,
            [tests[i].n for i, _ in part],
            template.names,
            signs[hypotheses],
            min_probability,
        )
        for (i, _), pred in zip(part, found, strict=True):
            preds[i] = pred
        advance(len(part))

    if len(signs) > 1:
        chunks = _searched_chunks(
            model, template, tests, signs, solver, use_color, color_weight, two_way
        )
    else:
        chunks = _forward_chunks(model, template, tests, signs, use_color)
        if two_way:
            reverse = _reverse_chunks(model, template, tests, signs, use_color)
            chunks = _two_way_chunks(chunks, reverse)
    _pipelined(chunks, dispatch, collect)
    return preds


_device_two_way = jax.jit(matching.two_way_log_probs)


def _paired_chunks(forward_chunks, reverse_chunks):
    """``(part, inputs, (forward log-probs [b, M_b, N_b + 1], reverse [b, N_b, M_b + 1]))`` per
    chunk of ``_forward_chunks`` and the matching ``_reverse_chunks`` (the same items, hence the
    same chunks in the same order; ``inputs``: the forward chunk's)."""
    for (part, inputs, lp), (r_part, _, r_lp) in zip(forward_chunks, reverse_chunks, strict=True):
        if part != r_part:
            raise AssertionError(f"forward chunk {part} and reverse chunk {r_part} differ")
        yield part, inputs, (lp, r_lp)


def _two_way_chunks(forward_chunks, reverse_chunks):
    """``_forward_chunks``' chunks with their log-probs replaced on the device by the two-way
    scores (``matching.two_way_log_probs``) with the matching ``_reverse_chunks``'."""
    for part, inputs, (lp, r_lp) in _paired_chunks(forward_chunks, reverse_chunks):
        yield part, inputs, _device_two_way(lp, r_lp)


def _device_chunk_predictions(
    host: dict[str, np.ndarray],
    sizes: Sequence[int],
    names: np.ndarray,
    orientations: np.ndarray,
    min_probability: float,
) -> list[Prediction]:
    """The Predictions of a chunk's first ``len(sizes)`` rows from its padded
    ``match_batch_device`` results ``host`` (assignment [b, M_b], probability [b, M_b],
    candidates and candidate_probs [b, M_b, K], outlier_probability [b, M_b]): row j has
    ``sizes[j]`` neurons and kept ``orientations[j]`` [3]; template ``names`` [N];
    ``min_probability`` turns weaker assignments into "no label" (a chunk at a time)."""
    b = len(sizes)
    assignment = host["assignment"][:b]  # [b, M_b]
    probability = host["probability"][:b]  # [b, M_b]
    low = (assignment >= 0) & (probability < min_probability)
    if low.any():
        assignment = np.where(low, matching.NO_LABEL, assignment)
        probability = np.where(low, 0.0, probability)
    labels = _labels_of(names, assignment)  # [b, M_b]
    orientations = np.asarray(orientations, np.float32)  # [b, 3]
    # Per volume: small copies reuse freed memory, where converting the whole chunk at once
    # page-faults tens of MB of fresh arrays (measured slower).
    predictions = []
    for j, m in enumerate(sizes):
        predictions.append(
            Prediction(
                assignment=assignment[j, :m].astype(np.int64),
                labels=labels[j, :m],
                probability=probability[j, :m].astype(np.float64),
                candidates=host["candidates"][j, :m].astype(np.int64),
                candidate_probs=host["candidate_probs"][j, :m].astype(np.float64),
                outlier_probability=host["outlier_probability"][j, :m].astype(np.float64),
                template_names=names,
                orientation=orientations[j],
            )
        )
    return predictions


# Host matching (Hungarian, softmax, top-k) of many volumes runs in a thread pool: scipy's assignment
# and numpy's sorts release the GIL, so on a many-core host (a GPU machine) it is no longer one core
# that caps predict_batch. Results do not depend on it (each volume is independent).
HOST_THREADS = min(8, os.cpu_count() or 1)
HOST_PARALLEL_MIN = 8  # fewer volumes: a plain loop
# With the matching on the host, predict_batch runs its volumes in blocks of this many, so a recording
# of any length needs memory for one block's log-probs only (1,000 volumes of 150 neurons at once
# took 593 MB more peak memory with the `small` model on CPU; blocks of 256, 247 MB). On CPU a
# forward call holds at most 16 volumes; on an accelerator a block's 4-way search is 1,024 rows.
HOST_BLOCK = 256


@functools.cache
def _host_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(HOST_THREADS, thread_name_prefix="fdnc-match")


def _host_map(fn, items) -> list:
    """``[fn(x) for x in items]``, in the host thread pool when there are many items."""
    items = list(items)
    if HOST_THREADS < 2 or len(items) < HOST_PARALLEL_MIN:
        return [fn(x) for x in items]
    return list(_host_pool().map(fn, items))


def _color_kwargs(template: Worm, test: Worm, use_color: bool, color_weight: float) -> dict:
    """The color arguments of ``matching.match`` / ``match_scores`` (empty without color)."""
    if not use_color:
        return {}
    return {
        "template_color": template.color_for_matching("template"),
        "test_color": test.color_for_matching("test"),
        "color_weight": color_weight,
    }


def _labels_of(names: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """[...] names of the assigned template neurons (``assignment`` [...] indexes ``names`` [N]),
    '' where unassigned (−1)."""
    return np.append(names, "")[assignment]  # −1 picks the appended ''


def _prediction(
    log_probs: np.ndarray,
    template: Worm,
    test: Worm,
    use_color: bool,
    color_weight: float,
    top_k: int,
    min_probability: float,
    signs: np.ndarray,
    temperature: float = 1.0,
) -> Prediction:
    colors = _color_kwargs(template, test, use_color, color_weight)
    m = matching.match(
        log_probs,
        top_k=top_k,
        min_probability=min_probability,
        temperature=temperature,
        **colors,
    )
    return _prediction_of(m, template.names, signs)


def _prediction_of(
    m: matching.Matching, names: np.ndarray, orientation: np.ndarray | None = None
) -> Prediction:
    """The Prediction of a Matching against template ``names`` [N] (``orientation`` [3]: the kept
    sign flip; default: none)."""
    kept = {} if orientation is None else {"orientation": orientation.astype(np.float32)}
    return Prediction(
        assignment=m.assignment.astype(np.int64),
        labels=_labels_of(names, m.assignment),
        probability=m.probability,
        candidates=m.candidates,
        candidate_probs=m.candidate_probs,
        outlier_probability=m.outlier_probability,
        template_names=names,
        **kept,
    )


def _matches_on_device(match_on: str, rows: int = 0) -> bool:
    """Whether ``match_on`` ("auto", "host", "device") means the device here for ``rows``
    (volume, orientation) matchings; ValueError for another value."""
    if match_on not in MATCH_ON:
        raise ValueError(f"match_on={match_on!r} must be one of {MATCH_ON}")
    if match_on == "auto":
        return jax.default_backend() != "cpu" and rows >= DEVICE_MATCH_MIN_ROWS
    return match_on == "device"


def predict_batch(
    model: Model,
    template: Worm | Sequence[Worm],
    tests: Sequence[Worm],
    *,
    use_color: bool | None = None,
    color_weight: float = matching.DEFAULT_COLOR_WEIGHT,
    top_k: int = 5,
    min_probability: float = 0.0,
    orientation: str = "auto",
    match_on: str = "auto",
    device_solver: str | None = None,
    two_way: bool = True,
    progress: bool = False,
) -> list[Prediction]:
    """Matches many test worms (e.g. every volume of a recording) to one template.

    Args:
      model: from ``load_pretrained()`` or ``load_checkpoint(workdir)``.
      template: the reference Worm (names optional: without names, use ``assignment`` alone); or
        a list of labelled templates that vote on every test's names (``predict_ensemble``; the
        matching then runs on the host).
      tests: the Worms to match.
      use_color: add the NeuroPAL color term after the network (None: when template and all tests
        have color and the model does not take color as input).
      color_weight: weight of the color log-likelihood (60 as the original).
      top_k: number of candidates per test neuron (1 ≤ top_k ≤ template neurons).
      min_probability: assignments below this probability become −1 ("no label"). Probabilities
        are the row softmax of the scores / ``model.temperature`` (the bundled models carry a
        temperature fitted on labelled real pairs; ``model.with_temperature(1.0)``: the raw ones).
      orientation: for canonical-pose models, which orientations of the test to try (each test is
        matched under every hypothesis in both directions, and the hypothesis whose one-to-one
        assignments agree most — cycle consistency — and whose correspondence one affine map
        explains best is kept, ``fdnc_jax.orientation.orientation_key``; with the color term when
        ``use_color``; the reverse direction only for hypotheses that can still win): "auto" the 4
        proper 180° flips of its principal axes, "auto+mirror" also their mirror images (worms
        whose side is unknown; a wrong choice swaps left/right names), "fixed" none.
      match_on: where the one-to-one assignment, softmax and top-k run: "host" (scipy, float64;
        a thread pool for many volumes), "device" (``matching.match_batch_device``: jitted and
        batched with the forward, float32 — for accelerators, where a host loop would cap the
        throughput), "auto" (default) = "device" on GPU/TPU for ≥ ``DEVICE_MATCH_MIN_ROWS``
        (volume, orientation) pairs, "host" otherwise. The two agree up to near-ties and float32
        rounding (tested).
      device_solver: the device matching's one-to-one assignment (``matching.DEVICE_SOLVERS``):
        "hungarian" (optax) or "auction" (``fdnc_jax.auction``, parallel over rows and volumes);
        None: ``DEVICE_SOLVER`` ("auction": faster on GPUs, within ``auction.DEFAULT_TOLERANCE``
        of the optimal total score; "hungarian" is exact). Used only where the matching runs on the
        device.
      two_way: match on two-way scores (``matching.two_way_log_probs``): the mean of the forward
        log-probs (test rows) and those of the same pair matched the other way (the test as
        template), so a pair both directions pick wins. The orientation search runs that reverse
        direction anyway (one more forward per volume with ``orientation="fixed"``, or on the
        device). Real across-animal pairs: +0.5 to +1.8 points per WormND lab over the forward
        scores alone (README, Concepts). False: the original's forward scores.
      progress: show a progress bar (tqdm, on stderr) over the volumes, advanced per block or
        chunk of volumes as they finish — for recordings of thousands of volumes.

    Returns:
      One Prediction per test worm, in order.

    Example:
      >>> preds = predict_batch(load_pretrained(), template, volumes)  # doctest: +SKIP
    """
    tests = list(tests)
    if not tests:
        raise ValueError("tests is empty: pass at least one test Worm")
    _check_bool(two_way, "two_way")
    _check_bool(progress, "progress")
    from tqdm.auto import tqdm

    with tqdm(total=len(tests), desc="predict", unit="volume", disable=not progress) as bar:
        if isinstance(template, list | tuple):  # Ensembles match on the host (averaged votes).
            _matches_on_device(match_on)  # validated all the same
            return _ensemble_predictions(
                model,
                template,
                tests,
                use_color=use_color,
                color_weight=color_weight,
                top_k=top_k,
                min_probability=min_probability,
                orientation=orientation,
                two_way=two_way,
                advance=bar.update,
            )
        use_color = _check_inputs(model, template, tests, use_color, top_k, min_probability)
        signs = orientation_hypotheses(model, orientation)
        on_device = _matches_on_device(match_on, len(tests) * len(signs))
        if use_color and not (np.isfinite(color_weight) and color_weight >= 0):
            raise ValueError(f"color_weight must be finite and >= 0, got {color_weight}")
        solver = matching.check_device_solver(
            DEVICE_SOLVER if device_solver is None else device_solver, "device_solver"
        )
        if on_device:
            return _device_predictions(
                model,
                template,
                tests,
                signs,
                use_color,
                float(color_weight),
                top_k,
                min_probability,
                solver,
                two_way,
                advance=bar.update,
            )
        return _in_blocks(
            tests,
            lambda block: _host_predictions(
                model,
                template,
                block,
                signs,
                use_color,
                color_weight,
                top_k,
                min_probability,
                two_way,
            ),
            bar.update,
        )


def _in_blocks(tests: list[Worm], predict_block, advance) -> list[Prediction]:
    """``predict_block(block)`` of each block of ``HOST_BLOCK`` tests, concatenated in order;
    ``advance(len(block))`` after each (the progress bar)."""
    preds = []
    for start in range(0, len(tests), HOST_BLOCK):
        block = tests[start : start + HOST_BLOCK]
        preds += predict_block(block)
        advance(len(block))
    return preds


def _check_bool(value: object, name: str) -> None:
    """TypeError unless ``value`` is a bool (``name``: the argument's, for the message)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _host_predictions(
    model: Model,
    template: Worm,
    tests: Sequence[Worm],
    signs: np.ndarray,
    use_color: bool,
    color_weight: float,
    top_k: int,
    min_probability: float,
    two_way: bool = False,
) -> list[Prediction]:
    """``predict_batch`` with the matching on the host, for one block of tests: every hypothesis'
    log-probs [M_i, N + 1] of the block are held at once (~0.5 MB per 150-neuron volume with
    the 4-way search), so ``predict_batch`` runs blocks of ``HOST_BLOCK`` volumes."""
    all_log_probs, chosen = _log_probs(
        model, template, tests, signs, use_color, color_weight, two_way
    )
    return _host_map(
        lambda i: _prediction(
            all_log_probs[i],
            template,
            tests[i],
            use_color,
            color_weight,
            top_k,
            min_probability,
            signs[chosen[i]],
            model.temperature,
        ),
        range(len(tests)),
    )


def predict(
    model: Model,
    template: Worm | Sequence[Worm],
    test: Worm,
    *,
    use_color: bool | None = None,
    color_weight: float = matching.DEFAULT_COLOR_WEIGHT,
    top_k: int = 5,
    min_probability: float = 0.0,
    orientation: str = "auto",
    match_on: str = "auto",
    two_way: bool = True,
) -> Prediction:
    """Matches the neurons of ``test`` to ``template``; see ``predict_batch`` for the arguments.

    ``template`` may also be a list of labelled templates (e.g. several annotated animals): the test is
    matched to each, the per-name probabilities are averaged over the templates that carry the name,
    and one one-to-one assignment over names is made. Then ``assignment`` indexes
    ``Prediction.template_names``, the sorted union of the templates' names.

    Example:
      >>> import fdnc_jax as fd
      >>> template, test = fd.load_demo_pair()
      >>> pred = fd.predict(fd.load_pretrained(), template, test)
      >>> pred.labels[:3]  # doctest: +SKIP
    """
    if not isinstance(test, Worm):
        raise TypeError(f"test must be a Worm, got {type(test).__name__}")
    return predict_batch(
        model,
        template,
        [test],
        use_color=use_color,
        color_weight=color_weight,
        top_k=top_k,
        min_probability=min_probability,
        orientation=orientation,
        match_on=match_on,
        two_way=two_way,
    )[0]


def predict_ensemble(
    model: Model,
    templates: Sequence[Worm],
    test: Worm,
    *,
    use_color: bool | None = None,
    color_weight: float = matching.DEFAULT_COLOR_WEIGHT,
    top_k: int = 5,
    min_probability: float = 0.0,
    orientation: str = "auto",
    two_way: bool = True,
) -> Prediction:
    """Names the neurons of ``test`` by voting over several labelled templates.

    For every template, the network's log-probabilities (two-way unless ``two_way=False``; + the
    color term) give a row-softmax distribution over that template's neurons, i.e. over its
    names. Per test neuron and name, the probabilities are averaged over the templates that carry
    the name (rows renormalised); the outlier probability is averaged too. One Hungarian
    assignment over names follows. The votes use the network's own probabilities
    (``model.temperature`` is not applied: the ensemble's probabilities were not calibrated).

    Args:
      templates: ≥ 1 labelled Worms (each needs names).
      test: the Worm to label. Other arguments as ``predict_batch``.

    Returns:
      A Prediction whose ``assignment`` / ``candidates`` index ``template_names`` (sorted union).

    Example:
      >>> from fdnc_jax.datasets import load_bundled_worm
      >>> templates = [load_bundled_worm(n) for n in ("NP_11_YAaLR", "EY_20190924_03")]
      >>> pred = predict(load_pretrained(), templates, test)  # doctest: +SKIP
    """
    return _ensemble_predictions(
        model,
        templates,
        [test],
        use_color=use_color,
        color_weight=color_weight,
        top_k=top_k,
        min_probability=min_probability,
        orientation=orientation,
        two_way=two_way,
    )[0]


def _ensemble_predictions(
    model: Model,
    templates: Sequence[Worm],
    tests: Sequence[Worm],
    *,
    use_color: bool | None,
    color_weight: float,
    top_k: int,
    min_probability: float,
    orientation: str,
    two_way: bool,
    advance=lambda n: None,
) -> list[Prediction]:
    """``predict_ensemble`` of every test worm: each template matches the tests batched
    (``_log_probs``, blocks of ``HOST_BLOCK`` tests), then each test's votes are tallied and
    assigned on the host (thread pool). ``use_color=None``: the color term with a template when it
    and all the tests have color (as ``predict_batch``). ``advance(n)``: n more tests done."""
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty: pass at least one labelled template")
    _check_bool(two_way, "two_way")
    for i, t in enumerate(templates):
        if not isinstance(t, Worm):
            raise TypeError(f"templates[{i}] must be a Worm, got {type(t).__name__}")
        if not t.labelled.any():
            raise ValueError(f"templates[{i}] has no names: an ensemble votes over names")
    names = np.array(sorted(set().union(*(t.names[t.labelled].tolist() for t in templates))))
    _check_top_k(top_k, len(names), "names of the templates")
    signs = orientation_hypotheses(model, orientation)
    return _in_blocks(
        tests,
        lambda block: _ensemble_block(
            model,
            templates,
            names,
            block,
            signs,
            use_color,
            color_weight,
            top_k,
            min_probability,
            two_way,
        ),
        advance,
    )


def _ensemble_block(
    model, templates, names, tests, signs, use_color, color_weight, top_k, min_probability, two_way
) -> list[Prediction]:
    """``_ensemble_predictions`` of one block of tests, voting over ``names`` [K] (sorted)."""
    votes = [np.zeros((t.n, len(names))) for t in tests]  # [M_i, K] summed probabilities per name
    outlier = [np.zeros((t.n,)) for t in tests]  # [M_i] summed outlier probabilities
    counts = np.zeros((len(names),))  # templates carrying each name
    for t in templates:
        t_use_color = _check_inputs(model, t, tests, use_color, min(top_k, t.n), min_probability)
        log_probs, _ = _log_probs(model, t, tests, signs, t_use_color, color_weight, two_way)
        column = np.searchsorted(names, t.names[t.labelled])
        counts[column] += 1

        found = _host_map(
            lambda i, t=t, use=t_use_color, lps=log_probs: _votes(
                lps[i], t, tests[i], use, color_weight
            ),
            range(len(tests)),
        )
        for i, (probs, outlier_probs) in enumerate(found):
            votes[i][:, column] += probs
            outlier[i] += outlier_probs

    def assign(i: int) -> Prediction:
        mean = votes[i] / np.maximum(counts, 1)[None, :]
        mean /= np.maximum(mean.sum(axis=1, keepdims=True), 1e-12)
        outlier_mean = np.clip(outlier[i] / len(templates), 1e-12, 1 - 1e-12)
        # A log-prob table in the network's layout ([M, K + 1], last column outlier) for match.
        with np.errstate(divide="ignore"):
            table = np.concatenate([np.log(mean), np.log(outlier_mean)[:, None]], axis=1)
        m = matching.match(table, top_k=top_k, min_probability=min_probability)
        return dataclasses.replace(_prediction_of(m, names), outlier_probability=outlier_mean)

    return _host_map(assign, range(len(tests)))


def _votes(
    log_probs: np.ndarray, template: Worm, test: Worm, use_color: bool, color_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """One template's votes on one test: the row-softmax probabilities [M, L] of the template's L
    labelled neurons (of the network's ``log_probs`` [M, N + 1] + the color term when
    ``use_color``) and the outlier probabilities [M]."""
    colors = _color_kwargs(template, test, use_color, color_weight)
    probs = matching.row_softmax(matching.match_scores(log_probs, **colors))  # [M, N]
    return probs[:, template.labelled], np.exp(log_probs[:, -1])
