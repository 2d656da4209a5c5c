"""Tests of the reusable layers in survjax.nn: attention, Nystrom, TransMIL, MIL, genomic.

Every test runs its module computations inside one `jax.jit` (modules are pytrees, or are
split/merged as the trainer does) and checks the results with numpy: op-by-op execution
compiles each primitive separately and is far slower on the shared 2-core machine.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from survjax.nn import grid_conv as grid_conv_lib
from survjax.nn import nystrom as nystrom_lib
from survjax.nn.attention import MultiHeadAttention, TransformerLayer
from survjax.nn.core import dropout, masked_softmax
from survjax.nn.genomic import SNN, GroupTokenizer, alpha_dropout
from survjax.nn.mil import GatedABMIL
from survjax.nn.nystrom import NystromAttention, newton_pinv
from survjax.nn.transmil import PPEG, TransMIL, ceil_sqrt, square_layout


def _normal(seed, shape, scale=1.0):
  return np.asarray(scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32))


def _functional(module, **static):
  """The trainer's way of running a module: split once, merge inside a plain jax.jit.

  Returns ``f(*arrays, key=None)``; ``static`` keyword arguments are baked in.
  """
  graphdef, state = nnx.split(module)

  @jax.jit
  def run(state, args, key):
    return nnx.merge(graphdef, state)(*args, key=key, **static)

  return lambda *args, key=None: jax.tree.map(np.asarray, run(state, args, key))


def _pad_bag(x, n, positions=None):
  """Places the L rows of x [L, D] at `positions` (default the first L) of a [1, n, D] bag."""
  l, d = x.shape
  positions = np.arange(l) if positions is None else np.asarray(positions)
  bag = _normal(99, (n, d), 3.0).copy()  # garbage in the padding, not zeros
  bag[positions] = np.asarray(x)
  mask = np.zeros((n,), bool)
  mask[positions] = True
  return bag[None], mask[None]


def _stack(*bags):
  return np.concatenate([b[0] for b in bags]), np.concatenate([b[1] for b in bags])


# ---- core ---------------------------------------------------------------------------------


def test_masked_softmax_zero_rows_and_grad_finite():
  s = _normal(0, (3, 5))
  mask = np.array([[True] * 5, [True, False, True, False, False], [False] * 5])

  @jax.jit
  def run(s):
    g = jax.grad(lambda s: jnp.sum(masked_softmax(s, mask) * jnp.arange(5.0)))(s)
    return masked_softmax(s, mask), g

  p, g = map(np.asarray, run(s))
  np.testing.assert_allclose(p[0], jax.nn.softmax(s[0]), atol=1e-6)
  np.testing.assert_allclose(p[1, [0, 2]], jax.nn.softmax(s[1, [0, 2]]), atol=1e-6)
  np.testing.assert_array_equal(p[1, [1, 3, 4]], 0.0)
  np.testing.assert_array_equal(p[2], 0.0)
  assert np.all(np.isfinite(g))


def test_dropout_only_with_key():
  x = jnp.ones((1000,))
  np.testing.assert_array_equal(dropout(x, 0.5, None), x)
  y = np.asarray(dropout(x, 0.5, jax.random.key(0)))
  assert set(np.unique(y).tolist()) <= {0.0, 2.0}
  assert abs(y.mean() - 1.0) < 0.1


# ---- multi-head attention ------------------------------------------------------------


def test_mha_equals_eq7_per_head_and_masks_keys():
  dim, heads = 8, 2
  mha = MultiHeadAttention(dim, heads, rngs=nnx.Rngs(0))
  q_tok, kv_tok = _normal(1, (2, 3, dim)), _normal(2, (2, 5, dim))
  mask = np.array([[True, True, False, True, False], [True] * 5])
  out = _functional(mha)(q_tok, kv_tok, mask)

  # Eq. (7) per head on the real keys only, heads concatenated, output projection.
  p = {n: (np.asarray(getattr(mha, n).kernel[...]), np.asarray(getattr(mha, n).bias[...]))
       for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
  dk = dim // heads
  for b in range(2):
    qq = q_tok[b] @ p["q_proj"][0] + p["q_proj"][1]
    kk = kv_tok[b][mask[b]] @ p["k_proj"][0] + p["k_proj"][1]
    vv = kv_tok[b][mask[b]] @ p["v_proj"][0] + p["v_proj"][1]
    heads_out = []
    for i in range(heads):
      sl = slice(i * dk, (i + 1) * dk)
      s = qq[:, sl] @ kk[:, sl].T / math.sqrt(dk)
      a = np.exp(s - s.max(-1, keepdims=True))
      heads_out.append(a / a.sum(-1, keepdims=True) @ vv[:, sl])
    ref = np.concatenate(heads_out, -1) @ p["out_proj"][0] + p["out_proj"][1]
    np.testing.assert_allclose(out[b], ref, atol=1e-5)


def test_mha_fully_masked_rows_are_zero_and_finite():
  mha = MultiHeadAttention(8, 2, rngs=nnx.Rngs(0))
  q_tok, kv_tok = _normal(1, (2, 3, 8)), _normal(2, (2, 4, 8))
  mask = np.array([[False] * 4, [True, False, False, False]])

  @jax.jit
  def run(m, q):
    return m(q, kv_tok, mask), jax.grad(lambda t: jnp.sum(m(t, kv_tok, mask) ** 2))(q)

  out, g = map(np.asarray, run(mha, q_tok))
  np.testing.assert_array_equal(out[0], 0.0)
  assert np.abs(out[1]).max() > 0.0
  assert np.all(np.isfinite(g))


def test_transformer_layer_padding_invariant_and_dropout_key():
  layer = TransformerLayer(8, 2, 2.0, 0.5, rngs=nnx.Rngs(0))
  x = _normal(1, (4, 8))
  pos_b = np.array([0, 2, 3, 7])
  fwd = _functional(layer)
  xa, ma = _pad_bag(x, 9)
  xb, mb = _pad_bag(x, 9, positions=pos_b)
  xs, ms = _stack((xa, ma), (xb, mb))
  out = fwd(xs, ms)
  np.testing.assert_allclose(out[0, :4], out[1, pos_b], atol=1e-5)
  np.testing.assert_array_equal(out[0, 4:], 0.0)
  np.testing.assert_array_equal(fwd(xs, ms), out)  # no key: deterministic
  assert np.abs(fwd(xs, ms, key=jax.random.key(3)) - out).max() > 1e-3


def test_transformer_layer_remat_same_values_and_gradients():
  """`remat=True` recomputes in the backward what the plain layer stores: the same
  function, the same gradients (with dropout, the mask drawn again from the same key),
  and it differentiates with part of its parameters frozen (split as the trainer does)."""
  plain = TransformerLayer(8, 2, 2.0, 0.5, rngs=nnx.Rngs(0))
  remat = TransformerLayer(8, 2, 2.0, 0.5, rngs=nnx.Rngs(0), remat=True)
  x, mask = _pad_bag(_normal(1, (5, 8)), 7)
  key = jax.random.key(2)

  def grads(layer):
    graphdef, trained, frozen = nnx.split(layer, nnx.PathContains("fc2"), ...)

    def loss(trained, x, frozen):
      out = nnx.merge(graphdef, trained, frozen)(x, mask, key)
      return jnp.sum(jnp.sin(out))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(trained, x, frozen)

  (loss_p, (g_p, gx_p)), (loss_r, (g_r, gx_r)) = grads(plain), grads(remat)
  np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
  np.testing.assert_allclose(gx_r, gx_p, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_p), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.abs(gx_p).max() > 0.0 and all(np.abs(g).max() > 0.0 for g in jax.tree.leaves(g_p))


# ---- Nystrom attention ---------------------------------------------------------------


def _exact_attention(layer, x):
  """softmax(Q K^T / sqrt(d_h)) V with the layer's own projections (no value conv)."""
  b, n, _ = x.shape
  h, dh = layer.num_heads, layer.dim_head
  qkv = layer.to_qkv(x).reshape(b, n, 3, h, dh)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  a = jax.nn.softmax(jnp.einsum("bnhc,bmhc->bhnm", q, k) / math.sqrt(dh), axis=-1)
  return layer.to_out(jnp.einsum("bhnm,bmhc->bnhc", a, v).reshape(b, n, h * dh))


