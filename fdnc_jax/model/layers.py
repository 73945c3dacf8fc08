"""Building blocks of the fDNC transformer (Flax NNX).

Letters: B batch, L tokens (template + test), D model width, F feed-forward width, C color channels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class PointEmbedding(nnx.Module):
    """Per-point embedding: Linear(F_in → D) of positions scaled to ~unit spread.

    No LayerNorm here: normalising Linear(xyz) across features would divide out each point's
    distance from the centre (LN(r·Wx̂) = LN(Wx̂)), leaving only its direction. The original's
    BatchNorm is a fixed affine map at inference, which a Linear layer already covers.

    Args:
      in_features: 3 for positions, 3 + C with color features.
      width: D.
      position_scale: multiplies the (model-unit) positions; a head spans ~1.2 units, so 4 gives
        coordinates of order one.

    Example:
      >>> embed = PointEmbedding(3, 8, rngs=nnx.Rngs(0))
      >>> embed(jnp.zeros((1, 5, 3))).shape  # [B, L, D]
      (1, 5, 8)
    """

    def __init__(
        self, in_features: int, width: int, *, rngs: nnx.Rngs, position_scale: float = 4.0
    ):
        self.linear = nnx.Linear(in_features, width, rngs=rngs)
        self.position_scale = position_scale

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, F_in] (xyz first) → [B, L, D]."""
        scale = jnp.concatenate(
            [jnp.full((3,), self.position_scale), jnp.ones((x.shape[-1] - 3,))]
        ).astype(x.dtype)
        return self.linear(x * scale[None, None, :])


