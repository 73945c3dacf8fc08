"""Pure, jitted training and evaluation steps over (graphdef, state).

Letters: B batch (pairs), N template slots, M test slots.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fdnc_jax import losses
from fdnc_jax.model.fdnc import Model
from fdnc_jax.pose import oracle_signs
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.sim.pairs import make_pair_batch
from fdnc_jax.types import PairBatch, SourceBank


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["step", "params", "opt_state", "nonfinite"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training (a pytree; checkpointed whole).

    Attributes:
      step: [] int32, optimizer steps taken.
      params: nnx.State of the model parameters.
      opt_state: optax state (learning rate injected as a hyperparameter).
      nonfinite: [] int32, steps skipped because loss or gradients were not finite.

    Example:
      >>> from fdnc_jax.model.fdnc import ModelConfig
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> state = init_state(model, make_optimizer(1e-3, clip_norm=1.0))
      >>> int(state.step), int(state.nonfinite)
      (0, 0)
    """

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array


LR_SCHEDULES = ("plateau", "cosine")


class ParamsEmaState(NamedTuple):
    """State of ``params_ema``: updates applied so far ([] int32) and the average (params' tree).

    Example:
      >>> state = params_ema(0.9).init({"w": jnp.ones(2)})
      >>> int(state.count), state.ema["w"].tolist()
      (0, [1.0, 1.0])
    """

    count: jax.Array
    ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
    """An exponential moving average of the parameters, kept in the optimizer state.

    The last link of an optax chain: it passes the updates through unchanged and averages the
    parameters they produce (``params + updates``) with a decay that warms up,
    ``min(decay, (1 + t) / (10 + t))`` at update t (as TensorFlow's ExponentialMovingAverage with
    ``num_updates``), so early averages follow the fast-moving weights. Keeping it in the optimizer
    state means a step that is skipped (non-finite) or restored (plateau rule) skips or restores the
    average with it, and checkpoints hold it.

    Args:
      decay: in (0, 1); e.g. 0.999 averages over ~1,000 recent steps.

    Returns:
      The transformation; ``eval_params(state)`` reads the average from a TrainState.

    Example:
      >>> tx = params_ema(0.5)
      >>> state = tx.init({"w": jnp.zeros(())})
      >>> _, state = tx.update({"w": jnp.ones(())}, state, {"w": jnp.zeros(())})
      >>> round(float(state.ema["w"]), 6)  # decay min(0.5, 1/10) = 0.1 at update 0: 0.9 × 1
      0.9
    """

    def init(params):
        # Own buffers: a train step donates its state, and one buffer cannot be donated twice.
        ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return ParamsEmaState(count=jnp.zeros((), jnp.int32), ema=ema)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("params_ema needs the parameters: call update(updates, state, params)")
        t = state.count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema, new)
        return updates, ParamsEmaState(count=state.count + 1, ema=ema)

    return optax.GradientTransformation(init, update)


