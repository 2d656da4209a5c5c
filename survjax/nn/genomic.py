"""Genomic encoders: self-normalising networks (Klambauer et al., NeurIPS 2017) and a
per-gene-group tokenizer (as MCAT, SurvPath and MUST build their genomic tokens).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
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


def _draw_keys(rngs: nnx.Rngs, n: int) -> jax.Array:
  """``jnp.stack([rngs.params() for _ in range(n)])``, in one vectorised call.

  A stream's ``k``-th key is ``fold_in(stream.key, count + k)``; advancing ``count`` by
  ``n`` leaves the stream where ``n`` calls would. Falls back to the calls for a stream
  of another kind.
  """
  stream = rngs.params
  if type(stream) is nnx.RngStream and n > 1:
    base, count = stream.key[...], stream.count[...]
    steps = count + jnp.arange(n, dtype=count.dtype)
    keys = jax.vmap(lambda c: jax.random.fold_in(base, c))(steps)
    stream.count[...] = count + n
    return keys
  return jnp.stack([rngs.params() for _ in range(n)])


def _exact_kernels(init, keys: jax.Array, sizes: list[int], hidden: int) -> jax.Array:
  """``init(keys[i], (sizes[i], hidden))`` stacked and zero-padded to the largest size:
  ``[len(sizes), max(sizes), hidden]`` (one vmapped draw per distinct size)."""
  out = jnp.zeros((len(sizes), max(sizes), hidden), jnp.float32)
  for size in sorted(set(sizes)):
    rows = np.asarray([i for i, s in enumerate(sizes) if s == size])
    vals = jax.vmap(lambda k, size=size: init(k, (size, hidden)))(keys[rows])
    out = out.at[rows, :size].set(vals)
  return out


def _fast_kernels(init, keys: jax.Array, sizes: list[int], hidden: int) -> jax.Array:
  """As `_exact_kernels`, in one draw at the largest size whatever the number of sizes.

  `variance_scaling(1, "fan_in", "normal")` draws ``(sqrt(2) sqrt(1 / n)) erfinv(u)``
  with ``u ~ U(nextafter(-1, 0), 1)`` of shape ``(n, hidden)``; with partitionable
  threefry (JAX's default) the uniform of shape ``(n, hidden)`` is the first ``n`` rows
  of the one of shape ``(w, hidden)``, so one draw serves every size. Checked against
  ``init`` by `_fast_kernels_match` before use.
  """
  del init
  width = max(sizes)
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
  u = jax.vmap(lambda k: jax.random.uniform(k, (width, hidden), jnp.float32, lo, 1.0))(keys)
  scale = np.float32(np.sqrt(2)) * np.sqrt(np.asarray([1.0 / s for s in sizes], np.float32))
  vals = jnp.asarray(scale)[:, None, None] * jax.lax.erf_inv(u)
  rows = np.arange(width)[None, :] < np.asarray(sizes)[:, None]
  return jnp.where(rows[..., None], vals, 0.0)


_FAST_KERNELS_OK: bool | None = None


def _fast_kernels_match(init) -> bool:
  """Whether `_fast_kernels` gives `init`'s values bit for bit (a 5-row group drawn inside
  an 8-row bucket), checked once per process."""
  global _FAST_KERNELS_OK
  if _FAST_KERNELS_OK is None:
    key = jax.random.key(12345)
    ref = np.asarray(init(key, (5, 16)))
    got = np.asarray(_fast_kernels(init, jnp.stack([key, key]), [5, 8], 16)[0, :5])
    _FAST_KERNELS_OK = bool(np.array_equal(ref, got))
  return _FAST_KERNELS_OK


class GroupTokenizer(nnx.Module):
  """One token per gene group: a small SNN on each group's columns.

      t_g = SNN_g(x[:, c_g : c_g + n_g]),   tokens = [t_1, ..., t_G]   ([B, G, dim])

  for a flat tabular block whose columns come group after group with sizes
  ``group_sizes = (n_1, ..., n_G)``. Each SNN has two blocks ``n_g -> hidden -> dim``
  (``hidden = 256``, alpha dropout 0.25), as MCAT/SurvPath/MUST encode the six gene
  families. (Their ``SNN_Block`` uses ELU; we use SELU, the self-normalising activation
  of Klambauer et al.) Token ``g`` depends only on group ``g``'s columns.

  The G networks are evaluated together, so that the compiled program (and its compile
  time and memory) does not grow with the number of groups:

  * layer 1: groups are bucketed by size (bucket ``k`` holds the sizes in
    ``(2^(k-1), 2^k]``), each bucket's kernels are stacked into ``[G_k, w_k, hidden]``
    (``w_k`` = the bucket's largest size; shorter groups have zero-padded rows, masked)
    and one einsum per bucket serves all its groups. At most ``log2(max n_g) + 1``
    buckets, and padding at most doubles a group's first-layer width;
  * layer 2 (``hidden -> dim``) has the same shape for every group: one ``[G, hidden,
    dim]`` einsum.

  The result equals G separate SNNs (`SNN`) with the same weights: padded columns add
  exact zeros, and each group's alpha-dropout masks are drawn from the same keys and
  shapes as a per-group loop would (``split(key, G)[g]``, then one key per block). The
  initialisation draws, group after group, exactly the keys a list of
  ``SNN(n_g, hidden, 2, dropout, out_dim=dim)`` would draw from ``rngs`` (kernel, bias,
  kernel, bias per group; LeCun-normal kernels, zero biases), so the weights are those of
  the per-group networks, stacked.

  Parameters: ``kernels1[k]`` ``[G_k, w_k, hidden]`` (bucket ``k``), ``bias1`` ``[G,
  hidden]``, ``kernel2`` ``[G, hidden, dim]``, ``bias2`` ``[G, dim]`` (group order).
  """

  def __init__(self, group_sizes: tuple[int, ...], dim: int, *, rngs: nnx.Rngs,
               hidden: int = 256, dropout: float = 0.25):
    """Builds the stacked per-group SNNs.

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
    self.dropout = dropout
    num = len(group_sizes)

    # The keys a list of per-group SNNs draws, in its order: per group kernel1, bias1,
    # kernel2, bias2 (nnx.Linear draws a bias key even for a zeros init).
    keys = _draw_keys(rngs, 4 * num).reshape(num, 4)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")

    # Layer-1 kernels, bucketed by size.
    bucket_of = [max(0, int(math.ceil(math.log2(s)))) for s in group_sizes]
    kernels1, buckets_members = [], []
    draw = _fast_kernels if _fast_kernels_match(init) else _exact_kernels
    for b in sorted(set(bucket_of)):
      members = [g for g in range(num) if bucket_of[g] == b]
      sizes = [group_sizes[g] for g in members]
      kernels1.append(nnx.Param(draw(init, keys[np.asarray(members), 0], sizes, hidden)))
      buckets_members.append(tuple(members))
    self.kernels1 = nnx.List(kernels1)
    self.bias1 = nnx.Param(jnp.zeros((num, hidden), jnp.float32))
    self.kernel2 = nnx.Param(jax.vmap(lambda k: init(k, (hidden, dim)))(keys[:, 2]))
    self.bias2 = nnx.Param(jnp.zeros((num, dim), jnp.float32))
    # Static layout (plain tuples: part of the graph definition, not of the state).
    self.buckets = tuple(buckets_members)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Tokenizes the groups.

    Args:
      x: ``[..., sum(group_sizes)]``.
      key: PRNG key for alpha dropout, or None.

    Returns:
      ``[..., num_groups, dim]``.
    """
    total = sum(self.group_sizes)
    if x.shape[-1] != total:
      raise ValueError(f"expected {total} columns ({self.group_sizes}), got {x.shape[-1]}")
    num = len(self.group_sizes)
    # Column `total` is an appended zero: padded rows of a bucket read it.
    xz = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (1,), x.dtype)], axis=-1)
    starts = np.concatenate([[0], np.cumsum(self.group_sizes)[:-1]])
    parts, order = [], []
    for kernel, members in zip(self.kernels1, self.buckets):
      kernel = kernel[...]
      width = kernel.shape[1]
      idx = np.full((len(members), width), total, np.int32)
      for i, g in enumerate(members):
        idx[i, :self.group_sizes[g]] = starts[g] + np.arange(self.group_sizes[g])
      xb = jnp.take(xz, idx, axis=-1)  # [..., G_k, w_k]
      w = jnp.where((idx < total)[..., None], kernel, 0.0)  # padded rows stay zero
      parts.append(jnp.einsum("...gi,gih->...gh", xb, w))
      order.extend(members)
    h = jnp.concatenate(parts, axis=-2) if len(parts) > 1 else parts[0]
    if order != list(range(num)):  # bucket order -> group order
      h = jnp.take(h, np.argsort(np.asarray(order)).astype(np.int32), axis=-2)
    if key is None or self.dropout <= 0.0:
      k1 = k2 = None
    else:
      layer_keys = jax.vmap(lambda k: jax.random.split(k, 2))(jax.random.split(key, num))
      k1, k2 = layer_keys[:, 0], layer_keys[:, 1]
    h = self._dropout(jax.nn.selu(h + self.bias1[...]), k1)
    y = jnp.einsum("...gh,ghd->...gd", h, self.kernel2[...]) + self.bias2[...]
    return self._dropout(jax.nn.selu(y), k2)

  def _dropout(self, h: jax.Array, keys: jax.Array | None) -> jax.Array:
    """Alpha dropout of ``h`` ``[..., G, d]`` with group ``g``'s mask drawn from
    ``keys[g]`` at shape ``[..., d]`` (as a per-group SNN draws it)."""
    if keys is None:
      return h
    per_group = jnp.moveaxis(h, -2, 0)
    out = jax.vmap(lambda x, k: alpha_dropout(x, self.dropout, k))(per_group, keys)
    return jnp.moveaxis(out, 0, -2)
