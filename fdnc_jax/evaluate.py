"""Accuracy of fDNC and baselines on labelled worm pairs, semi-synthetic pairs and tracking.

Letters: N template neurons, M test neurons, K top-k candidates, B batch of semi-synthetic pairs.

Methods (names used everywhere: tables, CSV, ``summary.json``):

* ``fdnc``: the network on positions only (``predict_batch(..., use_color=False)``).
* ``fdnc+color``: the network plus the NeuroPAL color term (``use_color=True``).
* ``cpd``: the non-learned baseline, JAX Coherent Point Drift (rigid, then non-rigid with the
  original fDNC setting ``CPDConfig.fdnc()``) in model units, then a one-to-one assignment.
* ``none``: no registration: both clouds median-centred in model units, then Hungarian on the
  Euclidean distance.

Accuracy is the paper's definition (``fdnc_jax.metrics``): correct / counted, where counted =
annotated test neurons whose name is also in the template (uncertain names left out by default). The
model sees raw positions only: the anterior direction ``ap_vec`` or aligned coordinates are never
used (there is no pre-alignment option).

Example:
  >>> worms = [fd.load_worm(p) for p in resolve_worm_files("data/wormnd")]  # doctest: +SKIP
  >>> result = evaluate_pairs(model, worms, max_pairs=200)  # doctest: +SKIP
  >>> summarize(result)["fdnc"]["mean"]  # doctest: +SKIP
  >>> write_outputs(result, "eval_out")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from fdnc_jax import matching
from fdnc_jax.cpd import CPDConfig, cpd_match
from fdnc_jax.datasets import lab_of
from fdnc_jax.io import atomic_write
from fdnc_jax.metrics import countable, name_accuracy, topk_name_accuracy
from fdnc_jax.model.fdnc import Model
from fdnc_jax.predict import Prediction, bucket_size, compile_count, predict_batch
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.worm import Worm, as_worm_list, to_model_units

__all__ = [
    "METHODS",
    "EvalResult",
    "calibration_bins",
    "evaluate_pairs",
    "evaluate_semisynthetic",
    "evaluate_tracking",
    "format_table",
    "parse_methods",
    "summarize",
    "wilcoxon_pvalue",
    "write_outputs",
]

METHODS: tuple[str, ...] = ("fdnc", "fdnc+color", "fdnc+mirror", "fdnc+color+mirror", "cpd", "none")
# Methods with probabilities and top-k candidates. "+mirror": the test may also be matched as a
# mirror image (predict orientation="auto+mirror"), for data whose handedness is unknown.
FDNC_METHODS = ("fdnc", "fdnc+color", "fdnc+mirror", "fdnc+color+mirror")
DEFAULT_METHODS = ("fdnc", "fdnc+color", "cpd", "none")  # The paper's comparison.
TOP_K = (3, 5)
CALIBRATION_BINS = 10
CPD_METHOD = "rigid+nonrigid"
SUMMARY_KEYS = ("mean", "median", "n_pairs", "seconds_per_pair")  # Contract of summary.json.
_SIM_CHUNK = 32  # Semi-synthetic pairs simulated and matched per batch.


# ----------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass
class EvalResult:
    """Everything an evaluation measured (host data; ``summarize`` / ``write_outputs`` read it).

    Attributes:
      mode: "pairs", "semisynthetic" or "tracking".
      methods: the methods evaluated, in order.
      records: one dict per evaluated (pair, method): template, test, method, correct, counted,
        accuracy (correct / counted), top3 / top5 (NaN for methods without candidates), seconds
        (wall time of the method on this pair, compilation excluded), n_template, n_test, labs.
      skipped: one dict per (pair, method) that could not be evaluated: template, test, method
        ("all" when the whole pair was skipped), reason.
      neuron_hits: method → neuron name → [correct, counted] over all pairs.
      confidence: method → list of (probability [K], correct [K] bool) chunks, one per pair, of the
        counted test neurons (fdnc methods only), for calibration.
      settings: the evaluation's arguments (JSON-able).
      notes: remarks on the data (e.g. duplicated template names left out of the accuracy).
      example: (template, test, Prediction) of the first fdnc pair, for ``plots.plot_matches``.

    Example:
      >>> from fdnc_jax.datasets import load_demo_pair
      >>> result = evaluate_pairs(None, list(load_demo_pair()), methods=("none",), progress=False)
      >>> result.mode, len(result.records)  # both ordered pairs of the two demo worms
      ('pairs', 2)
    """

    mode: str
    methods: tuple[str, ...]
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    neuron_hits: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
    confidence: dict[str, list[tuple[np.ndarray, np.ndarray]]] = dataclasses.field(
        default_factory=dict
    )
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    example: tuple[Worm, Worm, Prediction] | None = None

    def per_pair(self, key: str = "accuracy") -> dict[str, list[float]]:
        """method → per-pair values of ``key`` ("accuracy", "top3", "top5", "seconds").

        Example:
          >>> from fdnc_jax.datasets import load_demo_pair
          >>> result = evaluate_pairs(None, list(load_demo_pair()), methods=("none",), progress=False)
          >>> len(result.per_pair()["none"])
          2
        """
        out: dict[str, list[float]] = {m: [] for m in self.methods}
        for r in self.records:
            out.setdefault(r["method"], []).append(float(r[key]))
        return out

    def per_neuron(self) -> list[dict[str, Any]]:
        """Rows (method, name, correct, counted, accuracy), sorted by method then name.

        Example:
          >>> result.per_neuron()[0]  # doctest: +SKIP
          {'method': 'fdnc', 'name': 'ADAL', 'correct': 1, 'counted': 2, 'accuracy': 0.5}
        """
        rows = []
        for method in self.methods:
            for name, (c, n) in sorted(self.neuron_hits.get(method, {}).items()):
                rows.append(
                    {
                        "method": method,
                        "name": name,
                        "correct": c,
                        "counted": n,
                        "accuracy": c / n if n else math.nan,
                    }
                )
        return rows

    def calibration(self, num_bins: int = CALIBRATION_BINS) -> dict[str, dict[str, Any]]:
        """method → reliability bins and ECE (``calibration_bins``) of the fdnc methods.

        Example:
          >>> result.calibration()["fdnc"]["ece"]  # doctest: +SKIP
          0.08
        """
        out = {}
        for method, chunks in self.confidence.items():
            if not chunks:
                continue
            conf = np.concatenate([c for c, _ in chunks])
            hit = np.concatenate([h for _, h in chunks])
            out[method] = calibration_bins(conf, hit, num_bins)
        return out

    def wilcoxon(self) -> list[dict[str, Any]]:
        """Wilcoxon signed-rank tests between every two methods on the pairs both evaluated.

        Returns:
          One dict per two methods: method_a, method_b, n_pairs, mean_a, mean_b, p_value.

        Example:
          >>> [(r["method_a"], r["method_b"]) for r in result.wilcoxon()]  # doctest: +SKIP
          [('fdnc', 'cpd'), ('fdnc', 'none'), ('cpd', 'none')]
        """
        acc: dict[str, dict[tuple[str, str], float]] = {m: {} for m in self.methods}
        for r in self.records:
            acc.setdefault(r["method"], {})[(r["template"], r["test"])] = float(r["accuracy"])
        rows = []
        for i, a in enumerate(self.methods):
            for b in self.methods[i + 1 :]:
                common = sorted(set(acc[a]) & set(acc[b]))
                xa = np.array([acc[a][k] for k in common])
                xb = np.array([acc[b][k] for k in common])
                rows.append(
                    {
                        "method_a": a,
                        "method_b": b,
                        "n_pairs": len(common),
                        "mean_a": float(xa.mean()) if common else math.nan,
                        "mean_b": float(xb.mean()) if common else math.nan,
                        "p_value": wilcoxon_pvalue(xa, xb),
                    }
                )
        return rows


def wilcoxon_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (``scipy.stats.wilcoxon``).

    Pairs with a NaN are dropped. All differences zero (identical methods) gives 1.0 — no evidence
    of a difference — instead of scipy's warning; no pairs at all gives NaN.

    Args:
      a: [P] per-pair values of method A (e.g. accuracy).
      b: [P] the same pairs for method B.

    Returns:
      The p-value in [0, 1], or NaN when there is no pair.

    Example:
      >>> wilcoxon_pvalue([0.5, 0.6, 0.7, 0.1], [0.4, 0.5, 0.6, 0.0])
      0.125
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D of the same length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size == 0:
        return math.nan
    if np.all(a - b == 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Few pairs / ties: scipy's normal approx.
        return float(scipy.stats.wilcoxon(a, b).pvalue)


def calibration_bins(
    confidence: Sequence[float], correct: Sequence[bool], num_bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
    """Reliability diagram: equal-width confidence bins, mean confidence vs accuracy per bin.

    Args:
      confidence: [K] predicted probabilities in [0, 1] (0 for a neuron left without a label).
      correct: [K] bool, whether that prediction was right.
      num_bins: number of equal-width bins over [0, 1].

    Returns:
      {"bins": [{"lo", "hi", "count", "confidence", "accuracy"}, ...] (NaN means in empty bins),
      "ece": expected calibration error Σ_b (n_b / K) |accuracy_b − confidence_b|, "n": K}.

    Example:
      >>> c = calibration_bins([0.9, 0.9, 0.2, 0.2], [True, True, False, True], num_bins=2)
      >>> round(c["ece"], 3)
      0.2
    """
    conf = np.clip(np.asarray(confidence, np.float64), 0.0, 1.0)
    hit = np.asarray(correct, bool)
    if conf.shape != hit.shape:
        raise ValueError(f"confidence {conf.shape} and correct {hit.shape} differ in shape")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=False), 0, num_bins - 1)
    bins, ece = [], 0.0
    for b in range(num_bins):
        sel = idx == b
        n = int(sel.sum())
        mc = float(conf[sel].mean()) if n else math.nan
        ma = float(hit[sel].mean()) if n else math.nan
        if n:
            ece += n / conf.size * abs(ma - mc)
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": n,
                "confidence": mc,
                "accuracy": ma,
            }
        )
    return {"bins": bins, "ece": float(ece) if conf.size else math.nan, "n": int(conf.size)}


# ----------------------------------------------------------------------------------------------
# Matching one template against tests, per method.


@dataclasses.dataclass(frozen=True)
class _Match:
    """One method's answer for one test worm."""

    assignment: np.ndarray  # [M] template index or −1.
    seconds: float
    probability: np.ndarray | None = None  # [M]
    candidates: np.ndarray | None = None  # [M, K]
    prediction: Prediction | None = None