class EncoderBlock(nnx.Module):
    """Post-norm transformer encoder layer (as PyTorch's TransformerEncoderLayer, ReLU, dropout).

    With ``distance_bias`` each head h adds −|p_i − p_j|² / (2 σ_h²) to its attention logits, p the
    tokens' positions (model units) and σ_h > 0 a learned length per head, initialised from
    ``distance_bias_sigmas`` (short to long): a head can look at a neighbourhood without first
    having to learn distances from the embedded coordinates (as point-cloud transformers do). In
    the canonical pose the two clouds share a frame, so this also covers cross-cloud neighbours.

    Args:
      width: D, the token width.
      heads: attention heads (D must be divisible by it).
      ff_width: F, the feed-forward width.
      dropout: dropout rate in [0, 1) (used when called with ``deterministic=False``).
      rngs: random streams for the initial parameters.
      distance_bias: learn the per-head distance bias above (the call must pass ``positions``).

    Example:
      >>> block = EncoderBlock(8, 2, 16, 0.0, rngs=nnx.Rngs(0))
      >>> mask = key_padding_mask(jnp.ones((1, 5), bool))
      >>> block(jnp.zeros((1, 5, 8)), mask, deterministic=True, rngs=None).shape  # [B, L, D]
      (1, 5, 8)
    """

    def __init__(
        self,
        width: int,
        heads: int,
        ff_width: int,
        dropout: float,
        *,
        rngs: nnx.Rngs,
        distance_bias: bool = False,
    ):
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads,
            in_features=width,
            qkv_features=width,
            out_features=width,
            dropout_rate=dropout,
            broadcast_dropout=False,
            decode=False,
            attention_fn=head_by_head_attention,
            rngs=rngs,
        )
        self.ff_in = nnx.Linear(width, ff_width, rngs=rngs)
        self.ff_out = nnx.Linear(ff_width, width, rngs=rngs)
        self.norm_attention = nnx.LayerNorm(width, rngs=rngs)
        self.norm_ff = nnx.LayerNorm(width, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.log_sigma = (
            nnx.Param(jnp.log(distance_bias_sigmas(heads))) if distance_bias else None
        )  # [H]

    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool,
        rngs: nnx.Rngs | None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, L, D]; attention_mask: [B, 1, 1 or L, L] bool (True = may attend); positions:
        [B, L, 3] the tokens' positions (model units; distance-bias blocks only) → [B, L, D]."""
        kwargs = {"deterministic": deterministic, "rngs": rngs}
        if self.log_sigma is None:
            h = self.attention(x, mask=attention_mask, **kwargs)
        else:
            if positions is None:
                raise ValueError("a distance-bias block needs the tokens' positions [B, L, 3]")
            h = self._biased_attention(x, attention_mask, positions, deterministic, rngs)
        x = self.norm_attention(x + self.dropout(h, **kwargs))
        h = self.ff_out(self.dropout(jax.nn.relu(self.ff_in(x)), **kwargs))
        return self.norm_ff(x + self.dropout(h, **kwargs))

    def _biased_attention(
        self,
        x: jax.Array,
        attention_mask: jax.Array,
        positions: jax.Array,
        deterministic: bool,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        """The attention of ``nnx.MultiHeadAttention`` (same parameters) plus the distance bias.

        The bias enters through 4 extra query/key features per head: −|p_i − p_j|²/2σ² =
        (p_i·p_j − |p_j|²/2)/σ² − |p_i|²/2σ², and the last term, constant along a softmax row,
        drops out. So no [B, H, L, L] bias is built and the CPU's head-by-head attention
        (``head_by_head_attention``) still applies.
        """
        att = self.attention
        q, k, v = att.query(x), att.key(x), att.value(x)  # [B, L, H, Dh]
        dh = q.shape[-1]
        e = dh + 4  # The attention divides by sqrt(e): pre-scale so that q·k keeps its 1/sqrt(dh).
        log_sigma = jnp.maximum(self.log_sigma[...], LOG_SIGMA_FLOOR)
        inv_var = jnp.exp(-2.0 * log_sigma)[None, None, :, None]  # [1, 1, H, 1]
        p = jnp.broadcast_to(positions[:, :, None, :], (*q.shape[:-1], 3)).astype(q.dtype)
        half_norm2 = 0.5 * jnp.sum(p * p, axis=-1, keepdims=True)  # [B, L, H, 1]
        root_e = jnp.sqrt(jnp.asarray(e, q.dtype))
        q_aug = jnp.concatenate(
            [q * (root_e / jnp.sqrt(dh)), root_e * p * inv_var, jnp.full_like(half_norm2, root_e)],
            axis=-1,
        )  # [B, L, H, Dh + 4]
        k_aug = jnp.concatenate([k, p, -half_norm2 * inv_var], axis=-1)  # [B, L, H, Dh + 4]
        # Values padded to the same width (nnx.dot_product_attention requires it); sliced after.
        v_pad = jnp.concatenate([v, jnp.zeros_like(q_aug[..., dh:])], axis=-1)
        dropout = att.dropout_rate > 0.0 and not deterministic
        out = att.attention_fn(
            q_aug,
            k_aug,
            v_pad,
            mask=attention_mask,
            dropout_rng=rngs.dropout() if dropout else None,
            dropout_rate=att.dropout_rate,
            broadcast_dropout=att.broadcast_dropout,
            deterministic=not dropout,
        )  # [B, L, H, Dh + 4]
        return att.out(out[..., :dh])


DISTANCE_BIAS_SHORTEST = 0.08  # Model units (~7 µm): a neuron and its nearest neighbours.
DISTANCE_BIAS_LONGEST = 0.64  # Model units (~54 µm): half a head.
LOG_SIGMA_FLOOR = math.log(0.01)  # σ_h ≥ 0.01 model units (0.84 µm), below any spacing.


def distance_bias_sigmas(heads: int) -> jax.Array:
    """Initial lengths σ_h of the distance bias [H]: geometric from 0.08 to 0.64 model units.

    Example:
      >>> [round(float(s), 2) for s in distance_bias_sigmas(4)]
      [0.08, 0.16, 0.32, 0.64]
    """
    if heads == 1:
        return jnp.array([DISTANCE_BIAS_SHORTEST])
    return jnp.geomspace(DISTANCE_BIAS_SHORTEST, DISTANCE_BIAS_LONGEST, heads)


def head_by_head_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    module: nnx.Module | None = None,
    is_causal: bool = False,
    **kwargs,
) -> jax.Array:
    """``nnx.dot_product_attention``, computed one head at a time on CPU, with a hand-written VJP.

    On a CPU the [B, H, L, L] attention weights of a few hundred tokens (~5 MB per volume) do not
    fit the caches, and the masked softmax is a chain of passes over them (max, exp, sum, divide)
    that is memory-bound: ~1.6 ms per paper-size layer on this project's 2-core Xeon. A
    ``lax.map`` over heads keeps each head's [B, L, L] block in cache and normalises after the
    value product (one pass fewer): ~1.2 ms, the same numbers to float32 rounding. Under
    ``jax.grad`` (CPU training without dropout) the forward keeps the weights P instead and the
    gradient is the textbook one (dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ = dS K/√d,
    dK = dSᵀ Q/√d) in heads-first batched products: 2.6× faster than differentiating the
    ``lax.map`` (1.9× faster than differentiating ``nnx.dot_product_attention``) for the ``small``
    model's batch. Active dropout, accelerators, biases, causal masks, per-head or < 3-D masks and
    attention-weight sowing use ``nnx.dot_product_attention`` unchanged.

    Args:
      query, key: [B, L, H, Dk] (any batch dims before L).
      value: [B, L, H, Dv].
      bias: optional additive logits bias (only the standard path supports it).
      mask: [B, 1, 1 or L, L] bool, True = may attend (one mask for all heads).
      dropout_rate, deterministic, module, is_causal, kwargs: as ``nnx.dot_product_attention``.

    Returns:
      [B, L, H, Dv] attention output.

    Example:
      >>> q = jnp.ones((1, 4, 2, 8))
      >>> head_by_head_attention(q, q, q, deterministic=True).shape
      (1, 4, 2, 8)
    """
    standard = (
        jax.default_backend() != "cpu"
        or (dropout_rate > 0.0 and not deterministic)
        or bias is not None
        or module is not None
        or is_causal
        or (mask is not None and (mask.ndim < 3 or mask.shape[-3] != 1))
        or query.shape[-3] != key.shape[-3]
    )
    if standard:
        return nnx.dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            module=module,
            is_causal=is_causal,
            **kwargs,
        )
    keep = None if mask is None else mask[..., 0, :, :]  # [B, 1 or L, L]
    return _cpu_attention(query, key, value, keep)