def learning_rate_schedule(
    learning_rate: float, schedule: str = "plateau", steps: int = 0, warmup_steps: int = 0
) -> optax.Schedule | None:
    """The learning rate as a function of the training step, or None where the loop sets it.

    Args:
      learning_rate: the initial (``"plateau"``) or peak (``"cosine"``) learning rate.
      schedule: ``"plateau"``: constant, lowered by the training loop on validation plateaus (the
        paper's schedule); ``"cosine"``: linear warm-up over ``warmup_steps``, then a cosine decay
        to zero at ``steps`` (for a fixed budget of steps; README, Training: measured on CPU).
      steps: the step at which the cosine reaches zero (``"cosine"`` only; > warmup_steps).
      warmup_steps: linear warm-up from zero (``"cosine"`` only; ≥ 0).

    Returns:
      None for ``"plateau"`` (the rate stays as injected), else an optax schedule (step → learning
      rate) for ``make_train_step``.

    Raises:
      ValueError: unknown ``schedule``, or steps/warm-up that leave no decay.

    Example:
      >>> lr = learning_rate_schedule(1e-3, "cosine", steps=100, warmup_steps=10)
      >>> [round(float(lr(s)), 6) for s in (0, 5, 10, 55, 100)]
      [0.0, 0.0005, 0.001, 0.0005, 0.0]
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule={schedule!r} must be one of {LR_SCHEDULES}")
    if schedule == "plateau":
        return None
    if warmup_steps < 0 or steps <= warmup_steps:
        raise ValueError(
            f"train.lr_schedule='cosine' needs 0 ≤ train.warmup_steps ({warmup_steps}) < "
            f"train.steps ({steps})"
        )
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(learning_rate, steps)
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, steps, 0.0)


def make_optimizer(
    learning_rate: float, clip_norm: float, optimizer: str = "adam", ema_decay: float = 0.0
) -> optax.GradientTransformation:
    """Gradient-norm clipping + Adam/AdamW with the learning rate injected (settable on plateau).

    Args:
      learning_rate: the initial learning rate (a schedule, if any, is applied by
        ``make_train_step``, so the state's structure never depends on it).
      clip_norm: the maximum global gradient norm.
      optimizer: "adam" or "adamw".
      ema_decay: > 0: also keep an exponential moving average of the parameters
        (``params_ema``), which validation, the best weights and ``load_checkpoint`` then use;
        0: none (the state is as without this argument, so older checkpoints load).

    Returns:
      The optax transformation; its state carries ``hyperparams['learning_rate']``.

    Example:
      >>> tx = make_optimizer(1e-3, clip_norm=1.0, optimizer="adamw")
      >>> round(float(tx.init({"w": jnp.zeros(2)}).hyperparams["learning_rate"]), 6)
      0.001
    """

    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={ema_decay} must be in [0, 1) (0: no average)")

    def build(learning_rate):
        opt = {"adam": optax.adam, "adamw": optax.adamw}[optimizer](learning_rate)
        links = [optax.clip_by_global_norm(clip_norm), opt]
        if ema_decay > 0:
            links.append(params_ema(ema_decay))
        return optax.chain(*links)

    return optax.inject_hyperparams(build)(learning_rate=learning_rate)


def optimizer_from_config(train: Mapping[str, Any]) -> optax.GradientTransformation:
    """``make_optimizer`` for a run's ``config.train`` (a ConfigDict or the dict a checkpoint
    saved with it; fields absent from older checkpoints take their defaults).

    Example:
      >>> tx = optimizer_from_config({"learning_rate": 1e-3, "ema_decay": 0.9})
      >>> round(float(tx.init({"w": jnp.zeros(2)}).hyperparams["learning_rate"]), 6)
      0.001
    """
    return make_optimizer(
        train.get("learning_rate", 2e-4),
        train.get("clip_norm", 1.0),
        train.get("optimizer", "adam"),
        train.get("ema_decay", 0.0),
    )


def eval_params(state: TrainState) -> Any:
    """The parameters to validate, save as best and load: the moving average of ``params_ema``
    when the optimizer keeps one, else ``state.params``.

    Example:
      >>> from fdnc_jax.model.fdnc import ModelConfig
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> state = init_state(model, make_optimizer(1e-3, 1.0))
      >>> eval_params(state) is state.params
      True
    """
    found = [part for part in state.opt_state.inner_state if isinstance(part, ParamsEmaState)]
    return found[0].ema if found else state.params


def learning_rate(state: TrainState) -> float:
    """The learning rate the optimizer of ``state`` currently uses.

    Example:
      >>> from fdnc_jax.model.fdnc import ModelConfig
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> round(learning_rate(init_state(model, make_optimizer(1e-3, 1.0))), 6)
      0.001
    """
    return float(state.opt_state.hyperparams["learning_rate"])


def with_learning_rate(state: TrainState, lr: float) -> TrainState:
    """A copy of ``state`` whose optimizer uses ``lr`` from now on.

    Args:
      state: the TrainState.
      lr: the new learning rate.

    Returns:
      The new TrainState (parameters and optimizer moments unchanged).

    Example:
      >>> from fdnc_jax.model.fdnc import ModelConfig
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> state = init_state(model, make_optimizer(1e-3, 1.0))
      >>> round(learning_rate(with_learning_rate(state, 5e-4)), 6)
      0.0005
    """
    return dataclasses.replace(state, opt_state=_with_injected_rate(state.opt_state, lr))


def _with_injected_rate(opt_state, lr):
    """``opt_state`` (``make_optimizer``'s) with the injected learning rate set to ``lr``."""
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, jnp.asarray(hyper["learning_rate"]).dtype)
    return opt_state._replace(hyperparams=hyper)


def init_state(model: Model, tx: optax.GradientTransformation) -> TrainState:
    """Step 0: the model's parameters and a fresh optimizer state.

    Args:
      model: the Model whose parameters are trained.
      tx: the optimizer (``make_optimizer``).

    Returns:
      The TrainState at step 0.

    Example:
      >>> from fdnc_jax.model.fdnc import ModelConfig
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> int(init_state(model, make_optimizer(1e-3, 1.0)).step)
      0
    """
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=model.params,
        opt_state=tx.init(model.params),
        nonfinite=jnp.zeros((), jnp.int32),
    )


def forward(
    model: Model, params: Any, batch: PairBatch, *, deterministic: bool, dropout_key=None
) -> jax.Array:
    """Log-probs [B, M, N + 1] of ``model`` with ``params`` on a PairBatch.

    Canonical-pose models see each test in the flip of its canonical axes that agrees with the
    template (``pose.oracle_signs``, from the known correspondence): they learn to match in one
    consistent frame, and inference searches over the flips instead.

    Args:
      model: the Model (architecture).
      params: nnx.State of parameters (e.g. ``state.params``).
      batch: the PairBatch (template [B, N, 3], test [B, M, 3], model units).
      deterministic: no dropout (evaluation); training passes False and a ``dropout_key``.
      dropout_key: PRNG key for dropout.

    Returns:
      [B, M, N + 1] log-probabilities (last column: outlier).

    Example:
      >>> from fdnc_jax.model.fdnc import ModelConfig
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> xyz, mask = jnp.zeros((1, 5, 3)), jnp.ones((1, 5), bool)
      >>> batch = PairBatch(xyz, mask, xyz[:, :4], mask[:, :4], target=jnp.arange(4)[None])
      >>> forward(model, model.params, batch, deterministic=True).shape
      (1, 4, 6)
    """
    test_signs = None
    if model.config.canonical_pose:
        test_signs = oracle_signs(
            batch.template_xyz, batch.template_mask, batch.test_xyz, batch.test_mask, batch.target
        )
    return model.module(params)(
        batch.template_xyz,
        batch.template_mask,
        batch.test_xyz,
        batch.test_mask,
        batch.template_color,
        batch.test_color,
        test_signs=test_signs,
        deterministic=deterministic,
        dropout_key=dropout_key,
    )


