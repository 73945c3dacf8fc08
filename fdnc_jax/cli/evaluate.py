"""fdnc-evaluate: accuracy of fDNC and baselines (CPD, no registration) on labelled worms.

Examples:
  fdnc-evaluate --mode=pairs --data=data/wormnd --methods=fdnc,cpd,none --max_pairs=200 --out=eval/
  fdnc-evaluate --mode=pairs --data='data/wormnd/EY_*.npz' \
      --template=data/wormnd/EY_20190924_01.npz --methods=fdnc,fdnc+color --out=eval_ey/
  fdnc-evaluate --mode=semisynthetic --data=heldout/ --num_pairs=2000 --out=eval_sim/
  fdnc-evaluate --mode=tracking --data='recording/vol_*.npz' --template=recording/vol_0000.npz \
      --tracking_by=index --out=eval_track/
  fdnc-evaluate --mode=tracking --recording=annotated_recording.csv --reference_volume=0 --out=eval_track/
  fdnc-evaluate --mode=templates --data=data/wormnd --ensemble_size=5 --out=eval_templates/

Writes OUT/summary.json, pairs.csv, per_neuron.csv, wilcoxon.csv, calibration.json, skipped.csv,
plots, and prints a table. Intentionally kept short: all logic is in fdnc_jax.evaluate.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from absl import flags

from fdnc_jax.cli._common import (
    MATMUL_DTYPE_CHOICES,
    MATMUL_DTYPE_HELP,
    recording_volume,
    run_main,
)

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "mode",
    "pairs",
    ["pairs", "semisynthetic", "tracking", "templates"],
    "pairs: across-animal accuracy on every ordered pair of labelled worms (or --template vs all); "
    "semisynthetic: simulated pairs from the --data worms with known correspondence; tracking: "
    "--template volume vs every other volume of one animal; templates: leave-one-lab-out, an atlas "
    "built from the other labs vs each of their animals as template vs an ensemble of "
    "--ensemble_size of them, position only and with color (labs from meta['lab'] or the file "
    "name prefix).",
)
flags.DEFINE_string(
    "data",
    None,
    "Worm files: a folder, a glob or a comma-separated list of .npz/.csv files "
    "(positions in µm, names for accuracy).",
)
flags.DEFINE_string(
    "recording",
    None,
    "tracking mode: a recording file (.csv/.npz with a volume column, fdnc_jax.load_recording) "
    "whose volumes are tracked, instead of --data.",
)
flags.DEFINE_bool(
    "skip_invalid_volumes",
    False,
    "tracking mode with --recording: leave out (with a warning) volumes that are not valid "
    "worms, e.g. fewer than 3 neurons; default: an error naming the volume.",
)
flags.DEFINE_integer(
    "reference_volume",
    None,
    "tracking mode with --recording: the number of the volume every other volume is matched to "
    "(default: the first volume; or give --template).",
)
flags.DEFINE_string(
    "template",
    None,
    "Template worm file (.npz/.csv, µm). pairs: match only this template against "
    "all --data worms; tracking: the reference volume (default: the first --data file).",
)
flags.DEFINE_list(
    "methods",
    None,
    "Comma-separated methods among fdnc, fdnc+color, cpd, none (default: pairs "
    "fdnc,fdnc+color,cpd,none; semisynthetic and tracking fdnc,cpd,none).",
)
flags.DEFINE_integer(
    "max_pairs",
    None,
    "pairs mode: evaluate at most this many (template, test) pairs, a "
    "deterministic random subset chosen by --seed (count of pairs; default: all).",
)
flags.DEFINE_integer("num_pairs", 2000, "semisynthetic mode: number of simulated pairs (count).")
flags.DEFINE_string(
    "checkpoint",
    None,
    "Training workdir (fdnc-train --workdir) or weights .npz to load the model from; default: the "
    "bundled weights named by --weights.",
)
flags.DEFINE_string(
    "weights", "default", "Name of the bundled weights when --checkpoint is not given."
)
flags.DEFINE_enum("matmul_dtype", "float32", MATMUL_DTYPE_CHOICES, MATMUL_DTYPE_HELP)
flags.DEFINE_string("out", None, "Output folder (created) for summary.json, CSVs and PNG plots.")
flags.DEFINE_integer("seed", 0, "Seed (integer) of the pair subset and of the simulated pairs.")
flags.DEFINE_bool(
    "skip_uncertain",
    True,
    "Leave names marked uncertain ('?') out of the accuracy (true/false).",
)
flags.DEFINE_enum(
    "tracking_by",
    "name",
    ["name", "index"],
    "tracking mode ground truth: annotated names, or "
    "row index (volume neuron i = template neuron i).",
)
flags.DEFINE_integer(
    "ensemble_size", 5, "templates mode: animals voting in the ensemble template (count; 0 = none)."
)
flags.DEFINE_integer(
    "max_templates",
    None,
    "templates mode: at most this many single-animal templates per held-out "
    "lab, a random subset chosen by --seed (count; default: all).",
)
flags.DEFINE_bool(
    "match_handedness",
    True,
    "templates mode: mirror templates whose names show the other "
    "handedness than the held-out lab's convention (the majority of its animals).",
)
flags.DEFINE_bool("plots", True, "Write PNG plots (accuracy box plot, calibration, example match).")
flags.DEFINE_bool("progress", True, "Show progress bars.")

_DEFAULT_METHODS = {
    "pairs": ("fdnc", "fdnc+color", "cpd", "none"),
    "semisynthetic": ("fdnc", "cpd", "none"),
    "tracking": ("fdnc", "cpd", "none"),
    "templates": ("fdnc",),
}


class _Error(Exception):
    """A user error: printed without traceback, exit code 2."""


def _load_model(methods):
    import fdnc_jax as fd

    if not any(m.startswith("fdnc") for m in methods):
        return None
    if FLAGS.checkpoint:
        return fd.load_checkpoint(FLAGS.checkpoint).with_matmul_dtype(FLAGS.matmul_dtype)
    try:
        return fd.load_pretrained(FLAGS.weights).with_matmul_dtype(FLAGS.matmul_dtype)
    except ValueError as e:
        raise _Error(
            f"cannot load the bundled weights {FLAGS.weights!r} ({e}); pass --checkpoint=WORKDIR "
            "(a fdnc-train --workdir) to evaluate your own model"
        ) from e


def _named(worm, stem: str):
    """The worm with ``meta['worm'] = stem`` (its id in the tables)."""
    if worm.meta.get("worm") == stem:
        return worm
    with warnings.catch_warnings():  # Already warned when loading.
        warnings.simplefilter("ignore")
        return worm.replace(meta={**worm.meta, "worm": stem})


def _load_worms(spec: str):
    """(worms, load failures as skipped rows); a worm's id is its file stem."""
    from fdnc_jax.datasets import resolve_worm_files
    from fdnc_jax.io import load_worm

    worms, failed = [], []
    for p in resolve_worm_files(spec):
        try:
            w = load_worm(p)
        except ValueError as e:
            print(f"fdnc-evaluate: skipping {p}: {e}", file=sys.stderr)
            failed.append(
                {"template": "", "test": Path(p).stem, "method": "load", "reason": str(e)}
            )
            continue
        worms.append(_named(w, Path(p).stem))
    if not worms:
        raise _Error(f"no worm file under {spec!r} could be loaded")
    return worms, failed