def _worm_id(worm: Worm, i: int) -> str:
    if worm.meta.get("worm"):
        return str(worm.meta["worm"])
    if worm.meta.get("file"):
        return Path(str(worm.meta["file"])).stem
    return f"worm{i}"


def _unique_ids(worms: Sequence[Worm]) -> list[str]:
    ids, seen = [], set()
    for i, w in enumerate(worms):
        wid = _worm_id(w, i)
        if wid in seen:
            wid = f"{wid}#{i}"
        seen.add(wid)
        ids.append(wid)
    return ids


def _padded_model_units(worm: Worm) -> tuple[np.ndarray, np.ndarray]:
    """[S, 3] model units padded to the size bucket S, and its [S] mask."""
    xyz, _ = to_model_units(worm)
    size = bucket_size(worm.n, "worm")
    out = np.zeros((size, 3), np.float32)
    out[: worm.n] = xyz
    mask = np.zeros((size,), bool)
    mask[: worm.n] = True
    return out, mask


def _cpd_one(template: Worm, test: Worm, warm: set) -> _Match:
    t_xyz, t_mask = _padded_model_units(template)
    s_xyz, s_mask = _padded_model_units(test)
    run = lambda: cpd_match(t_xyz, t_mask, s_xyz, s_mask, method=CPD_METHOD, cfg=CPDConfig.fdnc())
    shape = (t_xyz.shape[0], s_xyz.shape[0])
    if shape not in warm:  # Compile outside the timed call.
        run()
        warm.add(shape)
    t0 = time.perf_counter()
    assign = run()[: test.n]
    return _Match(assignment=np.asarray(assign, np.int64), seconds=time.perf_counter() - t0)


