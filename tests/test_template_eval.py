"""Leave-one-lab-out template comparison (atlas vs single animals vs ensemble) and the atlas CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fdnc_jax as fd
from fdnc_jax import template_eval as te
from fdnc_jax.datasets import bundled_worm_paths, lab_of
from fdnc_jax.metrics import name_accuracy
from fdnc_jax.model.fdnc import Model, ModelConfig
from fdnc_jax.worm import Worm


@pytest.fixture(scope="module")
def model():
    return Model.create(ModelConfig(width=16, layers=1, heads=2, ff_width=32))


def _lab_worms(rng, base: Worm, labs: dict[str, int]) -> list[Worm]:
    """Noisy, partially annotated copies of ``base`` in several labs."""
    worms = []
    for lab, n in labs.items():
        for i in range(n):
            keep = rng.random(base.n) > 0.2
            xyz = base.xyz_um + rng.normal(scale=2.0, size=base.xyz_um.shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w = base.replace(
                    xyz_um=xyz.astype(np.float32), meta={"lab": lab, "worm": f"{lab}_{i}"}
                )
            worms.append(w.subset(keep))
    return worms


def test_leave_one_lab_out_records_and_summary(model, np_rng):
    base = fd.datasets.load_bundled_worm("NP_11_YAaLR")
    worms = _lab_worms(np_rng, base, {"A": 3, "B": 3, "C": 2})
    result = te.evaluate_templates(model, worms, ensemble_size=2, progress=False)
    for lab, n_test, n_train in (("A", 3, 5), ("B", 3, 5), ("C", 2, 6)):
        for mode in ("position", "color"):
            rows = [r for r in result.records if r["lab"] == lab and r["mode"] == mode]
            kinds = [r["kind"] for r in rows]
            assert kinds.count("atlas") == n_test and kinds.count("ensemble") == n_test
            assert kinds.count("single") == n_test * n_train
            # No animal is ever its own template or in its own lab's atlas/ensemble.
            assert all(r["template"].split("_")[0] != lab for r in rows if r["kind"] == "single")
            assert all(f"{lab}_" not in r["template"] for r in rows if r["kind"] == "ensemble")
    # A record's accuracy is the metric applied to that template's prediction.
    r = next(r for r in result.records if r["kind"] == "single" and r["mode"] == "position")
    by_id = {w.meta["worm"]: w for w in worms}
    pred = fd.predict(model, by_id[r["template"]], by_id[r["test"]], use_color=False)
    assert (r["correct"], r["counted"]) == name_accuracy(
        by_id[r["template"]], by_id[r["test"]], pred.labels
    )
    summary = result.summary()
    assert set(summary) == {"A", "B", "C", "all"}
    s = summary["A"]["position"]
    singles = list(result.per_template("A", "position", "single").values())
    assert s["n_single_templates"] == 5 and s["single_median"] == pytest.approx(np.median(singles))
    assert s["atlas_beats_fraction"] == pytest.approx(np.mean(s["atlas"] > np.array(singles)))
    assert summary["all"]["position"]["n_tests"] == 8
    table = te.format_template_table(summary)
    assert table.count("\n") == 2 + 4 * 2 - 1


def test_template_eval_bad_input(model, np_rng):
    base = fd.datasets.load_bundled_worm("NP_11_YAaLR")
    worms = _lab_worms(np_rng, base, {"A": 4})
    with pytest.raises(ValueError, match="≥ 2 labs"):
        te.evaluate_templates(model, worms, progress=False)
    with pytest.raises(ValueError, match="modes"):
        te.evaluate_templates(model, worms, modes=("rgb",), progress=False)
    with pytest.raises(ValueError, match="labs has"):
        te.evaluate_templates(model, worms, labs=["A"], progress=False)


# ----------------------------------------------------------------------------------------------
# Command lines (subprocesses: absl flags are process-global).


def _run(module: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def test_atlas_cli_build_info_and_errors(tmp_path):
    out = tmp_path / "atlas.npz"
    proc = _run("fdnc_jax.cli.atlas", "build", "--data=bundled", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert "from 8 animals" in proc.stdout
    assert json.loads(str(np.load(out)["meta"]))["command"] == (
        "fdnc-atlas build --data=bundled --out=atlas.npz"
    )
    proc = _run("fdnc_jax.cli.atlas", "info", f"--atlas={out}")
    assert proc.returncode == 0 and "names from 8 animals" in proc.stdout
    two = ",".join(str(p) for p in bundled_worm_paths()[:2])
    proc = _run("fdnc_jax.cli.atlas", "build", f"--data={two}", f"--out={tmp_path / 'x.npz'}")
    assert proc.returncode == 2 and "at least 3" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.npz").exists()
    proc = _run("fdnc_jax.cli.atlas")
    assert proc.returncode == 2 and "build or info" in proc.stderr
    proc = _run("fdnc_jax.cli.atlas", "--help")
    for flag in (
        "--data",
        "--out",
        "--atlas",
        "--min_animals",
        "--min_fraction",
        "--[no]scale",
        "--[no]allow_reflection",
        "--[no]robust",
        "--[no]skip_uncertain",
    ):
        assert flag in proc.stdout, flag


def test_predict_cli_defaults_to_the_atlas(tmp_path):
    test = next(p for p in bundled_worm_paths() if p.stem == "NP_20_YAaLR")
    proc = _run("fdnc_jax.cli.predict", f"--test={test}", f"--out={tmp_path / 'names.csv'}")
    assert proc.returncode == 0, proc.stderr
    assert "NP_20_YAaLR.npz: accuracy" in proc.stdout
    assert (tmp_path / "names.csv").is_file()


def test_evaluate_cli_templates_mode(tmp_path):
    out = tmp_path / "eval"
    proc = _run(
        "fdnc_jax.cli.evaluate",
        "--mode=templates",
        "--data=bundled",
        "--max_templates=1",
        "--ensemble_size=2",
        f"--out={out}",
        "--progress=false",
        "--weights=small",  # the CLI plumbing: the CPU model suffices
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| held-out lab |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"EY", "NP", "SF", "SK1", "all"}
    assert set(summary["EY"]) == {"position", "color"}
    assert (out / "templates_position.png").is_file() and (out / "templates.csv").is_file()


def test_templates_take_the_held_out_labs_handedness(model, np_rng):
    from fdnc_jax.atlas import mirror_image

    base = fd.datasets.load_bundled_worm("NP_11_YAaLR")  # mirror-image convention (−1)
    worms = _lab_worms(np_rng, base, {"A": 3, "B": 3})
    worms[:3] = [mirror_image(w) for w in worms[:3]]  # lab A records the anatomical handedness
    on = te.evaluate_templates(model, worms, modes=("position",), ensemble_size=0, progress=False)
    assert on.settings["lab_handedness"] == {"A": 1, "B": -1}
    off = te.evaluate_templates(
        model, worms, modes=("position",), ensemble_size=0, match_handedness=False, progress=False
    )
    assert off.settings["lab_handedness"] == {"A": 0, "B": 0}
    # Lab B's templates are mirrored for lab A's tests: the predictions change.
    acc = lambda r: [x["accuracy"] for x in r.records if x["lab"] == "A" and x["kind"] == "single"]
    assert acc(on) != acc(off)


def test_pooled_summary_compares_each_template_on_its_own_lab():
    rec = lambda lab, kind, t, test, acc: {
        "lab": lab,
        "mode": "position",
        "kind": kind,
        "template": t,
        "test": test,
        "correct": 1,
        "counted": 1,
        "accuracy": acc,
    }
    records = [
        rec("A", "atlas", "atlas", "a1", 0.9),
        rec("A", "single", "b1", "a1", 0.8),
        rec("B", "atlas", "atlas", "b1", 0.3),
        rec("B", "single", "a1", "b1", 0.2),
    ]
    summary = te.TemplateEvalResult(records, [], {}).summary()
    assert summary["A"]["position"]["atlas_beats_fraction"] == 1.0
    assert summary["all"]["position"]["atlas_beats_fraction"] == 1.0  # not 0.6 (pooled atlas) > 0.8
    assert summary["all"]["position"]["atlas"] == pytest.approx(0.6)


def test_predict_cli_reflect_flags(tmp_path):
    test = next(p for p in bundled_worm_paths() if p.stem.startswith("SF_"))
    proc = _run("fdnc_jax.cli.predict", f"--test={test}", "--reflect_test", "--use_color=false")
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout


def test_held_out_atlas_uses_the_other_labs_in_the_labs_convention():
    """The atlas of the animals not from the held-out lab, mirrored into that lab's handedness
    convention (the sign of its animals' summed handedness); zeros: no mirroring."""
    from fdnc_jax.atlas import build_atlas, in_convention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bundled worm has a duplicated point
        worms = [fd.load_worm(p) for p in bundled_worm_paths()]
    labs = [lab_of(w) for w in worms]
    others = [w for w, la in zip(worms, labs, strict=True) if la != "NP"]
    plain, convention = te.held_out_atlas(worms, labs, "NP", handedness=[0] * len(worms))
    assert convention == 0
    want = build_atlas(others).to_worm()
    np.testing.assert_allclose(plain.xyz_um, want.xyz_um)
    np.testing.assert_array_equal(plain.names, want.names)
    # The atlas shows the mirror image (its majority's convention, -1); a lab of the other one:
    hand = [+1 if la == "NP" else 0 for la in labs]
    mirrored, convention = te.held_out_atlas(worms, labs, "NP", handedness=hand)
    assert convention == +1
    np.testing.assert_allclose(mirrored.xyz_um, in_convention(want, +1).xyz_um)
    assert not np.allclose(mirrored.xyz_um, want.xyz_um)
