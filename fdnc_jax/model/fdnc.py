"""The fDNC matcher: a transformer over [template; test] point tokens scoring every test–template pair.

Letters: B batch, N template points, M test points, D model width, C color channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fdnc_jax.matching import check_temperature
from fdnc_jax.model.layers import (
    EncoderBlock,
    PointEmbedding,
    bfloat16_dot_general,
    key_padding_mask,
)
from fdnc_jax.pose import canonical_pose_batch

NEG_INF = -1e9
MATMUL_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture. Defaults are the paper's model (NIT_Registration).

    Example:
      >>> cfg = ModelConfig()
      >>> cfg.width, cfg.layers, cfg.heads
      (128, 6, 8)
    """

    width: int = 128  # D, d_model.
    layers: int = 6  # Transformer encoder layers.
    heads: int = 8  # Attention heads.
    ff_width: int = 2048  # Feed-forward width.
    dropout: float = 0.1  # Dropout in attention and feed-forward (training only).
    color_features: int = 0  # C > 0: per-point normalised color concatenated to xyz as input.
    canonical_pose: bool = False  # Rotate each cloud to its principal axes first (fdnc_jax.pose).
    # Learned per-head distance bias −|p_i − p_j|² / 2σ_h² on the attention logits (EncoderBlock).
    distance_bias: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds a validated config from a mapping (e.g. ``config.model`` of a training config).

        Args:
          d: field name → value; missing fields keep their defaults.

        Returns:
          The ModelConfig.

        Raises:
          ValueError: an unknown field, width not divisible by heads, dropout outside [0, 1) or a
            non-positive size.

        Example:
          >>> ModelConfig.from_dict({"width": 64, "heads": 2}).width
          64
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"unknown model config field(s) {sorted(unknown)}; known: {sorted(names)}"
            )
        cfg = cls(**dict(d))
        if cfg.width % cfg.heads:
            raise ValueError(
                f"model.width={cfg.width} must be divisible by model.heads={cfg.heads}"
            )
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"model.dropout={cfg.dropout} must be in [0, 1)")
        if min(cfg.width, cfg.layers, cfg.heads, cfg.ff_width) <= 0 or cfg.color_features < 0:
            raise ValueError(f"model sizes must be positive, got {cfg}")
        return cfg


