"""Attention-based multiple-instance pooling (Ilse et al., ICML 2018), gated variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from survjax.nn.core import check_precision, dropout, einsum, linear, masked_softmax, split_key

__all__ = ["GatedABMIL"]


class GatedABMIL(nnx.Module):
  """Gated attention MIL pooling over a padded bag.

      h_i = ReLU(W x_i + b)                                    (instance embedding)
      e_i = w^T (tanh(V h_i) * sigmoid(U h_i))                (gated attention score)
      a_i = exp(e_i) / sum_{j real} exp(e_j)   (real i),  a_i = 0 (padding)
      z   = sum_i a_i h_i

  (Ilse et al. 2018, eq. 9; the layout of CLAM's ``Attn_Net_Gated`` with an embedding
  ``in_dim -> dim`` and attention width ``attn_dim``, default ``dim // 2`` as CLAM's
  1024 -> 512 -> 256.) Permutation-invariant over instances and padding-invariant; an
  empty bag pools to zeros.
  """

  def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs, attn_dim: int | None = None,
               dropout: float = 0.0):
    """Builds the pooling.

    Args:
      in_dim: instance feature width.
      dim: embedding width of ``h_i`` (and of the pooled output).
      rngs: parameter initialisation keys.
      attn_dim: width of ``V, U`` (default ``dim // 2``).
      dropout: dropout on ``h_i`` and on the gated hidden layer (only with a call ``key``).
    """
    attn_dim = attn_dim or max(dim // 2, 1)
    self.dropout = dropout
    self.embed = nnx.Linear(in_dim, dim, rngs=rngs)
    self.attn_v = nnx.Linear(dim, attn_dim, rngs=rngs)
    self.attn_u = nnx.Linear(dim, attn_dim, rngs=rngs)
    self.attn_w = nnx.Linear(attn_dim, 1, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               key: jax.Array | None = None, *,
               precision: str = "float32") -> tuple[jax.Array, jax.Array]:
    """Pools a bag.

    Args:
      x: instances ``[B, N, in_dim]``.
      mask: boolean ``[B, N]`` (True = real instance) or None.
      key: PRNG key for dropout, or None.
      precision: matmul precision, ``"float32"`` (default) or ``"bfloat16"`` (bfloat16
        operands, float32 accumulation; `survjax.nn.core.PRECISIONS`).

    Returns:
      ``(pooled [B, dim], attention [B, N])``; attention sums to 1 over the real
      instances of a non-empty bag and is 0 at padding.
    """
    k1, k2 = split_key(key, 2)
    p = check_precision(precision)
    h = dropout(jax.nn.relu(linear(self.embed, x, p)), self.dropout, k1)
    gate = jnp.tanh(linear(self.attn_v, h, p)) * jax.nn.sigmoid(linear(self.attn_u, h, p))
    scores = linear(self.attn_w, dropout(gate, self.dropout, k2), p)[..., 0]
    attn = masked_softmax(scores, mask)
    if mask is not None:
      h = jnp.where(mask[..., None], h, 0.0)
    pooled = einsum("bn,bnd->bd", attn, h, p)
    return pooled, attn
