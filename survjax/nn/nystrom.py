"""Masked Nystrom self-attention (Xiong et al. 2021), the attention layer of TransMIL.

`NystromAttention` with its chunked path for long sequences, the iterative pseudo-inverse
`newton_pinv`, and the per-head value convolution along the sequence with its
hand-written VJP. Conventions as in `survjax.nn.attention`: padded sets with a boolean
mask ``[B, N]`` (True = real token), dropout only when a PRNG ``key`` is passed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from survjax.nn.attention import compact_index, valid_rank
from survjax.nn.core import (check_precision, dropout, einsum, linear, masked_softmax, matmul,
                             torch_uniform_init)

__all__ = ["NystromAttention", "chunk_elements", "newton_pinv"]


def newton_pinv(a: jax.Array, iterations: int = 6) -> jax.Array:
  """Moore-Penrose pseudo-inverse by the iterative scheme of the Nystromformer paper.

      Z_0 = A^T / (||A||_1 ||A||_inf)
      Z_{k+1} = 1/4 Z_k (13 I - A Z_k (15 I - A Z_k (7 I - A Z_k)))

  (Xiong et al. 2021, eq. 16; ``||A||_1`` = max column sum, ``||A||_inf`` = max row sum of
  ``|A|``). The reference code takes the two maxima over the whole batch; we take them
  per matrix, which keeps the same convergence guarantee (``Z_0 = alpha A^T`` with
  ``alpha <= 1 / sigma_max^2``) and makes each sample independent of the others in its
  batch.

  Args:
    a: ``[..., m, m]``.
    iterations: number of iterations (6 in the paper and TransMIL).

  Returns:
    ``[..., m, m]``, approximately ``pinv(a)``.
  """
  absa = jnp.abs(a)
  norm = jnp.max(jnp.sum(absa, -2), -1) * jnp.max(jnp.sum(absa, -1), -1)
  z = jnp.swapaxes(a, -1, -2) / norm[..., None, None]
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)

  def body(_, z):
    az = a @ z
    return 0.25 * z @ (13.0 * eye - az @ (15.0 * eye - az @ (7.0 * eye - az)))

  # Unrolled: the backward pass of the rolled loop is ~2x slower on CPU (stacked residuals).
  return jax.lax.fori_loop(0, iterations, body, z, unroll=True)


# Default size (elements of [h, N, m]) above which NystromAttention goes chunked, on a
# device that does not report its memory (the CPU).
CHUNK_ELEMENTS = 2**27
# Elsewhere: one float32 [h, N, m] matrix may take this fraction of the device's memory.
# The unchunked forward holds a few such matrices at once (scores and softmax of both
# [h, N, m] and [h, m, N]), a training step about three times as many; 1/32 keeps them
# within half of the device.
CHUNK_MEMORY_FRACTION = 1 / 32


def chunk_elements(device: jax.Device | None = None) -> int:
  """Elements of ``[h, N, m]`` above which `NystromAttention` takes its chunked path.

  ``CHUNK_MEMORY_FRACTION`` of the device's memory (``memory_stats()["bytes_limit"]``, which
  GPUs and TPUs report) in float32 elements, and never below ``CHUNK_ELEMENTS``; a device
  that reports no memory limit (XLA:CPU) gets ``CHUNK_ELEMENTS`` (2^27, 512 MiB), the
  CPU default measured in `NystromAttention`'s docstring. An H100 (80 GB) gets about
  6e8 elements, i.e. TransMIL (8 heads, 256 landmarks) goes chunked past about 300k
  tokens instead of 65k: on a large GPU the one-shot attention is the faster path (the
  chunked one cost 30% at 64k-200k patches on an H200) and memory is not the constraint.

  Args:
    device: the device (default: the first local device).

  Returns:
    The element count.
  """
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 -- some backends raise instead of returning None
    stats = {}
  limit = stats.get("bytes_limit")
  if not limit:
    return CHUNK_ELEMENTS
  return max(CHUNK_ELEMENTS, int(limit * CHUNK_MEMORY_FRACTION) // 4)


def _seq_conv_forward(v: jax.Array, w: jax.Array) -> jax.Array:
  k, n, p = w.shape[0], v.shape[1], w.shape[0] // 2
  vp = jnp.pad(v, ((0, 0), (p, p), (0, 0), (0, 0)))
  out = jnp.zeros_like(v)
  for t in range(k):
    out = out + vp[:, t:t + n] * w[t][None, None, :, None]
  return out


@jax.custom_vjp
def _depthwise_seq_conv(v: jax.Array, w: jax.Array) -> jax.Array:
  """Per-head 1-D convolution along the sequence, zero padded ('same'), no bias.

      out[n, h, c] = sum_t w[t, h] v[n + t - K // 2, h, c]

  (PyTorch's ``Conv2d(h, h, (K, 1), padding=(K // 2, 0), groups=h)`` on ``[B, h, N, c]``),
  written as a sum of ``K`` shifted slices: XLA's grouped convolution is slow on CPU. The
  VJP is the same sum with the flipped kernel for ``v`` and, for ``w``, the ``K`` lagged
  products reduced chunk by chunk (`_seq_conv_weight_grad`); left to autodiff, the
  weight gradient makes ``K`` full passes over the bag and costs ~40x the forward.

  Args:
    v: ``[B, N, h, c]``.
    w: ``[K, h]``, ``K`` odd.

  Returns:
    ``[B, N, h, c]``.
  """
  return _seq_conv_forward(v, w)


def _seq_conv_weight_grad(g: jax.Array, v: jax.Array, k: int, chunk: int = 256) -> jax.Array:
  """``dL/dw[t, h] = sum_{b, n, c} g[b, n, h, c] v[b, n + t - K // 2, h, c]``, in chunks."""
  b, n, h, c = v.shape
  p = k // 2
  chunk = max(1, min(chunk, n))  # short sequences: one chunk, no padding to a full one
  num_chunks = -(-n // chunk)
  extra = num_chunks * chunk - n
  gp = jnp.pad(g, ((0, 0), (0, extra), (0, 0), (0, 0)))
  vp = jnp.pad(v, ((0, 0), (p, p + extra), (0, 0), (0, 0)))

  def body(i, acc):
    gc = jax.lax.dynamic_slice_in_dim(gp, i * chunk, chunk, axis=1)
    window = jax.lax.dynamic_slice_in_dim(vp, i * chunk, chunk + 2 * p, axis=1)
    return acc + jnp.stack([jnp.sum(gc * window[:, t:t + chunk], axis=(0, 1, 3))
                            for t in range(k)])

  return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros((k, h), v.dtype))


def _seq_conv_fwd(v, w):
  return _seq_conv_forward(v, w), (v, w)


def _seq_conv_bwd(res, g):
  v, w = res
  return _seq_conv_forward(g, w[::-1]), _seq_conv_weight_grad(g, v, w.shape[0])


_depthwise_seq_conv.defvjp(_seq_conv_fwd, _seq_conv_bwd)


class NystromAttention(nnx.Module):
  """Masked Nystrom self-attention (Xiong et al. 2021), the layer TransMIL uses.

  With queries/keys/values ``Q, K, V`` (per head, ``Q`` scaled by ``d_h^{-1/2}``) and
  ``m`` landmarks ``Q~, K~`` (segment means of the real tokens):

      out = softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V + conv_K(V)

  where ``pinv`` is the iterative `newton_pinv` and ``conv_K`` is a per-head depthwise
  1-D convolution of the values along the sequence (kernel 33, no bias), followed by the
  output projection. This follows lucidrains' ``nystrom-attention`` (``dim_head = dim /
  heads``, ``to_qkv`` without bias, landmark means, masked fills, residual conv) with
  three deliberate differences:

  * Landmarks over the real tokens only. The reference pads the sequence at the front to
    a multiple of ``m`` and takes fixed segments, so padding moves the segment borders.
    Here real token ``i`` of ``L`` goes to landmark ``floor(i m / L)``. When ``L < m``
    some landmarks are empty: their rows/columns of ``softmax(Q~ K~^T)`` are replaced by
    those of the identity (so ``pinv`` acts on the non-empty block unchanged) and they
    get zero weight in the other two softmaxes. ``Q~ = mean(x) W_Q`` is computed from the
    segment means of the layer input (exact: ``to_qkv`` has no bias) with one
    ``segment_sum``.
  * Cheap product order. ``pinv(A~)`` is ``m x m`` and ``softmax(Q~ K^T) V`` is
    ``m x d_h``, so we evaluate ``softmax(Q K~^T) @ (pinv(A~) @ (softmax(Q~ K^T) @ V))``:
    ``O(N m d_h)``, where the reference's ``(softmax(Q K~^T) @ pinv) @ (...)`` costs an
    extra ``O(N m^2)`` (for TransMIL, ``m = 256 > d_h = 64``). No ``N x N`` product is
    ever formed.
  * The convolution runs over the real tokens in order (padding squeezed out), so its
    neighbourhoods do not depend on where the padding sat.

  Long sequences (static ``N > chunk_threshold``) take a chunked path that computes the
  same function without the ``[h, N, m]`` and ``[h, m, N]`` matrices (1.6 GB each for
  TransMIL at 200k tokens) or ``QKV`` (`_chunked_call`). The pseudo-inverse is
  normalised per matrix (see `newton_pinv`). Masked positions of the output are zero; a
  set with no real token gives zeros.
  """

  def __init__(self, dim: int, num_heads: int, num_landmarks: int, pinv_iterations: int = 6,
               residual_conv_kernel: int = 33, *, rngs: nnx.Rngs, dim_head: int | None = None,
               residual: bool = True, dropout: float = 0.0, chunk_threshold: int | None = None,
               chunk_size: int = 2048):
    """Builds the layer.

    Args:
      dim: token width ``D``.
      num_heads: heads ``h``.
      num_landmarks: landmarks ``m``.
      pinv_iterations: iterations of `newton_pinv`.
      residual_conv_kernel: odd kernel size of the value convolution.
      rngs: parameter initialisation keys.
      dim_head: per-head width (default ``dim // num_heads``, as TransMIL).
      residual: add the value convolution.
      dropout: dropout on the output projection (TransMIL: 0.1; only with a call ``key``).
      chunk_threshold: sequences longer than this (static ``N``) take the chunked path.
        None: where ``[h, N, m]`` would pass `chunk_elements` of the default device
        (on the CPU ``CHUNK_ELEMENTS``, 2^27 = 512 MiB in float32; on a GPU 1/32 of its
        memory) and ``N > 16384``; on the CPU that is ``N > 65536`` for TransMIL (8
        heads, 256 landmarks).
        The chunked path is faster in inference (~20% at 64k-200k tokens on CPU) but its
        backward pass, which recomputes the chunks, is slower (~25% for MUST's TransMIL
        at 64k tokens, though with ~40% less memory), hence the bound in memory.
      chunk_size: tokens per chunk of the chunked path (2048: as fast as 512 and
        ~20% faster than 8192 on CPU at 200k tokens).
    """
    if residual_conv_kernel % 2 != 1:
      raise ValueError(f"residual_conv_kernel must be odd, got {residual_conv_kernel}")
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if dim_head is None:
      if dim % num_heads:
        raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
      dim_head = dim // num_heads
    self.num_heads = num_heads
    self.dim_head = dim_head
    self.num_landmarks = num_landmarks
    self.pinv_iterations = pinv_iterations
    self.dropout = dropout
    if chunk_threshold is None:
      chunk_threshold = max(16384, chunk_elements() // (num_heads * num_landmarks))
    self.chunk_threshold = chunk_threshold
    self.chunk_size = chunk_size
    inner = num_heads * dim_head
    self.to_qkv = nnx.Linear(dim, 3 * inner, use_bias=False, rngs=rngs)
    self.to_out = nnx.Linear(inner, dim, rngs=rngs)
    if residual:
      self.res_conv = nnx.Param(torch_uniform_init(residual_conv_kernel)(
          rngs.params(), (residual_conv_kernel, num_heads)))
    else:
      self.res_conv = None

  def _segments(self, mask: jax.Array):
    """Per row: real-token count ``L [B]``, ranks ``[B, N]``, landmark of each token
    ``[B, N]`` (``m`` at padding) and non-empty landmarks ``[B, m]``."""
    m = self.num_landmarks
    count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    rank = valid_rank(mask)
    # Token i of L -> landmark floor(i m / L).
    seg = jnp.where(mask, rank * m // jnp.maximum(count, 1)[:, None], m)
    seg_cnt = jax.vmap(lambda sb: jax.ops.segment_sum(jnp.ones_like(sb), sb, m + 1))(seg)[:, :m]
    return count, rank, seg, seg_cnt

  def _landmark_attention(self, x_land: jax.Array, land_ok: jax.Array,
                          precision: str = "float32"):
    """``Q~`` (scaled), ``K~`` ``[B, m, h, d_h]`` and ``pinv(softmax(Q~ K~^T))`` ``[B, h, m, m]``
    from the landmark means of the input ``x_land [B, m, D]`` (the pseudo-inverse's
    iteration always in float32)."""
    b, m = x_land.shape[:2]
    h, dh = self.num_heads, self.dim_head
    inner = h * dh
    qk_land = matmul(x_land, self.to_qkv.kernel[...][:, :2 * inner],
                     precision).reshape(b, m, 2, h, dh)
    q_land, k_land = qk_land[:, :, 0] * dh ** -0.5, qk_land[:, :, 1]
    row_ok = land_ok[:, None, :, None]
    attn2 = masked_softmax(einsum("bihc,bjhc->bhij", q_land, k_land, precision),
                           land_ok[:, None, None, :])                            # [B,h,m,m]
    attn2 = (jnp.where(row_ok, attn2, 0.0)
             + jnp.where(row_ok, 0.0, jnp.eye(m, dtype=attn2.dtype)))
    return q_land, k_land, newton_pinv(attn2, self.pinv_iterations)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               key: jax.Array | None = None, *, out_rows: int | None = None,
               pre: Callable[[jax.Array], jax.Array] | None = None,
               skip: jax.Array | None = None, precision: str = "float32") -> jax.Array:
    """Applies the layer: ``skip + Attn(pre(x))``.

    ``pre`` and ``skip`` make a pre-LN residual block ``x + Attn(LN(x))`` one call, which
    the chunked path evaluates chunk by chunk without holding ``LN(x)`` or ``Attn(..)``
    for the whole sequence.

    Args:
      x: tokens ``[B, N, D]``.
      mask: boolean ``[B, N]`` (True = real token) or None.
      key: PRNG key for dropout, or None.
      out_rows: compute the outputs of the first ``out_rows`` positions only (every token
        is still attended to); None for all ``N``.
      pre: a map applied to each token of ``x`` on its own (e.g. a LayerNorm), or None.
      skip: ``[B, N, D]`` added to the output (all positions, padding too), or None.
      precision: matmul precision (`survjax.nn.core.PRECISIONS`): ``"bfloat16"`` takes
        bfloat16 operands with float32 accumulation in the projections and the
        attention products; `newton_pinv` stays float32.

    Returns:
      ``[B, N, D]`` (``[B, out_rows, D]``): ``skip`` plus the attention output, which is
      zero at masked positions.
    """
    b, n, _ = x.shape
    n_out = n if out_rows is None else out_rows
    if not 0 < n_out <= n:
      raise ValueError(f"out_rows={out_rows} must be in [1, {n}]")
    p = check_precision(precision)
    if n > self.chunk_threshold:
      return self._chunked_call(x, mask, key, n_out, pre, skip, p)
    h, dh, m = self.num_heads, self.dim_head, self.num_landmarks
    inner = h * dh
    all_real = mask is None
    if all_real:
      mask = jnp.ones((b, n), bool)
    if pre is not None:
      x = pre(x)
    x = jnp.where(mask[..., None], x, 0.0)
    count, rank, seg, seg_cnt = self._segments(mask)

    # Landmarks: segment means of the real inputs.
    seg_sum = jax.vmap(lambda xb, sb: jax.ops.segment_sum(xb, sb, m + 1))(x, seg)[:, :m]
    land_ok = seg_cnt > 0                                                 # [B, m]
    x_land = seg_sum / jnp.maximum(seg_cnt, 1)[..., None].astype(x.dtype)
    q_land, k_land, pinv = self._landmark_attention(x_land, land_ok, p)

    if n_out == n:
      qkv = linear(self.to_qkv, x, p).reshape(b, n, 3, h, dh)
      q, k, v = qkv[:, :, 0] * dh ** -0.5, qkv[:, :, 1], qkv[:, :, 2]
    else:  # queries of the output rows only
      kernel = self.to_qkv.kernel[...]
      q = matmul(x[:, :n_out], kernel[:, :inner], p).reshape(b, n_out, h, dh) * dh ** -0.5
      kv = matmul(x, kernel[:, inner:], p).reshape(b, n, 2, h, dh)
      k, v = kv[:, :, 0], kv[:, :, 1]

    col_ok = land_ok[:, None, None, :]
    row_ok = land_ok[:, None, :, None]
    attn1 = masked_softmax(einsum("bnhc,bmhc->bhnm", q, k_land, p), col_ok)        # [B,h,N,m]
    attn3 = masked_softmax(einsum("bihc,bnhc->bhin", q_land, k, p),
                           mask[:, None, None, :])                               # [B,h,m,N]
    attn3 = jnp.where(row_ok, attn3, 0.0)
    ctx = einsum("bhin,bnhc->bhic", attn3, v, p)                                    # [B,h,m,dh]
    ctx = matmul(pinv, ctx, p)
    out = einsum("bhnm,bhmc->bnhc", attn1, ctx, p)                                  # [B,N,h,dh]

    if self.res_conv is not None:
      w = self.res_conv[...]
      # Output rows < n_out need (compacted) values up to n_out + K // 2 only.
      n_v = min(n, n_out + w.shape[0] // 2)
      if all_real:
        out = out + _depthwise_seq_conv(v[:, :n_v], w)[:, :n_out]
      else:  # convolve the real tokens in order, padding squeezed out
        idx = compact_index(mask)[:, :n_v]
        v_c = jnp.take_along_axis(v, idx[:, :, None, None], axis=1)
        v_c = jnp.where((jnp.arange(n_v) < count[:, None])[:, :, None, None], v_c, 0.0)
        res = _depthwise_seq_conv(v_c, w)
        out = out + jnp.take_along_axis(
            res, jnp.maximum(rank[:, :n_out], 0)[:, :, None, None], axis=1)

    out = dropout(linear(self.to_out, out.reshape(b, n_out, inner), p), self.dropout, key)
    out = jnp.where(mask[:, :n_out, None], out, 0.0)
    return out if skip is None else skip[:, :n_out] + out

  def _chunked_call(self, x: jax.Array, mask: jax.Array | None, key: jax.Array | None,
                    n_out: int, pre, skip: jax.Array | None,
                    precision: str = "float32") -> jax.Array:
    """`__call__` in chunks of ``C = chunk_size`` tokens: memory ``O(N D + C h m)``.

    Three `jax.lax.scan` passes over the token chunks, each projecting its chunk of ``x``
    itself (so neither ``QKV [N, 3 h d_h]`` nor an ``N x m`` matrix is ever held):

    1. landmark sums ``sum_{i in seg j} x_i``;
    2. ``C~ = softmax_N(Q~ K^T) V`` with an online softmax: per landmark row, a running
       maximum ``M``, sum ``S = sum_n exp(s_n - M)`` and ``A = sum_n exp(s_n - M) v_n``,
       rescaled by ``exp(M_old - M_new)`` as ``M`` grows; ``C~ = A / S``;
    3. per chunk of output rows, ``softmax_m(Q K~^T) (pinv(A~) C~) + conv_K(V)`` and the
       output projection, added into the ``[B, N, D]`` result (which starts as ``skip``,
       or zeros). The value convolution of a chunk needs ``V`` at the chunk's real
       tokens and ``K // 2`` real neighbours on either side; those ``C + K - 1`` rows are
       gathered from ``x`` (real tokens in order) and projected to ``Q`` and ``V`` in
       one product. Projecting ``V`` again costs about 10% of the layer's time at 200k
       tokens; holding it would cost ``[N, h d_h]`` (0.4 GB).

    ``pre`` is applied to each chunk as it is read. The last chunk is shifted back to end
    at ``N``; the tokens it shares with the previous one are left out of the sums and of
    the additions of pass 3. Sums come out in another order than in the unchunked path,
    so outputs agree to float rounding.

    Differentiable by autodiff through the scans. The scan bodies are rematerialised
    (`jax.checkpoint`): otherwise the backward pass would keep every chunk's
    intermediates, ``[h, N, m]`` again and more than the unchunked path holds. With it,
    a training step keeps ``O(N D)`` and recomputes each chunk once.
    """
    b, n, _ = x.shape
    h, dh, m = self.num_heads, self.dim_head, self.num_landmarks
    inner = h * dh
    all_real = mask is None
    if all_real:
      mask = jnp.ones((b, n), bool)
    kernel = self.to_qkv.kernel[...]
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    count, rank, seg, seg_cnt = self._segments(mask)
    land_ok = seg_cnt > 0

    def chunks(length):
      """(chunk size, number of chunks, start and freshness of chunk ``i``)."""
      c = min(self.chunk_size, length)
      num = -(-length // c)

      def at(i):
        start = jnp.minimum(i * c, length - c)
        return start, start + jnp.arange(c) >= i * c  # False: done by the previous chunk

      return c, num, at

    c, num, at = chunks(n)

    def load(i):
      """Chunk ``i`` of ``x`` (zero at padding) and its token mask, tokens seen before off."""
      start, fresh = at(i)
      ok = jax.lax.dynamic_slice_in_dim(mask, start, c, axis=1)
      xc = jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)
      xc = xc if pre is None else pre(xc)
      return start, jnp.where(ok[..., None], xc, 0).astype(dtype), ok & fresh

    # Pass 1: landmark means.
    def land_body(acc, i):
      start, xc, ok = load(i)
      sc = jnp.where(ok, jax.lax.dynamic_slice_in_dim(seg, start, c, axis=1), m)
      return acc + jax.vmap(lambda xb, sb: jax.ops.segment_sum(xb, sb, m + 1))(xc, sc), None

    seg_sum, _ = jax.lax.scan(jax.checkpoint(land_body),
                              jnp.zeros((b, m + 1, x.shape[-1]), dtype), jnp.arange(num))
    x_land = seg_sum[:, :m] / jnp.maximum(seg_cnt, 1)[..., None].astype(dtype)
    p_ = precision
    q_land, k_land, pinv = self._landmark_attention(x_land, land_ok, p_)

    # Pass 2: C~ = softmax over the tokens of Q~ K^T, times V (online softmax).
    w_kv = kernel[:, inner:]

    def ctx_body(carry, i):
      run_max, run_sum, acc = carry
      _, xc, ok = load(i)
      kv = matmul(xc, w_kv, p_).reshape(b, c, 2, h, dh)
      s = einsum("bihc,bnhc->bhin", q_land, kv[:, :, 0], p_)                      # [B,h,m,C]
      s = jnp.where(ok[:, None, None, :], s, -jnp.inf)
      # The result does not depend on the shift M, so no gradient flows through it
      # (as in `masked_softmax`); M stays -inf until a real token has been seen.
      new_max = jax.lax.stop_gradient(jnp.maximum(run_max, jnp.max(s, axis=-1)))
      shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      decay = jnp.exp(run_max - shift)                       # exp(M_old - M_new); 0 at first
      e = jnp.exp(s - shift[..., None])                      # 0 at padding (s = -inf)
      run_sum = run_sum * decay + jnp.sum(e, axis=-1)
      acc = acc * decay[..., None] + einsum("bhin,bnhc->bhic", e, kv[:, :, 1], p_)
      return (new_max, run_sum, acc), None

    init = (jnp.full((b, h, m), -jnp.inf, dtype), jnp.zeros((b, h, m), dtype),
            jnp.zeros((b, h, m, dh), dtype))
    (_, run_sum, acc), _ = jax.lax.scan(jax.checkpoint(ctx_body), init, jnp.arange(num))
    ctx = acc / jnp.where(run_sum > 0, run_sum, 1.0)[..., None]
    ctx = matmul(pinv, jnp.where(land_ok[:, None, :, None], ctx, 0.0), p_)          # [B,h,m,dh]

    # Pass 3: output rows, chunk by chunk, computed in the order of the real tokens. The
    # chunk's real tokens have ranks r0 .. r0 + C - 1 (at most); the value convolution
    # there also needs real tokens r0 - p .. r0 - 1 and r0 + C .. r0 + C + p - 1. Those
    # C + 2p rows of x (zero outside 0 .. L - 1) are gathered and projected to Q and V in
    # one product; the results go back to the chunk's positions by their ranks.
    c_out, num_out, at_out = chunks(n_out)
    col_ok = land_ok[:, None, None, :]
    if self.res_conv is None:
      p, w_qv = 0, kernel[:, :inner]
    else:
      w_conv = self.res_conv[...]
      p = w_conv.shape[0] // 2
      w_qv = jnp.concatenate([kernel[:, :inner], kernel[:, 2 * inner:]], axis=1)
    idx = None if all_real else compact_index(mask)
    before = rank + 1 - mask.astype(jnp.int32)         # real tokens before each position
    keys = None if key is None or self.dropout <= 0.0 else jax.random.split(key, num_out)

    def out_body(out, i):
      start, fresh = at_out(i)
      r0 = jax.lax.dynamic_index_in_dim(before, start, axis=1, keepdims=False)      # [B]
      r = r0[:, None] - p + jnp.arange(c_out + 2 * p)
      pos = jnp.clip(r, 0, n - 1)
      if idx is not None:
        pos = jnp.take_along_axis(idx, pos, axis=1)
      xw = jnp.take_along_axis(x, pos[..., None], axis=1)
      xw = xw if pre is None else pre(xw)
      inside = (r >= 0) & (r < count[:, None])
      xw = jnp.where(inside[..., None], xw, 0).astype(dtype)
      qv = matmul(xw, w_qv, p_).reshape(b, c_out + 2 * p, -1, h, dh)
      q = qv[:, p:p + c_out, 0] * dh ** -0.5
      attn1 = masked_softmax(einsum("bnhc,bmhc->bhnm", q, k_land, p_), col_ok)   # [B,h,C,m]
      y = einsum("bhnm,bhmc->bnhc", attn1, ctx, p_)
      if self.res_conv is not None:
        y = y + _depthwise_seq_conv(qv[:, :, 1], w_conv)[:, p:p + c_out]
      y = linear(self.to_out, y.reshape(b, c_out, inner), p_)     # real tokens r0 + t
      ok = jax.lax.dynamic_slice_in_dim(mask, start, c_out, axis=1)
      rel = jax.lax.dynamic_slice_in_dim(rank, start, c_out, axis=1) - r0[:, None]
      y = jnp.take_along_axis(y, jnp.clip(rel, 0, c_out - 1)[..., None], axis=1)
      if keys is not None:
        y = dropout(y, self.dropout, keys[i])
      y = jnp.where((ok & fresh)[..., None], y, 0.0)
      y = jax.lax.dynamic_slice_in_dim(out, start, c_out, axis=1) + y.astype(out.dtype)
      return jax.lax.dynamic_update_slice_in_dim(out, y, start, axis=1), None

    out_dtype = jnp.result_type(dtype, self.to_out.kernel.dtype)
    if skip is None:
      init = jnp.zeros((b, n_out, self.to_out.out_features), out_dtype)
    else:  # the result is accumulated into (a copy of) skip: no second [B, N, D] buffer
      init = skip[:, :n_out].astype(jnp.result_type(skip.dtype, out_dtype))
    out, _ = jax.lax.scan(jax.checkpoint(out_body), init, jnp.arange(num_out))
    return out
