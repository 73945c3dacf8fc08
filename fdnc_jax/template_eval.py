"""Which template names a new animal best: an atlas, one labelled animal, or several voting.

Leave-one-lab-out: for every lab, the animals of the other labs are the only labelled data. From them
come (1) an atlas (``fdnc_jax.atlas.build_atlas``), (2) every single animal as a template, and (3) an
ensemble of a few animals voting (``predict_ensemble``, batched). Each names every animal of the held-out lab;
accuracy is the paper's (correct / annotated test neurons whose name the template has). Position only
and with the color term.

Example:
  >>> result = evaluate_templates(load_pretrained(), worms)  # doctest: +SKIP
  >>> print(format_template_table(result.summary()))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fdnc_jax.atlas import AtlasConfig, alignable, anatomical_handedness, build_atlas, in_convention
from fdnc_jax.datasets import lab_of
from fdnc_jax.evaluate import _color_problem, _unique_ids, _unique_template, _write_csv, _write_json
from fdnc_jax.metrics import name_accuracy, uncertain_mask
from fdnc_jax.model.fdnc import Model
from fdnc_jax.predict import predict_batch
from fdnc_jax.worm import Worm, as_worm_list

TEMPLATE_KINDS = ("atlas", "single", "ensemble")
COLOR_MODES = {"position": False, "color": True}
RECORD_FIELDS = ["lab", "mode", "kind", "template", "test", "correct", "counted", "accuracy"]


@dataclasses.dataclass
class TemplateEvalResult:
    """Per (held-out lab, color mode, template kind, template, test) accuracies.

    Attributes:
      records: dicts with ``RECORD_FIELDS``; ``template`` is the atlas id, the animal id, or the
        '+'-joined ids of the ensemble.
      skipped: (lab, mode, reason) of what could not be evaluated.
      settings: how the evaluation ran.

    Example:
      >>> result = evaluate_templates(model, worms)  # doctest: +SKIP
      >>> result.summary()["EY"]["position"]["atlas"]  # doctest: +SKIP
      0.07
    """

    records: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    settings: dict[str, Any]

    def per_template(self, lab: str, mode: str, kind: str) -> dict[str, float]:
        """template id → mean accuracy over the held-out lab's animals (fractions 0–1).

        Example:
          >>> result.per_template("EY", "position", "single")  # doctest: +SKIP
          {'NP_11_YAaLR': 0.04, ...}
        """
        acc: dict[str, list[float]] = {}
        for r in self.records:
            if (r["lab"], r["mode"], r["kind"]) == (lab, mode, kind) and r["counted"]:
                acc.setdefault(r["template"], []).append(r["accuracy"])
        return {t: float(np.mean(v)) for t, v in acc.items()}

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{lab: {mode: {...}}}`` with the atlas's and the ensemble's mean accuracy over the lab's
        animals, and the single-animal templates' per-template means: median, min, max, and the
        fraction of them the atlas beats (each on its own held-out lab). ``"all"`` pools the labs
        (animal-weighted means; the single templates of every fold together).

        Example:
          >>> result.summary()["all"]["color"]["atlas_beats_fraction"]  # doctest: +SKIP
          0.75
        """
        out: dict[str, dict[str, dict[str, Any]]] = {}
        labs = sorted({r["lab"] for r in self.records})
        for lab in [*labs, "all"]:
            for mode in COLOR_MODES:
                rows = [
                    r
                    for r in self.records
                    if r["mode"] == mode and r["counted"] and (lab == "all" or r["lab"] == lab)
                ]
                if not rows:
                    continue

                def mean(kind, rows=rows):
                    v = [r["accuracy"] for r in rows if r["kind"] == kind]
                    return float(np.mean(v)) if v else float("nan")

                atlas = mean("atlas")
                # Each single template is compared with the atlas on the same held-out lab.
                singles, beaten = [], []
                for la in labs if lab == "all" else [lab]:
                    per = np.array(list(self.per_template(la, mode, "single").values()))
                    lab_atlas = np.mean(
                        [r["accuracy"] for r in rows if r["kind"] == "atlas" and r["lab"] == la]
                        or [np.nan]
                    )
                    singles.append(per)
                    beaten.append(lab_atlas > per)
                singles, beaten = np.concatenate(singles), np.concatenate(beaten)
                entry = {
                    "n_tests": len({r["test"] for r in rows}),
                    "atlas": atlas,
                    "ensemble": mean("ensemble"),
                    "single_mean": mean("single"),
                    "single_median": float(np.median(singles)) if singles.size else float("nan"),
                    "single_min": float(singles.min()) if singles.size else float("nan"),
                    "single_max": float(singles.max()) if singles.size else float("nan"),
                    "n_single_templates": int(singles.size),
                    "atlas_beats_fraction": float(np.mean(beaten))
                    if singles.size
                    else float("nan"),
                }
                out.setdefault(lab, {})[mode] = entry
        return out


