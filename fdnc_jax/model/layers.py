"""Building blocks of the fDNC transformer (Flax NNX).

Letters: B batch, L tokens (template + test), D model width, F feed-forward width, C color channels.
"""

from __future__ import annotations

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

    Args:
      width: D, the token width.
      heads: attention heads (D must be divisible by it).
      ff_width: F, the feed-forward width.
      dropout: dropout rate in [0, 1) (used when called with ``deterministic=False``).
      rngs: random streams for the initial parameters.

    Example:
      >>> block = EncoderBlock(8, 2, 16, 0.0, rngs=nnx.Rngs(0))
      >>> mask = key_padding_mask(jnp.ones((1, 5), bool))
      >>> block(jnp.zeros((1, 5, 8)), mask, deterministic=True, rngs=None).shape  # [B, L, D]
      (1, 5, 8)
    """

    def __init__(self, width: int, heads: int, ff_width: int, dropout: float, *, rngs: nnx.Rngs):
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

    def __call__(
        self, x: jax.Array, attention_mask: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None
    ) -> jax.Array:
        """x: [B, L, D]; attention_mask: [B, 1, 1 or L, L] bool (True = may attend) → [B, L, D]."""
        kwargs = {"deterministic": deterministic, "rngs": rngs}
        h = self.attention(x, mask=attention_mask, **kwargs)
        x = self.norm_attention(x + self.dropout(h, **kwargs))
        h = self.ff_out(self.dropout(jax.nn.relu(self.ff_in(x)), **kwargs))
        return self.norm_ff(x + self.dropout(h, **kwargs))


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
    """``nnx.dot_product_attention``, computed one head at a time on CPU at inference.

    On a CPU the [B, H, L, L] attention weights of a few hundred tokens (~5 MB per volume) do not
    fit the caches, and the masked softmax is a chain of passes over them (max, exp, sum, divide)
    that is memory-bound: ~1.6 ms per paper-size layer on this project's 2-core Xeon. A
    ``lax.map`` over heads keeps each head's [B, L, L] block in cache and normalises after the
    value product (one pass fewer): ~1.2 ms, the same numbers to float32 rounding (also used by
    CPU training without dropout: ~5 % faster steps, gradients identical to rounding). Active
    dropout, accelerators, biases, causal masks, per-head or < 3-D masks and attention-weight
    sowing use ``nnx.dot_product_attention`` unchanged.

    Args:
      query, key, value: [B, L, H, Dh] (any batch dims before L).
      bias: optional additive logits bias (only the standard path supports it).
      mask: [B, 1, 1 or L, L] bool, True = may attend (one mask for all heads).
      dropout_rate, deterministic, module, is_causal, kwargs: as ``nnx.dot_product_attention``.

    Returns:
      [B, L, H, Dh] attention output.

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
    dtype = jnp.result_type(query, key, value)
    q = query / jnp.sqrt(jnp.asarray(query.shape[-1], dtype))
    big_neg = jnp.finfo(dtype).min
    keep = None if mask is None else mask[..., 0, :, :]  # [B, 1 or L, L]

    def one_head(qkv: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        q_h, k_h, v_h = qkv  # [B, L, Dh] each
        logits = jnp.einsum("...qd,...kd->...qk", q_h, k_h)  # [B, L, L]
        if keep is not None:
            logits = jnp.where(keep, logits, big_neg)
        e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        return jnp.einsum("...qk,...kd->...qd", e, v_h) / jnp.sum(e, axis=-1, keepdims=True)

    heads_first = tuple(jnp.moveaxis(x, -2, 0) for x in (q, key, value))  # [H, B, L, Dh]
    out = jax.lax.map(one_head, heads_first)  # [H, B, L, Dh]
    return jnp.moveaxis(out, 0, -2).astype(dtype)


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
