"""Masked attention layers: multi-head (cross-)attention and a pre-LN transformer layer,
and the index helpers for padded sets (`valid_rank`, `compact_index`; also used by
`survjax.nn.nystrom` and TransMIL's grid layout). Nystrom attention, the layer of
TransMIL, is in `survjax.nn.nystrom`.

All layers take variable-length sets as padded arrays with a boolean mask ``[B, N]``
(True = real token). Padding never changes an output at a real position, and a set with
no real token gives finite outputs (zeros). Dropout is applied only when a PRNG ``key``
is passed at call time; the modules hold parameters only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from survjax.nn.core import LN_EPS, dropout, masked_softmax, split_key

__all__ = [
    "MultiHeadAttention",
    "TransformerLayer",
    "valid_rank",
    "compact_index",
]


# ---- index helpers for padded sets -------------------------------------------------------


def valid_rank(mask: jax.Array) -> jax.Array:
  """Rank of each real token among the real tokens of its row: ``cumsum(mask) - 1``.

  Args:
    mask: boolean ``[B, N]``.

  Returns:
    int32 ``[B, N]``; ``r`` for the ``r``-th real token (0-based), meaningless at padding.
  """
  return jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1


def compact_index(mask: jax.Array) -> jax.Array:
  """Positions of the real tokens, in order: ``idx[b, r]`` = position of the ``r``-th one.

  Entries ``r >= L_b`` (``L_b`` real tokens) are 0. ``take_along_axis(x, idx)`` moves the
  real tokens to the front, so a layer that works on the sequence order (a convolution)
  sees the same sequence wherever the padding sat.

  Args:
    mask: boolean ``[B, N]``.

  Returns:
    int32 ``[B, N]``.
  """
  n = mask.shape[-1]
  target = jnp.where(mask, valid_rank(mask), n)
  pos = jnp.arange(n, dtype=jnp.int32)
  return jax.vmap(lambda t: jnp.zeros((n,), jnp.int32).at[t].set(pos, mode="drop"))(target)


# ---- multi-head attention ------------------------------------------------------------


class MultiHeadAttention(nnx.Module):
  """Masked multi-head (cross-)attention, MUST eq. (7) per head:

      CA(Q, K, V) = softmax(Q W_Q (K W_K)^T / sqrt(d_k)) V W_V

  with ``h`` heads of width ``d_k = dim / h``, concatenated and mixed by an output
  projection ``W_O`` (as `torch.nn.MultiheadAttention`). Keys with ``kv_mask = False``
  get zero weight; a query row whose keys are all masked returns zeros.
  Self-attention is ``mha(x, x, mask)``.
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
               attn_dropout: float = 0.0):
    """Builds the layer.

    Args:
      dim: token width ``D`` (queries and keys/values alike).
      num_heads: ``h``; must divide ``dim``.
      rngs: parameter initialisation keys.
      qkv_bias: biases in ``W_Q, W_K, W_V``.
      attn_dropout: dropout rate on the attention weights (only with a call ``key``).
    """
    if dim % num_heads:
      raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    self.num_heads = num_heads
    self.attn_dropout = attn_dropout
    self.q_proj = nnx.Linear(dim, dim, use_bias=qkv_bias, rngs=rngs)
    self.k_proj = nnx.Linear(dim, dim, use_bias=qkv_bias, rngs=rngs)
    self.v_proj = nnx.Linear(dim, dim, use_bias=qkv_bias, rngs=rngs)
    self.out_proj = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, q_tokens: jax.Array, kv_tokens: jax.Array,
               kv_mask: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
    """Attends from ``q_tokens`` to ``kv_tokens``.

    Args:
      q_tokens: ``[B, Nq, D]``.
      kv_tokens: ``[B, Nk, D]``.
      kv_mask: boolean ``[B, Nk]`` (True = real key) or None.
      key: PRNG key for attention dropout, or None.

    Returns:
      ``[B, Nq, D]``; zero rows where no key is real.
    """
    b, nq, d = q_tokens.shape
    nk = kv_tokens.shape[1]
    h = self.num_heads
    q = self.q_proj(q_tokens).reshape(b, nq, h, d // h)
    k = self.k_proj(kv_tokens).reshape(b, nk, h, d // h)
    v = self.v_proj(kv_tokens).reshape(b, nk, h, d // h)
    if kv_mask is not None:
      v = jnp.where(kv_mask[:, :, None, None], v, 0.0)
    scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // h)
    attn = masked_softmax(scores, None if kv_mask is None else kv_mask[:, None, None, :])
    attn = dropout(attn, self.attn_dropout, key)
    out = self.out_proj(jnp.einsum("bhqk,bkhc->bqhc", attn, v).reshape(b, nq, d))
    if kv_mask is not None:
      out = jnp.where(jnp.any(kv_mask, axis=-1)[:, None, None], out, 0.0)
    return out


class TransformerLayer(nnx.Module):
  """Pre-LN transformer layer with masked self-attention:

      x <- x + Drop(MHA(LN(x), LN(x), mask))
      x <- x + Drop(W_2 Drop(GELU(W_1 LN(x))))

  Padded positions of the output are zero; real positions do not depend on padding.
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
               *, rngs: nnx.Rngs, remat: bool = False):
    """Builds the layer.

    Args:
      dim: token width.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width as a multiple of ``dim``.
      dropout: dropout rate after attention and in the MLP (only with a call ``key``).
      rngs: parameter initialisation keys.
      remat: under differentiation, keep only the outputs of the unbatched matmuls (the
        projections and the MLP) for the backward pass and recompute the rest (norms,
        GELU, softmax, attention products) there (`jax.checkpoint` with
        ``dots_with_no_batch_dims_saveable``). Same values and gradients, fewer
        intermediates written by the forward pass: on XLA:CPU a stack of these layers over
        short sequences (impuTMAE's) differentiates faster.
    """
    hidden = int(round(mlp_ratio * dim))
    self.dropout = dropout
    self.remat = remat
    self.norm1 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
    self.attn = MultiHeadAttention(dim, num_heads, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               key: jax.Array | None = None) -> jax.Array:
    """Applies the layer.

    Args:
      x: tokens ``[B, N, D]``.
      mask: boolean ``[B, N]`` or None.
      key: PRNG key for dropout, or None.

    Returns:
      ``[B, N, D]``.
    """
    if self.remat:
      # A pure function of the layer's state: the layer has nothing to write back, and
      # its parameters may come from different traces (a partly frozen model).
      graphdef, state = nnx.split(self)
      apply = lambda state, x, mask, key: nnx.merge(graphdef, state)._apply(x, mask, key)
      policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
      return jax.checkpoint(apply, policy=policy)(state, x, mask, key)
    return self._apply(x, mask, key)

  def _apply(self, x, mask, key):
    k_attn, k_hidden, k_out = split_key(key, 3)
    h = self.norm1(x)
    x = x + dropout(self.attn(h, h, mask), self.dropout, k_attn)
    h = jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)
    h = dropout(h, self.dropout, k_hidden)
    x = x + dropout(self.fc2(h), self.dropout, k_out)
    if mask is not None:
      x = jnp.where(mask[..., None], x, 0.0)
    return x