def test_newton_pinv_matches_pinv():
  a = jax.nn.softmax(_normal(0, (2, 6, 6), 2.0), axis=-1)
  z, ref = jax.jit(lambda a: (newton_pinv(a, 30), jnp.linalg.pinv(a)))(a)
  np.testing.assert_allclose(z, ref, rtol=1e-3, atol=1e-3)


def test_nystrom_with_one_token_per_landmark_is_exact_attention():
  """m = L: every token is its own landmark, and A pinv(A) A = A for softmax attention.

  Also with padding (garbage rows, real rows in the middle): landmarks are taken over the
  real tokens only, so the result is still exact attention over the real tokens.
  """
  l, dim = 12, 16
  layer = NystromAttention(dim, 2, l, pinv_iterations=40, residual=False, rngs=nnx.Rngs(0))
  x = _normal(1, (l, dim), 2.0)
  xp, mp = _pad_bag(x, 20, positions=np.arange(l) + 3)

  @jax.jit
  def run(layer):
    return layer(x[None]), layer(xp, mp), _exact_attention(layer, x[None])

  out, out_padded, ref = map(np.asarray, run(layer))
  np.testing.assert_allclose(out, ref, atol=1e-3)
  np.testing.assert_allclose(out_padded[0, 3:3 + l], ref[0], atol=1e-3)


