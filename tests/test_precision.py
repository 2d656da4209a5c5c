"""The ``precision`` option: bfloat16 matmul operands with float32 accumulation.

Stated tolerances (bfloat16 keeps 8 significant bits, a relative rounding of 2^-9 per
operand; float32 accumulation keeps the sums from adding more):

* the matmul helpers agree with a float64 numpy product of the bfloat16-rounded
  operands (ml_dtypes, an independent rounding) to 1e-5 relative: the products of two
  bfloat16 numbers are exact in float32, only the float32 sum rounds;
* DDIM samples (10 steps x 3 samples, a 2-layer denoiser): relative RMS difference from
  the float32 samples under 1e-2 (measured about 1e-3), and not zero (the option is
  taken);
* MIL outputs (gated ABMIL, TransMIL unchunked and chunked): max difference under 3% of
  the largest float32 output (measured 0.2% and 0.8%);
* C-index of a risk read from those outputs: moves by less than 0.01 (measured 0.001).

The default ``"float32"`` is the layers' plain code path; that it is unchanged is
checked in tests/test_nn.py and tests/test_diffusion.py by their float32 references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from survjax.diffusion.ddim import make_sampler
from survjax.diffusion.denoiser import ConditionalDenoiser
from survjax.diffusion.schedules import linear_schedule
from survjax.evaluate.metrics import concordance_index
from survjax.nn import core
from survjax.nn.mil import GatedABMIL
from survjax.nn.transmil import TransMIL

SAMPLE_RMS_TOL = 1e-2
MIL_REL_TOL = 3e-2
CINDEX_TOL = 0.01


def _bf16_round(x):
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _cindex(time, event, risk) -> float:
  c = concordance_index(time, event, np.asarray(risk, np.float64))
  return float(c[0] if isinstance(c, tuple) else c)


def test_helpers_match_rounded_numpy_products():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 7, 33)).astype(np.float32)
  b = rng.normal(size=(33, 5)).astype(np.float32)
  ref = _bf16_round(a) @ _bf16_round(b)
  got = core.matmul(jnp.asarray(a), jnp.asarray(b), "bfloat16")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
  # and it is not the float32 product
  assert np.abs(np.asarray(got) - a.astype(np.float64) @ b).max() > 1e-4
  got = core.einsum("bnd,de->bne", jnp.asarray(a), jnp.asarray(b), "bfloat16")
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
  lin = nnx.Linear(33, 5, rngs=nnx.Rngs(0))
  ref = _bf16_round(a) @ _bf16_round(lin.kernel[...]) + np.asarray(lin.bias[...], np.float64)
  np.testing.assert_allclose(np.asarray(core.linear(lin, jnp.asarray(a), "bfloat16")), ref,
                             rtol=1e-5, atol=1e-5)
  # float32 is the plain call, bit for bit
  np.testing.assert_array_equal(np.asarray(core.linear(lin, jnp.asarray(a))),
                                np.asarray(lin(jnp.asarray(a))))
  with pytest.raises(ValueError, match="precision must be one of"):
    core.matmul(jnp.asarray(a), jnp.asarray(b), "float16")


def test_ddim_bfloat16_samples_and_cindex_within_tolerance():
  dim = 64
  model = ConditionalDenoiser(dim, 2, 4, 2, 2, rngs=nnx.Rngs(0))
  model.out.kernel[...] = 0.05 * jax.random.normal(jax.random.key(1), (dim, dim))
  graphdef, state = nnx.split(model)
  schedule = linear_schedule(1000)
  cond = jax.random.normal(jax.random.key(2), (32, 2, dim))
  kw = dict(schedule=schedule, num_steps=10, num_samples=3)
  m32, s32 = make_sampler(graphdef, **kw)(state, cond, jax.random.key(3))
  m16, s16 = make_sampler(graphdef, precision="bfloat16", **kw)(state, cond, jax.random.key(3))
  s32, s16 = np.asarray(s32, np.float64), np.asarray(s16, np.float64)
  rel_rms = np.sqrt(np.mean((s32 - s16) ** 2) / np.mean(s32 ** 2))
  assert 0 < rel_rms < SAMPLE_RMS_TOL, rel_rms
  # A risk read from the sample means: the C-index moves by less than CINDEX_TOL.
  rng = np.random.default_rng(0)
  w = rng.normal(size=dim)
  r32, r16 = np.asarray(m32) @ w, np.asarray(m16) @ w
  time = rng.exponential(np.exp(-r32 / r32.std()))
  event = rng.random(32) < 0.7
  assert abs(_cindex(time, event, r32) - _cindex(time, event, r16)) < CINDEX_TOL
  with pytest.raises(ValueError, match="precision"):
    make_sampler(graphdef, precision="fp8", **kw)


@pytest.mark.parametrize("model", ["abmil", "transmil", "transmil_chunked"])
def test_mil_bfloat16_outputs_and_cindex_within_tolerance(model):
  n_pat, n, d_in = 32, 40, 24
  x = jax.random.normal(jax.random.key(4), (n_pat, n, d_in))
  mask = jnp.arange(n)[None] < jax.random.randint(jax.random.key(5), (n_pat, 1), 8, n + 1)
  if model == "abmil":
    mod = GatedABMIL(d_in, 16, rngs=nnx.Rngs(0))
  else:
    thr = 10 if model == "transmil_chunked" else None
    mod = TransMIL(d_in, 16, 2, 4, chunk_threshold=thr, chunk_size=8, rngs=nnx.Rngs(0))
    assert (mod.chunk_threshold == 10) == (model == "transmil_chunked")
  graphdef, state = nnx.split(mod)

  @jax.jit
  def both(state):
    m = nnx.merge(graphdef, state)
    outs = [m(x, mask, precision=p) for p in ("float32", "bfloat16")]
    return [o[0] if model == "abmil" else o[:, 0] for o in outs]

  outs = both(state)
  out = dict(zip(("float32", "bfloat16"), outs)).__getitem__
  o32, o16 = np.asarray(out("float32"), np.float64), np.asarray(out("bfloat16"), np.float64)
  diff = np.abs(o32 - o16).max()
  assert 0 < diff < MIL_REL_TOL * np.abs(o32).max(), (diff, np.abs(o32).max())
  rng = np.random.default_rng(1)
  w = rng.normal(size=o32.shape[-1])
  r32, r16 = o32 @ w, o16 @ w
  time = rng.exponential(np.exp(-r32 / r32.std()))
  event = rng.random(n_pat) < 0.7
  assert abs(_cindex(time, event, r32) - _cindex(time, event, r16)) < CINDEX_TOL
