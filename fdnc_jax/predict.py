"""Inference: match the neurons of test worms to a template worm.

Letters: B batch of test worms, N template neurons, M test neurons, K top-k candidates.

The forward pass is jitted once per size bucket: N and M are padded up to the next size in
``SIZE_BUCKETS`` (masks keep padding inert) and ``predict_batch`` pads the batch to a fixed chunk, so a
recording of thousands of volumes compiles a handful of times, never once per volume. The one-to-one
assignment (Hungarian), the optional color term, top-k and thresholds run on the host
(``fdnc_jax.matching``).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdnc_jax import matching
from fdnc_jax.io import atomic_write
from fdnc_jax.model.fdnc import Model
from fdnc_jax.worm import Worm, to_model_units

SIZE_BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024)
BATCH_CHUNK = 32  # predict_batch pads the batch dimension to this many volumes (fewer for small B).


def bucket_size(n: int, what: str = "worm") -> int:
    """The smallest bucket ≥ n; ValueError when n exceeds the largest (no silent crop)."""
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
    """

    assignment: np.ndarray
    labels: np.ndarray
    probability: np.ndarray
    candidates: np.ndarray
    candidate_probs: np.ndarray
    outlier_probability: np.ndarray
    template_names: np.ndarray

    @property
    def candidate_labels(self) -> np.ndarray:
        """[M, K] str, names of the candidates."""
        names = np.append(self.template_names, "")
        return names[np.where(self.candidates >= 0, self.candidates, len(self.template_names))]

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per test neuron: index, assignment, label, probability, outlier probability,
        and the top-k candidate names/probabilities."""
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
        """Writes ``to_records()`` as CSV (atomic)."""
        records = self.to_records()

        def write(f):
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)

        atomic_write(path, write, binary=False)

    def to_dataframe(self):
        """``to_records()`` as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("to_dataframe needs pandas: pip install pandas") from e
        return pd.DataFrame.from_records(self.to_records())


@functools.lru_cache(maxsize=8)
def _compiled_forward(model: Model):
    """A jitted forward for ``model``; jax caches one executable per input shape (bucket)."""

    def forward(params, t_xyz, t_mask, s_xyz, s_mask, t_color, s_color):
        return model.module(params)(t_xyz, t_mask, s_xyz, s_mask, t_color, s_color)

    return jax.jit(forward)


def compile_count(model: Model) -> int:
    """How many executables the forward of ``model`` has compiled (one per bucket/batch shape)."""
    return _compiled_forward(model)._cache_size()


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size,) + x.shape[1:], np.float32)
    out[: len(x)] = x
    return out


def _model_inputs(worm: Worm, size: int, n_color: int) -> tuple[np.ndarray, ...]:
    xyz, _ = to_model_units(worm)
    mask = np.zeros((size,), bool)
    mask[: worm.n] = True
    color = None
    if n_color:
        color = _pad(matching.normalize_color(worm.color_for_matching()).astype(np.float32), size)
    return _pad(xyz, size), mask, color


def _check_inputs(model: Model, template: Worm, tests: Sequence[Worm], use_color, top_k, min_probability):
    if not isinstance(model, Model):
        raise TypeError(f"model must be a fdnc_jax Model (load_pretrained/load_checkpoint), got {type(model).__name__}")
    if not isinstance(template, Worm):
        raise TypeError(f"template must be a Worm, got {type(template).__name__}")
    for i, t in enumerate(tests):
        if not isinstance(t, Worm):
            raise TypeError(f"test worm {i} must be a Worm, got {type(t).__name__}")
    template.check_template()
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k <= 0 or top_k > template.n:
        raise ValueError(f"top_k={top_k} must be between 1 and the template's {template.n} neurons")
    if not 0.0 <= float(min_probability) <= 1.0:
        raise ValueError(f"min_probability={min_probability} must be in [0, 1]")
    both_color = template.has_color and all(t.has_color for t in tests)
    if use_color is None:
        use_color = both_color
    if use_color:
        if not template.has_color:
            raise ValueError("use_color=True but the template has no color")
        for i, t in enumerate(tests):
            if not t.has_color:
                raise ValueError(f"use_color=True but test worm {i} has no color")
            if t.color.shape[1] != template.color.shape[1]:
                raise ValueError(
                    f"color channel counts differ: template has {template.color.shape[1]}, test worm "
                    f"{i} has {t.color.shape[1]}"
                )
    if model.uses_color and not both_color:
        raise ValueError("this model takes color as input: template and test worms need color")
    return bool(use_color)


