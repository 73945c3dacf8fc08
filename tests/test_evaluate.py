"""Tests for fdnc_jax.evaluate, fdnc_jax.plots (evaluation figures) and the fdnc-evaluate CLI.

Tiny worms (16–24 neurons, µm) and a tiny random model keep the file well under a minute on 2 CPU
cores; the real-data test runs only with FDNC_SHARED set.
"""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats
from cli_process import run_cli
from matplotlib.figure import Figure

from fdnc_jax import evaluate as ev
from fdnc_jax import matching, plots
from fdnc_jax.io import save_recording, save_worm
from fdnc_jax.model.fdnc import Model, ModelConfig
from fdnc_jax.predict import predict
from fdnc_jax.worm import Worm

N = 20
NAMES = np.array([f"N{i}" for i in range(N)])


@pytest.fixture(scope="module")
def model():
    return Model.create(ModelConfig(width=16, layers=1, heads=2, ff_width=32))


def _base(seed: int = 0, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3)) * [30.0, 10.0, 8.0] + [200.0, 150.0, 20.0]).astype(np.float32)


def _worm(
    seed: int,
    names=NAMES,
    n_color: int = 4,
    wid: str | None = None,
    shift=(0, 0, 0),
    noise: float = 1.0,
    uncertain=None,
) -> Worm:
    rng = np.random.default_rng(100 + seed)
    n = len(names)
    xyz = _base(0, n) + np.asarray(shift, np.float32) + rng.normal(size=(n, 3)) * noise
    color = None
    if n_color:
        color = rng.uniform(0.1, 1.0, (len(names), n_color)).astype(np.float32)
    meta = {"worm": wid or f"w{seed}"}
    if uncertain is not None:
        meta["uncertain"] = list(uncertain)
    return Worm(xyz_um=xyz, names=names, color=color, meta=meta)


def _match(assignment, candidates=None):
    return ev._Match(
        assignment=np.asarray(assignment, np.int64),
        seconds=0.0,
        candidates=None if candidates is None else np.asarray(candidates),
    )


# ----------------------------------------------------------------------------------------------
# Accuracy on hand-made cases.


def test_score_counts_only_shared_certain_names():
    xyz = _base(0, 6)
    template = Worm(
        xyz_um=xyz[:5],
        names=["A", "B", "C", "D", ""],
        meta={"uncertain": [False, False, False, True, False]},
    )
    # Test: A, B correct; C wrong; "Z" absent from the template; D uncertain in the template;
    # an unlabelled neuron; an outlier (extra point without a name).
    test = Worm(xyz_um=xyz, names=["A", "B", "C", "Z", "D", ""])
    assignment = [0, 1, 3, 2, 3, -1]
    metrics, ok, hit, keys = ev._score(template, test, _match(assignment), "name", True)
    assert (metrics["correct"], metrics["counted"]) == (2, 3)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(ok, [True, True, True, False, False, False])
    np.testing.assert_array_equal(hit, [True, True, False, False, False, False])
    assert keys[:3] == ["A", "B", "C"]
    assert math.isnan(metrics["top3"])  # No candidates for this method.
    # Uncertain names counted when asked.
    metrics, *_ = ev._score(template, test, _match(assignment), "name", False)
    assert (metrics["correct"], metrics["counted"]) == (3, 4)  # D (assigned to D) now counts.


def test_score_uncertain_in_test_and_topk():
    xyz = _base(1, 4)
    template = Worm(xyz_um=xyz, names=["A", "B", "C", "D"])
    test = Worm(
        xyz_um=xyz, names=["A", "B", "C", "D"], meta={"uncertain": [False, True, False, False]}
    )
    cand = [[1, 0, 2], [1, 0, 2], [0, 1, 3], [0, 1, 2]]  # Top-3 hit for A only.
    metrics, ok, _, _ = ev._score(template, test, _match([1, 1, 2, 0], cand), "name", True)
    assert not ok[1]
    assert (metrics["correct"], metrics["counted"]) == (1, 3)  # Only C correct at top-1.
    assert metrics["top3"] == pytest.approx(1 / 3)  # A only (C's true index 2 not in [0, 1, 3]).
    assert metrics["top5"] == pytest.approx(1 / 3)