def test_nystrom_padding_invariance():
  """Same tokens, padded to different lengths and with padding interleaved: same outputs.

  Covers more real tokens than landmarks (11 > 4) and fewer (3 < 8, empty landmarks).
  """
  for num_real, landmarks in ((11, 4), (3, 8)):
    layer = NystromAttention(16, 2, landmarks, residual_conv_kernel=5, rngs=nnx.Rngs(0))
    fwd = _functional(layer)
    x = _normal(num_real, (num_real, 16))
    n = 20
    pos = np.sort(np.random.default_rng(num_real).choice(n, num_real, replace=False))
    xs, ms = _stack(_pad_bag(x, n), _pad_bag(x, n, positions=pos))
    out_tight = fwd(*_pad_bag(x, num_real))[0]
    out = fwd(xs, ms)
    np.testing.assert_allclose(out[0, :num_real], out_tight, atol=1e-5)
    np.testing.assert_allclose(out[1, pos], out_tight, atol=1e-5)
    np.testing.assert_array_equal(out[~ms], 0.0)


def test_nystrom_fully_masked_is_finite_zero():
  layer = NystromAttention(16, 2, 4, rngs=nnx.Rngs(0))
  x = _normal(1, (2, 9, 16))
  mask = np.array([[False] * 9, [True] * 4 + [False] * 5])

  @jax.jit
  def run(layer, x):
    return layer(x, mask), jax.grad(lambda x: jnp.sum(layer(x, mask) ** 2))(x)

  out, g = map(np.asarray, run(layer, x))
  np.testing.assert_array_equal(out[0], 0.0)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))


