"""How should ``predict`` choose among the 4 orientation hypotheses? A study on real pairs.

For canonical-pose models ``predict(orientation="auto")`` matches the test under the 4 proper 180°
flips of its principal axes and keeps the flip whose one-to-one assignment has the highest mean
network log-probability ("forward"). This script scores every flip of every pair several ways and
prints the accuracy each criterion would give, next to the oracle (best flip per pair) and the
identity (no search):

* forward: mean log-prob of the Hungarian assignment, template → test (the current criterion);
* fwd+rev: plus the same for the reverse direction (the test as template, the template flipped);
* cycle: cycle consistency — the fraction of test neurons whose forward assignment is assigned back
  to them by the reverse assignment (ties: fwd+rev).

Pair sets: every ordered pair of the held-out NP lab (90), and 120 random pairs across the other
three labs (EY, SF, SK1; same handedness; animals seen in training). Positions only, no color term.

Run:  FDNC_SHARED=/work/shared python benchmarks/orientation_study.py --weights=default,color
The last line is ``orientation_study <weights>/<set>: forward=<%> cycle=<%> ...`` for the last set.
"""

from __future__ import annotations

import argparse
import importlib
import os
import warnings
from pathlib import Path

import numpy as np

import fdnc_jax as fd
from fdnc_jax import matching
from fdnc_jax.atlas import anatomical_handedness
from fdnc_jax.datasets import lab_of, resolve_worm_files
from fdnc_jax.evaluate import _unique_template
from fdnc_jax.metrics import name_accuracy

predict_mod = importlib.import_module("fdnc_jax.predict")


def hypothesis_log_probs(model: fd.Model, template: fd.Worm, test: fd.Worm) -> list[np.ndarray]:
    """[M, N + 1] network log-probs of ``test`` under each orientation hypothesis."""
    signs = predict_mod.orientation_hypotheses(model, "auto")
    found = predict_mod._hypothesis_log_probs(model, template, [test], signs)
    return [found[0, h] for h in range(len(signs))]


def accuracy(template: fd.Worm, test: fd.Worm, assignment: np.ndarray) -> float:
    """``metrics.name_accuracy`` of an assignment (template index per test neuron, −1: none)."""
    correct, counted = name_accuracy(
        template, test, predict_mod._labels_of(template.names, assignment)
    )
    return correct / counted


def criteria(model: fd.Model, template: fd.Worm, test: fd.Worm) -> dict[str, np.ndarray]:
    """Per hypothesis [4]: accuracy and the criteria (forward, fwd+rev, cycle)."""
    fwd = hypothesis_log_probs(model, template, test)
    rev = hypothesis_log_probs(
        model, test, template
    )  # flipping the template = the same relative pose
    out = {k: [] for k in ("accuracy", "forward", "fwd+rev", "cycle")}
    for f, r in zip(fwd, rev, strict=True):
        a_f, a_r = matching.match(f).assignment, matching.match(r).assignment
        score_f, score_r = predict_mod._orientation_score(f), predict_mod._orientation_score(r)
        back = np.flatnonzero(a_f >= 0)
        out["accuracy"].append(accuracy(template, test, a_f))
        out["forward"].append(score_f)
        out["fwd+rev"].append(score_f + score_r)
        cycle = float(np.mean(a_r[a_f[back]] == back)) if back.size else 0.0
        out["cycle"].append(cycle + 1e-6 * (score_f + score_r))
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("FDNC_SHARED", "../shared"))
    parser.add_argument("--data", default=str(shared / "data" / "wormnd"))
    parser.add_argument("--weights", default="default,color")
    parser.add_argument("--cross_pairs", type=int, default=120)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worms = [_unique_template(fd.load_worm(p))[0] for p in resolve_worm_files(args.data)]
    np_lab = [w for w in worms if lab_of(w) == "NP"]
    others = [w for w in worms if lab_of(w) != "NP"]
    rng = np.random.default_rng(0)
    cross = []
    while len(cross) < args.cross_pairs:
        t, s = others[rng.integers(len(others))], others[rng.integers(len(others))]
        if lab_of(t) != lab_of(s) and anatomical_handedness(t) == anatomical_handedness(s):
            cross.append((t, s))
    sets = {"NP": [(t, s) for t in np_lab for s in np_lab if s is not t], "cross-lab": cross}
    line = ""
    for name in args.weights.split(","):
        model = fd.load_pretrained(name)
        for set_name, pairs in sets.items():
            rows = [criteria(model, t, s) for t, s in pairs]
            acc = np.stack([r["accuracy"] for r in rows])  # [P, 4]
            idx = np.arange(len(rows))
            result = {
                c: 100 * acc[idx, np.stack([r[c] for r in rows]).argmax(1)].mean()
                for c in ("forward", "fwd+rev", "cycle")
            }
            result["identity"] = 100 * acc[:, 0].mean()
            result["oracle"] = 100 * acc.max(1).mean()
            line = f"orientation_study {name}/{set_name}: " + " ".join(
                f"{k}={v:.1f}" for k, v in result.items()
            )
            print(f"{line}  ({len(rows)} pairs)", flush=True)
    print(line)


if __name__ == "__main__":
    main()
