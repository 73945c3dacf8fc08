"""fdnc_jax.predict: equivariance, matching invariants, batching/compilation, outputs, bad input.

A tiny random model is enough: every property tested here holds for any weights.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import types
import warnings

import jax
import numpy as np
import pytest

import fdnc_jax as fd
from fdnc_jax import orientation
from fdnc_jax.model.fdnc import Model, ModelConfig

# ``fdnc_jax.predict`` is the function re-exported by the package; the module holds compile_count.
predict_mod = importlib.import_module("fdnc_jax.predict")

TINY = ModelConfig(width=16, layers=1, heads=2, ff_width=32, dropout=0.0)


def cloud(n: int, seed: int, **kwargs) -> fd.Worm:
    """A synthetic head-like cloud of n neurons in µm."""
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)) * np.array([30.0, 8.0, 6.0]) + 60.0
    return fd.Worm(xyz_um=xyz, **kwargs)


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.create(TINY)


@pytest.fixture(scope="module")
def demo() -> tuple[fd.Worm, fd.Worm]:
    return fd.load_demo_pair()


@pytest.fixture(scope="module")
def demo_pred(model, demo):
    template, test = demo
    return fd.predict(model, template, test, use_color=False)


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


# ------------------------------------------------------------------ symmetries


def test_permuting_test_worm_permutes_prediction(model, demo, demo_pred):
    template, test = demo
    perm = np.random.default_rng(1).permutation(test.n)
    pred = fd.predict(model, template, test.subset(perm), use_color=False)
    np.testing.assert_array_equal(pred.assignment, demo_pred.assignment[perm])
    np.testing.assert_array_equal(pred.labels, demo_pred.labels[perm])
    close(pred.probability, demo_pred.probability[perm])
    close(pred.outlier_probability, demo_pred.outlier_probability[perm])
    close(pred.candidate_probs, demo_pred.candidate_probs[perm])


def test_permuting_template_relabels_indices(model, demo, demo_pred):
    template, test = demo
    perm = np.random.default_rng(2).permutation(template.n)  # new index k holds old neuron perm[k]
    pred = fd.predict(model, template.subset(perm), test, use_color=False)
    inverse = np.argsort(perm)
    expected = np.where(demo_pred.assignment >= 0, inverse[demo_pred.assignment], -1)
    np.testing.assert_array_equal(pred.assignment, expected)
    np.testing.assert_array_equal(pred.labels, demo_pred.labels)  # Names follow the neurons.
    close(pred.probability, demo_pred.probability)
    close(pred.outlier_probability, demo_pred.outlier_probability)
    np.testing.assert_array_equal(pred.candidate_labels, demo_pred.candidate_labels)


# ------------------------------------------------------------------ invariants of one prediction


def test_prediction_invariants(demo, demo_pred):
    template, test = demo
    p = demo_pred
    assert p.assignment.shape == p.labels.shape == p.probability.shape == (test.n,)
    assert p.candidates.shape == p.candidate_probs.shape == (test.n, 5)
    assigned = p.assignment[p.assignment >= 0]
    assert len(assigned) == min(test.n, template.n)  # N == M here: everyone gets a partner.
    assert len(np.unique(assigned)) == len(assigned)  # One-to-one.
    assert np.all(assigned < template.n)
    for probs in (p.probability, p.candidate_probs, p.outlier_probability):
        assert np.all((probs >= 0) & (probs <= 1))
    assert np.all(np.diff(p.candidate_probs, axis=1) <= 1e-12)  # Top-k sorted decreasing.
    assert np.all((p.candidates >= 0) & (p.candidates < template.n))
    np.testing.assert_array_equal(p.labels, template.names[p.assignment])
    np.testing.assert_array_equal(p.candidate_labels, template.names[p.candidates])


def test_uninformative_color_changes_nothing(model):
    template = cloud(40, 10, color=np.ones((40, 3)))
    test = cloud(36, 11, color=np.full((36, 3), 5.0))  # Every row the same hue as the template's.
    off = fd.predict(model, template, test, use_color=False)
    on = fd.predict(model, template, test, use_color=True)
    np.testing.assert_array_equal(on.assignment, off.assignment)
    close(on.probability, off.probability, atol=1e-9)
    close(on.candidate_probs, off.candidate_probs, atol=1e-9)
    np.testing.assert_array_equal(on.candidates, off.candidates)


def test_predict_batch_equals_loop(model, demo):
    template, test = demo
    tests = [test, cloud(150, 3), cloud(70, 4), cloud(150, 5)]  # Three size buckets, one repeated.
    batch = fd.predict_batch(model, template, tests, use_color=False, top_k=3)
    for t, b in zip(tests, batch, strict=True):
        single = fd.predict(model, template, t, use_color=False, top_k=3)
        np.testing.assert_array_equal(b.assignment, single.assignment)
        np.testing.assert_array_equal(b.labels, single.labels)
        close(b.probability, single.probability)
        close(b.candidate_probs, single.candidate_probs)
        close(b.outlier_probability, single.outlier_probability)


def test_predict_batch_chunks_and_padding(model, monkeypatch):
    """Chunks smaller than the batch (with a padded last chunk) give the per-volume results."""
    monkeypatch.setattr(predict_mod, "BATCH_CHUNK", 4)
    template = cloud(40, 6)
    tests = [cloud(40 + i, 100 + i) for i in range(10)]  # One bucket: chunks of 4, 4, 2.
    batch = fd.predict_batch(model, template, tests, top_k=2)
    for t, b in zip(tests, batch, strict=True):
        single = fd.predict(model, template, t, top_k=2)
        np.testing.assert_array_equal(b.assignment, single.assignment)
        close(b.probability, single.probability)


def test_predict_batch_blocks_on_the_host_give_the_same_predictions(demo, monkeypatch, capsys):
    """Blocks of HOST_BLOCK volumes (the last one shorter), each searched (4 flips, branch and
    bound) and matched on its own, give what one block of all the volumes gives, in order; the
    progress bar counts them all."""
    model = fd.load_pretrained("small")  # canonical pose: the orientation search runs per block
    template, test = demo
    rng = np.random.default_rng(5)
    tests = [test.subset(np.sort(rng.permutation(test.n)[: 150 + 5 * i])) for i in range(7)]
    tests[2] = tests[2].replace(xyz_um=tests[2].xyz_um * np.array([1.0, -1.0, -1.0]))  # turned
    whole = fd.predict_batch(model, template, tests, top_k=2, match_on="host")
    blocks = []
    original = predict_mod._host_predictions

    def counting(model, template, tests, *args):
        blocks.append(len(tests))
        return original(model, template, tests, *args)

    monkeypatch.setattr(predict_mod, "_host_predictions", counting)
    monkeypatch.setattr(predict_mod, "HOST_BLOCK", 3)
    blocked = fd.predict_batch(model, template, tests, top_k=2, match_on="host", progress=True)
    assert blocks == [3, 3, 1]
    bar = capsys.readouterr().err  # the progress bar (tqdm redraws at most every 0.1 s)
    assert "predict" in bar and "0/7" in bar and "7/7" in bar
    for w, b in zip(whole, blocked, strict=True):
        np.testing.assert_array_equal(b.assignment, w.assignment)
        np.testing.assert_array_equal(b.orientation, w.orientation)
        close(b.probability, w.probability)
        close(b.candidate_probs, w.candidate_probs)


def test_auto_matches_on_device_only_for_large_batches_on_accelerators(monkeypatch):
    """match_on='auto': host on CPU; on an accelerator the device from DEVICE_MATCH_MIN_ROWS rows."""
    monkeypatch.setattr(predict_mod.jax, "default_backend", lambda: "cpu")
    assert not predict_mod._matches_on_device("auto", 10**6)
    assert predict_mod._matches_on_device("device", 1)
    monkeypatch.setattr(predict_mod.jax, "default_backend", lambda: "gpu")
    limit = predict_mod.DEVICE_MATCH_MIN_ROWS
    assert not predict_mod._matches_on_device("auto", limit - 1)
    assert predict_mod._matches_on_device("auto", limit)
    assert not predict_mod._matches_on_device("host", 10**6)


def test_accelerator_chunk_follows_device_memory(monkeypatch):
    """A third of the reported memory limit bounds a chunk; ACCELERATOR_CHUNK_BYTES otherwise."""
    paper = types.SimpleNamespace(config=ModelConfig())
    stats: dict = {}

    class Device:
        def memory_stats(self):
            if stats.get("fail"):
                raise NotImplementedError
            return stats.get("value")

    monkeypatch.setattr(predict_mod.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(predict_mod.jax, "devices", lambda: [Device()])
    per_volume = 4 * 320 * (2 * 8 * 320 + 2048)  # 150 + 150 neurons in the 160 buckets
    stats["value"] = {"bytes_limit": 3 * 600 * per_volume}  # room for 600 volumes
    assert predict_mod._max_chunk(paper, 160, 160) == 512
    stats["value"] = {"bytes_limit": 60 << 30}  # an H100: capped by BATCH_CHUNK
    assert predict_mod._max_chunk(paper, 160, 160) == predict_mod.BATCH_CHUNK
    for stats["value"] in (None, {}):  # not reported: the fixed budget
        assert predict_mod._accelerator_budget() == predict_mod.ACCELERATOR_CHUNK_BYTES
    stats["fail"] = True
    assert predict_mod._accelerator_budget() == predict_mod.ACCELERATOR_CHUNK_BYTES
    assert predict_mod._max_chunk(paper, 1024, 1024) >= 1


def test_cpu_chunk_limit():
    paper = types.SimpleNamespace(config=ModelConfig())
    small = types.SimpleNamespace(config=ModelConfig(width=64, layers=4, heads=4, ff_width=256))
    if jax.default_backend() == "cpu":
        assert predict_mod._max_chunk(paper, 224, 224) == 4
        assert predict_mod._max_chunk(paper, 512, 512) == 1
        assert predict_mod._max_chunk(small, 160, 160) == 16
    assert predict_mod._chunk_size(3, 32) == 4
    assert predict_mod._chunk_size(1, 32) == 1
    assert predict_mod._chunk_size(40, 32) == 32


@pytest.mark.parametrize("two_way", [False, True])
def test_compiles_once_per_bucket(two_way):
    """One executable per bucket and direction: the forward, and with two-way scores the reverse
    (its template side batched per test)."""
    model = Model.create(TINY, seed=1 + two_way)  # A fresh model: its own compilation cache.
    template = cloud(50, 20)
    size = predict_mod.bucket_size(50)
    fd.predict(model, template, cloud(50, 21), two_way=two_way)
    count = predict_mod.compile_count(model)
    assert count == 1 + two_way
    fd.predict(model, template, cloud(size - 1, 22), two_way=two_way)  # Same bucket: none new.
    assert predict_mod.compile_count(model) == count
    fd.predict(model, template, cloud(size + 1, 23), two_way=two_way)  # Next bucket: one more each.
    assert predict_mod.compile_count(model) == 2 * count


def test_template_without_names(model):
    template, test = cloud(30, 30), cloud(30, 31)
    assert np.all(template.names == "")
    pred = fd.predict(model, template, test, top_k=2)
    assert np.all(pred.labels == "")
    assert np.all(pred.assignment >= 0)
    records = pred.to_records()
    assert records[0]["candidates"] == ";".join(str(c) for c in pred.candidates[0])


def test_min_probability_one_unassigns_everything(model, demo):
    template, test = demo
    pred = fd.predict(model, template, test, use_color=False, min_probability=1.0)
    assert np.all(pred.assignment == -1)
    assert np.all(pred.labels == "")
    assert np.all(pred.probability == 0)
    assert np.all(pred.candidates >= 0)  # Candidates are still reported.


def test_more_test_than_template_neurons(model):
    template, test = cloud(20, 40, names=[f"N{i}" for i in range(20)]), cloud(45, 41)
    pred = fd.predict(model, template, test)
    assert np.sum(pred.assignment == -1) == 25
    assert np.all(pred.labels[pred.assignment == -1] == "")
    assigned = pred.assignment[pred.assignment >= 0]
    assert len(np.unique(assigned)) == 20


def test_too_large_worm_raises(model):
    big = fd.Worm(xyz_um=np.random.default_rng(0).uniform(0, 300, size=(1025, 3)))
    small = cloud(30, 50)
    with pytest.raises(ValueError, match="largest supported size"):
        fd.predict(model, small, big)
    with pytest.raises(ValueError, match="template has 1025 neurons"):
        fd.predict(model, big, small)


# ------------------------------------------------------------------ output formats


def test_csv_and_records_round_trip(demo_pred, tmp_path):
    records = demo_pred.to_records()
    assert len(records) == len(demo_pred.assignment)
    r = records[3]
    assert r["test_index"] == 3
    assert r["assignment"] == demo_pred.assignment[3]
    assert r["label"] == demo_pred.labels[3]
    assert r["candidates"].split(";") == [c for c in demo_pred.candidate_labels[3] if c]
    path = tmp_path / "pred.csv"
    demo_pred.to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert list(rows[0]) == list(records[0])
    for row, rec in zip(rows, records, strict=True):
        assert int(row["test_index"]) == rec["test_index"]
        assert int(row["assignment"]) == rec["assignment"]
        assert row["label"] == rec["label"]
        assert float(row["probability"]) == rec["probability"]
        assert float(row["outlier_probability"]) == rec["outlier_probability"]
        assert row["candidates"] == rec["candidates"]
        assert row["candidate_probs"] == rec["candidate_probs"]


def test_save_predictions_writes_one_csv_for_all_volumes(model, demo, tmp_path):
    """One row per neuron of every volume, the volume number first, then each Prediction's own
    records; a volume number per prediction is required."""
    template, test = demo
    volumes = [test, test.subset(np.arange(100))]
    preds = fd.predict_batch(model, template, volumes, use_color=False, orientation="fixed")
    path = tmp_path / "tracks.csv"
    fd.save_predictions(preds, path, volumes=[4, 9])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == test.n + 100
    assert list(rows[0]) == ["volume", *preds[0].to_records()[0]]
    assert [int(r["volume"]) for r in rows] == [4] * test.n + [9] * 100
    for row, rec in zip(rows[test.n :], preds[1].to_records(), strict=True):
        assert int(row["test_index"]) == rec["test_index"]
        assert int(row["assignment"]) == rec["assignment"] and row["label"] == rec["label"]
    fd.save_predictions(preds, path)  # default numbers 0, 1
    with open(path, newline="") as f:
        assert {r["volume"] for r in csv.DictReader(f)} == {"0", "1"}
    with pytest.raises(ValueError, match="volumes has 1 numbers for 2 predictions"):
        fd.save_predictions(preds, path, volumes=[4])
    with pytest.raises(ValueError, match="predictions is empty"):
        fd.save_predictions([], path)
    with pytest.raises(TypeError, match="got one"):
        fd.save_predictions(preds[0], path)
    with pytest.raises(TypeError, match=r"predictions\[1\] is a Worm"):
        fd.save_predictions([preds[0], test], path)
    with pytest.raises(TypeError, match="volumes must be a sequence"):
        fd.save_predictions(preds, path, volumes=5)
    with pytest.raises(TypeError, match="volumes must be integers"):
        fd.save_predictions(preds, path, volumes=[1.5, 2])


def test_track_matrix_inverts_the_assignments(model, demo):
    """track_matrix[t, j] is the neuron of volume t assigned to template neuron j (-1: none)."""
    template, test = demo
    volumes = [test, test.subset(np.arange(0, test.n, 2))]
    preds = fd.predict_batch(model, template, volumes, use_color=False, orientation="fixed")
    tracks = fd.track_matrix(preds)
    assert tracks.shape == (2, template.n) and tracks.dtype == np.int64
    for t, pred in enumerate(preds):
        found = tracks[t] >= 0
        assert found.sum() == (pred.assignment >= 0).sum()
        np.testing.assert_array_equal(pred.assignment[tracks[t][found]], np.flatnonzero(found))
    with pytest.raises(ValueError, match="predictions is empty"):
        fd.track_matrix([])
    other = fd.predict(model, template.subset(np.arange(100)), test, use_color=False)
    with pytest.raises(ValueError, match="templates of different sizes"):
        fd.track_matrix([preds[0], other])


def test_to_dataframe_without_pandas(demo_pred):
    if importlib.util.find_spec("pandas") is not None:
        pytest.skip("pandas is installed")
    with pytest.raises(ImportError, match="pip install pandas"):
        demo_pred.to_dataframe()


# ------------------------------------------------------------------ bad input


def test_nan_worm_rejected():
    xyz = np.random.default_rng(0).normal(size=(10, 3)) * 20
    xyz[4, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fd.Worm(xyz_um=xyz)


def test_color_problems(model):
    template = cloud(20, 60, color=np.random.default_rng(0).uniform(0.1, 1, (20, 4)))
    test3 = cloud(20, 61, color=np.random.default_rng(1).uniform(0.1, 1, (20, 3)))
    # RGBW template vs RGB test: the color term compares R, G, B, so the W channel is irrelevant.
    rgb_template = template.replace(color=template.color[:, :3])
    a = fd.predict(model, template, test3, use_color=True)
    b = fd.predict(model, rgb_template, test3, use_color=True)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    with pytest.raises(ValueError, match="test worm 0 has no color"):
        fd.predict(model, template, cloud(20, 62), use_color=True)
    with pytest.raises(ValueError, match="template has no color"):
        fd.predict(model, cloud(20, 62), template, use_color=True)


@pytest.mark.parametrize("canonical", [False, True])  # True: orientation scoring on the host too
def test_host_thread_pool_gives_the_same_predictions(demo, monkeypatch, canonical):
    model = Model.create(ModelConfig(**{**TINY.__dict__, "canonical_pose": canonical}))
    template, _ = demo
    tests = [cloud(60 + 7 * i, 100 + i) for i in range(10)]  # ≥ HOST_PARALLEL_MIN volumes
    monkeypatch.setattr(predict_mod, "HOST_THREADS", 1)
    serial = fd.predict_batch(model, template, tests, use_color=False)
    monkeypatch.setattr(predict_mod, "HOST_THREADS", 2)
    pooled = fd.predict_batch(model, template, tests, use_color=False)
    for a, b in zip(serial, pooled, strict=True):
        np.testing.assert_array_equal(a.assignment, b.assignment)
        np.testing.assert_array_equal(a.candidates, b.candidates)
        np.testing.assert_array_equal(a.probability, b.probability)
        np.testing.assert_array_equal(a.orientation, b.orientation)


def test_color_input_model_skips_color_term_by_default():
    color_model = Model.create(ModelConfig(**{**TINY.__dict__, "color_features": 3}))
    rng = np.random.default_rng(3)
    template = cloud(30, 70, color=rng.uniform(0.1, 1, (30, 3)))
    test = cloud(28, 71, color=rng.uniform(0.1, 1, (28, 3)))
    auto = fd.predict(color_model, template, test)  # Color already read by the network ...
    off = fd.predict(color_model, template, test, use_color=False)
    on = fd.predict(color_model, template, test, use_color=True)  # ... the term only on request.
    close(auto.probability, off.probability, atol=0)
    assert not np.allclose(on.candidate_probs, off.candidate_probs)
    with pytest.raises(ValueError, match="takes color as input"):
        fd.predict(color_model, template, cloud(28, 72))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"top_k": 0}, ValueError, "top_k=0"),
        ({"top_k": -1}, ValueError, "top_k=-1"),
        ({"top_k": 21}, ValueError, "top_k=21"),
        ({"top_k": 2.0}, TypeError, "top_k must be an int"),
        ({"top_k": "3"}, TypeError, "top_k must be an int"),
        ({"top_k": True}, TypeError, "top_k must be an int"),
        ({"min_probability": -0.1}, ValueError, "min_probability"),
        ({"min_probability": 1.5}, ValueError, "min_probability"),
        ({"min_probability": float("nan")}, ValueError, "min_probability"),
    ],
)
def test_bad_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        fd.predict(model, cloud(20, 70), cloud(20, 71), **kwargs)


def test_bad_objects(model):
    template, test = cloud(20, 80), cloud(20, 81)
    with pytest.raises(TypeError, match="model must be a fdnc_jax Model"):
        fd.predict(model.params, template, test)
    with pytest.raises(TypeError, match="template must be a Worm"):
        fd.predict(model, template.xyz_um, test)
    with pytest.raises(TypeError, match="test must be a Worm"):
        fd.predict(model, template, test.xyz_um)
    with pytest.raises(TypeError, match="test worm 1 must be a Worm"):
        fd.predict_batch(model, template, [test, "x"])
    with pytest.raises(ValueError, match="tests is empty"):
        fd.predict_batch(model, template, [])


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(ValueError, match="nope.npz") as err:
        fd.load_worm(path)
    assert "no such file" in str(err.value)


def test_duplicate_template_names_rejected(model):
    names = ["A"] * 2 + [f"N{i}" for i in range(18)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template = cloud(20, 90, names=names)
    with pytest.raises(ValueError, match="duplicated"):
        fd.predict(model, template, cloud(20, 91))


@pytest.mark.parametrize("two_way", [False, True])
def test_ensemble_of_one_template_twice_equals_single(model, two_way):
    template, test = fd.load_demo_pair()
    named = template.subset(np.flatnonzero(template.labelled))  # votes are over names only
    # Fewer test neurons than names: every row is assigned, so the ensemble's renormalised rows
    # (a constant per row) cannot change which rows the one-to-one assignment leaves out.
    test = test.subset(np.arange(named.n - 5))
    single = fd.predict(model, named, test, use_color=False, two_way=two_way)
    ens = fd.predict(model, [named, named], test, use_color=False, two_way=two_way)
    np.testing.assert_array_equal(ens.template_names, np.sort(named.names))
    np.testing.assert_array_equal(ens.labels, single.labels)
    np.testing.assert_allclose(ens.probability, single.probability, atol=1e-5)
    np.testing.assert_allclose(ens.outlier_probability, single.outlier_probability, atol=1e-5)
    assert ens.template_names[ens.assignment[0]] == ens.labels[0]


def test_ensemble_batch_equals_one_test_at_a_time(model, demo, monkeypatch):
    """predict_batch with a list of templates (each template's forwards batched over the tests, in
    blocks) gives predict_ensemble's prediction of each test alone, for tests of several buckets."""
    monkeypatch.setattr(predict_mod, "HOST_BLOCK", 2)  # 3 tests: two blocks
    template, test = demo
    rng = np.random.default_rng(4)
    templates = [template, test.subset(rng.permutation(test.n)[:170])]
    tests = [test.subset(rng.permutation(test.n)[:m]) for m in (150, 100, 60)]
    batch = fd.predict_batch(model, templates, tests, use_color=True, top_k=3)
    for t, b in zip(tests, batch, strict=True):
        alone = predict_mod.predict_ensemble(model, templates, t, use_color=True, top_k=3)
        np.testing.assert_array_equal(b.template_names, alone.template_names)
        same = b.assignment == alone.assignment
        assert same.mean() > 0.95, same.mean()  # batched forwards: float32 near-ties may differ
        close(b.probability[same], alone.probability[same], atol=1e-4)
        close(b.outlier_probability, alone.outlier_probability, atol=1e-4)
        np.testing.assert_array_equal(b.labels[same], alone.labels[same])