def test_nystrom_value_conv_matches_grouped_conv():
  """The shifted-slice value convolution equals PyTorch's Conv2d(h, h, (K, 1), groups=h)."""
  b, n, h, c, k = 2, 10, 3, 4, 5
  v, w = _normal(0, (b, n, h, c)), _normal(1, (k, h))

  @jax.jit
  def run(v, w):
    ref = jax.lax.conv_general_dilated(
        jnp.transpose(v, (0, 1, 3, 2)), w[:, None, None, :], (1, 1),
        ((k // 2, k // 2), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=h)
    return nystrom_lib._depthwise_seq_conv(v, w), jnp.transpose(ref, (0, 1, 3, 2))

  ours, ref = run(v, w)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def _jaxpr_shapes(jx):
  """Shapes of every value a jaxpr computes, nested jaxprs (scan, cond, pjit) included."""
  for eqn in jx.eqns:
    for var in eqn.outvars:
      yield getattr(var.aval, "shape", ())
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _jaxpr_shapes(sub)


def test_nystrom_never_forms_an_n_by_n_product():
  n = 37  # distinct from every other dimension below
  layer = NystromAttention(16, 2, 4, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  jaxpr = jax.make_jaxpr(lambda s, x, m: nnx.merge(graphdef, s)(x, m))(
      state, jnp.zeros((1, n, 16)), jnp.ones((1, n), bool))
  all_shapes = list(_jaxpr_shapes(jaxpr.jaxpr))
  assert any(n in s for s in all_shapes)
  assert not [s for s in all_shapes if list(s).count(n) >= 2]


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nystrom_chunked_path_equals_unchunked_with_gradients():
  """The chunked path (forced at N = 20) equals the unchunked one, gradients included
  (in the parameters and x): padding at the end, interleaved, none, and an empty row;
  chunks of 3 (not dividing N) and 5 tokens; the fused ``pre``/``skip``; no mask and no
  value convolution."""
  n, dim = 20, 16
  x = _normal(1, (4, n, dim))
  mask = np.ones((4, n), bool)
  mask[0, 13:] = False
  mask[1, ::3] = False
  mask[3] = False
  ln = nnx.LayerNorm(dim, rngs=nnx.Rngs(1))
  layers = [NystromAttention(dim, 2, 4, residual_conv_kernel=5, rngs=nnx.Rngs(0),
                             chunk_threshold=t, chunk_size=c) for t, c in ((None, 1), (0, 3),
                                                                          (0, 5))]
  no_conv = [NystromAttention(dim, 2, 4, residual=False, rngs=nnx.Rngs(0), chunk_threshold=t,
                              chunk_size=3) for t in (None, 0)]

  def loss(layer, x):  # the gradient comes with the forward (has_aux)
    out = layer(x, mask, pre=ln, skip=x)
    return jnp.sum(jnp.sin(out)), out

  @jax.jit
  def run(layers, no_conv, x):
    grads = [jax.grad(loss, argnums=(0, 1), has_aux=True)(l, x) for l in layers[:2]]
    return grads, [l(x, mask) for l in layers[::2]], [l(x) for l in no_conv]

  (g_ref, g_chunked), outs, outs_no_conv = run(layers, no_conv, x)
  assert layers[0].chunk_threshold > n and layers[1].chunk_threshold == 0
  assert _max_abs_diff(g_ref[1], g_chunked[1]) < 1e-5
  assert _max_abs_diff(g_ref[0], g_chunked[0]) < 1e-4
  assert _max_abs_diff(*outs) < 1e-5 and _max_abs_diff(*outs_no_conv) < 1e-5
  np.testing.assert_array_equal(outs[1][~mask], 0.0)


def test_nystrom_chunked_path_never_forms_n_by_m_or_qkv():
  """At N = 37 > chunk 8, no array has the sequence length next to the landmarks or the
  q/k/v width: the only N-long arrays are the input, the output, masks and indices."""
  n, dim, m = 37, 16, 5
  layer = NystromAttention(dim, 2, m, dim_head=6, residual_conv_kernel=5, rngs=nnx.Rngs(0),
                           chunk_threshold=0, chunk_size=8)
  graphdef, state = nnx.split(layer)
  jaxpr = jax.make_jaxpr(lambda s, x, mk: nnx.merge(graphdef, s)(x, mk))(
      state, jnp.zeros((1, n, dim)), jnp.ones((1, n), bool))
  long = [s for s in _jaxpr_shapes(jaxpr.jaxpr) if n in s]
  assert long and all(set(s) <= {1, n, dim} for s in long), sorted(set(long))


# ---- TransMIL -----------------------------------------------------------------------------


def test_ceil_sqrt_exact():
  n = np.arange(0, 5000)
  np.testing.assert_array_equal(ceil_sqrt(n), np.ceil(np.sqrt(n)).astype(int))


def test_square_layout_wraps_like_the_reference():
  mask = np.array([[True, False, True, True, False, True, True, False, False]])  # L = 5
  src, valid, side = map(np.asarray, square_layout(mask))
  assert src.shape == (1, 9) and side[0] == 3
  real = [0, 2, 3, 5, 6]
  # Slots 0..4: the real tokens; slots 5..8 (H^2 - L = 4): real tokens 0..3 again.
  np.testing.assert_array_equal(src[0], real + real[:4])
  np.testing.assert_array_equal(valid[0], [True] * 9)
  src, valid, side = map(np.asarray, square_layout(np.arange(10)[None] < 2))  # cap 16
  assert src.shape == (1, 16) and side[0] == 2
  np.testing.assert_array_equal(src[0, :4], [0, 1, 0, 1])
  np.testing.assert_array_equal(valid[0], [True] * 4 + [False] * 12)


def _ppeg_reference(ppeg, grid):
  """Official PPEG on a square grid [B, H, H, D]: three grouped convolutions + identity."""
  out = grid
  for name in ("proj", "proj1", "proj2"):
    w = getattr(ppeg, f"{name}_kernel")[...]
    out = out + jax.lax.conv_general_dilated(
        grid, w[:, :, None, :], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=grid.shape[-1]) + getattr(ppeg, f"{name}_bias")[...]
  return out


def test_ppeg_shifted_slices_equal_grouped_convolutions():
  """Sides 1..5 in one batch of capacity 25, i.e. L = H^2 and also every non-square L
  (TransMIL lays any L out on ceil(sqrt(L))^2 slots); random kernels and biases."""
  dim, cap = 6, 25
  ppeg = PPEG(dim, rngs=nnx.Rngs(0))
  sides = [1, 2, 3, 4, 5]
  x = _normal(1, (len(sides), cap, dim))

  @jax.jit
  def run(ppeg):
    refs = [_ppeg_reference(ppeg, x[i:i + 1, :h * h].reshape(1, h, h, dim)).reshape(h * h, dim)
            for i, h in enumerate(sides)]
    return ppeg(x, jnp.array(sides)), ppeg(x[-1:]), refs

  out, out_static, refs = jax.tree.map(np.asarray, run(ppeg))
  for i, h in enumerate(sides):
    np.testing.assert_allclose(out[i, :h * h], refs[i], atol=1e-5)
    np.testing.assert_array_equal(out[i, h * h:], 0.0)
  np.testing.assert_allclose(out_static, out[-1:], atol=1e-6)  # static side sqrt(S)


def test_custom_vjps_equal_autodiff_of_grouped_convolutions():
  """The hand-written VJPs of the PPEG grid convolution (several grid sides in one batch)
  and of the Nystrom value convolution equal autodiff of XLA's grouped convolutions."""
  dim, sides = 5, (5, 3, 1)
  x, w7, g = _normal(1, (3, 30, dim)), _normal(2, (7, 7, dim)), _normal(3, (3, 30, dim))
  v, w33, gv = _normal(4, (2, 11, 3, 4)), _normal(5, (7, 3)), _normal(6, (2, 11, 3, 4))

  def conv_grid(xg, w):
    return jax.lax.conv_general_dilated(
        xg, w[:, :, None, :], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=dim)

  def conv_seq(v, w):  # PyTorch's Conv2d(h, h, (K, 1), padding=(K // 2, 0), groups=h)
    out = jax.lax.conv_general_dilated(
        jnp.transpose(v, (0, 1, 3, 2)), w[:, None, None, :], (1, 1),
        ((w.shape[0] // 2,) * 2, (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=v.shape[2])
    return jnp.transpose(out, (0, 1, 3, 2))

  @jax.jit
  def run(x, w7, v, w33):
    ours = jax.vjp(lambda x, w: grid_conv_lib.grid_conv7(x, w, jnp.array(sides)), x, w7)[1](g)
    refs = []
    for i, h in enumerate(sides):
      grid = x[i:i + 1, :h * h].reshape(1, h, h, dim)
      cot = g[i:i + 1, :h * h].reshape(1, h, h, dim)
      refs.append(jax.vjp(conv_grid, grid, w7)[1](cot))
    return ours, refs, jax.vjp(nystrom_lib._depthwise_seq_conv, v, w33)[1](gv), \
        jax.vjp(conv_seq, v, w33)[1](gv)

  (gx, gw), refs, ours_v, ref_v = jax.tree.map(np.asarray, run(x, w7, v, w33))
  for i, h in enumerate(sides):
    np.testing.assert_allclose(gx[i, :h * h], refs[i][0].reshape(h * h, dim), atol=1e-5)
    np.testing.assert_array_equal(gx[i, h * h:], 0.0)
  np.testing.assert_allclose(gw, sum(r[1] for r in refs), rtol=1e-5, atol=1e-5)
  for a, b in zip(ours_v, ref_v):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _transmil_reference(model, bag):
  """The official forward (unpadded bag [L, in_dim], batch 1, no masks) from our parts:
  wrap-around by concatenation, the three grouped convolutions on the reshaped grid."""
  h = jax.nn.relu(model.fc(bag[None]))
  l = h.shape[1]
  side = math.ceil(math.sqrt(l))
  h = jnp.concatenate([h, h[:, :side * side - l]], axis=1)
  k = model.num_class_tokens
  seq = jnp.concatenate([model.cls_token[...], h], axis=1)
  seq = model.layer1(seq)
  grid = seq[:, k:].reshape(1, side, side, -1)
  seq = jnp.concatenate([seq[:, :k], _ppeg_reference(model.pos_layer, grid).reshape(
      1, side * side, -1)], axis=1)
  seq = model.norm(model.layer2(seq))
  return seq[:, :k], seq[:, k:k + l]


def _small_transmil(num_class_tokens=1):
  return TransMIL(12, dim=16, num_heads=2, num_landmarks=4,
                  num_class_tokens=num_class_tokens, rngs=nnx.Rngs(0))


def test_transmil_matches_the_official_forward():
  """A non-square bag (L = 7, wrap-around) and a square one (L = 9), padded, in one batch."""
  model = _small_transmil(num_class_tokens=2)
  bags = [_normal(1, (7, 12)), _normal(2, (9, 12))]
  x, mask = _stack(_pad_bag(bags[0], 16, positions=np.arange(7) + 2), _pad_bag(bags[1], 16))

  @jax.jit
  def run(model):
    return model(x, mask, return_tokens=True), [_transmil_reference(model, b) for b in bags]

  (cls, tokens), refs = jax.tree.map(np.asarray, run(model))
  assert cls.shape == (2, 2, 16) and tokens.shape == (2, 16, 16)
  for i, (bag, offset) in enumerate(zip(bags, (2, 0))):
    ref_cls, ref_tokens = refs[i]
    np.testing.assert_allclose(cls[i], ref_cls[0], atol=1e-4)
    np.testing.assert_allclose(tokens[i, offset:offset + len(bag)], ref_tokens[0], atol=1e-4)
    np.testing.assert_array_equal(tokens[i][~mask[i]], 0.0)


def test_transmil_padding_and_padding_position_invariance():
  model = _small_transmil()
  bag, other = _normal(1, (10, 12)), _normal(2, (25, 12))
  x1, m1 = _pad_bag(bag, 16)  # perfect-square bucket, capacity 16
  pos = np.sort(np.random.default_rng(0).choice(30, 10, replace=False))
  x2, m2 = _stack(_pad_bag(bag, 30),                 # capacity 36
                  _pad_bag(bag, 30, positions=pos),  # padding interleaved
                  _pad_bag(other, 30))               # another bag size in the same batch

  @jax.jit
  def run(model):
    return model(x1, m1, return_tokens=True), model(x2, m2, return_tokens=True)

  (c1, t1), (c2, t2) = jax.tree.map(np.asarray, run(model))
  np.testing.assert_allclose(c2[0], c1[0], atol=1e-5)
  np.testing.assert_allclose(c2[1], c1[0], atol=1e-5)
  np.testing.assert_allclose(t2[0, :10], t1[0, :10], atol=1e-5)
  np.testing.assert_allclose(t2[1, pos], t1[0, :10], atol=1e-5)
  assert np.abs(c2[2] - c1[0]).max() > 1e-3


def _chunked_transmil_case():
  """A batch of padded, interleaved and empty bags, float16-exact, and the small TransMIL
  unchunked and chunked (forced at small N, chunks of 5 tokens: dividing neither the
  38 tokens nor the 36 grid slots), same parameters."""
  x = _normal(1, (3, 30, 12)).astype(np.float16)
  mask = np.ones((3, 30), bool)
  mask[0, 20:] = False
  mask[1, 1::4] = False
  mask[2] = False
  models = [TransMIL(12, dim=16, num_heads=2, num_landmarks=4, num_class_tokens=2,
                     pinv_iterations=2, chunk_threshold=t, chunk_size=5, rngs=nnx.Rngs(0))
            for t in (None, 0)]
  assert models[0].chunk_threshold > 38 and models[1].chunk_threshold == 0
  return x, mask, models


def test_transmil_chunked_path_equals_unchunked():
  """Chunked embedding, attention and in-place PPEG give the unchunked outputs: class
  and token outputs, and class outputs alone (second layer on the class rows only) from
  the float16 bag."""
  x, mask, models = _chunked_transmil_case()

  @jax.jit
  def run(models):
    return [m(x.astype(np.float32), mask, return_tokens=True) for m in models], models[1](x, mask)

  (out_ref, out), cls16 = run(models)
  assert _max_abs_diff(out_ref, out) < 1e-4 and _max_abs_diff(out_ref[0], cls16) < 1e-4
  assert np.all(np.isfinite(np.asarray(out[0])))
  np.testing.assert_array_equal(np.asarray(out[1])[~mask], 0.0)


@pytest.mark.slow
def test_transmil_chunked_path_gradients_equal_unchunked():
  """Parameter gradients through the whole chunked TransMIL equal the unchunked ones
  (compiling both gradients takes ~10-25 s on 2 shared cores, hence `slow`)."""
  x, mask, models = _chunked_transmil_case()

  def loss(model):
    cls, tokens = model(x.astype(np.float32), mask, return_tokens=True)
    return jnp.sum(jnp.sin(cls)) + jnp.sum(jnp.sin(tokens))

  g_ref, g = jax.jit(lambda models: [jax.grad(loss)(m) for m in models])(models)
  assert _max_abs_diff(nnx.state(g_ref), nnx.state(g)) < 1e-4


def test_ppeg_in_place_on_the_sequence_equals_ppeg_with_gradients():
  """`ppeg_sequence` (the grid after 2 class tokens; sides 5 and 4; one chunk, and chunks
  of 7 slots, the last one overlapping) equals concat(cls, PPEG(grid)); so does its VJP."""
  dim = 6
  ppeg = PPEG(dim, rngs=nnx.Rngs(0))
  seq, g = _normal(1, (2, 27, dim)), _normal(2, (2, 27, dim))
  sides = jnp.array([5, 4])

  def ref(seq, w, b):
    valid = (jnp.arange(25) < sides[:, None] ** 2)[..., None]
    grid = seq[:, 2:] + grid_conv_lib.grid_conv7(seq[:, 2:], w, sides) + b
    return jnp.concatenate([seq[:, :2], jnp.where(valid, grid, 0.0)], axis=1)

  @jax.jit
  def run(ppeg):
    w, b = ppeg.combined()
    out_ref, vjp_ref = jax.vjp(ref, seq, w, b)
    out, vjp = jax.vjp(lambda s, w, b: grid_conv_lib.ppeg_sequence(s, w, b, sides, 2), seq, w, b)
    chunked = jax.vmap(lambda s, h: grid_conv_lib._ppeg_seq_one(s, w, b, h, 2, 7))(seq, sides)
    return out_ref, out, chunked, ppeg(seq, sides, offset=2), vjp_ref(g), vjp(g)

  out_ref, out, chunked, out_module, g_ref, g_ours = run(ppeg)
  np.testing.assert_allclose(out, out_ref, atol=1e-6)
  np.testing.assert_array_equal(out_module, out)
  np.testing.assert_allclose(chunked, out_ref, atol=1e-6)
  assert _max_abs_diff(g_ref, g_ours) < 1e-5


def test_transmil_functional_empty_bag_finite_and_dropout_key():
  model = _small_transmil(num_class_tokens=3)
  x = _normal(1, (2, 9, 12))
  mask = np.array([[False] * 9, [True] * 5 + [False] * 4])
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, key):
    def loss(s):
      cls = nnx.merge(graphdef, s)(x, mask, key=key)
      return jnp.sum(cls ** 2 * jnp.arange(16.0)), cls
    (_, cls_drop), grads = jax.value_and_grad(loss, has_aux=True)(state)
    cls, tokens = nnx.merge(graphdef, state)(x, mask, return_tokens=True)
    return cls, tokens, cls_drop, grads

  cls, tokens, cls_drop, grads = jax.tree.map(np.asarray, run(state, jax.random.key(0)))
  assert cls.shape == (2, 3, 16)
  assert np.all(np.isfinite(cls)) and np.all(np.isfinite(cls_drop))
  np.testing.assert_array_equal(tokens[0], 0.0)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.abs(cls_drop - cls).max() > 1e-3  # dropout acts only with a key


# ---- MIL ----------------------------------------------------------------------------------


def test_gated_abmil_formula_padding_and_permutation_invariance():
  pool = GatedABMIL(6, 8, rngs=nnx.Rngs(0))
  bag = _normal(1, (5, 6))
  real = np.array([1, 2, 4, 6, 8])
  x, mask = _pad_bag(bag, 9, positions=real)
  perm = np.random.default_rng(0).permutation(9)
  xs = np.concatenate([x, x[:, perm], x])
  ms = np.concatenate([mask, mask[:, perm], np.zeros_like(mask)])

  @jax.jit
  def run(pool):
    h = jax.nn.relu(pool.embed(bag))  # the formula on the real instances only
    e = pool.attn_w(jnp.tanh(pool.attn_v(h)) * jax.nn.sigmoid(pool.attn_u(h)))[:, 0]
    a = jax.nn.softmax(e)
    return pool(xs, ms), (a @ h, a)

  (pooled, attn), (ref_pooled, ref_attn) = jax.tree.map(np.asarray, run(pool))
  np.testing.assert_allclose(pooled[0], ref_pooled, atol=1e-5)
  np.testing.assert_allclose(attn[0, real], ref_attn, atol=1e-6)
  np.testing.assert_array_equal(attn[0][~mask[0]], 0.0)
  np.testing.assert_allclose(pooled[1], pooled[0], atol=1e-5)          # permutation
  np.testing.assert_allclose(attn[1], attn[0, perm], atol=1e-6)
  np.testing.assert_array_equal(pooled[2], 0.0)                         # empty bag
  np.testing.assert_array_equal(attn[2], 0.0)


# ---- genomic ------------------------------------------------------------------------------


def test_alpha_dropout_keeps_mean_and_variance():
  x = _normal(0, (400_000,))
  y = np.asarray(jax.jit(lambda x: alpha_dropout(x, 0.25, jax.random.key(1)))(x))
  # Standard errors at this size: mean ~ 1.6e-3, variance ~ 2.6e-3.
  assert abs(y.mean()) < 0.01
  assert abs(y.var() - 1.0) < 0.015
  q, alpha = 0.75, -1.0507009873554805 * 1.6732632423543772
  a = (q + alpha ** 2 * q * (1 - q)) ** -0.5
  dropped = np.mean(np.isclose(y, a * alpha - a * (1 - q) * alpha))  # the saturation value
  assert abs(dropped - 0.25) < 0.005
  np.testing.assert_array_equal(alpha_dropout(x, 0.25, None), x)


def test_snn_shapes_init_and_self_normalisation():
  net = SNN(300, 256, 3, 0.1, rngs=nnx.Rngs(0))
  w = np.asarray(net.layers[0].kernel[...])
  assert abs(w.std() * math.sqrt(300) - 1.0) < 0.02
  fwd = _functional(net)
  x, k = _normal(1, (2000, 300)), jax.random.key(2)
  h = fwd(x)
  assert h.shape == (2000, 256)
  assert abs(h.mean()) < 0.15 and abs(h.var() - 1.0) < 0.25  # stays near N(0, 1)
  np.testing.assert_array_equal(fwd(x, key=k), fwd(x, key=k))
  assert np.abs(fwd(x, key=k) - h).max() > 1e-3


def test_group_tokenizer_shapes_and_group_locality():
  sizes = (3, 5, 2, 4)
  tok = GroupTokenizer(sizes, 8, rngs=nnx.Rngs(0), hidden=16)
  x = _normal(1, (2, sum(sizes)))

  @jax.jit
  def run(tok):
    jac = jax.jacobian(lambda x: tok(x[None])[0])(x[0])  # [G, dim, C]
    return tok(x), tok(x, key=jax.random.key(0)), jac

  out, out_drop, jac = map(np.asarray, run(tok))
  assert out.shape == (2, len(sizes), 8)
  bounds = np.cumsum((0,) + sizes)
  for g in range(len(sizes)):
    cols = np.zeros(sum(sizes), bool)
    cols[bounds[g]:bounds[g + 1]] = True
    assert np.abs(jac[g][:, cols]).max() > 0.0
    np.testing.assert_array_equal(jac[g][:, ~cols], 0.0)  # only its own group's columns
  assert np.abs(out_drop - out).max() > 1e-4
  with pytest.raises(ValueError, match="columns"):
    tok(jnp.zeros((1, 5)))


class _PerGroupTokenizer(nnx.Module):
  """The GroupTokenizer as it was before the groups were stacked (one `SNN` per group, a
  Python loop): the slow reference the stacked one must reproduce."""

  def __init__(self, group_sizes, dim, *, rngs, hidden=256, dropout=0.25):
    self.group_sizes = tuple(group_sizes)
    self.encoders = nnx.List([
        SNN(size, hidden, 2, dropout, rngs=rngs, out_dim=dim) for size in group_sizes])

  def __call__(self, x, key=None):
    keys = [None] * len(self.group_sizes) if key is None else list(
        jax.random.split(key, len(self.group_sizes)))
    tokens, start = [], 0
    for size, enc, k in zip(self.group_sizes, self.encoders, keys):
      tokens.append(enc(x[..., start:start + size], key=k))
      start += size
    return jnp.stack(tokens, axis=-2)


def _stacked_as_per_group(tok):
  """The stacked tokenizer's parameters as per-group ``[(w1, b1, w2, b2), ...]``."""
  out = [None] * len(tok.group_sizes)
  for kernel, members in zip(tok.kernels1, tok.buckets):
    for i, g in enumerate(members):
      out[g] = (kernel[i, :tok.group_sizes[g]], tok.bias1[g], tok.kernel2[g], tok.bias2[g])
  return out


def test_group_tokenizer_stacked_equals_per_group_snns():
  # Sizes in several buckets and out of order, a size-1 group, a group alone in its bucket.
  sizes = (3, 5, 1, 4, 9, 7)
  new = GroupTokenizer(sizes, 8, rngs=nnx.Rngs(3), hidden=16)
  old = _PerGroupTokenizer(sizes, 8, rngs=nnx.Rngs(3), hidden=16)
  assert len(new.kernels1) == 4  # buckets (0,1], (2,4], (4,8], (8,16]
  # The one-draw-per-bucket initialisation is the path tested here (not the fallback).
  from survjax.nn import genomic as genomic_lib
  assert genomic_lib._fast_kernels_match(nnx.initializers.variance_scaling(1.0, "fan_in",
                                                                           "normal"))
  # Same initial values, group by group (the same keys drawn in the same order).
  for g, (w1, b1, w2, b2) in enumerate(_stacked_as_per_group(new)):
    l1, l2 = old.encoders[g].layers
    np.testing.assert_array_equal(w1, l1.kernel[...])
    np.testing.assert_array_equal(b1, l1.bias[...])
    np.testing.assert_array_equal(w2, l2.kernel[...])
    np.testing.assert_array_equal(b2, l2.bias[...])
  # Train-like weights: nonzero biases, so that they are checked too.
  rng = np.random.default_rng(0)
  for layer in (l for enc in old.encoders for l in enc.layers):
    layer.bias[...] = rng.normal(0.0, 0.3, layer.bias.shape).astype(np.float32)
  new.bias1[...] = jnp.stack([e.layers[0].bias[...] for e in old.encoders])
  new.bias2[...] = jnp.stack([e.layers[1].bias[...] for e in old.encoders])
  x = _normal(1, (4, sum(sizes)))
  gd_new, st_new = nnx.split(new)
  gd_old, st_old = nnx.split(old)
  w = _normal(2, (4, len(sizes), 8))

  @jax.jit
  def run(st_new, st_old, x, key):
    def loss(gd, st, x):
      return jnp.sum(w * nnx.merge(gd, st)(x, key=key))
    outs = [nnx.merge(gd_new, st_new)(x, key=key), nnx.merge(gd_old, st_old)(x, key=key)]
    grads = [jax.grad(loss, argnums=(1, 2))(gd_new, st_new, x),
             jax.grad(loss, argnums=(1, 2))(gd_old, st_old, x)]
    return outs, grads

  for key in (None, jax.random.key(5)):
    (y_new, y_old), ((gs_new, gx_new), (gs_old, gx_old)) = run(st_new, st_old, x, key)
    np.testing.assert_allclose(y_new, y_old, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx_new, gx_old, rtol=1e-5, atol=1e-6)
    g_new = _stacked_as_per_group(nnx.merge(gd_new, gs_new))
    g_old = nnx.merge(gd_old, gs_old)
    for g, grads in enumerate(g_new):
      ref = [p[...] for layer in g_old.encoders[g].layers for p in (layer.kernel, layer.bias)]
      for a, b in zip(grads, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The zero padding of a bucket's shorter groups gets exactly zero gradient.
    for kernel, members in zip(nnx.merge(gd_new, gs_new).kernels1, new.buckets):
      for i, g in enumerate(members):
        np.testing.assert_array_equal(kernel[i, sizes[g]:], 0.0)
  assert np.abs(np.asarray(run(st_new, st_old, x, jax.random.key(5))[0][0])
                - np.asarray(run(st_new, st_old, x, None)[0][0])).max() > 1e-3


class _FakeDevice:
  """A device that reports ``bytes_limit`` (as GPUs and TPUs do), or nothing (CPU)."""

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return None if self.limit is None else {"bytes_limit": self.limit, "bytes_in_use": 0}


def test_chunk_threshold_follows_the_device_memory(monkeypatch):
  # XLA:CPU reports no memory limit: the CPU default, 65536 tokens for TransMIL's layer.
  assert jax.local_devices()[0].memory_stats() is None or "bytes_limit" not in (
      jax.local_devices()[0].memory_stats() or {})
  assert nystrom_lib.chunk_elements() == nystrom_lib.CHUNK_ELEMENTS == 2**27
  assert NystromAttention(64, 8, 256, rngs=nnx.Rngs(0)).chunk_threshold == 65536
  # A device with memory: one float32 [h, N, m] matrix within 1/32 of it.
  h100 = 80 * 2**30
  assert nystrom_lib.chunk_elements(_FakeDevice(h100)) == h100 // 32 // 4
  assert nystrom_lib.chunk_elements(_FakeDevice(None)) == 2**27
  # small devices never go below the CPU default
  assert nystrom_lib.chunk_elements(_FakeDevice(2**30)) == 2**27
  monkeypatch.setattr(nystrom_lib.jax, "local_devices", lambda: [_FakeDevice(h100)])
  layer = NystromAttention(64, 8, 256, rngs=nnx.Rngs(0))
  assert layer.chunk_threshold == h100 // 32 // 4 // (8 * 256) == 327680
  # an explicit threshold wins
  assert NystromAttention(64, 8, 256, rngs=nnx.Rngs(0), chunk_threshold=7).chunk_threshold == 7
