"""``train_and_evaluate(config, workdir)``: the only function in training with side effects.

It loads the source worms, builds the fixed validation set, resumes from ``workdir`` when a checkpoint
exists, runs the jitted train step (batches simulated on device), validates every
``config.train.eval_every`` steps, halves the learning rate and restores the best weights after
``plateau_patience`` validations without improvement (the original schedule; or follows a fixed
cosine schedule with ``train.lr_schedule="cosine"``), logs to ``workdir/metrics.jsonl`` and saves
orbax checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from fdnc_jax import checkpoint as ckpt
from fdnc_jax import datasets
from fdnc_jax.atlas import unify_handedness
from fdnc_jax.io import load_worm
from fdnc_jax.model.fdnc import Model, ModelConfig
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.sim.pairs import make_pair_batch, make_source_bank
from fdnc_jax.train import step as train_step_lib
from fdnc_jax.train.tensorboard import ScalarWriter
from fdnc_jax.types import PairBatch, SourceBank
from fdnc_jax.worm import Worm

# Fields that must agree between the config and the weights a run starts from (dropout is a
# training setting, not part of the weights).
_ARCHITECTURE_FIELDS = (
    "width",
    "layers",
    "heads",
    "ff_width",
    "color_features",
    "canonical_pose",
    "distance_bias",
)


def initial_model(model_cfg: ModelConfig, seed: int, init_weights: str = "") -> Model:
    """The model a fresh run starts from: random (``seed``), or the parameters of ``init_weights``.

    Args:
      model_cfg: the run's architecture (``config.model``).
      seed: seed of the random initialisation.
      init_weights: "" (random), a bundled name (``load_pretrained``: "default", "color",
        "small"), a training workdir or a weights ``.npz`` (``load_checkpoint``) — to fine-tune
        the shipped model on your own worms, or to continue a run in a new workdir.

    Returns:
      The Model (float32 parameters).

    Raises:
      ValueError: weights that cannot be found or read, or whose architecture differs from
        ``model_cfg`` (the message lists the ``--config.model.*`` flags that would match).

    Example:
      >>> initial_model(ModelConfig(), 0, "small")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: train.init_weights='small' has another architecture than config.model: pass ...
    """
    model = Model.create(model_cfg, seed=seed)
    if not init_weights:
        return model
    if init_weights not in ckpt.PRETRAINED_ALIASES and Path(init_weights).exists():
        source = ckpt.load_checkpoint(init_weights)
    else:
        try:
            source = ckpt.load_pretrained(init_weights)
        except ValueError as e:
            raise ValueError(
                f"train.init_weights={init_weights!r} is no file or folder, and {e}"
            ) from e
    differ = [f for f in _ARCHITECTURE_FIELDS if getattr(source.config, f) != getattr(model_cfg, f)]
    if differ:
        flags = " ".join(f"--config.model.{f}={getattr(source.config, f)}" for f in differ)
        raise ValueError(
            f"train.init_weights={init_weights!r} has another architecture than config.model: "
            f"pass {flags}"
        )
    return model.replace_params(source.params)  # loaded as float32 (load_weights casts)


def split_sources(worms: Sequence[Worm], data_cfg) -> tuple[list[Worm], list[Worm]]:
    """(train, validation) worms: a whole held-out lab (``val_lab``) or a ``val_fraction`` chosen by a
    seeded hash of the file names (independent of file order).

    Args:
      worms: the source worms.
      data_cfg: ``config.data``: ``val_lab`` (a lab name, or '' to use ``val_fraction``),
        ``val_fraction`` in (0, 1) and ``split_seed``.

    Returns:
      (train, validation) lists of Worms, each in the input order.

    Raises:
      ValueError: no worms, a ``val_lab`` matching no worm, or too few worms to split.

    Example:
      >>> worms = load_sources(ml_collections.ConfigDict({"sources": "bundled"}))
      >>> cfg = ml_collections.ConfigDict({"val_lab": "NP", "val_fraction": 0.0, "split_seed": 0})
      >>> train, val = split_sources(worms, cfg)
      >>> len(train), [datasets.lab_of(w) for w in val]
      (6, ['NP', 'NP'])
    """
    if not worms:
        raise ValueError("config.data.sources matched no worms")
    if data_cfg.val_lab:
        val = [w for w in worms if datasets.lab_of(w) == data_cfg.val_lab]
        train = [w for w in worms if datasets.lab_of(w) != data_cfg.val_lab]
        if not val:
            labs = sorted({datasets.lab_of(w) for w in worms})
            raise ValueError(
                f"config.data.val_lab={data_cfg.val_lab!r} matches no worm; labs: {labs}"
            )
    else:
        n_val = max(1, int(round(len(worms) * data_cfg.val_fraction)))
        if n_val >= len(worms):
            raise ValueError(
                f"{len(worms)} source worms are too few to hold out {n_val} for validation"
            )
        # Deterministic, independent of file order: rank worms by a hash of their identity — the
        # file name *and* the worm id, since converted data sets keep one source file per lab in
        # meta['file'] (hashing that alone made every split_seed give the same split).
        keys = [
            _hash_uniform(data_cfg.split_seed, *_identity(w, i).encode())
            for i, w in enumerate(worms)
        ]
        order = np.argsort(keys, kind="stable")
        val = [worms[i] for i in sorted(order[:n_val])]
        train = [worms[i] for i in sorted(order[n_val:])]
    if not train:
        raise ValueError("no training worms left after holding out the validation worms")
    return train, val


def load_sources(data_cfg) -> list[Worm]:
    """Loads the worms named by ``data_cfg.sources`` (see ``datasets.resolve_worm_files``).

    Args:
      data_cfg: ``config.data`` with ``sources``: "bundled", a folder, a glob, or a comma-separated
        mix of these.

    Returns:
      The Worms (positions in µm), in file order.

    Example:
      >>> worms = load_sources(ml_collections.ConfigDict({"sources": "bundled"}))
      >>> len(worms), worms[0].xyz_um.shape
      (8, (188, 3))
    """
    return [load_worm(p) for p in datasets.resolve_worm_files(data_cfg.sources)]


def _round_up(n: int, multiple: int = 16) -> int:
    return int(-(-n // multiple) * multiple)


def bucketed_source_banks(
    worms: Sequence[Worm], buckets: Sequence[int], use_color: bool, with_identity: bool = False
) -> list[SourceBank]:
    """Source banks grouped by size: each worm goes to the smallest bucket (points) that holds it.

    Small worms padded to the size of the largest would spend most of the attention on padding; a
    bank per size bucket keeps a step's cost close to its worms' real size (one compile per bucket).
    With no buckets, one bank sized to the largest worm (rounded up to 16). ``with_identity``
    carries name indices for real across-animal pairs (pairs are drawn within a bank).

    Args:
      worms: the source worms (µm).
      buckets: bank sizes P (points per worm); sizes ≥ the largest worm are replaced by its size
        rounded up to 16.
      use_color: carry normalised colors ([S, P, 3]).
      with_identity: carry name indices ([S, P]).

    Returns:
      One SourceBank per non-empty bucket, by increasing P (xyz [S, P, 3] model units).

    Example:
      >>> worms = load_sources(ml_collections.ConfigDict({"sources": "bundled"}))
      >>> banks = bucketed_source_banks(worms, buckets=[128, 160], use_color=False)
      >>> [(b.num_sources, b.num_points) for b in banks]
      [(2, 128), (2, 160), (4, 208)]
    """
    largest = max(w.n for w in worms)
    sizes = sorted(int(b) for b in buckets if int(b) < largest) + [_round_up(largest)]
    groups: dict[int, list[Worm]] = {}
    for w in worms:
        groups.setdefault(next(b for b in sizes if w.n <= b), []).append(w)
    return [
        make_source_bank(groups[b], b, use_color=use_color, with_identity=with_identity)
        for b in sorted(groups)
    ]


def _identity(worm: Worm, index: int) -> str:
    """A worm's identity for the validation split: ``meta['file']`` and ``meta['worm']`` (index if
    it has neither)."""
    file, name = worm.meta.get("file"), worm.meta.get("worm")
    return f"{file}|{name}" if file or name else str(index)


def _hash_uniform(*values: int) -> float:
    """A deterministic number in [0, 1) from integers (splitmix64): host-side scheduling only."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x / 2.0**64


