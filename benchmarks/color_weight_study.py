"""How much should the color term weigh? A sweep of ``color_weight`` on real animals.

``predict(use_color=True)`` adds ``color_weight`` × the original's color term (negative KL divergence of
per-neuron normalised R, G, B; the reference's weight is 60, ``matching.DEFAULT_COLOR_WEIGHT``) to the
network's log-probabilities before the one-to-one assignment (the orientation search sees the same
scores). The reference's weight was set for the original network; this script measures, per bundled
model and WormND lab, the mean name accuracy of ``fd.predict(model, template, test, use_color=True,
color_weight=w)`` end to end over up to ``--pairs`` random ordered pairs of the lab's animals (seed 0,
the pairs of ``orientation_study.py``). With ``--template=atlas``, each animal of the lab is matched
to the atlas of the other labs' animals instead (``template_eval.held_out_atlas``, in the lab's
handedness convention; as ``fdnc-evaluate --mode=templates``). NP is held out from every bundled
model's training.

Run:  FDNC_SHARED=/work/shared python benchmarks/color_weight_study.py --weights=default,small
      [--template=atlas]
Prints one Markdown table (``none``: position only, no color term); the last line is
``color_weight_study <weights>: best=<w> mean=<%> at_60=<%>`` for the last model (mean over labs).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

import fdnc_jax as fd
from fdnc_jax.atlas import anatomical_handedness
from fdnc_jax.datasets import lab_of
from fdnc_jax.template_eval import held_out_atlas

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orientation_study import accuracy, lab_pairs, load_worms, pair_study_parser  # noqa: E402


def main() -> None:
    parser = pair_study_parser(__doc__, weights="default,small")
    parser.add_argument("--color_weights", default="5,10,15,20,30,45,60,90")
    parser.add_argument(
        "--template", choices=("pairs", "atlas"), default="pairs", help="what each test is matched to"
    )
    args = parser.parse_args()
    color_weights = [float(w) for w in args.color_weights.split(",")]
    columns = ["none"] + [f"{w:g}" for w in color_weights]
    worms = load_worms(args.data)
    if args.template == "atlas":
        matched = _atlas_pairs(worms)
    else:
        matched = lambda lab: lab_pairs(worms, lab, args.pairs)  # noqa: E731
    print("| weights | lab | pairs | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 3) + "|")
    line = ""
    for name in args.weights.split(","):
        model = fd.load_pretrained(name)
        per_lab = []
        for lab in args.labs.split(","):
            scores: dict[str, list[float]] = {c: [] for c in columns}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for template, test in matched(lab):
                    pred = fd.predict(model, template, test, use_color=False)
                    scores["none"].append(accuracy(template, test, pred.assignment))
                    for w, c in zip(color_weights, columns[1:], strict=True):
                        pred = fd.predict(model, template, test, use_color=True, color_weight=w)
                        scores[c].append(accuracy(template, test, pred.assignment))
            mean = {c: 100 * float(np.mean(v)) for c, v in scores.items()}
            per_lab.append(mean)
            cells = " | ".join(f"{mean[c]:.1f}" for c in columns)
            print(f"| {name} | {lab} | {len(scores['none'])} | {cells} |", flush=True)
        overall = {c: float(np.mean([m[c] for m in per_lab])) for c in columns}
        cells = " | ".join(f"{overall[c]:.1f}" for c in columns)
        print(f"| {name} | mean | | {cells} |", flush=True)
        best = max(columns[1:], key=lambda c: overall[c])
        at_60 = overall.get("60", float("nan"))
        line = f"color_weight_study {name}: best={best} mean={overall[best]:.1f} at_60={at_60:.1f}"
    print(line)


def _atlas_pairs(worms: list[fd.Worm]):
    """lab → [(the atlas of the other labs, each animal of the lab with color)]."""
    labs = [lab_of(w) for w in worms]
    hand = [anatomical_handedness(w) for w in worms]

    def pairs(lab: str) -> list[tuple[fd.Worm, fd.Worm]]:
        atlas, _ = held_out_atlas(worms, labs, lab, hand)
        return [(atlas, w) for w, la in zip(worms, labs, strict=True) if la == lab and w.has_color]

    return pairs


if __name__ == "__main__":
    main()
