"""Two-way vs forward scores: does matching on both directions name more neurons?

``predict``'s default scores (``two_way=True``, ``fdnc_jax.matching.two_way_log_probs``) are the mean
of the forward log-probs (test → template) and those of the same pair matched the other way, for the
kept orientation; ``two_way=False`` matches on the forward ones, as the original. This script runs
``predict`` both ways on

* real pairs: up to ``--pairs`` random ordered pairs of each WormND lab's animals (seed 0, as
  ``orientation_study.py``; NP is held out from every bundled model's training), position only and
  with the color term (weight 60) — mean name accuracy;
* semi-synthetic pairs (``--sim_pairs``, of the held-out ``--sim_lab``'s animals, default simulator,
  seed 123): two deformed copies of one animal with a known correspondence, as in tracking — mean
  fraction of the test's neurons with a template counterpart assigned to it.

Run:  FDNC_SHARED=/work/shared python benchmarks/two_way_study.py --weights=default,color,small
Prints one Markdown table; the last line is
``two_way_study <weights>: forward=<%> two_way=<%>`` (the mean of the last model's real-pair rows).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
from orientation_study import accuracy, lab_pairs, load_worms, pair_study_parser

import fdnc_jax as fd
from fdnc_jax.datasets import lab_of
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.sim.pairs import make_pair_batch, make_source_bank
from fdnc_jax.worm import from_model_units


def real_rows(model: fd.Model, pairs, use_color: bool) -> tuple[float, float]:
    """Mean name accuracy (forward, two-way) over ``pairs`` of (template, test) Worms."""
    out = {False: [], True: []}
    for template, test in pairs:
        for two_way in out:
            pred = fd.predict(model, template, test, use_color=use_color, two_way=two_way)
            out[two_way].append(accuracy(template, test, pred.assignment))
    return float(np.mean(out[False])), float(np.mean(out[True]))


def semisynthetic_pairs(worms: list[fd.Worm], count: int) -> list[tuple[fd.Worm, fd.Worm, np.ndarray]]:
    """``count`` (template, test, truth [M]) pairs simulated from ``worms`` (µm; truth: the template
    index of each test neuron, −1 for none)."""
    b = jax.device_get(make_pair_batch(jax.random.key(123), make_source_bank(worms), count, SimConfig()))
    pairs = []
    for i in range(count):
        t_ok, s_ok = b.template_mask[i], b.test_mask[i]
        index = np.full(t_ok.shape, -1)
        index[t_ok] = np.arange(t_ok.sum())  # template slot → index among its valid points
        target = b.target[i][s_ok]
        truth = np.where(target >= 0, index[np.maximum(target, 0)], -1)
        template = fd.Worm(xyz_um=from_model_units(b.template_xyz[i][t_ok], np.zeros(3)))
        test = fd.Worm(xyz_um=from_model_units(b.test_xyz[i][s_ok], np.zeros(3)))
        pairs.append((template, test, truth))
    return pairs


def sim_row(model: fd.Model, pairs) -> tuple[float, float]:
    """Mean fraction of the test neurons with a counterpart that are assigned to it (forward,
    two-way)."""
    out = {False: [], True: []}
    for template, test, truth in pairs:
        for two_way in out:
            a = fd.predict(model, template, test, use_color=False, two_way=two_way).assignment
            out[two_way].append(np.mean(a[truth >= 0] == truth[truth >= 0]))
    return float(np.mean(out[False])), float(np.mean(out[True]))


def main() -> None:
    parser = pair_study_parser(__doc__, weights="default,color,small")
    parser.add_argument("--sim_pairs", type=int, default=96)
    parser.add_argument("--sim_lab", default="NP")
    args = parser.parse_args()
    worms = load_worms(args.data)
    sim = semisynthetic_pairs([w for w in worms if lab_of(w) == args.sim_lab], args.sim_pairs)
    print("| weights | pairs | mode | n | forward | two-way | change |")
    print("|---|---|---|---|---|---|---|")
    line = ""
    for name in args.weights.split(","):
        model = fd.load_pretrained(name)
        real = []
        rows = []
        for lab in args.labs.split(","):
            pairs = lab_pairs(worms, lab, args.pairs)
            for mode, use_color in (("pos", False), ("+color", True)):
                if use_color and model.config.color_features:
                    continue  # color is the network's input: the term would count it twice
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    f, t = real_rows(model, pairs, use_color)
                real.append((f, t))
                rows.append((f"{lab} real", mode, len(pairs), f, t))
        if not model.config.color_features:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows.append((f"{args.sim_lab} semi-synthetic", "pos", len(sim), *sim_row(model, sim)))
        for what, mode, n, f, t in rows:
            print(f"| {name} | {what} | {mode} | {n} | {100 * f:.1f} | {100 * t:.1f} | "
                  f"{100 * (t - f):+.1f} |", flush=True)
        f, t = np.mean(real, axis=0)
        line = f"two_way_study {name}: forward={100 * f:.1f} two_way={100 * t:.1f}"
    print(line)


if __name__ == "__main__":
    main()