def bank_for_step(step: int, weights: np.ndarray, seed: int) -> int:
    """Which source bank feeds ``step``: drawn ∝ bank size, a pure function of (seed, step) so that a
    resumed run sees exactly the banks of an uninterrupted one.

    Args:
      step: the training step.
      weights: [K] probabilities of the K banks (summing to 1).
      seed: the run's seed.

    Returns:
      The bank index in [0, K).

    Example:
      >>> [bank_for_step(step, np.array([0.25, 0.75]), seed=0) for step in range(8)]
      [0, 1, 1, 0, 1, 1, 1, 1]
    """
    u = _hash_uniform(seed, step)
    return int(min(np.searchsorted(np.cumsum(weights), u, side="right"), len(weights) - 1))


def validation_batches(
    bank: SourceBank, num_pairs: int, batch_size: int, sim_cfg: SimConfig, seed: int
) -> list[PairBatch]:
    """A fixed held-out semi-synthetic set: the same pairs at every evaluation and on resume.

    Args:
      bank: the validation SourceBank (xyz [S, P, 3] model units).
      num_pairs: how many pairs (rounded up to whole batches).
      batch_size: B, pairs per batch.
      sim_cfg: the simulator settings.
      seed: the seed of the set.

    Returns:
      ⌈num_pairs / B⌉ PairBatches with xyz [B, Q, 3], Q = P + ``sim_cfg.max_outliers``.

    Example:
      >>> w = Worm(xyz_um=np.random.default_rng(0).uniform(0, 100, (20, 3)))  # 20 neurons, µm
      >>> batches = validation_batches(make_source_bank([w, w]), 4, 2, SimConfig(), seed=0)
      >>> len(batches), batches[0].test_xyz.shape
      (2, (2, 52, 3))
    """
    key = jax.random.key(seed)
    n_batches = max(1, -(-num_pairs // batch_size))
    return [
        make_pair_batch(jax.random.fold_in(key, i), bank, batch_size, sim_cfg)
        for i in range(n_batches)
    ]


def evaluate(eval_step, params, batches: Sequence[PairBatch], prefix: str = "") -> dict[str, float]:
    """Validation metrics over fixed batches: loss, top-1 and top-5 accuracy (argmax, no Hungarian),
    keys prefixed with ``prefix``.

    Args:
      eval_step: ``step.make_eval_step(model)`` (or any function returning the same sums).
      params: the model parameters passed to ``eval_step``.
      batches: the PairBatches.
      prefix: prepended to every key (e.g. "real_").

    Returns:
      ``{prefix}val_loss`` (mean per pair), ``{prefix}accuracy`` and ``{prefix}top5_accuracy``
      (fractions of the counted test points) as floats.

    Example:
      >>> sums = {"loss_sum": 2.0, "pairs": 2.0, "top1": 3.0, "top5": 4.0, "count": 4.0}
      >>> evaluate(lambda params, batch: sums, None, [None, None])
      {'val_loss': 1.0, 'accuracy': 0.75, 'top5_accuracy': 1.0}
    """
    sums = None
    for batch in batches:
        out = eval_step(params, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    return {
        f"{prefix}val_loss": float(sums["loss_sum"] / sums["pairs"]),
        f"{prefix}accuracy": float(sums["top1"] / count),
        f"{prefix}top5_accuracy": float(sums["top5"] / count),
    }


class _MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl``; drops entries past a resume point."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _say(message: str, tcfg) -> None:
    """Logs a message and shows it above the progress bar."""
    logging.info(message)
    if tcfg.progress_bar:
        tqdm.write(message)


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def _now() -> float:
    """Seconds on a monotonic clock (the training time budget's; replaced in tests)."""
    return time.monotonic()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> Model:
    """Trains (or resumes training) the fDNC matcher; returns the best model.

    Args:
      config: a ConfigDict as in ``configs/default.py`` (model, sim, data, train).
      workdir: where checkpoints, ``config.json`` and ``metrics.jsonl`` go; an existing workdir with
        checkpoints is resumed from its latest step.

    Returns:
      The model with the best validation accuracy.

    Example:
      >>> from fdnc_jax.train.config_files import get_config
      >>> model = train_and_evaluate(get_config("configs/small.py"), "runs/small")  # doctest: +SKIP
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_cfg = ModelConfig.from_dict(config.model)
    sim_cfg = SimConfig.from_dict(config.sim)
    sim_cfg.validate()
    tcfg = config.train
    n_dev = jax.device_count()
    if tcfg.batch_size % n_dev:
        raise ValueError(
            f"train.batch_size={tcfg.batch_size} must be divisible by the {n_dev} devices"
        )
    lr_schedule = train_step_lib.learning_rate_schedule(
        tcfg.learning_rate,
        tcfg.get("lr_schedule", "plateau"),
        tcfg.steps,
        tcfg.get("warmup_steps", 0),
    )
    tx = train_step_lib.optimizer_from_config(tcfg)  # checks train.ema_decay before data is read

    sources = load_sources(config.data)
    real_pairs = sim_cfg.real_pair_fraction > 0
    if real_pairs and config.data.get("unify_handedness", True):
        sources, flipped = unify_handedness(sources)
        logging.info(
            "mirrored %d of %d sources to the majority handedness", flipped.sum(), len(sources)
        )
    train_worms, val_worms = split_sources(sources, config.data)
    use_color = model_cfg.color_features > 0
    train_banks = bucketed_source_banks(
        train_worms, config.data.source_buckets, use_color, with_identity=real_pairs
    )
    bank_weights = np.array([b.num_sources for b in train_banks], np.float64)
    bank_weights /= bank_weights.sum()
    # sized to its largest worm
    val_bank = make_source_bank(val_worms, use_color=use_color, with_identity=real_pairs)
    val_seed = config.seed + 1_000_003
    semi_cfg = dataclasses.replace(sim_cfg, real_pair_fraction=0.0)
    val_batches = validation_batches(
        val_bank, config.data.val_pairs, tcfg.batch_size, semi_cfg, val_seed
    )
    # Real across-animal validation pairs (other animals of the validation lab), when trained on.
    real_val_batches = []
    if real_pairs and len(val_worms) > 1:
        real_cfg = dataclasses.replace(sim_cfg, real_pair_fraction=1.0)
        real_val_batches = validation_batches(
            val_bank, config.data.val_pairs, tcfg.batch_size, real_cfg, val_seed + 1
        )
        if not any(bool(jnp.any(b.target >= 0)) for b in real_val_batches):
            raise ValueError(
                "the validation worms share no neuron names: real validation pairs have no "
                "correspondence to score (name the validation worms, or set sim.real_pair_fraction=0)"
            )
    select_on = tcfg.get("select_on", "accuracy")
    if select_on not in ("accuracy", "real_accuracy"):
        raise ValueError(f"train.select_on={select_on!r} must be 'accuracy' or 'real_accuracy'")
    if select_on == "real_accuracy" and not real_val_batches:
        raise ValueError(
            "train.select_on='real_accuracy' needs real validation pairs: set "
            "sim.real_pair_fraction > 0 and hold out ≥ 2 validation worms"
        )
    logging.info(
        "sources: %d training worms in banks of %s points, %d validation worms",
        len(train_worms),
        [b.num_points for b in train_banks],
        len(val_worms),
    )

    model = initial_model(model_cfg, config.seed, tcfg.get("init_weights", "") or "")
    state = train_step_lib.init_state(model, tx)
    abstract = ckpt.abstract_of(state)
    store = ckpt.CheckpointStore(workdir)
    run = {"best_accuracy": -1.0, "bad_evals": 0, "plateau_trials": 0, "stopped_early": False}
    best_state = state
    try:
        restored = store.restore(ckpt.LATEST, abstract)
    except ckpt.CheckpointError:
        _check_resumable_ema(store, tcfg.get("ema_decay", 0.0))  # name the likely cause
        raise
    if restored is not None:
        state, meta = restored
        run.update({k: meta[k] for k in run if k in meta})
        best = store.restore(ckpt.BEST, abstract)
        best_state = best[0] if best is not None else state
        _say(f"resumed from {store.root / ckpt.LATEST} at step {int(state.step)}", config.train)
        if tcfg.get("init_weights", ""):
            _say("train.init_weights applies to a fresh workdir only: resuming instead", tcfg)
        previous = meta.get("select_on", "accuracy")
        if previous != select_on:
            # The best so far was measured on another metric: select afresh on the new one.
            run.update(best_accuracy=-1.0, bad_evals=0)
            _say(
                f"train.select_on changed from {previous!r} to {select_on!r}: the best weights are "
                "chosen afresh from the next validation on",
                config.train,
            )
    run["select_on"] = select_on
    (workdir / "config.json").write_text(json.dumps(_config_dict(config), indent=2))

    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.device_put(state, replicated)
    train_banks = [jax.device_put(b, replicated) for b in train_banks]
    train_step = train_step_lib.make_train_step(
        model, tx, sim_cfg, tcfg.batch_size, batch_sharding, lr_schedule
    )
    eval_step = train_step_lib.make_eval_step(model)
    root_key = jax.random.key(config.seed)

    start = int(state.step)
    log = _MetricsLog(workdir / "metrics.jsonl", start)
    # TensorBoard scalars beside metrics.jsonl when the tensorboard package is installed.
    board = ScalarWriter.create(workdir / "tensorboard") if tcfg.get("tensorboard", True) else None
    nonfinite_seen = int(state.nonfinite)

    def save(which: str, s, extra: dict[str, Any] | None = None) -> None:
        meta = {**run, "config": _config_dict(config), "lr": train_step_lib.learning_rate(s)}
        store.save(which, int(s.step), jax.device_get(s), {**meta, **(extra or {})})

    t0 = time.time()
    # Wall-clock budget of this invocation (a resumed run gets a fresh one); 0 → none.
    budget_s = 60.0 * float(tcfg.get("max_minutes", 0.0) or 0.0)
    t_start = _now()
    bar = tqdm(total=tcfg.steps, initial=start, desc="train", disable=not tcfg.progress_bar)
    step = start
    try:
        while step < tcfg.steps and not run["stopped_early"]:
            bank = train_banks[bank_for_step(step, bank_weights, config.seed)]
            state, metrics = train_step(state, bank, root_key)
            step += 1
            bar.update(1)
            out_of_time = budget_s > 0 and _now() - t_start >= budget_s
            if out_of_time:
                _say(
                    f"train.max_minutes={tcfg.max_minutes} reached at step {step}: last "
                    "validation and checkpoint",
                    tcfg,
                )
            is_last = step == tcfg.steps or out_of_time
            record = None
            if step % tcfg.log_every == 0 or is_last:
                nonfinite = int(state.nonfinite)
                if nonfinite > nonfinite_seen:
                    last = store.latest_step()
                    raise FloatingPointError(
                        f"training loss or gradients became non-finite (NaN/inf) before step {step}; "
                        f"training stopped. The last good checkpoint is step {last} in "
                        f"{store.root / ckpt.LATEST} (lower train.learning_rate and resume)"
                    )
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                record = {
                    "step": step,
                    **host,
                    "lr": train_step_lib.learning_rate(state),
                    "elapsed_s": round(time.time() - t0, 2),
                }
            if step % tcfg.eval_every == 0 or is_last:
                params = train_step_lib.eval_params(state)  # the moving average, if kept
                val = evaluate(eval_step, params, val_batches)
                if real_val_batches:
                    val.update(evaluate(eval_step, params, real_val_batches, "real_"))
                if params is not state.params:  # what the average adds, for the record
                    val.update(evaluate(eval_step, state.params, val_batches, "raw_"))
                record = {
                    **(record or {"step": step, "elapsed_s": round(time.time() - t0, 2)}),
                    **val,
                }
                if val[select_on] > run["best_accuracy"]:
                    run.update(best_accuracy=val[select_on], bad_evals=0)
                    best_state = jax.device_get(state)
                    save(ckpt.BEST, state, {"val_accuracy": val[select_on]})
                elif lr_schedule is None:  # The plateau rule; a fixed schedule needs none.
                    run["bad_evals"] += 1
                    if run["bad_evals"] >= tcfg.plateau_patience:
                        run["plateau_trials"] += 1
                        run["bad_evals"] = 0
                        lr = train_step_lib.learning_rate(state) * tcfg.plateau_factor
                        restored_best = train_step_lib.with_learning_rate(best_state, lr)
                        state = jax.device_put(
                            type(state)(
                                state.step,
                                restored_best.params,
                                restored_best.opt_state,
                                state.nonfinite,
                            ),
                            replicated,
                        )
                        _say(f"plateau: restored best weights, learning rate → {lr:.3g}", tcfg)
                        if run["plateau_trials"] > tcfg.max_plateau_trials:
                            run["stopped_early"] = True
                record["best_accuracy"] = run["best_accuracy"]
                _say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()), tcfg)
                bar.set_postfix(acc=f"{val['accuracy']:.3f}")
            if record is not None:
                log.write(record)
                if board is not None:
                    board.write(record)
            if step % tcfg.checkpoint_every == 0 or is_last or run["stopped_early"]:
                save(ckpt.LATEST, state)
            if out_of_time:
                break
    finally:
        bar.close()
        store.close()
        if board is not None:
            board.close()
    return _best_model(model, best_state, run)


def _check_resumable_ema(store: ckpt.CheckpointStore, ema_decay: float) -> None:
    """ValueError when the workdir's latest checkpoint, which failed to restore, was written with
    another ``train.ema_decay`` on/off setting: the moving average is part of the optimizer state,
    so the two cannot resume each other (a changed decay > 0 can)."""
    meta = store.read_meta(ckpt.LATEST) if store.latest_step(ckpt.LATEST) is not None else None
    if not meta or "config" not in meta:
        return
    saved = float(meta["config"].get("train", {}).get("ema_decay", 0.0))
    if (saved > 0) != (ema_decay > 0):
        raise ValueError(
            f"{store.root / ckpt.LATEST} was trained with train.ema_decay={saved:g}, this run has "
            f"{ema_decay:g}: the moving average lives in the optimizer state, so resume with "
            f"--config.train.ema_decay={saved:g} (or start a new workdir)"
        )


def _best_model(model: Model, best_state, run: dict[str, Any]) -> Model:
    return model.replace_params(
        jax.device_get(train_step_lib.eval_params(best_state)),
        {"step": int(best_state.step), "best_accuracy": run["best_accuracy"]},
    )
