"""Ablation on the held-out validation lab: which ingredient helps on *real* animals.

For each model (the bundled weights, and any training workdirs given), on the real animals of the
validation lab (never a training source):
  * single template: every ordered pair of the lab's animals (the paper's across-animal test);
  * ensemble: each animal named by voting over all the lab's other animals (``predict`` with a list);
  * atlas of the other labs: built from the *other* labs only, mirrored to the lab's handedness
    convention when its names show the other one (``atlas.anatomical_handedness``);
  * atlas of the lab's other animals: leave-one-animal-out, like the ensemble but one mean shape;
each position only and with the color term. CPD and no registration on the same pairs for reference.

Run:
  FDNC_SHARED=/work/shared python benchmarks/ablation.py --val_lab=NP --checkpoints=runs/small_real

Prints one Markdown table; the last line is ``ablation <model>=<single position mean> ...``.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np

import fdnc_jax as fd
from fdnc_jax.atlas import anatomical_handedness, build_atlas, in_convention
from fdnc_jax.datasets import lab_of, resolve_worm_files
from fdnc_jax.evaluate import _unique_template, evaluate_pairs, summarize
from fdnc_jax.metrics import name_accuracy


def _load(data: str) -> list[fd.Worm]:
    worms = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in resolve_worm_files(data):
            w = fd.load_worm(p)
            worms.append(w.replace(meta={**w.meta, "worm": p.stem}))
    return worms


def _mean_accuracy(model, templates, tests, use_color: bool) -> float:
    """Mean over tests of the accuracy with ``templates[i]`` (a Worm or a list) naming tests[i]."""
    acc = []
    for template, test in zip(templates, tests, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pred = fd.predict(model, template, test, use_color=use_color)
        # An ensemble can name the union of its templates' names: the prediction's template_names.
        names = set(pred.template_names) if isinstance(template, list) else template
        c, n = name_accuracy(names, test, pred.labels)
        if n:
            acc.append(c / n)
    return float(np.mean(acc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("FDNC_SHARED", "../shared"))
    parser.add_argument("--data", default=str(shared / "data" / "wormnd"))
    parser.add_argument("--val_lab", default="NP")
    parser.add_argument(
        "--checkpoints", default="", help="comma-separated training workdirs or weights .npz files"
    )
    args = parser.parse_args()
    worms = _load(args.data)
    val = [_unique_template(w)[0] for w in worms if lab_of(w) == args.val_lab]
    others = [w for w in worms if lab_of(w) != args.val_lab]
    atlas = build_atlas(others, ids=[w.meta["worm"] for w in others]).to_worm()
    atlas = in_convention(atlas, int(np.sign(sum(anatomical_handedness(w) for w in val))))
    own_atlases = [
        build_atlas([w for w in val if w is not t], ids=[w.meta["worm"] for w in val if w is not t])
        .to_worm()
        for t in val
    ]
    models = {"bundled": fd.load_pretrained()}
    for c in filter(None, args.checkpoints.split(",")):
        models[Path(c).stem if c.endswith(".npz") else Path(c).name] = fd.load_checkpoint(c)
    print(f"validation lab {args.val_lab}: {len(val)} animals, {len(val) * (len(val) - 1)} pairs; "
          f"atlas from {len(others)} animals of the other labs")
    print("| model | template | position | + color |")
    print("|---|---|---|---|")
    last = []
    baselines = None
    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            methods = ("fdnc", "fdnc+color") + (("cpd", "none") if baselines is None else ())
            s = summarize(evaluate_pairs(model, val, methods=methods, progress=False))
        baselines = baselines or {m: s[m]["mean"] for m in ("cpd", "none")}
        rows = {"single animal (all pairs)": (s["fdnc"]["mean"], s["fdnc+color"]["mean"])}
        rest = [[w for w in val if w is not t] for t in val]
        rows["ensemble of the lab's other animals"] = tuple(
            _mean_accuracy(model, rest, val, c) for c in (False, True)
        )
        rows["atlas of the other labs"] = tuple(
            _mean_accuracy(model, [atlas] * len(val), val, c) for c in (False, True)
        )
        rows["atlas of the lab's other animals"] = tuple(
            _mean_accuracy(model, own_atlases, val, c) for c in (False, True)
        )
        for kind, (pos, col) in rows.items():
            print(f"| {name} | {kind} | {100 * pos:.1f} % | {100 * col:.1f} % |")
        last.append(f"{name}={100 * rows['single animal (all pairs)'][0]:.1f}")
    print(f"| CPD (rigid → non-rigid) | single animal | {100 * baselines['cpd']:.1f} % | |")
    print(f"| none (centring) | single animal | {100 * baselines['none']:.1f} % | |")
    print("ablation " + " ".join(last))


if __name__ == "__main__":
    main()