def test_score_by_index():
    xyz = _base(2, 5)
    template = Worm(xyz_um=xyz[:4])
    test = Worm(xyz_um=xyz)  # Neuron 4 has no template partner.
    metrics, ok, _, keys = ev._score(template, test, _match([0, 2, 1, 3, 0]), "index", True)
    assert (metrics["correct"], metrics["counted"]) == (2, 4)
    assert keys[0] == "#0" and not ok[4]
    test2 = Worm(xyz_um=xyz, meta={"template_index": [3, 2, 1, 0, -1]})
    metrics, *_ = ev._score(template, test2, _match([3, 2, 1, 0, -1]), "index", True)
    assert metrics["accuracy"] == 1.0


def test_none_method_recovers_a_permuted_copy():
    a = _worm(0, noise=0.0)
    perm = np.random.default_rng(3).permutation(N)
    b = Worm(xyz_um=a.xyz_um[perm] + 50.0, names=a.names[perm], meta={"worm": "copy"})
    result = ev.evaluate_pairs(None, [a, b], methods=["none", "cpd"], progress=False)
    assert len(result.records) == 4
    for r in result.records:
        assert r["accuracy"] == 1.0, r
        assert (r["correct"], r["counted"]) == (N, N)
        assert r["seconds"] >= 0


# ----------------------------------------------------------------------------------------------
# Statistics.


def test_wilcoxon_pvalue_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=12)
    b = a - rng.uniform(0.0, 0.2, size=12) + 0.05
    assert ev.wilcoxon_pvalue(a, b) == pytest.approx(scipy.stats.wilcoxon(a, b).pvalue)
    a4, b4 = [0.5, 0.6, 0.7, 0.1], [0.4, 0.5, 0.6, 0.0]
    assert ev.wilcoxon_pvalue(a4, b4) == pytest.approx(scipy.stats.wilcoxon(a4, b4).pvalue)
    assert ev.wilcoxon_pvalue(a4, b4) == pytest.approx(0.125)


def test_wilcoxon_pvalue_degenerate():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ev.wilcoxon_pvalue([0.3, 0.4, 0.5], [0.3, 0.4, 0.5]) == 1.0  # All differences zero.
    assert math.isnan(ev.wilcoxon_pvalue([], []))
    assert ev.wilcoxon_pvalue([0.3, np.nan, 0.5], [0.3, 0.1, 0.5]) == 1.0  # NaN pair dropped.
    with pytest.raises(ValueError, match="same length"):
        ev.wilcoxon_pvalue([1, 2], [1])


