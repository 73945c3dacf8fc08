"""fdnc-predict: name (or track) the neurons of test worms by matching them to a template.

Examples:
  fdnc-predict --demo
  fdnc-predict --test=new_worm.csv --out=names.csv        # names from the bundled NeuroPAL atlas
  fdnc-predict --template=template.npz --test=vol1.csv,vol2.csv --out=preds.csv --top_k=3
  fdnc-predict --recording=rec.csv --reference_volume=0 --out=tracks.csv   # tracking
  fdnc-predict --template='annotated/*.npz',atlas --test=new_worm.csv      # several templates vote
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from fdnc_jax.cli._common import (
    MATMUL_DTYPE_CHOICES,
    MATMUL_DTYPE_HELP,
    recording_volume,
    run_main,
)

FLAGS = flags.FLAGS
# --progress=auto shows predict_batch's progress bar (stderr) for at least this many test volumes.
PROGRESS_MIN_VOLUMES = 64

flags.DEFINE_bool(
    "demo", False, "Match the two bundled NeuroPAL demo worms and print the accuracy."
)
flags.DEFINE_list(
    "template",
    ["atlas"],
    "Template worm file (.npz/.csv; positions in µm, names optional), or "
    "'atlas' for the bundled NeuroPAL head atlas (194 named neurons, mean of 90 animals; in the "
    "handedness of the EY/NP WormND recordings: if your microscope records the other one, add "
    "--reflect_template). Several (comma-separated; a folder or a quoted glob stands for its "
    "files; 'atlas' may be one of them): labelled templates that vote — each test neuron's name "
    "from their averaged per-name probabilities (fdnc_jax.predict with a list).",
)
flags.DEFINE_list(
    "test",
    None,
    "Test worm file(s) (.npz/.csv, µm), comma-separated; a folder (its .npz/.csv files) or a quoted "
    "glob ('volumes/*.csv') stands for the files in it, in sorted order.",
)
flags.DEFINE_string(
    "recording",
    None,
    "A recording file (.csv/.npz with a 'volume' column, fdnc_jax.load_recording): every volume "
    "is a test worm; --out then writes one CSV with a volume column. Instead of --test.",
)
flags.DEFINE_bool(
    "skip_invalid_volumes",
    False,
    "With --recording: leave out (with a warning) volumes that are not valid worms, e.g. fewer "
    "than 3 neurons; default: an error naming the volume.",
)
flags.DEFINE_integer(
    "reference_volume",
    None,
    "With --recording: the number of the volume to track every volume to (the template), "
    "instead of --template.",
)
flags.DEFINE_enum(
    "use_color",
    "auto",
    ["auto", "true", "false"],
    "Add the NeuroPAL color term (weight --color_weight); auto = when all worms have color.",
)
flags.DEFINE_float("color_weight", 60.0, "Weight of the color log-likelihood term (original: 60).")
flags.DEFINE_enum(
    "progress",
    "auto",
    ["auto", "true", "false"],
    f"A progress bar on stderr over the volumes; auto = for {PROGRESS_MIN_VOLUMES} or more.",
)
flags.DEFINE_bool(
    "two_way",
    True,
    "Match on two-way scores (the mean of both directions' log-probs: +0.5 to +1.5 points on real "
    "pairs with the bundled default and color models); --notwo_way: the original's forward scores.",
)
flags.DEFINE_integer("top_k", 5, "Candidates per test neuron (1 ≤ top_k ≤ template neurons).")
flags.DEFINE_float("min_probability", 0.0, "Assignments below this probability get no label (0–1).")
flags.DEFINE_string(
    "out",
    None,
    "CSV to write (one row per test neuron; with several tests, "
    "one file per test: OUT stem + _<test stem>.csv; with --recording, one file for all volumes).",
)
flags.DEFINE_string(
    "checkpoint", None, "Training workdir or weights .npz to load from (default: bundled)."
)
flags.DEFINE_string(
    "weights",
    "auto",
    "Bundled weights when --checkpoint is not given: default (positions), color (NeuroPAL color "
    "as input), small, or auto = color when the template and every test have color, else default.",
)
flags.DEFINE_enum("matmul_dtype", "float32", MATMUL_DTYPE_CHOICES, MATMUL_DTYPE_HELP)
flags.DEFINE_bool("mirrored_test", False, "Test worms lie on the other side (negate x and z).")
flags.DEFINE_bool("mirrored_template", False, "The template lies on the other side.")
flags.DEFINE_bool(
    "reflect_template",
    False,
    "Use the template's mirror image (z negated): a template recorded "
    "in the other handedness convention than the tests (see fdnc_jax.atlas.anatomical_handedness).",
)
flags.DEFINE_bool("reflect_test", False, "Use the test worms' mirror images (z negated).")


def _table(template, test, pred) -> str:
    lines = [f"{'#':>4} {'annotated':>10} {'predicted':>10} {'prob':>6}  ok"]
    for i in range(test.n):
        truth, guess = test.names[i], pred.labels[i]
        mark = "" if not truth else ("✓" if truth == guess else "✗")
        lines.append(
            f"{i:>4} {truth or '-':>10} {guess or '-':>10} {pred.probability[i]:>6.2f}  {mark}"
        )
    return "\n".join(lines)


def _inputs(fd) -> tuple:
    """(template, test worms, their paths) from the flags, the worms' side flags applied; files are
    read before the model. With --reference_volume the template is that volume of the recording
    (after the test-side flags, which it gets like every volume)."""
    from fdnc_jax.atlas import mirror_image

    if FLAGS.demo and (FLAGS.test or FLAGS.recording or FLAGS.reference_volume is not None):
        raise app.UsageError(
            "--demo uses the bundled demo pair: drop --test/--recording/--reference_volume"
        )
    if FLAGS.test and FLAGS.recording:
        raise app.UsageError("give --test or --recording, not both")
    if FLAGS.reference_volume is not None and not FLAGS.recording:
        raise app.UsageError("--reference_volume picks a volume of --recording: give --recording")
    if FLAGS.skip_invalid_volumes and not FLAGS.recording:
        raise app.UsageError("--skip_invalid_volumes applies to --recording")
    if not (FLAGS.demo or FLAGS.test or FLAGS.recording):
        raise app.UsageError("give --test or --recording (and optionally --template), or --demo")
    if FLAGS.demo:
        template, test = fd.load_demo_pair()
        tests, paths = [test], [Path("demo_test")]
    elif FLAGS.recording:
        tests = fd.load_recording(FLAGS.recording, skip_invalid=FLAGS.skip_invalid_volumes)
        paths = [Path(FLAGS.recording)] * len(tests)
    else:
        paths = _worm_paths(FLAGS.test)
        tests = [fd.load_worm(p) for p in paths]
    if FLAGS.mirrored_test:
        tests = [t.replace(mirrored=True) for t in tests]
    if FLAGS.reflect_test:
        tests = [mirror_image(t) for t in tests]
    if FLAGS.reference_volume is not None:
        given = [f"--{f}" for f in _TEMPLATE_FLAGS if FLAGS[f].present]
        if given:
            raise ValueError(
                f"--reference_volume is a volume of the recording: drop {', '.join(given)} "
                "(the test-side flags apply to it)"
            )
        return recording_volume(tests, FLAGS.reference_volume, FLAGS.recording), tests, paths
    if not FLAGS.demo:
        templates = [
            fd.load_atlas() if p == "atlas" else fd.load_worm(p)
            for p in _worm_paths(FLAGS.template)
        ]
        template = templates[0] if len(templates) == 1 else templates
    if FLAGS.mirrored_template:
        template = _each(template, lambda t: t.replace(mirrored=True))
    if FLAGS.reflect_template:
        template = _each(template, mirror_image)
    return template, tests, paths


def _template_list(template) -> list:
    """The template as a list (a voting list as it is)."""
    return template if isinstance(template, list) else [template]


def _each(template, fn):
    """``fn`` applied to the template, or to each template of a voting list."""
    return [fn(t) for t in template] if isinstance(template, list) else fn(template)


_TEMPLATE_FLAGS = ("template", "mirrored_template", "reflect_template")


def _worm_paths(items: list[str]) -> list:
    """The files of --test / --template: each item a file, or a folder / glob standing for its
    sorted files ("atlas" kept as is)."""
    from fdnc_jax.datasets import resolve_worm_files

    paths: list = []
    for item in items:
        if item == "atlas":
            paths.append(item)
        elif Path(item).is_file():  # as named, even with glob characters ("scan[1].csv")
            paths.append(Path(item))
        elif Path(item).is_dir() or any(c in item for c in "*?["):
            paths.extend(resolve_worm_files([item]))
        else:
            paths.append(Path(item))  # load_worm names a missing file
    return paths


def _report_recording(template, volumes, preds) -> None:
    """Prints a summary of a recording's matching (and name accuracy when the volumes are
    annotated; the reference volume, matched to itself, left out of both); writes --out, one CSV
    for all volumes (the reference's own rows included)."""
    import numpy as np

    import fdnc_jax as fd
    from fdnc_jax.metrics import name_accuracy

    numbers = [v.meta["volume"] for v in volumes]
    others = [(v, p) for v, p in zip(volumes, preds, strict=True) if v is not template]
    print(
        f"{FLAGS.recording}: {len(volumes)} volumes (numbers {numbers[0]}..{numbers[-1]}), "
        f"{np.mean([v.n for v in volumes]):.1f} neurons per volume"
        + (f"; reference: volume {template.meta['volume']}" if len(others) < len(volumes) else "")
    )
    if others:
        assigned = np.concatenate([p.assignment >= 0 for _, p in others])
        probability = np.concatenate([p.probability for _, p in others])
        mean = f"{probability[assigned].mean():.3f}" if assigned.any() else "-"
        print(
            f"{len(others)} volumes matched: {assigned.mean():.1%} of their neurons assigned, mean "
            f"probability of the assigned {mean}"
        )
    scores = [name_accuracy(template, v, p.labels) for v, p in others]
    counted = sum(c for _, c in scores)
    if counted:
        correct = sum(c for c, _ in scores)
        print(
            f"accuracy {correct}/{counted} = {correct / counted:.1%} over the annotated neurons "
            "whose name is in the template"
        )
    if FLAGS.out:
        fd.save_predictions(preds, FLAGS.out, volumes=numbers)
        print(f"wrote {FLAGS.out}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import fdnc_jax as fd
    from fdnc_jax.metrics import name_accuracy

    try:
        template, tests, test_paths = _inputs(fd)
        use_color = {"auto": None, "true": True, "false": False}[FLAGS.use_color]
        if FLAGS.checkpoint:
            model, source = fd.load_checkpoint(FLAGS.checkpoint), FLAGS.checkpoint
        else:
            name = FLAGS.weights
            if name == "auto":
                colored = all(t.has_color for t in _template_list(template) + tests)
                name = "color" if colored else "default"
            model, source = fd.load_pretrained(name), f"bundled weights {name!r}"
        model = model.with_matmul_dtype(FLAGS.matmul_dtype)
        print(f"model: {source} ({model.num_params:,} parameters)")
        options = {
            "use_color": use_color,
            "color_weight": FLAGS.color_weight,
            "top_k": FLAGS.top_k,
            "min_probability": FLAGS.min_probability,
            "two_way": FLAGS.two_way,
        }
        progress = {"auto": len(tests) >= PROGRESS_MIN_VOLUMES, "true": True, "false": False}[
            FLAGS.progress
        ]
        preds = fd.predict_batch(model, template, tests, progress=progress, **options)
        if isinstance(template, list):
            print(f"{len(template)} templates vote on every name")
            template = set(preds[0].template_names.tolist())  # the names the vote can give
    except (ValueError, TypeError) as e:
        print(f"fdnc-predict: error: {e}", file=sys.stderr)
        return 2
    if FLAGS.recording:
        _report_recording(template, tests, preds)
        return 0
    for path, test, pred in zip(test_paths, tests, preds, strict=True):
        if FLAGS.demo or len(tests) == 1:
            print(_table(template, test, pred))
        correct, counted = name_accuracy(template, test, pred.labels)
        if counted:
            print(
                f"{path.name}: accuracy {correct}/{counted} = {correct / counted:.1%} "
                "(annotated test neurons whose name is in the template)"
            )
        if FLAGS.out:
            out = Path(FLAGS.out)
            if len(tests) > 1:
                out = out.with_name(f"{out.stem}_{path.stem}.csv")
            pred.to_csv(out)
            print(f"wrote {out}")
    return 0


def run():
    run_main(main, __name__)


if __name__ == "__main__":
    run()