class FDNC(nnx.Module):
    """Permutation-equivariant neuron matcher.

    Call with template points [B, N, 3] + mask [B, N] and test points [B, M, 3] + mask [B, M] (model
    units); returns log-probabilities [B, M, N + 1]: column n < N is "test point m is template point n",
    column N is "test point m is an outlier". Padded template columns get probability 0.

    Args:
      cfg: the ModelConfig.
      rngs: random streams for the initial parameters (``nnx.Rngs(seed)``).

    Example:
      >>> net = FDNC(ModelConfig(width=8, layers=1, heads=2, ff_width=16), rngs=nnx.Rngs(0))
      >>> xyz, mask = jnp.zeros((1, 5, 3)), jnp.ones((1, 5), bool)
      >>> net(xyz, mask, xyz[:, :4], mask[:, :4]).shape  # [B, M, N + 1]
      (1, 4, 6)
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = PointEmbedding(3 + cfg.color_features, cfg.width, rngs=rngs)
        self.blocks = nnx.List(
            [
                EncoderBlock(
                    cfg.width,
                    cfg.heads,
                    cfg.ff_width,
                    cfg.dropout,
                    rngs=rngs,
                    distance_bias=cfg.distance_bias,
                )
                for _ in range(cfg.layers)
            ]
        )
        self.outlier = nnx.Linear(cfg.width, 1, rngs=rngs)

    def __call__(
        self,
        template_xyz: jax.Array,
        template_mask: jax.Array,
        test_xyz: jax.Array,
        test_mask: jax.Array,
        template_color: jax.Array | None = None,
        test_color: jax.Array | None = None,
        *,
        test_signs: jax.Array | None = None,
        deterministic: bool = True,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Log-probabilities [B, M, N + 1].

        Args:
          template_xyz, test_xyz: [B, N, 3], [B, M, 3] model units; masks [B, N], [B, M] bool.
          template_color, test_color: [B, N, C], [B, M, C] normalised colors (color models only).
          test_signs: [B, 3] ±1 applied to the test's canonical axes (canonical_pose models only):
            the orientation hypotheses searched at inference (``fdnc_jax.pose.SIGN_FLIPS``).
          deterministic: no dropout (inference); training passes False and a ``dropout_key``.
        """
        n = template_xyz.shape[1]
        if self.cfg.canonical_pose:
            template_xyz = canonical_pose_batch(template_xyz, template_mask)
            test_xyz = canonical_pose_batch(test_xyz, test_mask)
            if test_signs is not None:
                test_xyz = test_xyz * test_signs[:, None, :]
        template_in, test_in = template_xyz, test_xyz
        if self.cfg.color_features:
            if template_color is None or test_color is None:
                raise ValueError("this model takes color input: pass template_color and test_color")
            c = self.cfg.color_features
            template_in = jnp.concatenate([template_xyz, template_color[..., :c]], axis=-1)
            test_in = jnp.concatenate([test_xyz, test_color[..., :c]], axis=-1)
        # [B, N + M, D]; template tokens get +1 on every feature, the only "which cloud" signal.
        tokens = jnp.concatenate([self.embed(template_in) + 1.0, self.embed(test_in)], axis=1)
        valid = jnp.concatenate([template_mask, test_mask], axis=1)  # [B, N + M]
        attention_mask = key_padding_mask(valid)
        rngs = None if deterministic else nnx.Rngs(dropout=dropout_key)
        positions = None
        if self.cfg.distance_bias:
            positions = jnp.concatenate([template_xyz, test_xyz], axis=1)  # [B, N + M, 3]
        for block in self.blocks:
            tokens = block(
                tokens, attention_mask, deterministic=deterministic, rngs=rngs, positions=positions
            )
        u, v = tokens[:, :n], tokens[:, n:]  # [B, N, D], [B, M, D]
        scores = jnp.einsum("bmd,bnd->bmn", v, u)  # [B, M, N]
        scores = jnp.where(template_mask[:, None, :], scores, NEG_INF)
        outlier = self.outlier(v)  # [B, M, 1]
        return jax.nn.log_softmax(jnp.concatenate([scores, outlier], axis=-1), axis=-1)


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars.

    Args:
      model: any NNX module.

    Returns:
      The total size of its ``nnx.Param`` arrays.

    Example:
      >>> count_params(nnx.Linear(3, 8, rngs=nnx.Rngs(0)))  # 3 × 8 weights + 8 biases
      32
    """
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A trained matcher ready for inference: the split NNX model plus its config.

    Attributes:
      graphdef: the NNX graph definition (static structure).
      params: nnx.State of the parameters.
      other: nnx.State of the non-parameter variables (unused dropout RNG counters).
      config: the ModelConfig.
      info: free-form provenance (training steps, accuracy, source of the weights).
      matmul_dtype: "float32" (default) or "bfloat16": the operand type of the encoder's matrix
        products — a label set by ``with_matmul_dtype``, which changes the graph (passing it to
        the constructor changes nothing else).
      temperature: T > 0 of the reported probabilities: ``predict`` takes the row softmax of its
        scores divided by T (1: the network's own; fitted on labelled pairs to calibrate them,
        ``with_temperature``). The assignment does not depend on it.

    Example:
      >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
      >>> model.num_params == count_params(model.module())
      True
    """

    graphdef: Any
    params: Any
    other: Any
    config: ModelConfig
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    matmul_dtype: str = "float32"
    temperature: float = 1.0

    @classmethod
    def create(
        cls, config: ModelConfig, seed: int = 0, info: Mapping[str, Any] | None = None
    ) -> Model:
        """A freshly initialised model (random weights: train it before use).

        Args:
          config: the architecture.
          seed: seed of the initial parameters.
          info: provenance to attach.

        Returns:
          The untrained Model.

        Example:
          >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16), seed=1)
          >>> model.info, model.num_params
          ({}, 641)
        """
        graphdef, params, other = nnx.split(FDNC(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)
        return cls(graphdef, params, other, config, dict(info or {}))

    def replace_params(self, params: Any, info: Mapping[str, Any] | None = None) -> Model:
        """A copy with other parameters (same structure and shapes) and, optionally, new info.

        Args:
          params: nnx.State of parameters shaped as ``self.params``.
          info: new provenance (default: keep this model's).

        Returns:
          The new Model (this one is unchanged).

        Example:
          >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
          >>> model.replace_params(model.params, {"step": 0}).info
          {'step': 0}
        """
        return dataclasses.replace(
            self, params=params, info=dict(info if info is not None else self.info)
        )

    def with_matmul_dtype(self, matmul_dtype: str) -> Model:
        """A copy whose encoder multiplies matrices in ``matmul_dtype`` (same parameters).

        ``"bfloat16"``: the attention projections and the feed-forward layers of every encoder
        block take bfloat16 operands and accumulate in float32 (``bfloat16_dot_general``);
        embedding, scores, softmax and LayerNorm stay float32. An inference option for CPUs with
        bfloat16 matrix units (Intel AMX / AVX512-BF16), where the paper-size forward runs ~1.4×
        faster (on CPUs without them, e.g. AMD Zen 3, it is ~1.35× slower); on the 90 real NP
        pairs of the bundled models the mean accuracy moved by < 0.15 points, single pairs by ~0.6
        points on average (README, Benchmarks). ``"float32"``
        restores exact float32 products. Train in float32.

        Args:
          matmul_dtype: "float32" or "bfloat16".

        Returns:
          The new Model (this one is unchanged; each has its own compiled forward).

        Raises:
          ValueError: another dtype.

        Example:
          >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
          >>> model.with_matmul_dtype("bfloat16").matmul_dtype
          'bfloat16'
        """
        if matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
        module = self.module()
        for block in module.blocks:
            for _, node in nnx.iter_graph(block):
                if isinstance(node, nnx.Linear | nnx.LinearGeneral):
                    if matmul_dtype == "bfloat16":
                        node.dot_general = bfloat16_dot_general
                    else:  # Each class's own default.
                        node.dot_general = (
                            jax.lax.dot_general if isinstance(node, nnx.Linear) else None
                        )
        graphdef, params, other = nnx.split(module, nnx.Param, ...)
        return dataclasses.replace(
            self, graphdef=graphdef, params=params, other=other, matmul_dtype=matmul_dtype
        )

    def with_temperature(self, temperature: float) -> Model:
        """A copy whose reported probabilities use ``temperature`` (same network and assignments).

        Probabilities are ``softmax(scores / T)`` per test neuron, scores = network log-probs (+ the
        color term); T > 1 softens over-confident probabilities. The bundled models carry a T
        fitted on labelled real pairs (MODEL_CARD.md); ``with_temperature(1.0)`` gives the raw ones.

        Args:
          temperature: finite T > 0.

        Returns:
          The new Model (this one is unchanged).

        Raises:
          ValueError: T not finite or ≤ 0.

        Example:
          >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
          >>> model.with_temperature(2.0).temperature
          2.0
        """
        return dataclasses.replace(self, temperature=check_temperature(temperature))

    def module(self, params: Any | None = None) -> FDNC:
        """The NNX module with ``params`` (default: this model's).

        Args:
          params: nnx.State of parameters shaped as ``self.params`` (e.g. while training).

        Returns:
          The FDNC module, callable on [B, N, 3] / [B, M, 3] point sets.

        Example:
          >>> model = Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16))
          >>> isinstance(model.module(), FDNC)
          True
        """
        return nnx.merge(self.graphdef, self.params if params is None else params, self.other)

    @property
    def num_params(self) -> int:
        """Number of trainable scalars.

        Example:
          >>> Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16)).num_params
          641
        """
        return int(sum(x.size for x in jax.tree.leaves(self.params)))

    @property
    def uses_color(self) -> bool:
        """Whether the model takes per-point color ([B, N, C] inputs, ``color_features > 0``).

        Example:
          >>> Model.create(ModelConfig(width=8, layers=1, heads=2, ff_width=16)).uses_color
          False
        """
        return self.config.color_features > 0

    def __repr__(self) -> str:
        dtype = "" if self.matmul_dtype == "float32" else f", matmul_dtype={self.matmul_dtype!r}"
        temp = "" if self.temperature == 1.0 else f", temperature={self.temperature:g}"
        return (
            f"Model({self.config}, params={self.num_params:,}, info={dict(self.info)}{dtype}{temp})"
        )
