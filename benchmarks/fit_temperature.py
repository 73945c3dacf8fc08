"""Fits the probability temperature of a model on real across-animal pairs of one lab.

``predict`` reports ``softmax(scores / T)`` (``Model.temperature``); the assignment does not depend
on T. For every ordered pair of the lab's animals (4-way orientation search, positions only,
two-way scores as ``predict``'s default, ``--one_way`` the forward ones alone; Hungarian
assignment), this collects the assigned probability and whether the name was right, then
prints the expected calibration error (``evaluate.calibration_bins``, 10 bins) for a grid of T:
on all pairs, and cross-validated over animals — T chosen on the pairs among half of the animals,
ECE measured on the pairs among the other half (``--folds`` random halvings, both directions).

Run (the bundled models' temperatures were fitted so, on the held-out NP lab):
  FDNC_SHARED=/work/shared python benchmarks/fit_temperature.py --weights=default --lab=NP
The last line is ``fit_temperature weights=<name> lab=<lab> T=<float> ece_raw=<float> ece=<float>``.
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
from fdnc_jax.datasets import lab_of, resolve_worm_files
from fdnc_jax.evaluate import _unique_template, calibration_bins
from fdnc_jax.metrics import countable

predict_mod = importlib.import_module("fdnc_jax.predict")
GRID = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


def pair_records(model: fd.Model, worms: list[fd.Worm], two_way: bool = True) -> list[tuple]:
    """(template index, test index, scores [M, N], assignment [M], correct [M], counted [M])."""
    signs = predict_mod.orientation_hypotheses(model, "auto")
    records = []
    for ti, template in enumerate(worms):
        tests = [(si, w) for si, w in enumerate(worms) if si != ti]
        log_probs, _ = predict_mod._log_probs(
            model, template, [w for _, w in tests], signs, two_way=two_way
        )
        for (si, test), lp in zip(tests, log_probs, strict=True):
            a = matching.match(lp).assignment
            counted = countable(template, test)
            correct = (a >= 0) & (template.names[np.maximum(a, 0)] == test.names)
            records.append((ti, si, lp[:, :-1], a, correct, counted))
    return records


def ece(records: list[tuple], temperature: float) -> float:
    """Expected calibration error of the assigned probabilities at ``temperature``."""
    conf, hit = [], []
    for _, _, scores, a, correct, counted in records:
        probs = matching.row_softmax(scores / temperature)
        p = np.where(a >= 0, probs[np.arange(len(a)), np.maximum(a, 0)], 0.0)
        conf.extend(p[counted])
        hit.extend(correct[counted])
    return calibration_bins(conf, hit)["ece"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("FDNC_SHARED", "../shared"))
    parser.add_argument("--data", default=str(shared / "data" / "wormnd"))
    parser.add_argument("--lab", default="NP")
    parser.add_argument("--weights", default="default", help="bundled name or weights .npz")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument(
        "--one_way", action="store_true", help="the forward scores alone (predict two_way=False)"
    )
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worms = [_unique_template(fd.load_worm(p))[0] for p in resolve_worm_files(args.data)]
    worms = [w for w in worms if lab_of(w) == args.lab]
    if len(worms) < 4:
        raise SystemExit(f"lab {args.lab!r} has {len(worms)} animals in {args.data}; need >= 4")
    if args.weights.endswith(".npz"):
        model = fd.load_checkpoint(args.weights)
    else:
        model = fd.load_pretrained(args.weights)
    records = pair_records(model.with_temperature(1.0), worms, two_way=not args.one_way)
    scores = "forward" if args.one_way else "two-way"
    print(f"{args.weights}: {len(records)} ordered pairs of {len(worms)} {args.lab} animals, "
          f"{scores} scores; shipped T={model.temperature:g}: ECE {ece(records, model.temperature):.3f}")
    print("ECE by T, all pairs: " + ", ".join(f"{t:g}: {ece(records, t):.3f}" for t in GRID))
    rng = np.random.default_rng(0)
    for _ in range(args.folds):
        perm = rng.permutation(len(worms))
        halves = set(perm[: len(worms) // 2].tolist()), set(perm[len(worms) // 2 :].tolist())
        for fit, held in (halves, halves[::-1]):
            on = lambda s: [r for r in records if r[0] in s and r[1] in s]  # noqa: E731
            best = min(GRID, key=lambda t: ece(on(fit), t))
            print(
                f"  fold: T={best:g} chosen on {len(fit)} animals; ECE on the other "
                f"{len(held)}: {ece(on(held), 1.0):.3f} raw -> {ece(on(held), best):.3f}"
            )
    best = min(GRID, key=lambda t: ece(records, t))
    print(
        f"fit_temperature weights={args.weights} lab={args.lab} T={best:g} "
        f"ece_raw={ece(records, 1.0):.4f} ece={ece(records, best):.4f}"
    )


if __name__ == "__main__":
    main()