def test_calibration_bins():
    conf = [0.05, 0.05, 0.95, 0.95, 0.55, 0.0]
    correct = [False, True, True, True, False, False]
    cal = ev.calibration_bins(conf, correct, num_bins=10)
    assert len(cal["bins"]) == 10 and cal["n"] == 6
    b0 = cal["bins"][0]
    assert b0["count"] == 3 and b0["accuracy"] == pytest.approx(1 / 3)
    assert b0["confidence"] == pytest.approx(0.1 / 3)
    assert cal["bins"][9]["count"] == 2 and cal["bins"][9]["accuracy"] == 1.0
    assert math.isnan(cal["bins"][3]["accuracy"])
    expected = 3 / 6 * abs(1 / 3 - 0.1 / 3) + 2 / 6 * 0.05 + 1 / 6 * 0.55
    assert cal["ece"] == pytest.approx(expected)
    perfect = ev.calibration_bins([1.0, 1.0, 0.0], [True, True, False])
    assert perfect["ece"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------
# End to end on tiny worms.


def test_evaluate_pairs_end_to_end(model, tmp_path):
    worms = [_worm(i, shift=(i * 5.0, 0, 0)) for i in range(3)]
    result = ev.evaluate_pairs(model, worms, progress=False)
    assert result.skipped == []
    assert len(result.records) == 6 * 4  # 6 ordered pairs × 4 methods.
    summary = ev.write_outputs(result, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(data) == ["fdnc", "fdnc+color", "cpd", "none"]
    for method, entry in data.items():
        for key, typ in [
            ("mean", float),
            ("median", float),
            ("n_pairs", int),
            ("seconds_per_pair", float),
        ]:
            assert isinstance(entry[key], typ), (method, key, entry[key])
        assert entry["n_pairs"] == 6
        assert 0.0 <= entry["mean"] <= 1.0 and 0.0 <= entry["median"] <= 1.0
        assert entry["seconds_per_pair"] >= 0.0
        assert ("top3" in entry) == method.startswith("fdnc")
        assert ("ece" in entry) == method.startswith("fdnc")
    assert {m: s["n_pairs"] for m, s in summary.items()} == {m: 6 for m in ev.DEFAULT_METHODS}
    for name in [
        "summary.json",
        "pairs.csv",
        "per_neuron.csv",
        "wilcoxon.csv",
        "calibration.json",
        "skipped.csv",
        "accuracy.png",
        "calibration.png",
        "matches_example.png",
    ]:
        assert (tmp_path / "out" / name).is_file(), name
    rows = list(csv.DictReader(open(tmp_path / "out" / "pairs.csv")))
    assert len(rows) == 24 and {r["method"] for r in rows} == set(ev.DEFAULT_METHODS)
    wil = list(csv.DictReader(open(tmp_path / "out" / "wilcoxon.csv")))
    assert len(wil) == 6
    calib = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert set(calib) == {"fdnc", "fdnc+color"} and len(calib["fdnc"]["bins"]) == 10
    per_neuron = list(csv.DictReader(open(tmp_path / "out" / "per_neuron.csv")))
    assert {r["name"] for r in per_neuron} == set(NAMES)
    table = ev.format_table(summary)
    assert "fdnc+color" in table and "s/pair" in table
    # fdnc accuracy equals predict + name_accuracy on the same pair.
    rec = next(r for r in result.records if r["method"] == "fdnc")
    t, s = (next(w for w in worms if w.meta["worm"] == rec[k]) for k in ("template", "test"))
    pred = predict(model, t, s, use_color=False)
    assert rec["correct"] == int(np.sum(pred.labels == s.names))


def test_max_pairs_is_deterministic_and_template_fixed(model):
    worms = [_worm(i) for i in range(4)]
    r1 = ev.evaluate_pairs(None, worms, methods=("none",), max_pairs=5, seed=1, progress=False)
    r2 = ev.evaluate_pairs(None, worms, methods=("none",), max_pairs=5, seed=1, progress=False)
    pairs1 = [(r["template"], r["test"]) for r in r1.records]
    assert len(pairs1) == 5 and len(set(pairs1)) == 5
    assert pairs1 == [(r["template"], r["test"]) for r in r2.records]
    fixed = ev.evaluate_pairs(None, worms, methods="none", template="w2", progress=False)
    assert [(r["template"], r["test"]) for r in fixed.records] == [
        ("w2", "w0"),
        ("w2", "w1"),
        ("w2", "w3"),
    ]


def test_tracking(model):
    template = _worm(0, wid="vol0")
    vols = [_worm(i, wid=f"vol{i}") for i in range(1, 3)]
    by_name = ev.evaluate_tracking(model, template, vols, methods=("fdnc", "none"), progress=False)
    assert len(by_name.records) == 4 and by_name.mode == "tracking"
    by_index = ev.evaluate_tracking(
        None, template, [template, *vols], by="index", methods=("none",), progress=False
    )
    assert [r["test"] for r in by_index.records] == ["vol1", "vol2"]
    assert all(r["counted"] == N for r in by_index.records)


def test_semisynthetic_confidence_uses_the_model_temperature(model):
    """Semi-synthetic pairs report the probabilities predict would (softmax of scores / T): the
    same assignments, softer confidences at T = 4."""
    worms = [_worm(i) for i in range(2)]
    run = lambda m: ev.evaluate_semisynthetic(
        m, worms, num_pairs=3, methods=("fdnc",), progress=False
    )  # noqa: E731
    raw, soft = run(model.with_temperature(1.0)), run(model.with_temperature(4.0))
    assert [r["accuracy"] for r in raw.records] == [r["accuracy"] for r in soft.records]
    p_raw = np.concatenate([p for p, _ in raw.confidence["fdnc"]])
    p_soft = np.concatenate([p for p, _ in soft.confidence["fdnc"]])
    assert p_soft.mean() < p_raw.mean()


def test_row_softmax_over_the_last_axis_of_a_batch():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 4, 5))
    scores[1, 2] = -np.inf  # a padding row
    batched = matching.row_softmax(scores)
    for b in range(3):
        np.testing.assert_array_equal(batched[b], matching.row_softmax(scores[b]))
    assert (batched[1, 2] == 0).all()