@jax.custom_vjp
def _cpu_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, keep: jax.Array | None
) -> jax.Array:
    """Masked softmax attention, head by head (see ``head_by_head_attention``).

    query, key [..., L, H, Dk], value [..., L, H, Dv], keep [..., 1 or L, L] bool or None →
    [..., L, H, Dv].
    """
    dtype = jnp.result_type(query, key, value)
    q = query / jnp.sqrt(jnp.asarray(query.shape[-1], dtype))
    big_neg = jnp.finfo(dtype).min

    def one_head(qkv: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        q_h, k_h, v_h = qkv  # [B, L, Dk], [B, L, Dk], [B, L, Dv]
        logits = jnp.einsum("...qd,...kd->...qk", q_h, k_h)  # [B, L, L]
        if keep is not None:
            logits = jnp.where(keep, logits, big_neg)
        e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        return jnp.einsum("...qk,...kd->...qd", e, v_h) / jnp.sum(e, axis=-1, keepdims=True)

    heads_first = tuple(jnp.moveaxis(x, -2, 0) for x in (q, key, value))  # [H, B, L, D]
    out = jax.lax.map(one_head, heads_first)  # [H, B, L, Dv]
    return jnp.moveaxis(out, 0, -2).astype(dtype)


def _cpu_attention_forward(query, key, value, keep):
    """Forward for the VJP: all heads at once, keeping the weights P [..., H, L, L]."""
    dtype = jnp.result_type(query, key, value)
    scale = 1.0 / jnp.sqrt(jnp.asarray(query.shape[-1], dtype))
    q, k, v = (jnp.swapaxes(x, -2, -3) for x in (query, key, value))  # [..., H, L, D]
    logits = jnp.matmul(q * scale, jnp.swapaxes(k, -1, -2))  # [..., H, L, L]
    if keep is not None:
        logits = jnp.where(keep[..., None, :, :], logits, jnp.finfo(dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.matmul(weights, v)  # [..., H, L, Dv]
    return jnp.swapaxes(out, -2, -3).astype(dtype), (q, k, v, weights, out, scale)


def _cpu_attention_backward(residuals, d_out):
    q, k, v, weights, out, scale = residuals
    d_out = jnp.swapaxes(d_out, -2, -3)  # [..., H, L, Dv]
    d_v = jnp.matmul(jnp.swapaxes(weights, -1, -2), d_out)
    d_weights = jnp.matmul(d_out, jnp.swapaxes(v, -1, -2))  # [..., H, L, L]
    d_logits = weights * (d_weights - jnp.sum(d_out * out, axis=-1, keepdims=True))
    d_q = jnp.matmul(d_logits, k) * scale
    d_k = jnp.matmul(jnp.swapaxes(d_logits, -1, -2), q) * scale
    back = lambda x: jnp.swapaxes(x, -2, -3)  # [..., L, H, D]
    return back(d_q), back(d_k), back(d_v), None


_cpu_attention.defvjp(_cpu_attention_forward, _cpu_attention_backward)


def bfloat16_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs) -> jax.Array:
    """``lax.dot_general`` with bfloat16 operands and float32 accumulation and result.

    A drop-in ``dot_general`` for ``nnx.Linear`` / ``nnx.LinearGeneral`` (see
    ``Model.with_matmul_dtype``): on CPUs with bfloat16 matrix units (Intel AMX, AVX512-BF16) the
    products run 2–3× faster than in float32; biases, softmax and LayerNorm stay float32.

    Example:
      >>> x = jnp.full((2, 3), 1.0 + 2.0**-10)  # not representable in bfloat16: rounds to 1
      >>> float(bfloat16_dot_general(x, jnp.ones((3, 1)), (((1,), (0,)), ((), ())))[0, 0])
      3.0
    """
    kwargs.pop("preferred_element_type", None)
    return jax.lax.dot_general(
        lhs.astype(jnp.bfloat16),
        rhs.astype(jnp.bfloat16),
        dimension_numbers,
        precision=precision,
        preferred_element_type=jnp.float32,
        **kwargs,
    )


def key_padding_mask(valid: jax.Array) -> jax.Array:
    """valid: [B, L] bool → [B, 1, 1, L] attention mask letting every query attend to valid keys.

    Broadcast over heads and queries ([B, H, L, L]) inside the attention, never materialised.

    Example:
      >>> key_padding_mask(jnp.array([[True, False]])).astype(int).tolist()
      [[[[1, 0]]]]
    """
    return valid[:, None, None, :]
