"""Pytree containers passed through jit: padded point sets and training pairs.

Letters: B batch, S source worms, P padded points per worm, N template points, M test points,
C color channels. Label codes everywhere: ≥ 0 identity (source neuron index), −1 unlabelled,
−2 outlier / false detection. Padded slots have mask False and label −3 (never used by a loss).
"""

from __future__ import annotations

import dataclasses

import jax

UNLABELLED = -1
OUTLIER = -2
PADDING = -3


def _pytree(cls):
    """Registers a frozen dataclass as a pytree with all fields as children."""
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree
@dataclasses.dataclass(frozen=True)
class SourceBank:
    """Real worms padded to a common size, the simulator's input.

    Attributes:
      xyz: [S, P, 3] float32, model units (centred, /200 px), valid where ``mask``.
      mask: [S, P] bool, which slots hold a neuron.
      color: optional [S, P, C] float32 normalised colors (None when absent).
      identity: optional [S, P] int32 index of each neuron's annotated name in the bank's name
        list (−1 unnamed or padding), for pairs across animals (None when absent).

    Example:
      >>> import jax.numpy as jnp
      >>> bank = SourceBank(xyz=jnp.zeros((2, 16, 3)), mask=jnp.ones((2, 16), bool))
      >>> len(jax.tree.leaves(bank))  # a pytree: the absent color and identity are no leaves
      2
    """

    xyz: jax.Array
    mask: jax.Array
    color: jax.Array | None = None
    identity: jax.Array | None = None

    @property
    def num_sources(self) -> int:
        """S, the number of source worms.

        Example:
          >>> import jax.numpy as jnp
          >>> SourceBank(xyz=jnp.zeros((2, 16, 3)), mask=jnp.ones((2, 16), bool)).num_sources
          2
        """
        return int(self.xyz.shape[0])

    @property
    def num_points(self) -> int:
        """P, the padded number of slots per worm.

        Example:
          >>> import jax.numpy as jnp
          >>> SourceBank(xyz=jnp.zeros((2, 16, 3)), mask=jnp.ones((2, 16), bool)).num_points
          16
        """
        return int(self.xyz.shape[1])


@_pytree
@dataclasses.dataclass(frozen=True)
class PairBatch:
    """A batch of (template, test) training pairs with known correspondence.

    Attributes:
      template_xyz: [B, N, 3] float32, model units.
      template_mask: [B, N] bool.
      test_xyz: [B, M, 3] float32, model units.
      test_mask: [B, M] bool.
      target: [B, M] int32, the template slot that test point m corresponds to (≥ 0), −1 when its
        identity is not in the template ("unlabelled": entropy term), −2 for an outlier, −3 padding.
      template_color: optional [B, N, C] float32.
      test_color: optional [B, M, C] float32.

    Example:
      >>> import jax.numpy as jnp
      >>> xyz, mask = jnp.zeros((1, 4, 3)), jnp.ones((1, 4), bool)
      >>> batch = PairBatch(xyz, mask, xyz, mask, target=jnp.arange(4)[None])
      >>> batch.target.shape
      (1, 4)
    """

    template_xyz: jax.Array
    template_mask: jax.Array
    test_xyz: jax.Array
    test_mask: jax.Array
    target: jax.Array
    template_color: jax.Array | None = None
    test_color: jax.Array | None = None
