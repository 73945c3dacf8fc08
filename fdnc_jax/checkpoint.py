"""Checkpoints (the only module that touches orbax) and packaged weights.

A training workdir holds ``checkpoints/latest`` (periodic saves, for resuming) and ``checkpoints/best``
(the best validation accuracy), each an orbax ``CheckpointManager`` whose steps hold the whole
``TrainState`` and a JSON ``meta`` item (the run's config, counters of the plateau schedule, metrics).
Orbax writes each step to a temporary folder and renames it when complete, so a killed run never
leaves a half-written checkpoint behind.

Weights shipped inside the package are compressed ``.npz`` files (float32 parameters keyed by their path
plus the model config as JSON), loaded by ``load_pretrained``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from fdnc_jax.io import atomic_write, write_npz
from fdnc_jax.model.fdnc import Model, ModelConfig, check_temperature

PathLike = str | os.PathLike
LATEST = "latest"
BEST = "best"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the model it is loaded into.

    A ``ValueError`` whose message starts with the offending path.

    Example:
      >>> try:
      ...     load_checkpoint("no/such/workdir")
      ... except CheckpointError as e:
      ...     print(e)
      no/such/workdir: no such checkpoint directory
    """


class CheckpointStore:
    """The two checkpoint managers of a training workdir.

    Args:
      workdir: the training workdir; checkpoints go to ``workdir/checkpoints/{latest,best}``.
      keep: how many periodic (``latest``) steps to keep; ``best`` keeps one.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     store = CheckpointStore(d)
      ...     store.save(LATEST, 3, {"w": np.arange(3.0)}, {"note": "hi"})
      ...     state, meta = store.restore(LATEST, abstract_of({"w": np.zeros(3)}))
      ...     store.close()
      >>> state["w"].tolist(), meta
      ([0.0, 1.0, 2.0], {'note': 'hi'})
    """

    def __init__(self, workdir: PathLike, keep: int = 2):
        root = Path(workdir).absolute() / "checkpoints"
        self.root = root
        self._managers = {
            LATEST: ocp.CheckpointManager(
                root / LATEST, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
            ),
            BEST: ocp.CheckpointManager(
                root / BEST, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
            ),
        }

    def latest_step(self, which: str = LATEST) -> int | None:
        """The newest saved step of ``which`` ("latest" or "best"); None when none is saved.

        Example:
          >>> import tempfile
          >>> with tempfile.TemporaryDirectory() as d:
          ...     store = CheckpointStore(d)
          ...     print(store.latest_step(BEST))
          ...     store.close()
          None
        """
        return self._managers[which].latest_step()

    def save(self, which: str, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Saves ``state`` (a pytree) and ``meta`` (JSON-able) at ``step``; blocks until written.

        Args:
          which: "latest" or "best".
          step: the training step (the checkpoint's name).
          state: a pytree of arrays of any shape (e.g. the ``TrainState``).
          meta: JSON-able metadata (config, counters, metrics).

        Example:
          >>> import tempfile
          >>> with tempfile.TemporaryDirectory() as d:
          ...     store = CheckpointStore(d)
          ...     store.save(BEST, 7, {"w": np.zeros(2)}, {"val_accuracy": 0.5})
          ...     print(store.latest_step(BEST))
          ...     store.close()
          7
        """
        mngr = self._managers[which]
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=True,
        )
        mngr.wait_until_finished()

    def restore(self, which: str, abstract_state: Any, step: int | None = None):
        """Restores (state, meta) from ``which`` at ``step`` (default latest); None when empty.

        Args:
          which: "latest" or "best".
          abstract_state: the target pytree's shapes/dtypes (``abstract_of(state)``).
          step: the step to restore (default: the newest).

        Returns:
          (state, meta) with arrays shaped as ``abstract_state``, or None when nothing is saved.

        Raises:
          CheckpointError: the checkpoint is corrupt or does not fit ``abstract_state``.

        Example:
          >>> import tempfile
          >>> with tempfile.TemporaryDirectory() as d:
          ...     store = CheckpointStore(d)
          ...     store.save(LATEST, 1, {"w": np.ones(2)}, {})
          ...     state, meta = store.restore(LATEST, abstract_of({"w": np.zeros(2)}))
          ...     store.close()
          >>> state["w"].tolist()
          [1.0, 1.0]
        """
        mngr = self._managers[which]
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        path = self.root / which / str(step)
        try:
            out = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean "cannot restore".
            raise CheckpointError(
                f"{path}: cannot restore the checkpoint ({type(e).__name__}: {str(e)[:500]}); "
                "it is corrupt or was written by a different model/optimizer configuration"
            ) from e
        return out.state, dict(out.meta)

    def read_meta(self, which: str, step: int | None = None) -> dict[str, Any] | None:
        """The JSON ``meta`` of ``which`` at ``step`` (default latest), without loading arrays.

        Returns:
          The metadata dict, or None when nothing is saved.

        Raises:
          CheckpointError: the metadata file is unreadable.

        Example:
          >>> import tempfile
          >>> with tempfile.TemporaryDirectory() as d:
          ...     store = CheckpointStore(d)
          ...     store.save(LATEST, 1, {"w": np.ones(2)}, {"lr": 0.001})
          ...     print(store.read_meta(LATEST))
          ...     store.close()
          {'lr': 0.001}
        """
        mngr = self._managers[which]
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        path = self.root / which / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from e

    def close(self) -> None:
        """Closes both checkpoint managers (waits for pending writes).

        Example:
          >>> import tempfile
          >>> with tempfile.TemporaryDirectory() as d:
          ...     CheckpointStore(d).close()
        """
        for m in self._managers.values():
            m.close()


def abstract_of(tree: Any) -> Any:
    """Shape/dtype structs of a pytree, the target orbax restores into.

    Args:
      tree: a pytree of arrays.

    Returns:
      The same pytree with each array replaced by a ``jax.ShapeDtypeStruct`` (same shape, dtype).

    Example:
      >>> abstract_of({"w": np.zeros((2, 3), np.float32)})["w"].shape
      (2, 3)
    """
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _checkpoint_root(path: Path) -> Path:
    if (path / "checkpoints").is_dir():
        return path
    if path.name == "checkpoints" and path.is_dir():
        return path.parent
    if path.parent.name == "checkpoints" and path.name in (LATEST, BEST):
        return path.parent.parent
    raise CheckpointError(
        f"{path}: no checkpoints found (expected a training workdir containing checkpoints/)"
    )


def _restore_model(store: CheckpointStore, which: str):
    from fdnc_jax.train.step import (
        init_state,
        optimizer_from_config,
    )  # Local: train imports the simulator.

    order = [which, LATEST if which == BEST else BEST]
    chosen = next((w for w in order if store.latest_step(w) is not None), None)
    if chosen is None:
        raise CheckpointError(f"{store.root}: contains no saved step")
    meta = store.read_meta(chosen)
    config = meta.get("config") if meta else None
    if not config or "model" not in config:
        raise CheckpointError(f"{store.root / chosen}: checkpoint metadata lacks the config")
    model = Model.create(ModelConfig.from_dict(config["model"]))
    tx = optimizer_from_config(config.get("train", {}))
    state, meta = store.restore(chosen, abstract_of(init_state(model, tx)))
    return chosen, model, state, meta


def load_checkpoint(path: PathLike, which: str = BEST) -> Model:
    """Loads a trained model from a training workdir (``fdnc-train --workdir``) or a weights file.

    Args:
      path: the workdir (or its ``checkpoints`` folder), or a ``.npz`` written by ``save_weights``.
      which: "best" (highest validation accuracy, default) or "latest"; falls back to the other when
        the requested one is empty. Ignored for a ``.npz`` (it holds one set of weights).

    Returns:
      A ``Model`` that ``fdnc_jax.predict`` accepts.

    Example:
      >>> model = load_checkpoint("runs/small")  # doctest: +SKIP
    """
    p = Path(path)
    if p.suffix == ".npz" and not p.is_dir():
        return load_weights(p)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if which not in (BEST, LATEST):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    for attempt in range(2):  # A run training in this workdir may replace "best" meanwhile.
        store = CheckpointStore(_checkpoint_root(p))
        try:
            chosen, model, state, meta = _restore_model(store, which)
            break
        except CheckpointError as e:
            if attempt or not isinstance(e.__cause__, FileNotFoundError):
                raise
        finally:
            store.close()
    info = {
        "source": os.fspath(store.root / chosen),
        "step": int(state.step),
        **{k: meta[k] for k in ("best_accuracy", "val_accuracy") if k in meta},
    }
    from fdnc_jax.train.step import eval_params

    return model.replace_params(eval_params(state), info)


def save_weights(model: Model, path: PathLike, dtype: str = "float32") -> None:
    """Saves a model's parameters + config (+ info, temperature) as a compressed ``.npz`` (atomic).

    Args:
      model: the Model (float32 parameters, keyed by their path in the file).
      path: the destination ``.npz``.
      dtype: storage type of the parameters, "float32" or "float16" (half the size; ``load_weights``
        computes in float32 again — the bundled paper-size weights are stored so, with > 99.6 % of
        assignments on real across-animal pairs unchanged).

    Example:
      >>> import pathlib, tempfile
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_weights(model, pathlib.Path(d) / "w.npz")
      ...     load_weights(pathlib.Path(d) / "w.npz").num_params == model.num_params
      True
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    flat = nnx.to_flat_state(model.params)
    arrays = {"/".join(map(str, k)): np.asarray(v.get_value(), dtype) for k, v in flat}
    arrays["__config__"] = np.asarray(json.dumps(dataclasses.asdict(model.config)))
    arrays["__info__"] = np.asarray(json.dumps(dict(model.info), default=str))
    arrays["__temperature__"] = np.asarray(model.temperature, np.float64)
    atomic_write(path, lambda f: write_npz(f, arrays))


def load_weights(path: PathLike) -> Model:
    """Loads a model saved by ``save_weights``; shape/name mismatches raise CheckpointError.

    Args:
      path: the ``.npz`` written by ``save_weights``.

    Returns:
      The Model, ``info['source']`` set to ``path``.

    Raises:
      CheckpointError: the file is unreadable or its parameters do not fit its config.

    Example:
      >>> import pathlib, tempfile
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_weights(model, pathlib.Path(d) / "w.npz")
      ...     load_weights(pathlib.Path(d) / "w.npz").config.width
      8
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
        config = ModelConfig.from_dict(json.loads(str(arrays.pop("__config__"))))
        info = json.loads(str(arrays.pop("__info__", "{}")))
        temperature = check_temperature(float(arrays.pop("__temperature__", 1.0)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: not a readable fdnc_jax weights file ({e})") from e
    model = Model.create(config, info=info).with_temperature(temperature)
    flat = nnx.to_flat_state(model.params)
    expected = {"/".join(map(str, k)): v for k, v in flat}
    if set(expected) != set(arrays):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise CheckpointError(
            f"{p}: parameters do not fit {config}: missing {missing[:5]}, extra {extra[:5]}"
        )
    for name, var in expected.items():
        if var.get_value().shape != arrays[name].shape:
            raise CheckpointError(
                f"{p}: parameter {name} has shape {arrays[name].shape}, the config expects "
                f"{var.get_value().shape}"
            )
        var.set_value(jax.numpy.asarray(arrays[name], var.get_value().dtype))
    params = nnx.from_flat_state(flat)
    return model.replace_params(params, {**info, "source": os.fspath(p)})


PRETRAINED_ALIASES = {"default": "fdnc_position", "color": "fdnc_color", "small": "fdnc_small"}


def load_pretrained(name: str = "default") -> Model:
    """The weights shipped inside the package (``fdnc_jax/data/MODEL_CARD.md``).

    * ``"default"`` (``fdnc_position``): the paper-size network (6 layers, D 128, 8 heads, FF 2048;
      canonical pose) trained for 17 GPU minutes (H100, then H200) on semi-synthetic and real
      across-animal pairs of the EY, SF and SK1 labs; positions only, so it works for every worm.
    * ``"color"`` (``fdnc_color``): the same with normalised NeuroPAL color (R, G, B) as network
      input; template and test worms need color. The best model for NeuroPAL animals.
    * ``"small"`` (``fdnc_small``): ``configs/small.py``, a 150 k-parameter network with
      distance-biased attention trained for 30 minutes on 2 CPU cores; ~3x faster on a CPU, less
      accurate (26 % vs 46 % on real NP pairs from positions).

    Args:
      name: "default", "color", "small", or the file name ``fdnc_jax/data/<name>.npz``.

    Returns:
      A Model for ``fdnc_jax.predict``.

    Raises:
      ValueError: no bundled weights of that name.

    Example:
      >>> model = load_pretrained()
      >>> model.config.width, model.config.layers, model.config.canonical_pose
      (128, 6, True)
      >>> load_pretrained("color").uses_color
      True
    """
    aliases = PRETRAINED_ALIASES
    fname = aliases.get(name, name) + ".npz"
    res = importlib.resources.files("fdnc_jax") / "data" / fname
    if not res.is_file():
        available = sorted(
            f.name[:-4]
            for f in (importlib.resources.files("fdnc_jax") / "data").iterdir()
            if f.name.startswith("fdnc_") and f.name.endswith(".npz")
        )
        raise ValueError(f"no bundled weights named {name!r}; available: {[*aliases, *available]}")
    with importlib.resources.as_file(res) as p:
        return load_weights(p)