def test_ensemble_bad_input(model):
    template, test = fd.load_demo_pair()
    with pytest.raises(ValueError, match="templates is empty"):
        fd.predict(model, [], test)
    with pytest.raises(ValueError, match="has no names"):
        fd.predict(model, [template, template.replace(names=None)], test)
    with pytest.raises(ValueError, match="top_k=500 must be between 1 and the"):
        fd.predict_batch(model, [template, template], [test, test], top_k=500)
    with pytest.raises(TypeError, match="top_k must be an int"):
        fd.predict_batch(model, [template], [test], top_k="3")
    with pytest.raises(TypeError, match="progress must be a bool"):
        fd.predict_batch(model, [template], [test], progress="yes")
    with pytest.raises(ValueError, match="match_on"):
        fd.predict_batch(model, [template], [test], match_on="gpu")


@pytest.mark.parametrize("name", ["small", "color"])
def test_reverse_log_probs_batched_equal_one_test_at_a_time(demo, name):
    """The reverse direction of the orientation search, batched over tests of several buckets,
    equals matching the template to each test alone (as the search did before)."""
    model = fd.load_pretrained(name)
    template, test = demo
    template = template.subset(np.arange(120))
    rng = np.random.default_rng(1)
    tests = [test, test.subset(rng.permutation(test.n)[:150]), test.subset(np.arange(60))]
    signs = predict_mod.orientation_hypotheses(model, "auto")
    batched = predict_mod._reverse_log_probs(model, template, tests, signs)
    assert sorted(batched) == [(i, h) for i in range(3) for h in range(len(signs))]
    for i, t in enumerate(tests):
        alone = predict_mod._hypothesis_log_probs(model, t, [template], signs)
        for h in range(len(signs)):
            assert batched[i, h].shape == (template.n, t.n + 1)
            close(batched[i, h], alone[0, h], atol=2e-4)


