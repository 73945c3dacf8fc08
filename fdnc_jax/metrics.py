"""Accuracy of predicted names against human annotation (the paper's definition).

Accuracy = correct / counted, where counted = labelled test neurons whose name also exists in the
template (and that are not marked uncertain); a test neuron is correct when its predicted label equals
its annotated name. Neurons without a name, names absent from the template and uncertain names are
not counted — a prediction there can be neither right nor wrong.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from fdnc_jax.worm import Worm


def uncertain_mask(worm: Worm) -> np.ndarray:
    """[N] bool, names the annotator marked uncertain ('?'), from ``meta['uncertain']``.

    Args:
      worm: the Worm (N neurons).

    Returns:
      [N] bool, all False when the worm has no ``meta['uncertain']``.

    Raises:
      ValueError: ``meta['uncertain']`` does not have one entry per neuron.

    Example:
      >>> xyz = np.random.default_rng(0).uniform(0, 100, (3, 3))
      >>> uncertain_mask(Worm(xyz_um=xyz, meta={"uncertain": [False, True, False]})).tolist()
      [False, True, False]
    """
    u = worm.meta.get("uncertain")
    if u is None:
        return np.zeros((worm.n,), bool)
    u = np.asarray(u, bool)
    if u.shape != (worm.n,):
        raise ValueError(f"meta['uncertain'] has shape {u.shape}, expected ({worm.n},)")
    return u


def countable(
    template: Worm | Collection[str], test: Worm, skip_uncertain: bool = True
) -> np.ndarray:
    """[M] bool, test neurons that count for accuracy.

    Args:
      template: the template Worm, or the names a matcher can assign (e.g. the union of an
        ensemble's templates).
      test: the annotated test worm.
      skip_uncertain: leave out names marked uncertain in the template (Worm only) or the test.

    Returns:
      [M] bool, one entry per test neuron.

    Example:
      >>> xyz = np.random.default_rng(0).uniform(0, 100, (3, 3))
      >>> test = Worm(xyz_um=xyz, names=["AVAL", "AVAR", ""])
      >>> countable({"AVAL", "RMEL"}, test).tolist()
      [True, False, False]
    """
    if isinstance(template, Worm):
        names = set(template.names[template.labelled].tolist())
        if skip_uncertain:
            names -= set(template.names[uncertain_mask(template)].tolist())
    else:
        names = set(template) - {""}
    ok = test.labelled & np.isin(test.names, list(names))
    if skip_uncertain:
        ok &= ~uncertain_mask(test)
    return ok


def name_accuracy(
    template: Worm | Collection[str],
    test: Worm,
    predicted_labels: Sequence[str],
    skip_uncertain: bool = True,
) -> tuple[int, int]:
    """(correct, counted) for one test worm.

    Args:
      template: the labelled template (or the set of names the matcher can assign).
      test: the annotated test worm (names = ground truth).
      predicted_labels: [M] predicted names ('' = no label, counted as wrong).
      skip_uncertain: leave out names marked uncertain in either worm.

    Returns:
      (correct, counted) as ints; accuracy is ``correct / counted``.

    Raises:
      ValueError: ``predicted_labels`` does not have one entry per test neuron.

    Example:
      >>> xyz = np.random.default_rng(0).uniform(0, 100, (3, 3))
      >>> template = Worm(xyz_um=xyz, names=["AVAL", "AVAR", "RMEL"])
      >>> test = Worm(xyz_um=xyz, names=["AVAL", "AVAR", ""])
      >>> name_accuracy(template, test, ["AVAL", "RMEL", "AVAR"])
      (1, 2)
    """
    pred = np.asarray(predicted_labels, dtype=str)
    if pred.shape != (test.n,):
        raise ValueError(f"predicted_labels has shape {pred.shape}, expected ({test.n},)")
    ok = countable(template, test, skip_uncertain)
    return int(np.sum(ok & (pred == test.names))), int(np.sum(ok))


def topk_name_accuracy(
    template: Worm, test: Worm, candidates: np.ndarray, k: int, skip_uncertain: bool = True
) -> tuple[int, int]:
    """(correct, counted) where correct = the true name is among the first k candidates ([M, K]).

    Args:
      template: the labelled template (N neurons).
      test: the annotated test worm (M neurons).
      candidates: [M, K] int template indices per test neuron, best first (−1 = none).
      k: how many of the candidates to look at (k ≤ K).
      skip_uncertain: leave out names marked uncertain in either worm.

    Returns:
      (correct, counted) as ints.

    Example:
      >>> xyz = np.random.default_rng(0).uniform(0, 100, (3, 3))
      >>> template = Worm(xyz_um=xyz, names=["AVAL", "AVAR", "RMEL"])
      >>> test = Worm(xyz_um=xyz, names=["AVAL", "AVAR", "RMEL"])
      >>> topk_name_accuracy(template, test, np.array([[0, 1], [0, 1], [0, 1]]), k=2)
      (2, 3)
    """
    names = np.append(template.names, "")
    cand = names[np.where(candidates[:, :k] >= 0, candidates[:, :k], template.n)]  # [M, k]
    ok = countable(template, test, skip_uncertain)
    hit = np.any(cand == test.names[:, None], axis=1)
    return int(np.sum(ok & hit)), int(np.sum(ok))
