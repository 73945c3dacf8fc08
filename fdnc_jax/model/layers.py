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
        """x: [B, L, D]; attention_mask: [B, 1, L, L] bool (True = may attend) → [B, L, D]."""
        kwargs = {"deterministic": deterministic, "rngs": rngs}
        h = self.attention(x, mask=attention_mask, **kwargs)
        x = self.norm_attention(x + self.dropout(h, **kwargs))
        h = self.ff_out(self.dropout(jax.nn.relu(self.ff_in(x)), **kwargs))
        return self.norm_ff(x + self.dropout(h, **kwargs))


def key_padding_mask(valid: jax.Array) -> jax.Array:
    """valid: [B, L] bool → [B, 1, L, L] attention mask letting every query attend to valid keys.

    Example:
      >>> key_padding_mask(jnp.array([[True, False]])).astype(int).tolist()
      [[[[1, 0], [1, 0]]]]
    """
    return jnp.broadcast_to(
        valid[:, None, None, :], (valid.shape[0], 1, valid.shape[1], valid.shape[1])
    )