@pytest.mark.parametrize(
    "solver,use_color,chunk",
    [("hungarian", False, None), ("auction", False, None), ("hungarian", True, 2)],
)
def test_device_orientation_choice_equals_host(demo, monkeypatch, solver, use_color, chunk):
    """The orientation search with both directions' assignments on the device keeps the same
    hypothesis as on the host, for tests of several buckets (canonical-pose model, 4 flips), also
    with the color term in the hypotheses' assignments; and the kept rows' two-way log-probs it
    gathers from its chunks are the host's. ``chunk``: a forward call's limit of volumes, here
    below the 4 hypotheses of a test (chunks still hold whole tests)."""
    if chunk is not None:
        monkeypatch.setattr(predict_mod, "_max_chunk", lambda *args: chunk)
    model = fd.load_pretrained("small")
    template, test = demo
    rng = np.random.default_rng(2)
    tests = [test, test.subset(rng.permutation(test.n)[:150]), test.subset(np.arange(60))]
    tests += [t.replace(xyz_um=t.xyz_um * np.array([-1.0, -1.0, 1.0])) for t in tests]  # turned
    signs = predict_mod.orientation_hypotheses(model, "auto")
    host_lp, host = predict_mod._log_probs(model, template, tests, signs, use_color, two_way=True)
    chunks = predict_mod._searched_chunks(
        model, template, tests, signs, solver, use_color, two_way=True
    )
    kept = {}
    for part, (_, s_mask, _, _), lp, hypotheses in chunks:
        lp, hypotheses = np.asarray(lp), np.asarray(hypotheses)  # [b', M_b, N_b + 1], [b']
        assert len(lp) == len(hypotheses) >= len(part) and not s_mask[len(part) :].any()
        for j, (i, h) in enumerate(part):
            assert h is None  # chosen on the device
            kept[i] = int(hypotheses[j])
            m = tests[i].n
            assert s_mask[j, :m].all() and not s_mask[j, m:].any()
            found = np.concatenate([lp[j, :m, : template.n], lp[j, :m, -1:]], axis=1)
            close(found, host_lp[i], atol=2e-4)
    assert sorted(kept) == list(range(len(tests)))  # every test once
    np.testing.assert_array_equal([kept[i] for i in range(len(tests))], host)
    assert len(set(host.tolist())) > 1  # the search does choose different flips here