def _loss_fn(params, model, batch, dropout_key):
    log_probs = forward(model, params, batch, deterministic=False, dropout_key=dropout_key)
    terms = losses.match_loss(log_probs, batch.target, batch.test_mask)
    return terms["loss"], (terms, log_probs)


def make_train_step(
    model: Model,
    tx: optax.GradientTransformation,
    sim_cfg: SimConfig,
    batch_size: int,
    batch_sharding: jax.sharding.Sharding | None = None,
    lr_schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, SourceBank, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``train_step(state, sources, root_key) -> (state, metrics)``, jitted once.

    The batch is simulated on device from ``fold_in(root_key, step)``: no host data pipeline. A step
    whose loss or gradient is not finite leaves the parameters unchanged and increments
    ``state.nonfinite`` (the loop turns that into an error at the next log step).

    Args:
      model: the Model (architecture; parameters come from the state).
      tx: the optimizer.
      sim_cfg: the simulator settings (static).
      batch_size: B, pairs per step.
      batch_sharding: optional sharding of the batch over devices (data parallel).
      lr_schedule: optional step → learning rate (``learning_rate_schedule``): each step first
        sets the injected rate to ``lr_schedule(state.step)``; None keeps the injected rate (the
        plateau rule changes it between steps).

    Returns:
      The jitted step; ``metrics`` holds scalar loss, nll, entropy, train_accuracy and grad_norm.

    Example:
      >>> from fdnc_jax.model.fdnc import ModelConfig
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> tx = make_optimizer(1e-3, 1.0)
      >>> train_step = make_train_step(model, tx, SimConfig(), batch_size=2)
      >>> state = init_state(model, tx)
      >>> # bank: a SourceBank (sim.pairs.make_source_bank); the first call compiles for seconds.
      >>> state, metrics = train_step(state, bank, jax.random.key(0))  # doctest: +SKIP
      >>> sorted(metrics)  # doctest: +SKIP
      ['entropy', 'grad_norm', 'loss', 'nll', 'train_accuracy']
    """

    def step(state: TrainState, sources: SourceBank, root_key: jax.Array):
        key = jax.random.fold_in(root_key, state.step)
        sim_key, dropout_key = jax.random.split(key)
        batch = make_pair_batch(sim_key, sources, batch_size, sim_cfg)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        (loss, (terms, log_probs)), grads = jax.value_and_grad(_loss_fn, has_aux=True)(
            state.params, model, batch, dropout_key
        )
        opt_state = state.opt_state
        if lr_schedule is not None:
            opt_state = _with_injected_rate(opt_state, lr_schedule(state.step))
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
        )
        acc = losses.topk_correct(log_probs, batch.target, batch.test_mask, ks=(1,))
        metrics = {
            "loss": loss,
            "nll": terms["nll"],
            "entropy": terms["entropy"],
            "train_accuracy": acc["top1"] / jnp.maximum(acc["count"], 1),
            "grad_norm": optax.global_norm(grads),
        }
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(model: Model) -> Callable[[Any, PairBatch], dict[str, jax.Array]]:
    """Builds ``eval_step(params, batch) -> sums`` (loss × count, top-1/top-5 correct, count).

    Args:
      model: the Model (architecture).

    Returns:
      The jitted step; for a PairBatch of B pairs it returns scalar sums: ``loss_sum`` (mean loss
      × B), ``pairs`` (B), ``top1`` / ``top5`` (correct test points) and ``count`` (counted ones).

    Example:
      >>> from fdnc_jax.model.fdnc import ModelConfig
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> xyz, mask = jnp.zeros((1, 5, 3)), jnp.ones((1, 5), bool)
      >>> batch = PairBatch(xyz, mask, xyz[:, :4], mask[:, :4], target=jnp.arange(4)[None])
      >>> sums = make_eval_step(model)(model.params, batch)
      >>> sorted(sums), float(sums["count"])
      (['count', 'loss_sum', 'pairs', 'top1', 'top5'], 4.0)
    """

    def step(params, batch: PairBatch):
        log_probs = forward(model, params, batch, deterministic=True)
        terms = losses.match_loss(log_probs, batch.target, batch.test_mask)
        acc = losses.topk_correct(log_probs, batch.target, batch.test_mask, ks=(1, 5))
        return {
            "loss_sum": terms["loss"] * batch.test_mask.shape[0],
            "pairs": jnp.asarray(batch.test_mask.shape[0], jnp.float32),
            **acc,
        }

    return jax.jit(step)