def _score(
    template: Worm | set[str], tests: Sequence[Worm], preds, skip_uncertain: bool
) -> list[tuple]:
    out = []
    for t, p in zip(tests, preds, strict=True):
        out.append(name_accuracy(template, t, p.labels, skip_uncertain))
    return out


def held_out_atlas(
    worms: Sequence[Worm],
    labs: Sequence[str],
    lab: str,
    handedness: Sequence[int] | None = None,
    atlas_config: AtlasConfig = AtlasConfig(),
    ids: Sequence[str] | None = None,
) -> tuple[Worm, int]:
    """The atlas template of every animal not from ``lab`` (those named well enough to align), in
    ``lab``'s handedness convention: the sign of its animals' summed ``handedness`` (default
    ``atlas.anatomical_handedness`` of each; zeros: no mirroring).

    Args:
      worms: labelled animals (µm); labs: one lab per worm; lab: the held-out lab.
      handedness: +1 / −1 / 0 per worm. atlas_config: how the atlas is built. ids: worm ids
        recorded in the atlas (default ``build_atlas``'s).

    Returns:
      (the atlas as a template Worm, the lab's convention +1 / −1 / 0).

    Example:
      >>> from fdnc_jax.datasets import bundled_worm_paths, load_worm
      >>> worms = [load_worm(p) for p in bundled_worm_paths()]  # 4 labs, 2 animals each
      >>> atlas, convention = held_out_atlas(worms, [lab_of(w) for w in worms], "NP")
      >>> atlas.n > 100, convention  # NP records the animals' mirror images
      (True, -1)
    """
    if handedness is None:
        handedness = [anatomical_handedness(w) for w in worms]
    test_idx = [i for i, la in enumerate(labs) if la == lab]
    train_idx = [i for i, la in enumerate(labs) if la != lab]
    convention = int(np.sign(sum(handedness[i] for i in test_idx)))
    named = [train_idx[i] for i in alignable([worms[j] for j in train_idx], atlas_config)]
    kept = None if ids is None else [ids[i] for i in named]
    atlas = build_atlas([worms[i] for i in named], atlas_config, ids=kept).to_worm()
    return in_convention(atlas, convention), convention


