"""TransMIL (Shao et al., NeurIPS 2021): a correlated-MIL transformer for WSI bags.

Faithful to the official code (``TransMIL.py``): ``fc = ReLU(Linear(in_dim, dim))``, the
bag of ``L`` tokens laid out on an ``H x H`` square with ``H = ceil(sqrt(L))`` by appending
its first ``H^2 - L`` tokens again (wrap-around), class token(s) prepended, then

    TransLayer(Nystrom) -> PPEG -> TransLayer(Nystrom) -> LayerNorm

and the class-token output is the bag representation. ``TransLayer(x) = x +
NystromAttention(LN(x))`` with ``heads = 8``, ``dim_head = dim / 8``, ``dim / 2``
landmarks, 6 pseudo-inverse iterations, the value convolution, dropout 0.1.
``PPEG(x) = x + dwconv7(x) + dwconv5(x) + dwconv3(x)`` on the square grid (depthwise, with
bias); the class tokens bypass it.

What differs from the reference, on purpose:

* Padded bags. Bags come padded to a bucket size ``N`` with a mask. ``H`` is computed
  per sample from the number of real tokens ``L`` (a traced value), and the square
  layout is an index gather into a static capacity ``S = ceil(sqrt(N))^2`` (``S = N``
  for perfect-square buckets): slot ``j < L`` holds real token ``j``, slot
  ``L <= j < H^2`` real token ``j - L`` (the wrap-around), slots ``j >= H^2`` are masked.
  Real tokens are taken in order wherever the padding sits, so neither the amount nor
  the placement of padding changes any output.
* PPEG speed. XLA's depthwise convolution is very slow on CPU, so the three kernels are
  summed into one 7x7 kernel (the 5x5 and 3x3 zero-padded, biases summed) and applied as
  a sum of 49 shifted copies of the flat token sequence (shift ``dy H + dx`` with the
  per-sample ``H``), masked at the grid's row and column borders
  (`survjax.nn.grid_conv.grid_conv7`, with a hand-written VJP: autodiff would turn the
  dynamic shifts into scatters that take seconds per 10k-token bag on CPU).
* Nystrom attention with masks, landmarks over real tokens and a cheaper product
  order (see `survjax.nn.nystrom.NystromAttention`).
* Several learnable class tokens (``num_class_tokens``; MUST needs more than one), each
  initialised ``N(0, 1)`` as the official single token.
* Long bags in bounded memory. Past ``chunk_threshold`` tokens (65536 in the paper
  setting) the embedding, both attention layers (`NystromAttention`'s chunked path, with
  the pre-LayerNorm and the residual fused in) and PPEG (`grid_conv.ppeg_sequence`, in
  place) hold no full-size array but the token sequence and one padded copy: a
  200k-patch forward (float32 bag of 0.8 GB) peaks at ~2.2 GB of host memory instead of
  ~9.5 GB. Without ``return_tokens`` the second layer computes the class-token rows
  only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from survjax.nn.attention import compact_index, valid_rank
from survjax.nn.core import LN_EPS, linear, masked_softmax, split_key, torch_uniform_init
from survjax.nn.grid_conv import grid_conv7, ppeg_sequence
from survjax.nn.nystrom import NystromAttention

__all__ = ["PPEG", "TransLayer", "TransMIL", "ceil_sqrt", "square_layout"]


def ceil_sqrt(n: jax.Array) -> jax.Array:
  """Exact ``ceil(sqrt(n))`` for non-negative int arrays (float sqrt, integer fix-up)."""
  n = jnp.asarray(n, jnp.int32)
  r = jnp.floor(jnp.sqrt(n.astype(jnp.float32))).astype(jnp.int32)
  r = jnp.where(r * r > n, r - 1, r)
  r = jnp.where((r + 1) * (r + 1) <= n, r + 1, r)  # now r = floor(sqrt(n))
  return jnp.where(r * r < n, r + 1, r)


def square_layout(mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """TransMIL's wrap-around square layout of a padded bag, as gather indices.

  With ``L`` real tokens per row, ``H = ceil(sqrt(L))`` and a static capacity
  ``S = ceil(sqrt(N))^2``, slot ``j`` of the grid sequence holds

      real token j        if j < L,
      real token j - L    if L <= j < H^2   (the reference's h[:, :H^2 - L] appended),
      nothing (masked)    if j >= H^2,

  where "real token r" is the ``r``-th True entry of ``mask``. (We index the wrap-around
  as ``j mod L``, the same thing since ``H^2 <= 2L``.)

  Args:
    mask: boolean ``[B, N]``.

  Returns:
    ``(src, valid, side)``: int32 ``[B, S]`` positions into the bag, boolean ``[B, S]``
    slot validity (``j < H^2``), int32 ``[B]`` grid side ``H``.
  """
  n = mask.shape[-1]
  cap = math.isqrt(max(n - 1, 0)) + 1 if n > 0 else 0
  cap = cap * cap
  count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  side = ceil_sqrt(count)
  idx = compact_index(mask)
  if cap > n:
    idx = jnp.pad(idx, ((0, 0), (0, cap - n)))
  j = jnp.arange(cap, dtype=jnp.int32)[None, :]
  src_rank = j % jnp.maximum(count, 1)[:, None]
  src = jnp.take_along_axis(idx, src_rank, axis=1)
  valid = j < (side * side)[:, None]
  return src, valid, side


class PPEG(nnx.Module):
  """Pyramid position encoding generator of TransMIL on a flat ``H x H`` token grid.

      PPEG(x) = x + (W_7 * x + b_7) + (W_5 * x + b_5) + (W_3 * x + b_3)
              = x + W * x + b,   W = W_7 + pad(W_5) + pad(W_3),  b = b_7 + b_5 + b_3

  with ``*`` the depthwise ('same', zero padded) 2-D cross-correlation on the grid,
  ``(W * x)[r, c, d] = sum_{dy, dx} W[dy + 3, dx + 3, d] x[r + dy, c + dx, d]``. The grid is
  stored row-major in a flat sequence, so the term ``(dy, dx)`` is the sequence shifted by
  ``dy H + dx``, kept only where ``0 <= r + dy < H`` and ``0 <= c + dx < H``: 49 shifted
  copies times per-channel weights (fast on CPU, unlike XLA's grouped convolution).
  Parameters and their PyTorch default initialisation follow the reference's three
  ``Conv2d(dim, dim, k, 1, k // 2, groups=dim)``.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    """Builds the three depthwise kernels (7, 5, 3) with biases.

    Args:
      dim: channels ``D``.
      rngs: parameter initialisation keys.
    """
    self.dim = dim
    for name, k in (("proj", 7), ("proj1", 5), ("proj2", 3)):
      init = torch_uniform_init(k * k)
      setattr(self, f"{name}_kernel", nnx.Param(init(rngs.params(), (k, k, dim))))
      setattr(self, f"{name}_bias", nnx.Param(init(rngs.params(), (dim,))))

  def combined(self) -> tuple[jax.Array, jax.Array]:
    """The single 7x7 depthwise kernel ``[7, 7, D]`` and bias ``[D]`` of the three convs."""
    w = (self.proj_kernel[...]
         + jnp.pad(self.proj1_kernel[...], ((1, 1), (1, 1), (0, 0)))
         + jnp.pad(self.proj2_kernel[...], ((2, 2), (2, 2), (0, 0))))
    b = self.proj_bias[...] + self.proj1_bias[...] + self.proj2_bias[...]
    return w, b

  def __call__(self, x: jax.Array, side: jax.Array | None = None, *,
               offset: int = 0) -> jax.Array:
    """Applies PPEG to grid tokens (class tokens excluded).

    Args:
      x: ``[B, offset + S, D]``, row ``offset + j`` holding grid cell ``(r, c)`` for slot
        ``j = r H + c``; slots ``j >= H^2`` are ignored.
      side: int ``[B]`` grid side ``H`` per sample (``H^2 <= S``); None means the static
        ``H = sqrt(S)`` (``S`` must then be a perfect square).
      offset: leading rows (class tokens) returned unchanged. With ``offset > 0`` the
        result is computed in place (`ppeg_sequence`), which saves three ``[B, S, D]``
        arrays on long bags.

    Returns:
      ``[B, offset + S, D]``, zero in slots ``j >= H^2``.
    """
    b, s = x.shape[0], x.shape[1] - offset
    if side is None:
      h = math.isqrt(s)
      if h * h != s:
        raise ValueError(f"PPEG without `side` needs a perfect-square length, got {s}")
      side = jnp.full((b,), h, jnp.int32)
    side = jnp.asarray(side, jnp.int32)
    w, bias = self.combined()
    if offset:
      return ppeg_sequence(x, w, bias, side, offset)
    valid = jnp.arange(s)[None, :] < (side * side)[:, None]
    y = x + grid_conv7(x, w, side) + bias
    return jnp.where(valid[..., None], y, 0.0)


class TransLayer(nnx.Module):
  """TransMIL's ``TransLayer``: ``x + NystromAttention(LN(x))`` (masked).

  ``chunk_threshold`` and ``chunk_size`` go to `NystromAttention` (its chunked path for
  long sequences); ``out_rows`` at call time keeps the first ``out_rows`` rows only.
  """

  def __init__(self, dim: int, num_heads: int, num_landmarks: int, *, rngs: nnx.Rngs,
               pinv_iterations: int = 6, dropout: float = 0.1,
               chunk_threshold: int | None = None, chunk_size: int = 2048):
    self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
    self.attn = NystromAttention(dim, num_heads, num_landmarks, pinv_iterations,
                                 rngs=rngs, dropout=dropout, chunk_threshold=chunk_threshold,
                                 chunk_size=chunk_size)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               key: jax.Array | None = None, *, out_rows: int | None = None,
               precision: str = "float32") -> jax.Array:
    return self.attn(x, mask, key=key, out_rows=out_rows, pre=self.norm, skip=x,
                     precision=precision)


class TransMIL(nnx.Module):
  """TransMIL bag encoder (see the module docstring); returns class-token outputs.

  ``__call__(x [B, N, in_dim], mask [B, N] | None, *, key=None, return_tokens=False)``
  gives ``[B, num_class_tokens, dim]`` (after the final LayerNorm), and with
  ``return_tokens`` also the token outputs ``[B, N, dim]`` at the bag's own positions
  (zero at padding). An empty bag gives finite outputs (the class tokens attend only to
  themselves; tokens are zero). `attention` gives a class token's attention over the
  patches in the last layer (for heatmaps).
  """

  def __init__(self, in_dim: int, dim: int = 512, num_heads: int = 8,
               num_landmarks: int | None = None, *, num_class_tokens: int = 1,
               dropout: float = 0.1, pinv_iterations: int = 6,
               chunk_threshold: int | None = None, chunk_size: int = 2048, rngs: nnx.Rngs):
    """Builds the encoder.

    Args:
      in_dim: patch feature width (1024 in the paper).
      dim: model width (512 in the paper).
      num_heads: attention heads (8).
      num_landmarks: Nystrom landmarks (default ``dim // 2``).
      num_class_tokens: learnable class tokens prepended to the bag.
      dropout: dropout on the Nystrom output projections (0.1; only with a call ``key``).
      pinv_iterations: Nystrom pseudo-inverse iterations (6).
      chunk_threshold: token sequences longer than this (static length) are embedded and
        attended chunk by chunk, without the full-size intermediates (see `__call__`);
        None for `NystromAttention`'s default (65536 tokens in the paper setting).
      chunk_size: tokens per chunk there.
      rngs: parameter initialisation keys.
    """
    if num_landmarks is None:
      num_landmarks = dim // 2
    self.num_class_tokens = num_class_tokens
    self.chunk_size = chunk_size
    self.fc = nnx.Linear(in_dim, dim, rngs=rngs)
    self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, num_class_tokens, dim)))
    chunking = dict(chunk_threshold=chunk_threshold, chunk_size=chunk_size)
    self.layer1 = TransLayer(dim, num_heads, num_landmarks, rngs=rngs,
                             pinv_iterations=pinv_iterations, dropout=dropout, **chunking)
    self.pos_layer = PPEG(dim, rngs=rngs)
    self.layer2 = TransLayer(dim, num_heads, num_landmarks, rngs=rngs,
                             pinv_iterations=pinv_iterations, dropout=dropout, **chunking)
    self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
    self.chunk_threshold = self.layer1.attn.chunk_threshold

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               key: jax.Array | None = None, return_tokens: bool = False,
               precision: str = "float32"):
    """Encodes a padded bag.

    Sequences of more than ``chunk_threshold`` tokens (class tokens plus the grid's
    capacity ``S``) are embedded chunk by chunk: each chunk of grid slots gathers its rows
    of ``x``, casts them (float16 bags stay float16 until then), and applies ``fc`` into
    the token sequence, so neither ``fc(x)`` nor a float32 copy of ``x`` is held next to
    the grid; the attention layers run chunked and PPEG in place. Without
    ``return_tokens`` the second layer computes the class-token rows only (every token is
    still attended to), and the final LayerNorm, a per-token map, is applied to the rows
    returned only.

    Args:
      x: patch features ``[B, N, in_dim]``.
      mask: boolean ``[B, N]`` (True = real patch) or None (all real).
      key: PRNG key for dropout, or None.
      return_tokens: also return the token outputs.
      precision: matmul precision, ``"float32"`` (default) or ``"bfloat16"`` (bfloat16
        operands with float32 accumulation in the embedding and both attention layers;
        PPEG, LayerNorms and the pseudo-inverse stay float32).

    Returns:
      ``cls [B, num_class_tokens, dim]``, or ``(cls, tokens [B, N, dim])``.
    """
    b, n, _ = x.shape
    k = self.num_class_tokens
    if mask is None:
      mask = jnp.ones((b, n), bool)
    k1, k2 = split_key(key, 2)
    seq, seq_mask = self._last_layer_input(x, mask, k1, precision)
    seq = self.layer2(seq, seq_mask, key=k2, out_rows=None if return_tokens else k,
                      precision=precision)
    cls_out = self.norm(seq[:, :k])
    if not return_tokens:
      return cls_out
    rank = jnp.maximum(valid_rank(mask), 0)
    tokens = self.norm(jnp.take_along_axis(seq[:, k:], rank[..., None], axis=1))
    return cls_out, jnp.where(mask[..., None], tokens, 0.0)

  def _last_layer_input(self, x: jax.Array, mask: jax.Array, key: jax.Array | None,
                        precision: str = "float32") -> tuple[jax.Array, jax.Array]:
    """Embedding, square layout, first layer and PPEG: the sequence ``[B, k + S, dim]``
    that enters ``layer2`` and its mask ``[B, k + S]`` (class tokens, then grid slots)."""
    b = x.shape[0]
    k = self.num_class_tokens
    src, valid, side = square_layout(mask)
    cls = jnp.broadcast_to(self.cls_token[...], (b, k, self.cls_token.shape[-1]))
    chunked = k + src.shape[1] > self.chunk_threshold
    if chunked:
      seq = self._embed_chunked(x, src, valid, cls, precision)
    else:
      h = jax.nn.relu(linear(self.fc, x, precision))
      grid = jnp.take_along_axis(h, src[..., None], axis=1)
      grid = jnp.where(valid[..., None], grid, 0.0)
      seq = jnp.concatenate([cls, grid], axis=1)
    seq_mask = jnp.concatenate([jnp.ones((b, k), bool), valid], axis=1)
    seq = self.layer1(seq, seq_mask, key=key, precision=precision)
    if chunked:
      seq = self.pos_layer(seq, side, offset=k)
    else:
      seq = jnp.concatenate([seq[:, :k], self.pos_layer(seq[:, k:], side)], axis=1)
    return seq, seq_mask

  def attention(self, x: jax.Array, mask: jax.Array | None = None, *,
                token: int = 0) -> jax.Array:
    """Attention of class token ``token`` over the bag's patches in the last layer.

    The exact softmax row of that class token's query against every key of ``layer2``
    (its pre-LayerNorm input, the layer's own ``W_Q``, ``W_K`` and ``d_h^{-1/2}``
    scaling), ``softmax_j(q_cls . k_j)`` over the class tokens and the ``H^2`` grid slots,
    averaged over heads. This is the attention that the layer's Nystrom product
    ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T)`` approximates, not that
    approximate row itself (which can be negative); one row costs ``O(N D)``. It is
    then restricted to the real patches, grid slot ``j < L`` being real patch ``j``:
    the class tokens and the wrap-around slots ``L <= j < H^2`` (the square layout's
    repeated patches) get no weight, nor does padding, and renormalised to sum to one
    per bag. Neither the amount nor the placement of padding changes it. Dropout is off.

    Args:
      x: patch features ``[B, N, in_dim]``.
      mask: boolean ``[B, N]`` (True = real patch) or None (all real).
      token: which class token's row.

    Returns:
      ``[B, N]``: non-negative, summing to 1 over each bag's real patches, exactly 0 at
      padding (all zeros for an empty bag).
    """
    b, n, _ = x.shape
    k = self.num_class_tokens
    if mask is None:
      mask = jnp.ones((b, n), bool)
    seq, seq_mask = self._last_layer_input(x, mask, None)
    attn = self.layer2.attn
    h, dh = attn.num_heads, attn.dim_head
    inner = h * dh
    kernel = attn.to_qkv.kernel[...]
    w_q = kernel[:, :inner].reshape(-1, h, dh)
    w_k = kernel[:, inner:2 * inner].reshape(-1, h, dh)
    q = jnp.einsum("bd,dhc->bhc", self.layer2.norm(seq[:, token]), w_q) * dh ** -0.5
    # The query folded into the key projection: scores = LN(seq) (W_K q) per head, an
    # O(N D h) product instead of projecting every key (O(N D^2)).
    scores = jnp.einsum("bsd,bdh->bhs", self.layer2.norm(seq),
                        jnp.einsum("dhc,bhc->bdh", w_k, q))
    row = jnp.mean(masked_softmax(scores, seq_mask[:, None, :]), axis=1)   # [B, k + S]
    # Slot j < L holds the real patch of rank j; padding and slots >= L are left out.
    rank = jnp.maximum(valid_rank(mask), 0)
    w = jnp.take_along_axis(row[:, k:], jnp.minimum(rank, row.shape[1] - k - 1), axis=1)
    w = jnp.where(mask, w, 0.0)
    total = jnp.sum(w, axis=1, keepdims=True)
    return w / jnp.where(total > 0, total, 1.0)

  def _embed_chunked(self, x: jax.Array, src: jax.Array, valid: jax.Array,
                     cls: jax.Array, precision: str = "float32") -> jax.Array:
    """``concat(cls, where(valid, ReLU(fc(x))[src], 0))`` ``[B, k + S, dim]``, one
    `jax.lax.scan` step per ``chunk_size`` grid slots (the last one shifted back to end
    at ``S``; its overlap is written twice with the same values)."""
    b, s = src.shape
    k = cls.shape[1]
    c = min(self.chunk_size, s)
    dtype = jnp.result_type(jnp.float32, self.fc.kernel.dtype)

    def body(seq, i):
      start = jnp.minimum(i * c, s - c)
      rows = jax.lax.dynamic_slice_in_dim(src, start, c, axis=1)
      ok = jax.lax.dynamic_slice_in_dim(valid, start, c, axis=1)
      xc = jnp.take_along_axis(x, rows[..., None], axis=1).astype(dtype)
      hc = jnp.where(ok[..., None], jax.nn.relu(linear(self.fc, xc, precision)), 0.0)
      return jax.lax.dynamic_update_slice_in_dim(seq, hc.astype(seq.dtype), k + start,
                                                 axis=1), None

    seq = jnp.zeros((b, k + s, cls.shape[-1]), jnp.result_type(dtype, cls.dtype))
    seq = jax.lax.dynamic_update_slice_in_dim(seq, cls.astype(seq.dtype), 0, axis=1)
    seq, _ = jax.lax.scan(jax.checkpoint(body), seq, jnp.arange(-(-s // c)))
    return seq