def _log_probs(model: Model, template: Worm, tests: Sequence[Worm]) -> list[np.ndarray]:
    """Network log-probs [M_i, N + 1] per test worm (unpadded), batched per bucket."""
    n_color = model.config.color_features
    n_bucket = bucket_size(template.n, "template")
    t_xyz, t_mask, t_color = _model_inputs(template, n_bucket, n_color)
    forward = _compiled_forward(model)
    out: list[np.ndarray | None] = [None] * len(tests)
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tests):
        groups.setdefault(bucket_size(t.n, f"test worm {i}"), []).append(i)
    chunk = BATCH_CHUNK if len(tests) > 1 else 1
    for m_bucket, idx in groups.items():
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            inputs = [_model_inputs(tests[i], m_bucket, n_color) for i in part]
            pad = chunk - len(part)
            s_xyz = np.stack([x for x, _, _ in inputs] + [np.zeros_like(inputs[0][0])] * pad)
            s_mask = np.stack([m for _, m, _ in inputs] + [np.zeros_like(inputs[0][1])] * pad)
            s_color = (
                np.stack([c for _, _, c in inputs] + [np.zeros_like(inputs[0][2])] * pad)
                if n_color
                else None
            )
            b = chunk
            lp = forward(
                model.params,
                jnp.broadcast_to(t_xyz, (b,) + t_xyz.shape),
                jnp.broadcast_to(t_mask, (b,) + t_mask.shape),
                s_xyz,
                s_mask,
                None if t_color is None else jnp.broadcast_to(t_color, (b,) + t_color.shape),
                s_color,
            )
            lp = np.asarray(lp)  # [b, M_bucket, N_bucket + 1]
            for j, i in enumerate(part):
                m = tests[i].n
                out[i] = np.concatenate([lp[j, :m, : template.n], lp[j, :m, -1:]], axis=1)
    return out  # type: ignore[return-value]


def _prediction(
    log_probs: np.ndarray, template: Worm, test: Worm, use_color: bool, color_weight: float,
    top_k: int, min_probability: float,
) -> Prediction:
    kwargs = {}
    if use_color:
        kwargs = {
            "template_color": template.color_for_matching("template"),
            "test_color": test.color_for_matching("test"),
            "color_weight": color_weight,
        }
    m = matching.match(log_probs, top_k=top_k, min_probability=min_probability, **kwargs)
    names = np.append(template.names, "")
    labels = names[np.where(m.assignment >= 0, m.assignment, template.n)]
    return Prediction(
        assignment=m.assignment.astype(np.int64),
        labels=labels,
        probability=m.probability,
        candidates=m.candidates,
        candidate_probs=m.candidate_probs,
        outlier_probability=m.outlier_probability,
        template_names=template.names,
    )


def predict_batch(
    model: Model,
    template: Worm,
    tests: Sequence[Worm],
    *,
    use_color: bool | None = None,
    color_weight: float = matching.DEFAULT_COLOR_WEIGHT,
    top_k: int = 5,
    min_probability: float = 0.0,
) -> list[Prediction]:
    """Matches many test worms (e.g. every volume of a recording) to one template.

    Args:
      model: from ``load_pretrained()`` or ``load_checkpoint(workdir)``.
      template: the reference Worm (names optional: without names, use ``assignment`` alone).
      tests: the Worms to match.
      use_color: add the NeuroPAL color term (None: when template and all tests have color).
      color_weight: weight of the color log-likelihood (60 as the original).
      top_k: number of candidates per test neuron (1 ≤ top_k ≤ template neurons).
      min_probability: assignments below this probability become −1 ("no label").

    Returns:
      One Prediction per test worm, in order.

    Example:
      >>> preds = predict_batch(load_pretrained(), template, volumes)  # doctest: +SKIP
    """
    tests = list(tests)
    if not tests:
        raise ValueError("tests is empty: pass at least one test Worm")
    use_color = _check_inputs(model, template, tests, use_color, top_k, min_probability)
    all_log_probs = _log_probs(model, template, tests)
    return [
        _prediction(lp, template, t, use_color, color_weight, top_k, min_probability)
        for lp, t in zip(all_log_probs, tests, strict=True)
    ]


def predict(
    model: Model,
    template: Worm,
    test: Worm,
    *,
    use_color: bool | None = None,
    color_weight: float = matching.DEFAULT_COLOR_WEIGHT,
    top_k: int = 5,
    min_probability: float = 0.0,
) -> Prediction:
    """Matches the neurons of ``test`` to ``template``; see ``predict_batch`` for the arguments.

    Example:
      >>> import fdnc_jax as fd
      >>> template, test = fd.load_demo_pair()
      >>> pred = fd.predict(fd.load_pretrained(), template, test)
      >>> pred.labels[:3]  # doctest: +SKIP
    """
    if not isinstance(test, Worm):
        raise TypeError(f"test must be a Worm, got {type(test).__name__}")
    return predict_batch(
        model, template, [test], use_color=use_color, color_weight=color_weight, top_k=top_k,
        min_probability=min_probability,
    )[0]
