"""Training: loss goes down, kill-and-resume is exact, NaN stops cleanly, no retrace, data parallel."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import fdnc_jax as fd
from fdnc_jax import losses
from fdnc_jax.checkpoint import CheckpointError, load_checkpoint, save_weights
from fdnc_jax.train.config_files import get_config
from fdnc_jax.train.loop import (
    bank_for_step,
    bucketed_source_banks,
    load_sources,
    split_sources,
    train_and_evaluate,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**train):
    config = get_config(ROOT / "configs" / "tiny.py")
    for k, v in train.items():
        config.train[k] = v
    return config


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(model.params)]


def _assert_same_latest_params(workdir_a, workdir_b):
    a = load_checkpoint(workdir_a, which="latest")
    b = load_checkpoint(workdir_b, which="latest")
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    model = train_and_evaluate(tiny_config(steps=60, eval_every=20, log_every=10), workdir)
    return workdir, model


def test_tiny_training_lowers_loss_and_writes_contract(trained):
    workdir, model = trained
    records = _records(workdir)
    assert all("step" in r and "loss" in r for r in records)
    evals = [r for r in records if "accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert records[-1]["loss"] < records[0]["loss"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert model.info["best_accuracy"] == max(r["accuracy"] for r in evals)


def test_tensorboard_scalars_mirror_metrics(trained):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = trained
    board = EventAccumulator(str(workdir / "tensorboard"))
    board.Reload()
    evals = [r for r in _records(workdir) if "accuracy" in r]
    scalars = board.Scalars("accuracy")
    assert [e.step for e in scalars] == [r["step"] for r in evals]
    np.testing.assert_allclose(
        [e.value for e in scalars], [r["accuracy"] for r in evals], rtol=1e-6
    )
    assert {"loss", "val_loss", "lr"} <= set(board.Tags()["scalars"])


def test_load_checkpoint_predicts_one_to_one(trained):
    workdir, _ = trained
    model = fd.load_checkpoint(workdir)
    template, test = fd.load_demo_pair()
    pred = fd.predict(model, template, test)
    assigned = pred.assignment[pred.assignment >= 0]
    assert len(assigned) == len(set(assigned.tolist())) > 0
    assert model.info["step"] in (20, 40, 60)


def test_load_checkpoint_reads_exported_weights(trained, tmp_path):
    workdir, _ = trained
    model = fd.load_checkpoint(workdir)
    save_weights(model, tmp_path / "w.npz")
    again = fd.load_checkpoint(tmp_path / "w.npz")  # As fdnc-evaluate --checkpoint=w.npz does.
    for x, y in zip(_params(model), _params(again), strict=True):
        np.testing.assert_array_equal(x, y)
    save_weights(model, tmp_path / "w16.npz", dtype="float16")
    half = fd.load_checkpoint(tmp_path / "w16.npz")
    for x, y in zip(_params(model), _params(half), strict=True):
        assert y.dtype == np.float32  # Computed in float32 again ...
        np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))  # ... rounded.
    assert (tmp_path / "w16.npz").stat().st_size < 0.7 * (tmp_path / "w.npz").stat().st_size
    with pytest.raises(ValueError, match="dtype"):
        save_weights(model, tmp_path / "w8.npz", dtype="int8")


def test_kill_and_resume_is_exact(tmp_path):
    config = tiny_config(steps=20, eval_every=5, log_every=5, checkpoint_every=10)
    train_and_evaluate(config, tmp_path / "a")
    config.train.steps = 10
    train_and_evaluate(config, tmp_path / "b")
    # Simulate a kill after step 13: metrics written past the last checkpoint are dropped on resume.
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 13, "loss": 1.0}) + "\n")
    config.train.steps = 20
    train_and_evaluate(config, tmp_path / "b")
    _assert_same_latest_params(tmp_path / "a", tmp_path / "b")
    steps_b = [r["step"] for r in _records(tmp_path / "b")]
    assert steps_b == [r["step"] for r in _records(tmp_path / "a")] == [5, 10, 15, 20]


def test_nan_stops_training_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(steps=10, eval_every=10, log_every=5, checkpoint_every=10)
    train_and_evaluate(config, tmp_path)
    before = load_checkpoint(tmp_path, which="latest")
    real = losses.match_loss

    def nan_loss(*args):
        out = real(*args)
        return {**out, "loss": out["loss"] * jax.numpy.nan}

    monkeypatch.setattr(losses, "match_loss", nan_loss)
    config.train.steps = 20
    with pytest.raises(FloatingPointError, match="non-finite.*last good checkpoint is step 10"):
        train_and_evaluate(config, tmp_path)
    after = load_checkpoint(tmp_path, which="latest")
    assert after.info["step"] == 10
    for x, y in zip(_params(before), _params(after), strict=True):
        np.testing.assert_array_equal(x, y)


def test_train_step_traced_once(tmp_path):
    from fdnc_jax.train import step as step_lib

    traces = []
    real = step_lib._loss_fn

    def counting(*args):
        traces.append(1)
        return real(*args)

    config = tiny_config(steps=12, eval_every=6, log_every=3)
    train, _ = split_sources(load_sources(config.data), config.data)
    n_banks = len(bucketed_source_banks(train, config.data.source_buckets, use_color=False))
    assert n_banks == 2  # the bundled worms span both size buckets: one trace per bank
    step_lib._loss_fn, saved = counting, real
    try:
        train_and_evaluate(config, tmp_path)
    finally:
        step_lib._loss_fn = saved
    assert len(traces) == n_banks


def test_bank_schedule_is_deterministic_and_proportional():
    weights = np.array([0.75, 0.25])
    picks = [bank_for_step(s, weights, seed=0) for s in range(4000)]
    assert picks == [bank_for_step(s, weights, seed=0) for s in range(4000)]
    assert abs(np.mean(picks) - 0.25) < 0.03
    assert picks != [bank_for_step(s, weights, seed=1) for s in range(4000)]


def test_corrupt_checkpoint_names_path(tmp_path):
    train_and_evaluate(tiny_config(steps=5, eval_every=5, checkpoint_every=5), tmp_path)
    for f in (tmp_path / "checkpoints" / "best" / "5" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"checkpoints/best/5"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        load_checkpoint(ROOT / "configs")


def test_resume_with_the_weight_average_switched_is_named(tmp_path):
    train_and_evaluate(tiny_config(steps=5, eval_every=5, checkpoint_every=5), tmp_path)
    with pytest.raises(ValueError, match=r"trained with train.ema_decay=0, this run has 0.99"):
        train_and_evaluate(tiny_config(steps=10, ema_decay=0.99), tmp_path)
    train_and_evaluate(tiny_config(steps=10), tmp_path)  # as it was trained: resumes
    assert load_checkpoint(tmp_path, which="latest").info["step"] == 10


def test_incompatible_config_on_resume(tmp_path):
    train_and_evaluate(tiny_config(steps=5, eval_every=5, checkpoint_every=5), tmp_path)
    config = tiny_config(steps=10)
    config.model.width = 32
    with pytest.raises(CheckpointError, match="different model"):
        train_and_evaluate(config, tmp_path)


_DP_SCRIPT = """
import json, sys, jax
from fdnc_jax.train.config_files import get_config
from fdnc_jax.train.loop import (
    bank_for_step,
    bucketed_source_banks,
    load_sources,
    split_sources,
    train_and_evaluate,
)
config = get_config(sys.argv[1])
config.train.steps = 4
config.train.log_every = 4
config.train.eval_every = 4
train_and_evaluate(config, sys.argv[2])
print(json.dumps({"devices": jax.device_count()}))
"""


def test_data_parallel_matches_single_device(tmp_path):
    out = {}
    for n in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                _DP_SCRIPT,
                str(ROOT / "configs" / "tiny.py"),
                str(tmp_path / str(n)),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout.strip().splitlines()[-1])["devices"] == n
        out[n] = _records(tmp_path / str(n))[-1]
    np.testing.assert_allclose(out[2]["loss"], out[1]["loss"], rtol=1e-4)
    np.testing.assert_allclose(out[2]["val_loss"], out[1]["val_loss"], rtol=1e-4)


def test_real_pairs_training_logs_and_selects_real_accuracy(tmp_path):
    config = tiny_config(
        steps=10, eval_every=5, log_every=5, checkpoint_every=10, select_on="real_accuracy"
    )
    config.sim.real_pair_fraction = 0.5
    config.data.val_fraction = 0.25  # 2 of the 8 bundled worms: real validation pairs exist
    model = train_and_evaluate(config, tmp_path)
    evals = [r for r in _records(tmp_path) if "accuracy" in r]
    assert all({"real_accuracy", "real_val_loss", "real_top5_accuracy"} <= set(r) for r in evals)
    assert model.info["best_accuracy"] == max(r["real_accuracy"] for r in evals)
    bad = tiny_config(steps=2, select_on="real_accuracy")
    with pytest.raises(ValueError, match="real_pair_fraction"):
        train_and_evaluate(bad, tmp_path / "bad")


def test_resume_with_another_select_on_selects_afresh(tmp_path):
    config = tiny_config(steps=10, eval_every=5, log_every=5, checkpoint_every=5)
    config.sim.real_pair_fraction = 0.5
    config.data.val_fraction = 0.25
    first = train_and_evaluate(config, tmp_path)  # Best on semi-synthetic accuracy ...
    config.train.steps, config.train.select_on = 20, "real_accuracy"
    model = train_and_evaluate(config, tmp_path)  # ... resumed: best on real pairs from now on.
    later = [r for r in _records(tmp_path) if "accuracy" in r and r["step"] > 10]
    assert model.info["best_accuracy"] == max(r["real_accuracy"] for r in later)
    assert first.info["best_accuracy"] == max(
        r["accuracy"] for r in _records(tmp_path) if "accuracy" in r and r["step"] <= 10
    )


def test_time_budget_validates_saves_and_resumes(tmp_path, monkeypatch):
    from fdnc_jax.train import loop

    clock = iter(range(0, 10**6, 10))  # Every reading of the clock is 10 s later than the last.
    monkeypatch.setattr(loop, "_now", lambda: float(next(clock)))
    config = tiny_config(steps=50, eval_every=25, log_every=5, checkpoint_every=25, max_minutes=1.0)
    train_and_evaluate(config, tmp_path)
    records = _records(tmp_path)
    stop = records[-1]["step"]
    assert 1 < stop < 50  # Stopped by the budget, not by train.steps.
    assert "accuracy" in records[-1]  # ... after a last validation ...
    assert load_checkpoint(tmp_path, which="latest").info["step"] == stop  # ... and a checkpoint.
    config.train.max_minutes = 0.0
    train_and_evaluate(config, tmp_path)  # Resumed without a budget: runs to train.steps.
    assert load_checkpoint(tmp_path, which="latest").info["step"] == 50


def test_cosine_schedule_follows_steps_and_resumes_exactly(tmp_path, monkeypatch):
    from fdnc_jax.train import loop
    from fdnc_jax.train.step import learning_rate_schedule

    config = tiny_config(
        steps=12, eval_every=3, log_every=1, checkpoint_every=3,
        lr_schedule="cosine", warmup_steps=2, learning_rate=1e-3,
    )
    train_and_evaluate(config, tmp_path / "a")
    schedule = learning_rate_schedule(1e-3, "cosine", steps=12, warmup_steps=2)
    records = [r for r in _records(tmp_path / "a") if "lr" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    # Logged after step s: the rate step s used, schedule(s - 1): warm-up, peak, decay to ~0.
    np.testing.assert_allclose(
        [r["lr"] for r in records], [float(schedule(s - 1)) for s in range(1, 13)], rtol=1e-5, atol=1e-9
    )
    assert records[2]["lr"] == pytest.approx(1e-3) and records[-1]["lr"] < 3e-5

    # Stopped part-way by the time budget, then resumed: the same parameters as in one go.
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(loop, "_now", lambda: float(next(clock)))
    config.train.max_minutes = 1.0
    train_and_evaluate(config, tmp_path / "b")
    stop = _records(tmp_path / "b")[-1]["step"]
    assert 1 < stop < 12
    config.train.max_minutes = 0.0
    train_and_evaluate(config, tmp_path / "b")
    _assert_same_latest_params(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("schedule, plateaus", [("plateau", True), ("cosine", False)])
def test_plateau_rule_only_with_the_plateau_schedule(tmp_path, monkeypatch, schedule, plateaus):
    from fdnc_jax.train import loop
    from fdnc_jax.train import step as step_lib

    # Validation never improves: with patience 1 the plateau rule fires at every validation after
    # the first, unless the schedule turns it off.
    flat = {"val_loss": 1.0, "accuracy": 0.5, "top5_accuracy": 0.5}
    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: dict(flat))
    decays = []
    restore = step_lib.with_learning_rate
    monkeypatch.setattr(
        step_lib, "with_learning_rate", lambda s, lr: decays.append(lr) or restore(s, lr)
    )
    config = tiny_config(steps=6, eval_every=2, plateau_patience=1, lr_schedule=schedule)
    train_and_evaluate(config, tmp_path)
    assert bool(decays) == plateaus


@pytest.mark.parametrize(
    "train, message",
    [
        ({"lr_schedule": "linear"}, "lr_schedule='linear' must be one of"),
        ({"lr_schedule": "cosine", "steps": 5, "warmup_steps": 5}, "warmup_steps"),
        ({"ema_decay": 1.0}, r"train.ema_decay=1.0 must be in \[0, 1\)"),
        ({"ema_decay": -0.1}, "train.ema_decay"),
    ],
)
def test_bad_learning_rate_schedule_is_named(tmp_path, train, message):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config(**train), tmp_path)


def test_init_weights_starts_from_given_weights(trained, tmp_path):
    from fdnc_jax.model.fdnc import ModelConfig
    from fdnc_jax.train.loop import initial_model

    workdir, model = trained
    config = tiny_config()
    cfg = ModelConfig.from_dict(config.model)
    start = initial_model(cfg, seed=123, init_weights=str(workdir))
    for x, y in zip(_params(start), _params(load_checkpoint(workdir)), strict=True):
        np.testing.assert_array_equal(x, y)
    random = initial_model(cfg, seed=123)
    assert any((x != y).any() for x, y in zip(_params(random), _params(start), strict=True))
    # Through the training loop: a fresh run starts there (and its first validation shows it).
    config.train.init_weights = str(workdir)
    config.train.steps, config.train.eval_every, config.train.log_every = 2, 2, 2
    train_and_evaluate(config, tmp_path / "ft")
    first = [r for r in _records(tmp_path / "ft") if "accuracy" in r][0]
    best = max(r["accuracy"] for r in _records(workdir) if "accuracy" in r)
    assert first["accuracy"] >= 0.5 * best > 0  # vs ~1/N for random weights
    with pytest.raises(ValueError, match="--config.model.width=64"):
        initial_model(ModelConfig.from_dict({**config.model, "width": 32}), 0, "small")
    with pytest.raises(ValueError, match="no bundled weights named 'nope'"):
        initial_model(cfg, 0, "nope")
    with pytest.raises(ValueError, match="is no file or folder"):
        initial_model(cfg, 0, str(tmp_path / "missing" / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):  # A folder without checkpoints.
        initial_model(cfg, 0, str(tmp_path / "empty"))


def test_val_fraction_split_follows_split_seed_and_not_file_order():
    import ml_collections

    # Converted data sets keep one provenance file per lab in meta['file']: the worm id must count.
    worms = [
        fd.Worm(
            xyz_um=np.random.default_rng(i).normal(size=(20, 3)) * 10 + 50,
            meta={"file": "one_source.pkl", "worm": f"W{i:02d}"},
        )
        for i in range(10)
    ]
    cfg = ml_collections.ConfigDict({"val_lab": "", "val_fraction": 0.3, "split_seed": 0})
    ids = lambda ws: sorted(w.meta["worm"] for w in ws)
    splits = set()
    for seed in range(6):
        cfg.split_seed = seed
        train, val = split_sources(worms, cfg)
        assert len(val) == 3 and len(train) == 7
        _, val_reversed = split_sources(worms[::-1], cfg)
        assert ids(val_reversed) == ids(val)  # independent of file order
        splits.add(tuple(ids(val)))
    assert len(splits) > 1  # the seed changes the split


def test_params_ema_averages_the_weights_each_update_produces():
    """params_ema: the warmed-up decay min(d, (1 + t) / (10 + t)) over params + updates, hand
    computed; the updates pass unchanged; without ema_decay the optimizer state has no average."""
    import jax.numpy as jnp
    import optax

    from fdnc_jax.train import step as step_lib

    tx = optax.chain(optax.sgd(1.0), step_lib.params_ema(0.5))
    params = {"w": jnp.array([0.0, 2.0])}
    state = tx.init(params)
    want = np.array([0.0, 2.0])
    for t, g in enumerate([1.0, -2.0, 0.5]):
        updates, state = tx.update({"w": jnp.full(2, g)}, state, params)
        np.testing.assert_allclose(updates["w"], -g)  # sgd's step, passed on unchanged
        params = optax.apply_updates(params, updates)
        d = min(0.5, (1 + t) / (10 + t))
        want = d * want + (1 - d) * np.asarray(params["w"])
        np.testing.assert_allclose(state[1].ema["w"], want, rtol=1e-6)
    with pytest.raises(ValueError, match="needs the parameters"):
        step_lib.params_ema(0.5).update({"w": jnp.ones(2)}, state[1])
    plain = step_lib.make_optimizer(1e-3, 1.0).init(params)
    assert not any(isinstance(p, step_lib.ParamsEmaState) for p in plain.inner_state)


def test_ema_weights_are_validated_saved_and_resumed_exactly(tmp_path, monkeypatch):
    """With train.ema_decay the validated, best and loaded weights are the moving average (not the
    last weights), and a run stopped by its budget and resumed ends with the same average."""
    from fdnc_jax.train import loop
    from fdnc_jax.train import step as step_lib

    seen = []
    evaluate = loop.evaluate

    def recording(step, params, *args, **kwargs):
        seen.append(params)
        return evaluate(step, params, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", recording)
    config = tiny_config(steps=12, eval_every=4, log_every=4, checkpoint_every=4, ema_decay=0.9)
    model = train_and_evaluate(config, tmp_path / "a")
    loaded = _params(load_checkpoint(tmp_path / "a", which="latest"))
    store = loop.ckpt.CheckpointStore(tmp_path / "a")
    try:
        tx = step_lib.make_optimizer(1e-3, 1.0, "adam", 0.9)
        state, _ = store.restore(
            loop.ckpt.LATEST, loop.ckpt.abstract_of(step_lib.init_state(model, tx))
        )
    finally:
        store.close()
    ema, raw = step_lib.eval_params(state), state.params
    assert ema is not raw
    for e, w in zip(jax.tree.leaves(ema), loaded, strict=True):
        np.testing.assert_array_equal(np.asarray(e), w)  # load_checkpoint gives the average
    assert any(
        not np.allclose(np.asarray(e), np.asarray(r))
        for e, r in zip(jax.tree.leaves(ema), jax.tree.leaves(raw), strict=True)
    )
    last, last_raw = seen[-2:]  # the last validation: the final average, then the raw weights
    for v, e in zip(jax.tree.leaves(last), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(np.asarray(v), np.asarray(e))
    for v, r in zip(jax.tree.leaves(last_raw), jax.tree.leaves(raw), strict=True):
        np.testing.assert_array_equal(np.asarray(v), np.asarray(r))
    evals = [r for r in _records(tmp_path / "a") if "accuracy" in r]
    assert evals and all("raw_accuracy" in r for r in evals)  # logged beside the average's

    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(loop, "_now", lambda: float(next(clock)))
    config.train.max_minutes = 1.0
    train_and_evaluate(config, tmp_path / "b")
    assert 1 < _records(tmp_path / "b")[-1]["step"] < 12
    config.train.max_minutes = 0.0
    train_and_evaluate(config, tmp_path / "b")
    _assert_same_latest_params(tmp_path / "a", tmp_path / "b")