def evaluate_templates(
    model: Model,
    worms: Sequence[Worm],
    *,
    labs: Sequence[str] | None = None,
    modes: Sequence[str] = ("position", "color"),
    ensemble_size: int = 5,
    max_single_templates: int | None = None,
    atlas_config: AtlasConfig = AtlasConfig(),
    match_handedness: bool = True,
    seed: int = 0,
    skip_uncertain: bool = True,
    progress: bool = True,
) -> TemplateEvalResult:
    """Leave-one-lab-out comparison of atlas, single-animal and ensemble templates.

    Args:
      model: the matcher (``load_pretrained`` / ``load_checkpoint``).
      worms: labelled animals (µm, names; color for the "color" mode) from ≥ 2 labs.
      labs: one lab per worm (default ``datasets.lab_of``: ``meta['lab']`` or the file prefix).
      modes: subset of ("position", "color"): without / with the color term.
      ensemble_size: animals voting in the ensemble (drawn once per held-out lab with ``seed``);
        0 skips the ensemble.
      max_single_templates: evaluate at most this many single-animal templates per held-out lab
        (a random subset drawn with ``seed``; default all).
      atlas_config: how each fold's atlas is built.
      match_handedness: give every template the held-out lab's handedness convention: a template
        whose names show the other handedness (``atlas.anatomical_handedness``) is mirrored. The
        lab's convention is one bit per lab (the majority of its animals) — what a user knows about
        their own microscope — not a per-animal peek at the test labels.
      seed: seed of the ensemble and template subsets.
      skip_uncertain: leave names marked uncertain out of the accuracy.
      progress: show a progress bar.

    Returns:
      The TemplateEvalResult.

    Raises:
      ValueError: fewer than 2 labs, a lab whose complement has < 3 animals, unknown modes.

    Example:
      >>> import fdnc_jax as fd
      >>> from fdnc_jax.datasets import bundled_worm_paths
      >>> worms = [fd.load_worm(p) for p in bundled_worm_paths()]  # 4 labs, 2 animals each
      >>> r = evaluate_templates(fd.load_pretrained(), worms, modes=("position",), ensemble_size=0,
      ...                        max_single_templates=1, progress=False)
      >>> sorted(r.summary())
      ['EY', 'NP', 'SF', 'SK1', 'all']
    """
    worms = as_worm_list(worms)
    bad = [m for m in modes if m not in COLOR_MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {list(COLOR_MODES)}, got {modes}")
    labs = [lab_of(w) for w in worms] if labs is None else [str(x) for x in labs]
    if len(labs) != len(worms):
        raise ValueError(f"labs has {len(labs)} entries for {len(worms)} worms")
    lab_names = sorted(set(labs))
    if len(lab_names) < 2:
        raise ValueError(f"leave-one-lab-out needs animals from ≥ 2 labs, got {lab_names}")
    if ensemble_size < 0:
        raise ValueError(f"ensemble_size must be ≥ 0, got {ensemble_size}")
    ids = _unique_ids(worms)
    hand = [anatomical_handedness(w) if match_handedness else 0 for w in worms]
    color_ok = [_color_problem(w, w) is None for w in worms]  # color term usable
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    folds = []
    for lab in lab_names:
        test_idx = [i for i, la in enumerate(labs) if la == lab]
        train_idx = [i for i, la in enumerate(labs) if la != lab]
        singles = list(train_idx)
        if max_single_templates is not None and max_single_templates < len(singles):
            singles = sorted(rng.choice(singles, max_single_templates, replace=False).tolist())
        voters = sorted(
            rng.choice(train_idx, min(ensemble_size, len(train_idx)), replace=False).tolist()
        )
        folds.append((lab, test_idx, train_idx, singles, voters))
    total = sum(len(f[1]) * (len(f[3]) + 2) for f in folds) * len(modes)
    bar = tqdm(total=total, desc="templates", disable=not progress, leave=False)
    conventions = {}
    for lab, test_idx, _, singles, voters in folds:
        atlas, convention = held_out_atlas(worms, labs, lab, hand, atlas_config, ids)
        conventions[lab] = convention
        atlas_id = f"atlas(-{lab})"
        for mode in modes:
            use_color = COLOR_MODES[mode]
            tests = [i for i in test_idx if color_ok[i] or not use_color]
            if len(tests) < len(test_idx):
                skipped.append(
                    {
                        "lab": lab,
                        "mode": mode,
                        "reason": f"{len(test_idx) - len(tests)} test animals without usable color",
                    }
                )
            if not tests:
                continue
            test_worms = [worms[i] for i in tests]

            def add(
                kind,
                template_id,
                template,
                preds,
                tests=tests,
                test_worms=test_worms,
                mode=mode,
                lab=lab,
            ):
                for i, (c, n) in zip(
                    tests, _score(template, test_worms, preds, skip_uncertain), strict=True
                ):
                    records.append(
                        {
                            "lab": lab,
                            "mode": mode,
                            "kind": kind,
                            "template": template_id,
                            "test": ids[i],
                            "correct": c,
                            "counted": n,
                            "accuracy": c / n if n else float("nan"),
                        }
                    )
                bar.update(len(test_worms))

            add(
                "atlas",
                atlas_id,
                atlas,
                predict_batch(model, atlas, test_worms, use_color=use_color),
            )
            for j in singles:
                if use_color and not color_ok[j]:
                    continue
                template = in_convention(_unique_template(worms[j])[0], convention, hand[j])
                add(
                    "single",
                    ids[j],
                    template,
                    predict_batch(model, template, test_worms, use_color=use_color),
                )
            used = [j for j in voters if color_ok[j] or not use_color]
            members = [
                in_convention(_unique_template(worms[j])[0], convention, hand[j]) for j in used
            ]
            if members:
                # What the ensemble can name: its names, less those its annotators marked uncertain
                # (as a single template's uncertain names are not scored).
                union = set().union(
                    *(
                        m.names[
                            m.labelled & ~(uncertain_mask(m) if skip_uncertain else False)
                        ].tolist()
                        for m in members
                    )
                )
                preds = predict_batch(model, members, test_worms, use_color=use_color)
                add("ensemble", "+".join(ids[j] for j in used), union, preds)
    bar.close()
    settings = {
        "mode": "templates",
        "labs": lab_names,
        "n_worms": len(worms),
        "modes": list(modes),
        "ensemble_size": ensemble_size,
        "max_single_templates": max_single_templates,
        "atlas_config": dataclasses.asdict(atlas_config),
        "match_handedness": match_handedness,
        "lab_handedness": conventions,
        "seed": seed,
        "skip_uncertain": skip_uncertain,
    }
    return TemplateEvalResult(records=records, skipped=skipped, settings=settings)


def format_template_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A Markdown table of ``TemplateEvalResult.summary()`` (accuracies in %).

    Example:
      >>> print(format_template_table(result.summary()))  # doctest: +SKIP
      | held-out lab | mode | animals | atlas | ...
    """
    lines = [
        "| held-out lab | mode | animals | atlas | single animal: median [min–max] | atlas beats "
        "| ensemble |",
        "|---|---|---|---|---|---|---|",
    ]
    for lab, modes in summary.items():
        for mode, s in modes.items():
            lines.append(
                f"| {lab} | {mode} | {s['n_tests']} | {100 * s['atlas']:.1f} % | "
                f"{100 * s['single_median']:.1f} % [{100 * s['single_min']:.1f}–"
                f"{100 * s['single_max']:.1f}] | {100 * s['atlas_beats_fraction']:.0f} % of "
                f"{s['n_single_templates']} | {_pct(s['ensemble'])} |"
            )
    return "\n".join(lines)


def _pct(v: float) -> str:
    """A fraction as '12.3 %', or '–' when it was not measured (NaN)."""
    return "–" if not np.isfinite(v) else f"{100 * v:.1f} %"


def write_template_outputs(
    result: TemplateEvalResult, out_dir: str | Path, plots: bool = True
) -> dict[str, Any]:
    """Writes ``summary.json``, ``templates.csv`` (one row per template × test × mode),
    ``skipped.csv``, ``settings.json`` and, with ``plots``, ``templates_<mode>.png`` (box plots:
    atlas and ensemble per test animal, single templates per template) into ``out_dir``.

    Example:
      >>> write_template_outputs(result, "eval_templates/")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    _write_json(out / "summary.json", summary)
    _write_csv(out / "templates.csv", result.records, RECORD_FIELDS)
    _write_csv(out / "skipped.csv", result.skipped, ["lab", "mode", "reason"])
    _write_json(out / "settings.json", result.settings)
    if plots:
        from fdnc_jax.plots import plot_accuracy_box

        labs = sorted({r["lab"] for r in result.records})
        for mode in COLOR_MODES:
            groups: dict[str, list[float]] = {}
            for lab in labs:
                for kind in TEMPLATE_KINDS:
                    if kind == "single":
                        v = list(result.per_template(lab, mode, kind).values())
                    else:
                        v = [
                            r["accuracy"]
                            for r in result.records
                            if r["counted"]
                            and (r["lab"], r["mode"], r["kind"]) == (lab, mode, kind)
                        ]
                    if v:
                        groups[f"{lab}\n{kind}"] = v
            if groups:
                plot_accuracy_box(
                    groups,
                    out / f"templates_{mode}.png",
                    title=f"leave-one-lab-out templates ({mode})",
                )
    return summary