def _none_one(template: Worm, test: Worm) -> _Match:
    t0 = time.perf_counter()
    t_xyz, _ = to_model_units(template)  # Median-centred, model units: the only "registration".
    s_xyz, _ = to_model_units(test)
    rows, cols = linear_sum_assignment(cdist(s_xyz, t_xyz))
    assign = np.full((test.n,), -1, np.int64)
    assign[rows] = cols
    return _Match(assignment=assign, seconds=time.perf_counter() - t0)


def _unique_template(template: Worm) -> tuple[Worm, list[str]]:
    """The template with names that label several neurons blanked (ambiguous: not scorable)."""
    ambiguous = template.labelled & ~template.uniquely_named
    if not ambiguous.any():
        return template, []
    dup = np.unique(template.names[ambiguous])
    names = np.where(ambiguous, "", template.names)
    with warnings.catch_warnings():  # Worm.replace re-validates: its warnings were already shown.
        warnings.simplefilter("ignore")
        return template.replace(names=names), dup.tolist()


def _color_problem(template: Worm, test: Worm) -> str | None:
    """Why the color term cannot be used on this pair (None when it can)."""
    if not template.has_color:
        return "template has no color"
    if not test.has_color:
        return "test has no color"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            template.color_for_matching("template")
            test.color_for_matching("test")
    except ValueError as e:
        return str(e)
    return None


def _fdnc_timed(
    model: Model, template: Worm, tests: list[Worm], use_color: bool, top_k: int, orientation: str
):
    """predict_batch, timed without compilation (rerun when the call compiled a new bucket)."""
    for _ in range(2):
        before = compile_count(model)
        t0 = time.perf_counter()
        preds = predict_batch(
            model, template, tests, use_color=use_color, top_k=top_k, orientation=orientation
        )
        seconds = time.perf_counter() - t0
        if compile_count(model) == before:
            break
    return preds, seconds / len(tests)


def _fdnc_group(
    model: Model, template: Worm, tests: list[Worm], use_color: bool, orientation: str = "auto"
) -> list[_Match | str]:
    """fDNC on one template and its tests; a failing test yields its error message instead."""
    out: list[_Match | str] = [""] * len(tests)
    todo = list(range(len(tests)))
    if use_color:
        todo = []
        for i, t in enumerate(tests):
            problem = _color_problem(template, t)
            if problem:
                out[i] = problem
            else:
                todo.append(i)
    if not todo:
        return out
    top_k = min(max(TOP_K), template.n)

    def to_match(pred: Prediction, seconds: float) -> _Match:
        return _Match(
            assignment=pred.assignment,
            seconds=seconds,
            probability=pred.probability,
            candidates=pred.candidates,
            prediction=pred,
        )

    try:
        preds, seconds = _fdnc_timed(
            model, template, [tests[i] for i in todo], use_color, top_k, orientation
        )
        for i, p in zip(todo, preds, strict=True):
            out[i] = to_match(p, seconds)
    except (ValueError, TypeError):
        for i in todo:  # Isolate the failing test(s); the others still count.
            try:
                (p,), seconds = _fdnc_timed(
                    model, template, [tests[i]], use_color, top_k, orientation
                )
                out[i] = to_match(p, seconds)
            except (ValueError, TypeError) as e:
                out[i] = str(e)
    return out


