"""Genomic encoders: self-normalising networks (Klambauer et al., NeurIPS 2017) and a
per-gene-group tokenizer (as MCAT, SurvPath and MUST build their genomic tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from survjax.nn.core import split_key

__all__ = ["alpha_dropout", "SNN", "GroupTokenizer"]

# SELU constants (Klambauer et al. 2017): alpha' = -lambda * alpha.
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805
_ALPHA_PRIME = -_SELU_SCALE * _SELU_ALPHA


def alpha_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Alpha dropout: keeps zero mean and unit variance of standardised inputs.

      y = a (x d + alpha' (1 - d)) + b,   d ~ Bernoulli(q),  q = 1 - rate,
      a = (q + alpha'^2 q (1 - q))^{-1/2},   b = -a (1 - q) alpha',
      alpha' = -lambda alpha ~= -1.7581   (the SELU saturation value)

  (Klambauer et al. 2017, Sec. "New Dropout Technique"; PyTorch's ``AlphaDropout``.)
  Identity when ``key`` is None or ``rate == 0``.

  Args:
    x: any array (ideally with zero mean and unit variance, e.g. SELU outputs).
    rate: drop probability ``1 - q`` in ``[0, 1)``.
    key: PRNG key, or None (evaluation).

  Returns:
    An array like ``x``.
  """
  if key is None or rate <= 0.0:
    return x
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"alpha dropout rate must be in [0, 1), got {rate}")
  q = 1.0 - rate
  a = (q + _ALPHA_PRIME ** 2 * q * (1.0 - q)) ** -0.5
  b = -a * (1.0 - q) * _ALPHA_PRIME
  keep = jax.random.bernoulli(key, q, x.shape)
  return a * jnp.where(keep, x, _ALPHA_PRIME) + b


class SNN(nnx.Module):
  """Self-normalising network: ``depth`` blocks of

      h <- AlphaDropout(SELU(W h + b))

  with LeCun-normal weights ``W ~ N(0, 1 / fan_in)`` and zero biases (Klambauer et al.
  2017). Widths: ``in_dim -> hidden -> ... -> hidden -> out_dim`` (``out_dim`` defaults
  to ``hidden``).
  """

  def __init__(self, in_dim: int, hidden: int, depth: int, dropout: float, *,
               rngs: nnx.Rngs, out_dim: int | None = None):
    """Builds the network.

    Args:
      in_dim: input width.
      hidden: width of the hidden blocks.
      depth: number of blocks (>= 1).
      dropout: alpha-dropout rate after every block (only with a call ``key``).
      rngs: parameter initialisation keys.
      out_dim: width of the last block (default ``hidden``).
    """
    if depth < 1:
      raise ValueError(f"SNN depth must be >= 1, got {depth}")
    out_dim = hidden if out_dim is None else out_dim
    widths = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
    self.dropout = dropout
    self.layers = nnx.List([
        nnx.Linear(a, b, kernel_init=init, bias_init=nnx.initializers.zeros_init(), rngs=rngs)
        for a, b in zip(widths[:-1], widths[1:])])

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Applies the network.

    Args:
      x: ``[..., in_dim]``.
      key: PRNG key for alpha dropout, or None.

    Returns:
      ``[..., out_dim]``.
    """
    keys = split_key(key, len(self.layers))
    for layer, k in zip(self.layers, keys):
      x = alpha_dropout(jax.nn.selu(layer(x)), self.dropout, k)
    return x


class GroupTokenizer(nnx.Module):
  """One token per gene group: a small SNN on each group's columns.

      t_g = SNN_g(x[:, c_g : c_g + n_g]),   tokens = [t_1, ..., t_G]   ([B, G, dim])

  for a flat tabular block whose columns come group after group with sizes
  ``group_sizes = (n_1, ..., n_G)``. Each SNN has two blocks ``n_g -> hidden -> dim``
  (``hidden = 256``, alpha dropout 0.25), as MCAT/SurvPath/MUST encode the six gene
  families. (Their ``SNN_Block`` uses ELU; we use SELU, the self-normalising activation
  of Klambauer et al.) Token ``g`` depends only on group ``g``'s columns.
  """

  def __init__(self, group_sizes: tuple[int, ...], dim: int, *, rngs: nnx.Rngs,
               hidden: int = 256, dropout: float = 0.25):
    """Builds one SNN per group.

    Args:
      group_sizes: column counts per group, in column order.
      dim: token width.
      rngs: parameter initialisation keys.
      hidden: hidden width of each group's SNN.
      dropout: alpha-dropout rate (only with a call ``key``).
    """
    group_sizes = tuple(int(s) for s in group_sizes)
    if not group_sizes or min(group_sizes) < 1:
      raise ValueError(f"group_sizes must be positive, got {group_sizes}")
    self.group_sizes = group_sizes
    self.encoders = nnx.List([
        SNN(size, hidden, 2, dropout, rngs=rngs, out_dim=dim) for size in group_sizes])

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Tokenizes the groups.

    Args:
      x: ``[B, sum(group_sizes)]``.
      key: PRNG key for alpha dropout, or None.

    Returns:
      ``[B, num_groups, dim]``.
    """
    total = sum(self.group_sizes)
    if x.shape[-1] != total:
      raise ValueError(f"expected {total} columns ({self.group_sizes}), got {x.shape[-1]}")
    keys = split_key(key, len(self.group_sizes))
    tokens, start = [], 0
    for size, enc, k in zip(self.group_sizes, self.encoders, keys):
      tokens.append(enc(x[..., start:start + size], key=k))
      start += size
    return jnp.stack(tokens, axis=-2)