def test_semisynthetic(model):
    worms = [_worm(i) for i in range(2)]
    result = ev.evaluate_semisynthetic(
        model, worms, num_pairs=3, methods=("fdnc", "none"), progress=False
    )
    assert len(result.records) == 6
    for r in result.records:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["counted"] > 0
    s = ev.summarize(result)
    assert s["fdnc"]["n_pairs"] == 3 and "top5" in s["fdnc"]
    # Identical noise-free copies without drops: "none" is perfect.
    from fdnc_jax.sim.config import SimConfig

    easy = SimConfig(
        bend_curvature_per_mm=0.0,
        bend_curvature_change_per_mm=0.0,
        warp_amplitude_um=0.0,
        rotate_yz_max=0.0,
        shear_yz=0.0,
        rotate_xy_max=0.0,
        shear_xy=0.0,
        scale=0.0,
        p_drop=(0.0, 0.0),
        max_outliers=0,
        outlier_candidates=0,
        straighten_sources=False,
    )
    result = ev.evaluate_semisynthetic(
        None, worms, num_pairs=2, sim_cfg=easy, methods=("none",), progress=False
    )
    assert [r["accuracy"] for r in result.records] == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, or the run continues and reports what it skipped.


def test_no_labelled_worms_is_a_clear_error():
    worms = [_worm(i, names=np.full(N, "")) for i in range(3)]
    with pytest.raises(ValueError, match="none of the 3 worms has neuron names"):
        ev.evaluate_pairs(None, worms, methods=("none",), progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        ev.evaluate_pairs(None, [_worm(0), _worm(1)], methods=("magic",), progress=False)
    with pytest.raises(ValueError, match="need a template and at least one other"):
        ev.evaluate_pairs(None, [_worm(0)], methods=("none",), progress=False)


def test_unshared_names_skipped_and_mixed_channel_counts_evaluated(model, tmp_path):
    other = np.array([f"X{i}" for i in range(N)])
    worms = [
        _worm(0, wid="a"),
        _worm(1, wid="b"),
        _worm(2, wid="sf", n_color=3),  # RGB against RGBW: the color term reads R, G, B.
        _worm(3, wid="alien", names=other),  # Shares no name with anyone.
    ]
    result = ev.evaluate_pairs(model, worms, methods=("fdnc", "fdnc+color", "none"), progress=False)
    reasons = {(s["template"], s["test"], s["method"]): s["reason"] for s in result.skipped}
    assert "no shared names" in reasons[("a", "alien", "all")]
    assert "no shared names" in reasons[("alien", "b", "all")]
    evaluated = {(r["template"], r["test"], r["method"]) for r in result.records}
    assert ("a", "sf", "fdnc+color") in evaluated and ("sf", "b", "fdnc+color") in evaluated
    assert ("a", "sf", "fdnc") in evaluated and ("a", "sf", "none") in evaluated
    assert ("a", "b", "fdnc+color") in evaluated and ("b", "a", "fdnc+color") in evaluated
    assert len(evaluated) == 6 * 3  # The 6 pairs without 'alien', every method.
    summary = ev.write_outputs(result, tmp_path, plots=False)
    assert summary["fdnc+color"]["n_pairs"] == 6 and summary["fdnc"]["n_pairs"] == 6
    rows = list(csv.DictReader(open(tmp_path / "skipped.csv")))
    assert len(rows) == len(result.skipped) == 6


def test_duplicated_template_names_are_not_scored(model):
    dup = NAMES.copy()
    dup[1] = "N0"  # "N0" labels two neurons of worm a: ambiguous.
    worms = [_worm(0, names=dup, wid="a"), _worm(1, wid="b")]
    result = ev.evaluate_pairs(model, worms, methods=("fdnc", "none"), template="a", progress=False)
    assert result.skipped == [] and len(result.records) == 2
    assert all(r["counted"] == N - 2 for r in result.records)  # N0 and N1 are not scored.
    assert "['N0']" in result.notes[0]


# ----------------------------------------------------------------------------------------------
# Plots.


def test_plots_return_figures(model, tmp_path):
    fig = plots.plot_accuracy_box(
        {"fdnc": [0.5, 0.7, np.nan], "cpd": [], "none": [0.2]}, path=tmp_path / "box.png"
    )
    assert isinstance(fig, Figure) and (tmp_path / "box.png").stat().st_size > 0
    cal = ev.calibration_bins([0.1, 0.5, 0.9], [False, True, True])
    assert isinstance(plots.plot_calibration(cal), Figure)
    assert isinstance(plots.plot_calibration(cal["bins"]), Figure)
    plots.plot_calibration({"fdnc": cal, "fdnc+color": cal}, path=tmp_path / "cal.png")
    assert (tmp_path / "cal.png").is_file()
    t, s = _worm(0), _worm(1)
    fig = plots.plot_matches(t, s, predict(model, t, s), path=tmp_path / "m.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    unlabelled = Worm(xyz_um=s.xyz_um)
    assert isinstance(plots.plot_matches(t, unlabelled, predict(model, t, unlabelled)), Figure)


# ----------------------------------------------------------------------------------------------
# CLI (subprocesses: absl flags are process-global).


def _cli(*args, cwd):
    return run_cli("evaluate", *args, cwd=cwd)


def test_cli_baselines_and_errors(tmp_path):
    data = tmp_path / "worms"
    data.mkdir()
    for i in range(3):
        save_worm(_worm(i), data / f"w{i}.npz")
    out = tmp_path / "out"
    proc = _cli(
        "--data",
        str(data),
        "--methods=cpd,none",
        "--out",
        str(out),
        "--progress=false",
        "--plots=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "s/pair" in proc.stdout
    assert set(json.loads((out / "summary.json").read_text())) == {"cpd", "none"}
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(2):
        save_worm(_worm(i, names=np.full(N, "")), empty / f"u{i}.npz")
    proc = _cli("--data", str(empty), "--methods=none", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    assert "has neuron names" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("--data", str(data), "--out", str(out), "--weights=nope", cwd=tmp_path)
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_tracks_a_recording_file(tmp_path):
    """--mode=tracking --recording: every volume but the reference one is scored against it (names
    as ground truth); a wrong volume number or --recording outside tracking is a clear error."""
    volumes = [_worm(i, wid=f"v{i}", noise=0.3) for i in range(4)]
    save_recording(volumes, tmp_path / "rec.csv", numbers=[20, 21, 22, 23])
    out = tmp_path / "out"
    args = ["--mode=tracking", f"--recording={tmp_path / 'rec.csv'}", "--methods=none"]
    proc = _cli(*args, "--reference_volume=22", "--out", str(out), "--plots=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["none"]["n_pairs"] == 3
    assert summary["none"]["mean"] > 0.9  # the same animal, ~0.3 µm apart: centring is enough
    with open(out / "pairs.csv", newline="") as f:
        tested = {row["test"] for row in csv.DictReader(f)}
    assert tested == {"rec_v20", "rec_v21", "rec_v23"}
    proc = _cli(*args, "--reference_volume=5", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "volumes 20..23, 4 in all" in proc.stderr
    proc = _cli(
        "--mode=pairs", f"--recording={tmp_path / 'rec.csv'}", "--out", str(out), cwd=tmp_path
    )
    assert proc.returncode == 2 and "--recording is for --mode=tracking" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Real data.


def test_real_worms(shared_data, model):
    from fdnc_jax.datasets import resolve_worm_files
    from fdnc_jax.io import load_worm

    files = resolve_worm_files(str(shared_data / "data" / "wormnd" / "EY_*.npz"))[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worms = [load_worm(p) for p in files]
    result = ev.evaluate_pairs(
        model, worms, methods=("fdnc", "cpd", "none"), max_pairs=2, progress=False
    )
    summary = ev.summarize(result)
    assert all(summary[m]["n_pairs"] == 2 for m in ("fdnc", "cpd", "none"))
    for r in result.records:
        assert r["counted"] > 50 and 0.0 <= r["accuracy"] <= 1.0
