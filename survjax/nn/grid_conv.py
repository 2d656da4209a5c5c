"""Depthwise 7x7 convolutions on flat ``H x H`` token grids with hand-written VJPs (PPEG).

TransMIL lays a bag out row-major on an ``H x H`` square (per-sample ``H``) and applies
depthwise convolutions to it (`survjax.nn.transmil.PPEG`). XLA's grouped convolution is
very slow on CPU, so here the convolution is a sum of 49 shifted copies of the flat
sequence (shift ``dy H + dx``), masked at the grid's row and column borders, computed
chunk by chunk:

* `grid_conv7`: the convolution of the grids ``[B, S, D]``;
* `ppeg_sequence`: PPEG's ``x + W * x + b`` on the grid part of a token sequence (after
  the class tokens), in place.

Both have hand-written VJPs: autodiff would turn the dynamic shifts into scatters that
take seconds per 10k-token bag on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["grid_conv7", "ppeg_sequence"]


def _chunk_geometry(j0: jax.Array, chunk: int, side: jax.Array):
  """Row, column and validity of slots ``j0 .. j0 + chunk - 1`` of a ``side x side`` grid."""
  j = j0 + jnp.arange(chunk, dtype=jnp.int32)
  hs = jnp.maximum(side, 1)
  return j // hs, j % hs, j < side * side


def _grid_padding(s: int, chunk: int) -> tuple[int, int, int]:
  """(number of chunks, slots added at the end, zero rows on each side of the shifts)."""
  assert chunk <= max(s, 1), (chunk, s)
  hmax = math.isqrt(max(s - 1, 0)) + 1
  num_chunks = -(-s // chunk)
  return num_chunks, num_chunks * chunk - s, 3 * hmax + 3


def _conv7_rows(xp: jax.Array, w: jax.Array, side: jax.Array, j0: jax.Array, chunk: int,
                pad: int) -> tuple[jax.Array, jax.Array]:
  """`grid_conv7` at slots ``j0 .. j0 + chunk - 1`` of one grid, read from ``xp`` (the grid
  with ``pad >= 3 H + 3`` zero rows before it), and the slots' validity ``j < H^2``.

  For each kernel row ``dy`` (a `fori_loop`), one dynamic slice of ``xp`` at offset
  ``dy H - 3`` covers the 7 column shifts, which are then static slices: this keeps the
  work in cache, vectorises, and compiles small.
  """
  r, c, valid = _chunk_geometry(j0, chunk, side)

  def row_body(a, y):
    dy = a - 3
    window = jax.lax.dynamic_slice_in_dim(xp, pad + j0 + dy * side - 3, chunk + 6, axis=0)
    w_row = jax.lax.dynamic_index_in_dim(w, a, axis=0, keepdims=False)
    row_ok = valid & (r + dy >= 0) & (r + dy < side)
    for dx in range(-3, 4):
      ok = row_ok & (c + dx >= 0) & (c + dx < side)
      y = y + jnp.where(ok[:, None], window[3 + dx:3 + dx + chunk], 0.0) * w_row[dx + 3]
    return y

  y = jax.lax.fori_loop(0, 7, row_body, jnp.zeros((chunk, xp.shape[1]), xp.dtype))
  return y, valid


def _conv7_one(x: jax.Array, w: jax.Array, side: jax.Array, chunk: int = 512) -> jax.Array:
  """`grid_conv7` of one grid ``x [S, D]``, chunk by chunk (`_conv7_rows`)."""
  s, d = x.shape
  chunk = max(1, min(chunk, s))  # small grids: one chunk, no padding to a full one
  num_chunks, extra, pad = _grid_padding(s, chunk)
  xp = jnp.pad(x, ((pad, pad + extra), (0, 0)))

  def chunk_body(i, out):
    y, _ = _conv7_rows(xp, w, side, i * chunk, chunk, pad)
    return jax.lax.dynamic_update_slice_in_dim(out, y, i * chunk, axis=0)

  out = jax.lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros((s + extra, d), x.dtype))
  return out[:s]


def _conv7_weight_grad_one(g: jax.Array, x: jax.Array, side: jax.Array,
                           chunk: int = 256) -> jax.Array:
  """``dL/dw[dy, dx, d] = sum_j ok_j(dy, dx) g[j, d] x[j + dy H + dx, d]`` for one grid.

  Accumulated chunk by chunk like `_conv7_one`, so the 49 products of a chunk are reduced
  while it is in cache (49 full passes over a 10k-token bag cost about 5x more).
  """
  s, d = x.shape
  chunk = max(1, min(chunk, s))
  num_chunks, extra, pad = _grid_padding(s, chunk)
  gp = jnp.pad(g, ((0, extra), (0, 0)))
  xp = jnp.pad(x, ((pad, pad + extra), (0, 0)))

  def chunk_body(i, acc):
    j0 = i * chunk
    r, c, valid = _chunk_geometry(j0, chunk, side)
    gc = jax.lax.dynamic_slice_in_dim(gp, j0, chunk, axis=0)

    def row_body(a, acc):
      dy = a - 3
      window = jax.lax.dynamic_slice_in_dim(xp, pad + j0 + dy * side - 3, chunk + 6, axis=0)
      row_ok = valid & (r + dy >= 0) & (r + dy < side)
      terms = []
      for dx in range(-3, 4):
        ok = row_ok & (c + dx >= 0) & (c + dx < side)
        terms.append(jnp.sum(jnp.where(ok[:, None], gc * window[3 + dx:3 + dx + chunk], 0.0),
                             axis=0))
      row = jax.lax.dynamic_index_in_dim(acc, a, axis=0) + jnp.stack(terms)[None]
      return jax.lax.dynamic_update_slice_in_dim(acc, row, a, axis=0)

    return jax.lax.fori_loop(0, 7, row_body, acc)

  return jax.lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros((7, 7, d), x.dtype))


@jax.custom_vjp
def grid_conv7(x: jax.Array, w: jax.Array, side: jax.Array) -> jax.Array:
  """Depthwise 7x7 'same' cross-correlation on flat ``H x H`` grids (per-sample ``H``).

      y[j, d] = sum_{dy, dx = -3..3} ok_j(dy, dx) w[dy + 3, dx + 3, d] x[j + dy H + dx, d]

  for grid slots ``j = r H + c < H^2`` (zero elsewhere), with ``ok_j(dy, dx)`` true when
  ``(r + dy, c + dx)`` lies inside the grid: a sum of 49 shifted copies of the flat
  sequence (shift ``dy H + dx``), computed chunk by chunk (`_conv7_one`). The VJP is the
  same operation with the flipped kernel (for ``x``) and 49 masked reductions (for
  ``w``); the automatic one would transpose the dynamic slices into scatters, which take
  seconds on CPU for a 10k-token bag.

  Args:
    x: ``[B, S, D]`` flat grids.
    w: ``[7, 7, D]`` kernel.
    side: int32 ``[B]``, ``H`` per sample, ``H^2 <= S``.

  Returns:
    ``[B, S, D]``.
  """
  return jax.vmap(_conv7_one, (0, None, 0))(x, w, side)


def _grid_conv7_fwd(x, w, side):
  return grid_conv7(x, w, side), (x, w, side)


def _grid_conv7_bwd(res, g):
  x, w, side = res
  gx = jax.vmap(_conv7_one, (0, None, 0))(g, w[::-1, ::-1], side)
  gw = jnp.sum(jax.vmap(_conv7_weight_grad_one)(g, x, side), axis=0)
  return gx, gw, None


grid_conv7.defvjp(_grid_conv7_fwd, _grid_conv7_bwd)


def _ppeg_seq_one(seq: jax.Array, w: jax.Array, b: jax.Array, side: jax.Array, offset: int,
                  chunk: int = 512) -> jax.Array:
  """`ppeg_sequence` of one sequence ``[offset + S, D]``.

  The chunks' results go into ``seq``'s own rows (the loop reads only the padded copy
  ``xp``, so XLA updates ``seq`` in place when nothing else needs it). The last chunk is
  shifted back to end at ``S``; its overlap is computed twice, the same both times.
  """
  s = seq.shape[0] - offset
  chunk = max(1, min(chunk, s))
  num_chunks, _, pad = _grid_padding(s, chunk)
  xp = jnp.pad(seq[offset:], ((pad, pad), (0, 0)))

  def chunk_body(i, out):
    j0 = jnp.minimum(i * chunk, s - chunk)
    y, valid = _conv7_rows(xp, w, side, j0, chunk, pad)
    x = jax.lax.dynamic_slice_in_dim(xp, pad + j0, chunk, axis=0)
    y = jnp.where(valid[:, None], x + y + b, 0.0)
    return jax.lax.dynamic_update_slice_in_dim(out, y, offset + j0, axis=0)

  return jax.lax.fori_loop(0, num_chunks, chunk_body, seq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def ppeg_sequence(seq: jax.Array, w: jax.Array, b: jax.Array, side: jax.Array,
                  offset: int) -> jax.Array:
  """PPEG's ``x + W * x + b`` (masked) on the grid part of a token sequence, in place.

      out[:, :offset] = seq[:, :offset]
      out[:, offset + j] = 1[j < H^2] (x[j] + grid_conv7(x, W, H)[j] + b),  x = seq[:, offset:]

  The same as ``concat(seq[:, :offset], PPEG(seq[:, offset:]))`` without the separate
  grid copy, convolution output and concatenation (each ``[B, S, D]``): only the
  zero-padded grid that the shifts read is allocated besides the result. The VJP is
  that of `grid_conv7` plus the identity and bias terms.

  Args:
    seq: ``[B, offset + S, D]``.
    w: ``[7, 7, D]`` kernel (`survjax.nn.transmil.PPEG.combined`).
    b: ``[D]`` bias.
    side: int32 ``[B]``, ``H`` per sample, ``H^2 <= S``.
    offset: rows before the grid (class tokens), passed through.

  Returns:
    ``[B, offset + S, D]``.
  """
  return jax.vmap(_ppeg_seq_one, (0, None, None, 0, None))(seq, w, b, side, offset)


def _ppeg_sequence_fwd(seq, w, b, side, offset):
  return ppeg_sequence(seq, w, b, side, offset), (seq, w, side)


def _ppeg_sequence_bwd(offset, res, g):
  seq, w, side = res
  s = seq.shape[1] - offset
  valid = jnp.arange(s)[None, :] < (side * side)[:, None]
  g_grid = jnp.where(valid[..., None], g[:, offset:], 0.0)
  gx = g_grid + jax.vmap(_conv7_one, (0, None, 0))(g_grid, w[::-1, ::-1], side)
  gw = jnp.sum(jax.vmap(_conv7_weight_grad_one)(g_grid, seq[:, offset:], side), axis=0)
  return (jnp.concatenate([g[:, :offset], gx], axis=1), gw, jnp.sum(g_grid, axis=(0, 1)),
          None)


ppeg_sequence.defvjp(_ppeg_sequence_fwd, _ppeg_sequence_bwd)