def _recording_volumes(path: str) -> list:
    """The volumes of a recording file, each named ``<file stem>_v<number>`` in the tables."""
    from fdnc_jax.io import load_recording

    stem = Path(path).stem
    volumes = load_recording(path, skip_invalid=FLAGS.skip_invalid_volumes)
    return [_named(v, f"{stem}_v{v.meta['volume']}") for v in volumes]


def _evaluate():
    from fdnc_jax import evaluate as ev
    from fdnc_jax.io import load_worm

    if FLAGS.recording and FLAGS.mode != "tracking":
        raise _Error("--recording is for --mode=tracking")
    if FLAGS.reference_volume is not None and not FLAGS.recording:
        raise _Error("--reference_volume picks a volume of --recording: give --recording")
    if bool(FLAGS.data) == bool(FLAGS.recording):
        raise _Error(
            "give --data (a folder, glob or list of worm files)"
            + (" or --recording (tracking mode), not both" if FLAGS.recording else "")
        )
    if not FLAGS.out:
        raise _Error("give --out (the output folder)")
    methods = tuple(FLAGS.methods) if FLAGS.methods else _DEFAULT_METHODS[FLAGS.mode]
    methods = ev.parse_methods(methods, ev.METHODS)
    template = None
    if FLAGS.recording:
        worms, failed = _recording_volumes(FLAGS.recording), []
        if FLAGS.reference_volume is not None:
            if FLAGS.template:
                raise _Error("give --template or --reference_volume, not both")
            template = recording_volume(worms, FLAGS.reference_volume, FLAGS.recording)
    else:
        worms, failed = _load_worms(FLAGS.data)
    if FLAGS.template:
        template = load_worm(FLAGS.template)
        template = _named(template, Path(FLAGS.template).stem)
    model = _load_model(methods)
    if FLAGS.mode == "templates":
        return _evaluate_templates(model, methods, worms, failed)
    if FLAGS.mode == "pairs":
        if template is not None:
            same = [w for w in worms if w.meta["worm"] == template.meta["worm"]]
            template = same[0] if same else template
        result = ev.evaluate_pairs(
            model,
            worms,
            methods=methods,
            template=template,
            max_pairs=FLAGS.max_pairs,
            seed=FLAGS.seed,
            skip_uncertain=FLAGS.skip_uncertain,
            progress=FLAGS.progress,
        )
    elif FLAGS.mode == "semisynthetic":
        result = ev.evaluate_semisynthetic(
            model,
            worms,
            num_pairs=FLAGS.num_pairs,
            seed=FLAGS.seed,
            methods=methods,
            progress=FLAGS.progress,
        )
    else:
        if template is None:
            template, worms = worms[0], worms[1:]
        else:
            worms = [w for w in worms if w.meta["worm"] != template.meta["worm"]]
        result = ev.evaluate_tracking(
            model,
            template,
            worms,
            by=FLAGS.tracking_by,
            methods=methods,
            skip_uncertain=FLAGS.skip_uncertain,
            progress=FLAGS.progress,
        )
    result.skipped[:0] = failed
    summary = ev.write_outputs(result, FLAGS.out, plots=FLAGS.plots)
    return result, summary