def _run_method(
    model: Model | None, method: str, template: Worm, tests: list[Worm], warm: set
) -> list[_Match | str]:
    if method in FDNC_METHODS:
        if model is None:
            raise ValueError(f"method {method!r} needs a model")
        return _fdnc_group(
            model,
            template,
            tests,
            use_color="+color" in method,
            orientation="auto+mirror" if method.endswith("+mirror") else "auto",
        )
    out: list[_Match | str] = []
    for t in tests:
        try:
            out.append(_cpd_one(template, t, warm) if method == "cpd" else _none_one(template, t))
        except ValueError as e:
            out.append(str(e))
    return out


# ----------------------------------------------------------------------------------------------
# Scoring one answer.


def _index_truth(template: Worm, test: Worm) -> np.ndarray:
    """[M] true template index per test neuron for tracking by index (−1 = not counted).

    ``test.meta['template_index']`` when given; else volume neuron i is template neuron i.
    """
    given = test.meta.get("template_index")
    if given is not None:
        truth = np.asarray(given, np.int64)
        if truth.shape != (test.n,):
            raise ValueError(
                f"meta['template_index'] has shape {truth.shape}, expected ({test.n},)"
            )
    else:
        truth = np.arange(test.n, dtype=np.int64)
    return np.where(truth < template.n, truth, -1)


def _score(
    template: Worm, test: Worm, match: _Match, by: str, skip_uncertain: bool
) -> tuple[dict[str, float], np.ndarray, np.ndarray, list[str]]:
    """(metrics, counted [M] bool, hit [M] bool, neuron keys [M]) of one answer."""
    assign = match.assignment
    metrics: dict[str, float] = {}
    if by == "name":
        names = np.append(template.names, "")
        labels = names[np.where(assign >= 0, assign, template.n)]
        correct, counted = name_accuracy(template, test, labels, skip_uncertain)
        ok = countable(template, test, skip_uncertain)
        hit = ok & (labels == test.names)
        keys = test.names.tolist()
        for k in TOP_K:
            if match.candidates is None:
                metrics[f"top{k}"] = math.nan
            else:
                c, n = topk_name_accuracy(template, test, match.candidates, k, skip_uncertain)
                metrics[f"top{k}"] = c / n if n else math.nan
    else:
        truth = _index_truth(template, test)
        ok = truth >= 0
        hit = ok & (assign == truth)
        correct, counted = int(hit.sum()), int(ok.sum())
        keys = [(template.names[t] or f"#{t}") if t >= 0 else "" for t in truth.tolist()]
        for k in TOP_K:
            if match.candidates is None or not counted:
                metrics[f"top{k}"] = math.nan
            else:
                top = np.any(match.candidates[:, :k] == truth[:, None], axis=1) & ok
                metrics[f"top{k}"] = float(top.sum() / counted)
    metrics.update(
        correct=correct, counted=counted, accuracy=correct / counted if counted else math.nan
    )
    return metrics, ok, hit, keys


def _evaluate_groups(
    model: Model | None,
    groups: list[tuple[Worm, str, list[tuple[Worm, str]]]],
    methods: tuple[str, ...],
    mode: str,
    by: str,
    skip_uncertain: bool,
    progress: bool,
    settings: dict[str, Any],
) -> EvalResult:
    """Runs every method on (template, [tests]) groups and scores the answers."""
    from tqdm.auto import tqdm

    result = EvalResult(mode=mode, methods=methods, settings=settings)
    result.neuron_hits = {m: {} for m in methods}
    result.confidence = {m: [] for m in methods if m in FDNC_METHODS}
    warm: set = set()
    total = sum(len(tests) for _, _, tests in groups)
    bar = tqdm(total=total, desc=f"evaluate {mode}", unit="pair", disable=not progress)
    for template, t_id, tests in groups:
        template, dup = _unique_template(template)
        if dup:
            result.notes.append(
                f"template {t_id}: names {dup} label several neurons; left unlabelled (not scored)"
            )
        evaluable = []
        for test, s_id in tests:
            if by == "name" and not countable(template, test, skip_uncertain).any():
                result.skipped.append(
                    {
                        "template": t_id,
                        "test": s_id,
                        "method": "all",
                        "reason": "no shared names: no annotated test name is in the template",
                    }
                )
                bar.update(1)
            elif by == "index" and not (_index_truth(template, test) >= 0).any():
                result.skipped.append(
                    {
                        "template": t_id,
                        "test": s_id,
                        "method": "all",
                        "reason": "no test neuron has a template index",
                    }
                )
                bar.update(1)
            else:
                evaluable.append((test, s_id))
        if not evaluable:
            continue
        test_worms = [t for t, _ in evaluable]
        answers = {m: _run_method(model, m, template, test_worms, warm) for m in methods}
        for j, (test, s_id) in enumerate(evaluable):
            for method in methods:
                ans = answers[method][j]
                if isinstance(ans, str):
                    result.skipped.append(
                        {"template": t_id, "test": s_id, "method": method, "reason": ans}
                    )
                    continue
                metrics, ok, hit, keys = _score(template, test, ans, by, skip_uncertain)
                result.records.append(
                    {
                        "template": t_id,
                        "test": s_id,
                        "method": method,
                        **metrics,
                        "seconds": ans.seconds,
                        "n_template": template.n,
                        "n_test": test.n,
                        "template_lab": lab_of(template),
                        "test_lab": lab_of(test),
                    }
                )
                hits = result.neuron_hits[method]
                for i in np.flatnonzero(ok):
                    entry = hits.setdefault(keys[i], [0, 0])
                    entry[0] += int(hit[i])
                    entry[1] += 1
                if ans.probability is not None:
                    result.confidence[method].append((ans.probability[ok], hit[ok]))
                    if result.example is None and ans.prediction is not None:
                        result.example = (template, test, ans.prediction)
            bar.update(1)
    bar.close()
    return result


