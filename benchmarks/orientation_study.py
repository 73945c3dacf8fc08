"""How should ``predict`` choose among the 4 orientation hypotheses? A study on real pairs.

For canonical-pose models ``predict(orientation="auto")`` matches the test under the 4 proper 180°
flips of its principal axes and keeps one. This script scores every flip of every pair several ways
and prints the accuracy each criterion would give, next to the oracle (best flip per pair) and the
identity (no search):

* forward: mean score of the one-to-one (Hungarian) assignment, template → test;
* before: cycle consistency of the network's own assignments (the fraction of test neurons whose
  forward assignment the reverse direction — the test as template, the template flipped — assigns
  back to them; ties: mean score both ways), without the color term: ``predict``'s criterion until
  2026-11-26;
* cycle: the same with the color term in both directions' scores when the prediction uses it;
* affine: the median residual (µm) of the forward assignment after a robust affine fit
  (``fdnc_jax.geometry``; smaller is better);
* current: ``fdnc_jax.orientation.orientation_key``, cycle − affine residual / 6 µm (what ``predict`` uses).

Each criterion is scored for the position-only prediction (``pos``) and with the color term after
the network (``+color``; the assignments the criterion looks at then include it too, except for
``before``). Pair sets: per WormND lab, up to ``--pairs`` random ordered pairs of its animals (seed
0; NP is held out from every bundled model's training, the other labs were training sources).

Run:  FDNC_SHARED=/work/shared python benchmarks/orientation_study.py --weights=small,default,color
Prints one Markdown table; the last line is
``orientation_study <weights>/<lab>: before=<%> current=<%> oracle=<%>`` (``+color``, last row).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import random
import warnings
from pathlib import Path

import numpy as np

import fdnc_jax as fd
from fdnc_jax import orientation
from fdnc_jax.datasets import lab_of, resolve_worm_files
from fdnc_jax.evaluate import _unique_template
from fdnc_jax.metrics import name_accuracy

predict_mod = importlib.import_module("fdnc_jax.predict")
CRITERIA = ("identity", "forward", "before", "cycle", "affine", "current", "oracle")


def accuracy(template: fd.Worm, test: fd.Worm, assignment: np.ndarray) -> float:
    """``metrics.name_accuracy`` of an assignment (template index per test neuron, −1: none)."""
    correct, counted = name_accuracy(
        template, test, predict_mod._labels_of(template.names, assignment)
    )
    return correct / counted


def pair_criteria(model: fd.Model, template: fd.Worm, test: fd.Worm) -> dict:
    """Per mode ('pos', '+color') and criterion: the accuracy of the flip that criterion keeps."""
    signs = orientation.orientation_hypotheses(model, "auto")
    fwd = predict_mod._hypothesis_log_probs(model, template, [test], signs)
    rev = predict_mod._reverse_log_probs(model, template, [test], signs)
    color = predict_mod._color_term(template, test, True, fd.matching.DEFAULT_COLOR_WEIGHT)
    out = {}
    for mode, c in (("pos", None), ("+color", color)):
        acc, keys = [], {k: [] for k in CRITERIA[1:-1]}
        for h in range(len(signs)):
            f, r = fwd[0, h], rev[0, h]
            fc = orientation.with_color(f, c)
            rc = orientation.with_color(r, None if c is None else c.T)
            a_f, a_r = orientation.one_to_one(fc), orientation.one_to_one(rc)
            acc.append(accuracy(template, test, a_f))
            mean = orientation.mean_assigned(fc, a_f) + orientation.mean_assigned(rc, a_r)
            residual = orientation.assignment_residual(a_f, test.xyz_um, template.xyz_um)
            keys["forward"].append(orientation.mean_assigned(fc, a_f))
            a_f0, a_r0 = orientation.one_to_one(f), orientation.one_to_one(r)  # network only
            mean0 = orientation.mean_assigned(f, a_f0) + orientation.mean_assigned(r, a_r0)
            keys["before"].append(orientation.cycle_key(a_f0, a_r0, mean0, 0.0))
            keys["cycle"].append(orientation.cycle_key(a_f, a_r, mean, 0.0))
            keys["affine"].append(-residual)
            keys["current"].append(
                orientation.orientation_key(f, r, test.xyz_um, template.xyz_um, c)
            )
        out[mode] = {"identity": acc[0], "oracle": max(acc)}
        for k, v in keys.items():
            out[mode][k] = acc[max(range(len(signs)), key=lambda h, v=v: v[h])]
    return out


def load_worms(data: str) -> list[fd.Worm]:
    """Every worm file of ``data`` (folder or glob), names made unique per animal, its file stem
    in ``meta["worm"]`` (``lab_of`` reads the lab from it)."""
    worms = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in resolve_worm_files(data):
            w = fd.load_worm(p)
            worms.append(_unique_template(w.replace(meta={**w.meta, "worm": p.stem}))[0])
    return worms


def lab_pairs(worms: list[fd.Worm], lab: str, count: int) -> list[tuple[fd.Worm, fd.Worm]]:
    """Up to ``count`` random ordered (template, test) pairs of ``lab``'s animals (seed 0)."""
    animals = [w for w in worms if lab_of(w) == lab]
    pairs = list(itertools.permutations(range(len(animals)), 2))
    random.Random(0).shuffle(pairs)
    return [(animals[a], animals[b]) for a, b in pairs[:count]]


def pair_study_parser(doc: str, weights: str) -> argparse.ArgumentParser:
    """The flags of the within-lab pair studies (this one, ``color_weight_study.py``): ``--data``
    (WormND folder or glob), ``--weights`` (bundled models, default ``weights``), ``--labs`` and
    ``--pairs`` (ordered pairs per lab, ``lab_pairs``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    shared = Path(os.environ.get("FDNC_SHARED", "../shared"))
    parser.add_argument("--data", default=str(shared / "data" / "wormnd"))
    parser.add_argument("--weights", default=weights)
    parser.add_argument("--labs", default="EY,NP,SF,SK1")
    parser.add_argument("--pairs", type=int, default=90, help="ordered pairs per lab (at most)")
    return parser


def main() -> None:
    parser = pair_study_parser(__doc__, weights="small,default,color")
    args = parser.parse_args()
    worms = load_worms(args.data)
    print("| weights | lab | mode | pairs | " + " | ".join(CRITERIA) + " |")
    print("|---" * (len(CRITERIA) + 4) + "|")
    line = ""
    for name in args.weights.split(","):
        model = fd.load_pretrained(name)
        for lab in args.labs.split(","):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = [pair_criteria(model, t, u) for t, u in lab_pairs(worms, lab, args.pairs)]
            for mode in ("pos", "+color"):
                mean = {k: 100 * np.mean([r[mode][k] for r in rows]) for k in CRITERIA}
                cells = " | ".join(f"{mean[k]:.1f}" for k in CRITERIA)
                print(f"| {name} | {lab} | {mode} | {len(rows)} | {cells} |", flush=True)
                line = (
                    f"orientation_study {name}/{lab}: before={mean['before']:.1f} "
                    f"current={mean['current']:.1f} oracle={mean['oracle']:.1f}"
                )
    print(line)


if __name__ == "__main__":
    main()
