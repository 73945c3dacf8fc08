"""The example pair shipped with the original fDNC code: template.data → test.data (48 shared names).

Loads the original pickles with ``mask_keep`` and ``side`` applied as the original did
(``load_fdnc_pickle``), then runs every method of ``fdnc_jax.evaluate`` on the one ordered pair.
Published: 38/48 (79.2 %) for fDNC with color and the published weights; original CPD 58.3 %;
no registration 35.4 %.

Run:
  FDNC_SHARED=/work/shared python benchmarks/example_pair.py [--weights color | --checkpoint runs/small]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import fdnc_jax as fd
from fdnc_jax.evaluate import evaluate_pairs, format_table, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default=None, help="training workdir or weights .npz (default: bundled)"
    )
    parser.add_argument("--weights", default="default", help="bundled weights: default, color, small")
    args = parser.parse_args()
    root = Path(os.environ.get("FDNC_SHARED", "../shared")) / "data" / "fdnc_example"
    template = fd.load_fdnc_pickle(root / "template.data", trust=True)
    test = fd.load_fdnc_pickle(root / "test.data", trust=True)
    model = (
        fd.load_checkpoint(args.checkpoint) if args.checkpoint else fd.load_pretrained(args.weights)
    )
    shared = (set(template.names) - {""}) & (set(test.names) - {""})
    print(f"example pair: template {template.n} neurons, test {test.n}, {len(shared)} shared names")
    result = evaluate_pairs(
        model,
        [template, test],
        template=template,
        methods=("fdnc", "fdnc+color", "fdnc+mirror", "cpd", "none"),
        progress=False,
    )
    summary = summarize(result)
    print(format_table(summary))
    for method, row in summary.items():
        print(f"example_pair {method} correct={round(row['mean'] * len(shared))}/{len(shared)}")


if __name__ == "__main__":
    main()