def test_orientation_search_keeps_the_true_pose_of_the_demo_pair(demo):
    """The two bundled NP animals are in the same canonical pose (the identity flip names 60 and
    110 of 188 neurons, the 180° turn about the long axis 30 and 99): the search must keep it."""
    template, test = demo
    for name in ("default", "color"):
        pred = fd.predict(fd.load_pretrained(name), template, test, use_color=False)
        np.testing.assert_array_equal(pred.orientation, [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "solver,use_color,two_way",
    [
        ("hungarian", False, True),
        ("auction", False, True),
        ("hungarian", True, True),
        ("auction", True, True),
        ("hungarian", False, False),
    ],
)
def test_device_matching_agrees_with_host(demo, monkeypatch, capsys, use_color, solver, two_way):
    model = fd.load_pretrained("small")  # Trained (peaked scores) and canonical pose: 4 hypotheses.
    template, test = demo
    rng = np.random.default_rng(0)
    template = template.subset(np.arange(120))  # Smaller than the tests: rows left over.
    # One size bucket (160; padding differs per test), so the auction and the Hungarian compile
    # once per direction: buckets are test_device_orientation_choice_equals_host's concern.
    sizes = (150, 147, 156)
    tests = [test.subset(rng.permutation(test.n)[:m]) for m in sizes]
    kwargs = dict(use_color=use_color, top_k=3, min_probability=0.3, two_way=two_way)
    host = fd.predict_batch(model, template, tests, match_on="host", **kwargs)
    forwarded = []  # (test, hypothesis) items of every forward call, either direction
    padded_tests = predict_mod._padded_tests

    def counting(*args):
        for chunk in padded_tests(*args):
            forwarded.extend(chunk[0])
            yield chunk

    monkeypatch.setattr(predict_mod, "_padded_tests", counting)
    device = fd.predict_batch(
        model, template, tests, match_on="device", device_solver=solver, progress=True, **kwargs
    )
    assert "3/3" in capsys.readouterr().err  # the progress bar, advanced per chunk
    # The search runs each of the 4 hypotheses once per direction; the match reuses the kept ones.
    assert sorted(forwarded) == sorted([(i, h) for i in range(3) for h in range(4)] * 2)
    for h, d in zip(host, device, strict=True):
        np.testing.assert_array_equal(d.orientation, h.orientation)
        same = d.assignment == h.assignment
        assert same.mean() > 0.97, same.mean()  # float32 vs float64: near-ties may differ.
        close(d.probability[same], h.probability[same], atol=1e-4)
        rows = (d.candidates == h.candidates).all(axis=1)
        assert rows.mean() > 0.97
        close(d.candidate_probs[rows], h.candidate_probs[rows], atol=1e-4)
        assert (h.assignment < 0).any() and ((d.assignment < 0) == (h.assignment < 0)).mean() > 0.97
        close(d.outlier_probability, h.outlier_probability, atol=1e-5)
        np.testing.assert_array_equal(d.labels[same], h.labels[same])
        assert ((d.assignment >= 0) <= (d.probability >= 0.3)).all()  # min_probability applied
        assert d.candidates.dtype == h.candidates.dtype == np.int64
        assert d.assignment.dtype == np.int64 and d.probability.dtype == np.float64
        assert (d.labels[d.assignment < 0] == "").all() and (
            d.labels[d.assignment >= 0] != ""
        ).all()


@pytest.mark.parametrize("orientation_mode", ["fixed", "auto"])
def test_two_way_scores_are_the_mean_of_both_directions(demo, orientation_mode):
    """predict's default scores are matching.two_way_log_probs of the kept hypothesis' forward and
    reverse log-probs (with "fixed", the reverse runs for the two-way scores alone);
    two_way=False matches on the forward log-probs, as the original."""
    model = fd.load_pretrained("small")
    template, test = demo
    tests = [test, test.subset(np.random.default_rng(5).permutation(test.n)[:150])]
    signs = predict_mod.orientation_hypotheses(model, orientation_mode)
    forward = predict_mod._hypothesis_log_probs(model, template, tests, signs)
    reverse = predict_mod._reverse_log_probs(model, template, tests, signs)
    kwargs = dict(use_color=False, top_k=3, orientation=orientation_mode, match_on="host")
    both = fd.predict_batch(model, template, tests, **kwargs)
    one = fd.predict_batch(model, template, tests, two_way=False, **kwargs)
    for i, (b, o) in enumerate(zip(both, one, strict=True)):
        h = int(np.flatnonzero((signs == b.orientation).all(axis=1))[0])
        lp = fd.matching.two_way_log_probs(forward[i, h], reverse[i, h])
        want = fd.matching.match(lp, top_k=3, temperature=model.temperature)
        np.testing.assert_array_equal(b.assignment, want.assignment)
        close(b.probability, want.probability, atol=1e-4)
        close(b.outlier_probability, np.exp(forward[i, h][:, -1]), atol=1e-5)
        want = fd.matching.match(forward[i, h], top_k=3, temperature=model.temperature)
        np.testing.assert_array_equal(o.assignment, want.assignment)
        assert (b.assignment != o.assignment).any()  # the reverse direction does change some
    with pytest.raises(TypeError, match="two_way must be a bool"):
        fd.predict(model, template, test, two_way="yes")
    with pytest.raises(TypeError, match="two_way must be a bool"):
        fd.predict(model, [template], test, two_way=None)


def test_match_on_is_validated(model, demo):
    template, test = demo
    with pytest.raises(ValueError, match="match_on"):
        fd.predict(model, template, test, match_on="gpu")
    with pytest.raises(ValueError, match="color_weight"):
        fd.predict(model, template, test, use_color=True, color_weight=-1.0, match_on="device")
    with pytest.raises(ValueError, match="device_solver"):  # checked wherever the matching runs
        fd.predict_batch(model, template, [test], match_on="host", device_solver="greedy")


def test_model_temperature_reaches_predictions_and_survives_save_load(tmp_path, demo):
    """Model.temperature: probabilities softened on host and device paths, assignment unchanged;
    saved with the weights; files without it load at 1; the bundled models carry theirs (> 1)."""
    from fdnc_jax.checkpoint import CheckpointError, load_weights, save_weights

    model = fd.load_pretrained("small")
    template, test = demo
    raw = fd.predict(model.with_temperature(1.0), template, test, orientation="fixed")
    for match_on in ("host", "device"):
        soft = fd.predict(
            model.with_temperature(3.0), template, test, orientation="fixed", match_on=match_on
        )
        same = soft.assignment == raw.assignment
        assert same.mean() > 0.97
        rows = (soft.candidates[:, 0] == raw.candidates[:, 0]) & (raw.candidate_probs[:, 0] > 0)
        assert rows.mean() > 0.97  # each row's best candidate, now less certain
        assert (soft.candidate_probs[rows, 0] <= raw.candidate_probs[rows, 0] + 1e-6).all()
        top = (soft.assignment >= 0) & same
        assert soft.probability[top].mean() < raw.probability[top].mean()
    path = tmp_path / "w.npz"
    save_weights(model.with_temperature(2.0), path)
    assert load_weights(path).temperature == 2.0
    arrays = dict(np.load(path))
    del arrays["__temperature__"]  # a file written before temperatures existed
    np.savez(tmp_path / "old.npz", **arrays)
    assert load_weights(tmp_path / "old.npz").temperature == 1.0
    arrays["__temperature__"] = np.asarray(-1.0)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match="temperature"):
        load_weights(tmp_path / "bad.npz")
    assert fd.load_pretrained("default").temperature > 1
    assert fd.load_pretrained("color").temperature > 1
    with pytest.raises(ValueError, match="temperature"):
        model.with_temperature(0.0)