def parse_methods(
    methods: Sequence[str] | str, allowed: Sequence[str] = METHODS
) -> tuple[str, ...]:
    """Validated, de-duplicated method names from a sequence or a comma-separated string.

    Example:
      >>> parse_methods("fdnc, cpd,fdnc")
      ('fdnc', 'cpd')
    """
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = tuple(dict.fromkeys(methods))
    if not methods:
        raise ValueError(f"no method given; choose from {list(allowed)}")
    bad = [m for m in methods if m not in allowed]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {list(allowed)}")
    return methods


# ----------------------------------------------------------------------------------------------
# Public evaluations.


def evaluate_pairs(
    model: Model | None,
    worms: Sequence[Worm],
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    template: Worm | str | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    skip_uncertain: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Across-animal accuracy on every ordered pair of labelled worms (or one fixed template).

    Args:
      model: the matcher (``load_pretrained`` / ``load_checkpoint``); may be None when only "cpd"
        and "none" are evaluated.
      worms: annotated worms (positions µm, names; color for "fdnc+color"). Worms without any name
        are ignored.
      methods: subset of ``METHODS``.
      template: a fixed template (a Worm, or the id — ``meta['worm']`` or file stem — of one of
        ``worms``) matched against every other labelled worm; None = all ordered pairs.
      max_pairs: evaluate at most this many pairs, a deterministic random subset (``seed``).
      seed: seed of that subset.
      skip_uncertain: leave out names marked uncertain ('?') from the accuracy.
      progress: show a tqdm progress bar.

    Returns:
      The EvalResult (pairs that cannot be evaluated are in ``result.skipped`` with the reason).

    Raises:
      ValueError: no labelled worm, fewer than two worms to pair, an unknown method or template id.

    Example:
      >>> from fdnc_jax.datasets import load_demo_pair
      >>> r = evaluate_pairs(None, list(load_demo_pair()), methods=("none",), progress=False)
      >>> sorted({(x["template"], x["test"]) for x in r.records})
      [('NP_11_YAaLR', 'NP_20_YAaLR'), ('NP_20_YAaLR', 'NP_11_YAaLR')]
    """
    methods = parse_methods(methods, METHODS)
    worms = as_worm_list(worms)
    ids = _unique_ids(worms)
    labelled = [i for i, w in enumerate(worms) if w.labelled.any()]
    if not labelled:
        raise ValueError(
            f"none of the {len(worms)} worms has neuron names: accuracy needs annotated worms "
            "(names '' are unlabelled)"
        )
    if template is None:
        pairs = [(i, j) for i in labelled for j in labelled if i != j]
        t_worms = {i: (worms[i], ids[i]) for i in labelled}
    else:
        if isinstance(template, str):
            if template not in ids:
                raise ValueError(f"template {template!r} is not one of the worms {ids[:10]}...")
            t_index = ids.index(template)
            t_worm, t_id = worms[t_index], template
        elif isinstance(template, Worm):
            t_index = next((i for i, w in enumerate(worms) if w is template), -1)
            t_worm, t_id = template, ids[t_index] if t_index >= 0 else _worm_id(template, -1)
        else:
            raise TypeError(
                f"template must be a Worm, a worm id or None, got {type(template).__name__}"
            )
        if not t_worm.labelled.any():
            raise ValueError(f"template {t_id!r} has no neuron names: nothing to score against")
        t_worms = {-1: (t_worm, t_id)}
        pairs = [(-1, j) for j in labelled if j != t_index and ids[j] != t_id]
    if not pairs:
        raise ValueError(
            f"only {len(labelled)} labelled worm(s): need a template and at least one other "
            "labelled worm to form a pair"
        )
    if max_pairs is not None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be ≥ 1, got {max_pairs}")
        if max_pairs < len(pairs):
            keep = jax.random.permutation(jax.random.key(seed), len(pairs))[:max_pairs]
            pairs = [pairs[k] for k in sorted(np.asarray(keep).tolist())]
    groups: dict[int, list[tuple[Worm, str]]] = {}
    for i, j in pairs:
        groups.setdefault(i, []).append((worms[j], ids[j]))
    settings = {
        "mode": "pairs",
        "methods": list(methods),
        "template": None if template is None else t_worms[-1][1],
        "max_pairs": max_pairs,
        "seed": seed,
        "skip_uncertain": skip_uncertain,
        "n_worms": len(worms),
        "n_labelled": len(labelled),
        "n_pairs": len(pairs),
        "cpd": f"{CPD_METHOD} {dataclasses.asdict(CPDConfig.fdnc())} (model units)",
    }
    return _evaluate_groups(
        model,
        [(t_worms[i][0], t_worms[i][1], tests) for i, tests in groups.items()],
        methods,
        "pairs",
        "name",
        skip_uncertain,
        progress,
        settings,
    )


def evaluate_tracking(
    model: Model | None,
    template: Worm,
    volumes: Sequence[Worm],
    by: str = "name",
    *,
    methods: Sequence[str] = ("fdnc", "cpd", "none"),
    skip_uncertain: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Within-animal tracking: one template volume matched to many volumes of the same animal.

    Args:
      model: the matcher (None for "cpd"/"none" only).
      template: the reference volume (µm).
      volumes: the other volumes (µm); the template itself is left out if it is among them.
      by: ground truth; "name": the volumes' annotated names (paper accuracy); "index": volume
        neuron i is template neuron ``volume.meta['template_index'][i]`` (default i; −1 = none),
        for recordings whose rows are tracked identities.
      methods: subset of ``METHODS``.
      skip_uncertain: leave out uncertain names (by="name").
      progress: show a progress bar.

    Returns:
      The EvalResult (mode "tracking"; one record per volume and method).

    Example:
      >>> volumes = [load_worm(p) for p in sorted(Path("rec").glob("vol_*.npz"))]  # doctest: +SKIP
      >>> result = evaluate_tracking(load_pretrained(), volumes[0], volumes[1:])  # doctest: +SKIP
    """
    if by not in ("name", "index"):
        raise ValueError(f"by must be 'name' or 'index', got {by!r}")
    methods = parse_methods(methods, METHODS)
    if not isinstance(template, Worm):
        raise TypeError(f"template must be a Worm, got {type(template).__name__}")
    if by == "name" and not template.labelled.any():
        raise ValueError("template has no neuron names: use by='index' or a labelled template")
    vols = [v for v in volumes if v is not template]
    if not vols:
        raise ValueError("no volumes to track (besides the template)")
    ids = _unique_ids(vols)
    t_id = _worm_id(template, -1)
    if t_id in ids:
        t_id = f"{t_id} (template)"
    settings = {
        "mode": "tracking",
        "methods": list(methods),
        "by": by,
        "template": t_id,
        "n_volumes": len(vols),
        "skip_uncertain": skip_uncertain,
    }
    return _evaluate_groups(
        model,
        [(template, t_id, list(zip(vols, ids, strict=True)))],
        methods,
        "tracking",
        by,
        skip_uncertain,
        progress,
        settings,
    )


@functools.lru_cache(maxsize=4)
def _sim_forward(model: Model) -> Callable:
    from fdnc_jax.train.step import forward  # Local: train imports the optimizer stack.

    def run(params, batch):
        lp = forward(model, params, batch, deterministic=True)  # [B, M, N + 1]
        scores = jnp.where(batch.template_mask[:, None, :], lp[..., :-1], -jnp.inf)
        return scores  # [B, M, N]

    return jax.jit(run)


def _timed(fn: Callable, warm: bool) -> tuple[Any, float]:
    """(fn(), seconds); a first call compiles untimed when ``warm`` is False."""
    if not warm:
        jax.block_until_ready(fn())
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def evaluate_semisynthetic(
    model: Model | None,
    worms: Sequence[Worm],
    num_pairs: int = 2000,
    sim_cfg: SimConfig = SimConfig(),
    seed: int = 0,
    methods: Sequence[str] = ("fdnc", "cpd", "none"),
    *,
    progress: bool = True,
) -> EvalResult:
    """Accuracy on held-out semi-synthetic pairs simulated from ``worms`` (known correspondence).

    Accuracy per pair = correct / test points with a template partner (target ≥ 0); outliers and
    neurons dropped from the template are not counted. fDNC assigns with the Hungarian algorithm on
    its log-probabilities (``matching.hungarian_assignment_batch``), "fdnc+color" adds the color
    term of the simulated colors, "cpd" and "none" are as in ``evaluate_pairs``.

    Args:
      model: the matcher (None for "cpd"/"none" only).
      worms: source worms (µm), held out from training.
      num_pairs: number of pairs.
      sim_cfg: the simulator settings.
      seed: PRNG seed (``jax.random.key``).
      methods: subset of ``METHODS``.
      progress: show a progress bar.

    Returns:
      The EvalResult (mode "semisynthetic"; pairs named ``sim<k>``).

    Example:
      >>> from fdnc_jax.datasets import load_demo_pair
      >>> r = evaluate_semisynthetic(None, list(load_demo_pair()), num_pairs=4, methods=("none",),
      ...                            progress=False)
      >>> len(r.records)
      4
    """
    from tqdm.auto import tqdm

    from fdnc_jax.sim.pairs import make_pair_batch, make_source_bank

    methods = parse_methods(methods, METHODS)
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be ≥ 1, got {num_pairs}")
    if model is None and any(m in FDNC_METHODS for m in methods):
        raise ValueError("the fdnc methods need a model")
    use_color = "fdnc+color" in methods or (model is not None and model.uses_color)
    bank = make_source_bank(list(worms), use_color=use_color)
    result = EvalResult(
        mode="semisynthetic",
        methods=methods,
        settings={
            "mode": "semisynthetic",
            "methods": list(methods),
            "num_pairs": num_pairs,
            "seed": seed,
            "n_sources": bank.num_sources,
            "sim_cfg": sim_cfg.to_dict(),
        },
    )
    result.neuron_hits = {m: {} for m in methods}
    result.confidence = {m: [] for m in methods if m in FDNC_METHODS}
    key = jax.random.key(seed)
    warm: set[str] = set()
    bar = tqdm(total=num_pairs, desc="evaluate semisynthetic", unit="pair", disable=not progress)
    done = 0
    chunk = min(_SIM_CHUNK, num_pairs)
    for chunk_index in range(math.ceil(num_pairs / chunk)):
        batch = make_pair_batch(jax.random.fold_in(key, chunk_index), bank, chunk, sim_cfg)
        take = min(chunk, num_pairs - done)
        target = np.asarray(batch.target)[:take]  # [b, M]
        valid = np.asarray(batch.test_mask)[:take]
        counted = valid & (target >= 0)
        for method in methods:
            extra: dict[str, np.ndarray] = {}
            if method in FDNC_METHODS:
                run_fdnc = functools.partial(_sim_forward(model), model.params, batch)
                scores, sec = _timed(run_fdnc, "f" in warm)
                scores = np.asarray(scores, np.float64)[:take]
                if method == "fdnc+color":
                    tc, sc = np.asarray(batch.template_color), np.asarray(batch.test_color)
                    scores = scores + np.stack(
                        [
                            matching.DEFAULT_COLOR_WEIGHT
                            * matching.color_log_likelihood(tc[b], sc[b])
                            for b in range(take)
                        ]
                    )
                t0 = time.perf_counter()
                assign = np.asarray(matching.hungarian_assignment_batch(scores, valid))
                sec += time.perf_counter() - t0
                warm.add("f")
                probs = matching.row_softmax(scores / model.temperature)  # [b, M, N], as predict
                order = np.argsort(-scores, axis=-1)[..., : max(TOP_K)]
                extra = {"probs": probs, "order": order}
            elif method == "cpd":
                run_cpd = functools.partial(
                    cpd_match,
                    batch.template_xyz,
                    batch.template_mask,
                    batch.test_xyz,
                    batch.test_mask,
                    method=CPD_METHOD,
                    cfg=CPDConfig.fdnc(),
                )
                assign, sec = _timed(run_cpd, "c" in warm)
                assign = np.asarray(assign)[:take]
                warm.add("c")
            else:
                t0 = time.perf_counter()
                assign = _sim_none(batch, take)
                sec = time.perf_counter() - t0
            hit = counted & (assign == target)
            for b in range(take):
                n = int(counted[b].sum())
                if n == 0:
                    result.skipped.append(
                        {
                            "template": f"sim{done + b}",
                            "test": f"sim{done + b}",
                            "method": method,
                            "reason": "no counted test point",
                        }
                    )
                    continue
                rec = {
                    "template": f"sim{done + b}",
                    "test": f"sim{done + b}",
                    "method": method,
                    "correct": int(hit[b].sum()),
                    "counted": n,
                    "accuracy": float(hit[b].sum() / n),
                }
                for k in TOP_K:
                    rec[f"top{k}"] = (
                        float(
                            np.sum(
                                np.any(extra["order"][b, :, :k] == target[b, :, None], -1)
                                & counted[b]
                            )
                            / n
                        )
                        if extra
                        else math.nan
                    )
                rec.update(
                    seconds=sec / take,
                    n_template=int(batch.template_mask[b].sum()),
                    n_test=int(valid[b].sum()),
                    template_lab="sim",
                    test_lab="sim",
                )
                result.records.append(rec)
                if extra:
                    a = np.maximum(assign[b], 0)
                    p = np.where(assign[b] >= 0, extra["probs"][b, np.arange(a.size), a], 0.0)
                    result.confidence[method].append((p[counted[b]], hit[b][counted[b]]))
        done += take
        bar.update(take)
    bar.close()
    return result


def _sim_none(batch, take: int) -> np.ndarray:
    """[b, M] Hungarian on Euclidean distance after median-centring each synthetic cloud."""
    t_xyz, t_mask = np.asarray(batch.template_xyz), np.asarray(batch.template_mask)
    s_xyz, s_mask = np.asarray(batch.test_xyz), np.asarray(batch.test_mask)
    out = np.full(s_mask.shape, -1, np.int64)[:take]
    for b in range(take):
        ti, si = np.flatnonzero(t_mask[b]), np.flatnonzero(s_mask[b])
        tx = t_xyz[b, ti] - np.median(t_xyz[b, ti], axis=0)
        sx = s_xyz[b, si] - np.median(s_xyz[b, si], axis=0)
        r, c = linear_sum_assignment(cdist(sx, tx))
        out[b, si[r]] = ti[c]
    return out


# ----------------------------------------------------------------------------------------------
# Summaries and files.


def summarize(result: EvalResult) -> dict[str, dict[str, Any]]:
    """Per-method summary: ``{method: {"mean", "median", "n_pairs", "seconds_per_pair", ...}}``.

    The four named keys are an output contract (``summary.json``): mean and median of the per-pair
    top-1 accuracy (fraction 0–1; NaN when no pair was evaluated), number of evaluated pairs, mean
    wall time per pair in seconds (compilation excluded). Extra keys: "iqr" (75th − 25th
    percentile), "q25", "q75", "pooled" (Σ correct / Σ counted), "n_skipped", and for fdnc methods
    "top3", "top5" (mean per-pair top-k accuracy) and "ece" (expected calibration error of the
    match ``probability``).

    Example:
      >>> from fdnc_jax.datasets import load_demo_pair
      >>> result = evaluate_pairs(None, list(load_demo_pair()), methods=("none",), progress=False)
      >>> summarize(result)["none"]["n_pairs"]
      2
    """
    calib = result.calibration()
    skipped: dict[str, int] = {}
    for s in result.skipped:
        for m in result.methods if s["method"] == "all" else [s["method"]]:
            skipped[m] = skipped.get(m, 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for method in result.methods:
        recs = [r for r in result.records if r["method"] == method]
        acc = np.array([r["accuracy"] for r in recs], np.float64)
        n = len(recs)
        q25, q75 = np.percentile(acc, [25, 75]) if n else (math.nan, math.nan)
        entry: dict[str, Any] = {
            "mean": float(acc.mean()) if n else math.nan,
            "median": float(np.median(acc)) if n else math.nan,
            "n_pairs": int(n),
            "seconds_per_pair": float(np.mean([r["seconds"] for r in recs])) if n else math.nan,
            "iqr": float(q75 - q25),
            "q25": float(q25),
            "q75": float(q75),
            "pooled": (
                float(sum(r["correct"] for r in recs) / max(1, sum(r["counted"] for r in recs)))
                if n
                else math.nan
            ),
            "n_skipped": int(skipped.get(method, 0)),
        }
        if method in FDNC_METHODS:
            for k in TOP_K:
                vals = np.array([r[f"top{k}"] for r in recs], np.float64)
                entry[f"top{k}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
            entry["ece"] = float(calib[method]["ece"]) if method in calib else math.nan
        out[method] = entry
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a text table: method, mean, median, IQR, top-1/3/5 (%), n_pairs, s/pair.

    Example:
      >>> from fdnc_jax.datasets import load_demo_pair
      >>> result = evaluate_pairs(None, list(load_demo_pair()), methods=("none",), progress=False)
      >>> print(format_table(summarize(result)))  # doctest: +ELLIPSIS
      method ...
    """

    def pct(v):
        return "-" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"

    head = (
        f"{'method':<11} {'mean%':>6} {'median%':>8} {'IQR%':>6} {'top1%':>6} {'top3%':>6} "
        f"{'top5%':>6} {'n_pairs':>7} {'s/pair':>8}"
    )
    lines = [head, "-" * len(head)]
    for m, s in summary.items():
        sec = s["seconds_per_pair"]
        lines.append(
            f"{m:<11} {pct(s['mean']):>6} {pct(s['median']):>8} {pct(s.get('iqr')):>6} "
            f"{pct(s['mean']):>6} {pct(s.get('top3')):>6} {pct(s.get('top5')):>6} "
            f"{s['n_pairs']:>7} {('-' if not np.isfinite(sec) else f'{sec:.4f}'):>8}"
        )
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    def write(f):
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    atomic_write(path, write, binary=False)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), binary=False)


def write_outputs(result: EvalResult, out_dir: str | Path, plots: bool = True) -> dict[str, Any]:
    """Writes the evaluation's files into ``out_dir`` (created) and returns the summary.

    Files: ``summary.json`` (``summarize``), ``pairs.csv`` (one row per pair × method),
    ``per_neuron.csv``, ``wilcoxon.csv`` (every two methods), ``calibration.json`` (fdnc methods),
    ``skipped.csv`` (pairs not evaluated, with the reason), ``settings.json``, and with ``plots``:
    ``accuracy.png`` (box + strip per method), ``calibration.png``, ``matches_example.png``.

    Example:
      >>> write_outputs(result, "eval_out/")["fdnc"]["mean"]  # doctest: +SKIP
      0.21
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    _write_json(out / "summary.json", summary)
    _write_csv(
        out / "pairs.csv",
        result.records,
        [
            "template",
            "test",
            "method",
            "correct",
            "counted",
            "accuracy",
            "top3",
            "top5",
            "seconds",
            "n_template",
            "n_test",
            "template_lab",
            "test_lab",
        ],
    )
    _write_csv(
        out / "per_neuron.csv",
        result.per_neuron(),
        ["method", "name", "correct", "counted", "accuracy"],
    )
    _write_csv(
        out / "wilcoxon.csv",
        result.wilcoxon(),
        ["method_a", "method_b", "n_pairs", "mean_a", "mean_b", "p_value"],
    )
    calib = result.calibration()
    _write_json(out / "calibration.json", calib)
    _write_csv(out / "skipped.csv", result.skipped, ["template", "test", "method", "reason"])
    _write_json(out / "settings.json", {**result.settings, "notes": result.notes})
    if plots:
        from fdnc_jax import plots as P

        P.plot_accuracy_box(
            result.per_pair("accuracy"),
            out / "accuracy.png",
            title=f"top-1 accuracy per pair ({result.mode})",
        )
        if calib:
            P.plot_calibration(calib, out / "calibration.png")
        if result.example is not None:
            P.plot_matches(*result.example, path=out / "matches_example.png")
    return summary