def _evaluate_templates(model, methods, worms, failed):
    from fdnc_jax import template_eval as te

    if methods != ("fdnc",):
        raise _Error("--mode=templates evaluates the fdnc matcher only (--methods=fdnc)")
    result = te.evaluate_templates(
        model,
        worms,
        ensemble_size=FLAGS.ensemble_size,
        max_single_templates=FLAGS.max_templates,
        match_handedness=FLAGS.match_handedness,
        seed=FLAGS.seed,
        skip_uncertain=FLAGS.skip_uncertain,
        progress=FLAGS.progress,
    )
    result.skipped[:0] = [{"lab": "", "mode": "load", "reason": f["reason"]} for f in failed]
    summary = te.write_template_outputs(result, FLAGS.out, plots=FLAGS.plots)
    return result, summary


def main(argv):
    if len(argv) > 1:
        print(f"fdnc-evaluate: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    from fdnc_jax.evaluate import format_table

    try:
        result, summary = _evaluate()
    except (_Error, ValueError, TypeError, OSError) as e:
        print(f"fdnc-evaluate: error: {e}", file=sys.stderr)
        return 2
    if FLAGS.mode == "templates":
        from fdnc_jax.template_eval import format_template_table

        print(format_template_table(summary))
        for s in result.skipped:
            print(f"skipped: {s['lab']} {s['mode']}: {s['reason']}")
        print(f"\nwrote {FLAGS.out}/summary.json, templates.csv, skipped.csv, settings.json")
        return 0
    print(format_table(summary))
    for note in result.notes[:10]:
        print(f"note: {note}")
    if len(result.notes) > 10:
        print(f"note: ... {len(result.notes) - 10} more notes in settings.json")
    if result.skipped:
        reasons: dict[str, int] = {}
        for s in result.skipped:
            key = f"{s['method']}: {s['reason']}"
            reasons[key] = reasons.get(key, 0) + 1
        print(f"\n{len(result.skipped)} (pair, method) skipped (see skipped.csv):")
        for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {n:>5} × {k}")
    wil = result.wilcoxon()
    if wil:
        print("\nWilcoxon signed-rank p-values (per-pair accuracy):")
        for r in wil:
            print(
                f"  {r['method_a']} vs {r['method_b']}: p = {r['p_value']:.3g} (n={r['n_pairs']})"
            )
    print(
        f"\nwrote {FLAGS.out}/summary.json, pairs.csv, per_neuron.csv, wilcoxon.csv, "
        "calibration.json, skipped.csv"
    )
    return 0


def run():
    run_main(main, __name__)


if __name__ == "__main__":
    run()