@pytest.mark.parametrize("use_color", [False, True])
def test_orientation_branch_and_bound_keeps_the_full_searchs_choice(demo, monkeypatch, use_color):
    """_choose_orientations runs the reverse direction only for hypotheses whose bound can still
    win, yet keeps what scoring every hypothesis both ways keeps — for tests of several buckets, some
    turned 180° — and it does skip some reverse forwards."""
    model = fd.load_pretrained("small")
    template, test = demo
    rng = np.random.default_rng(3)
    tests = [test, test.subset(rng.permutation(test.n)[:150]), test.subset(np.arange(80))]
    tests += [t.replace(xyz_um=t.xyz_um * np.array([1.0, -1.0, -1.0])) for t in tests]  # turned
    signs = predict_mod.orientation_hypotheses(model, "auto")
    forward = predict_mod._hypothesis_log_probs(model, template, tests, signs)
    reverse = predict_mod._reverse_log_probs(model, template, tests, signs)
    full = []
    for i, t in enumerate(tests):
        color = predict_mod._color_term(template, t, use_color, 60.0)
        keys = [
            orientation.orientation_key(
                forward[i, h], reverse[i, h], t.xyz_um, template.xyz_um, color
            )
            for h in range(len(signs))
        ]
        full.append(int(np.argmax([k[0] + 1e-9 * k[1] for k in keys])))

    run = []
    original = predict_mod._reverse_log_probs

    def counting(*args, items=None):
        run.extend(items)
        return original(*args, items=items)

    monkeypatch.setattr(predict_mod, "_reverse_log_probs", counting)
    chosen, kept_reverse = predict_mod._choose_orientations(
        model, template, tests, signs, forward, use_color, 60.0
    )
    np.testing.assert_array_equal(chosen, full)
    assert sorted(kept_reverse) == [(i, h) for i, h in enumerate(full)]  # the kept ones' reverse
    for item, lp in kept_reverse.items():  # other chunks than ``reverse``'s: float32 rounding
        np.testing.assert_allclose(lp, reverse[item], atol=2e-4)
    if not use_color:  # positions alone: the search does keep different flips for these tests
        assert len(set(full)) > 1
    assert len(run) == len(set(run)) < len(tests) * len(signs)  # each at most once, some skipped
