"""The fused Pallas DDIM loop (interpret mode on the CPU) against the XLA sampler.

Reference: `ddim_sample` with the same denoiser, condition and key (the XLA path, itself
tested step by step against a slow oracle in tests/test_diffusion.py). Tolerance: the
same samples to 1e-5 relative to their largest magnitude (the kernel sums attention in
another order; measured about 1e-7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from survjax.diffusion import ddim
from survjax.diffusion.denoiser import ConditionalDenoiser
from survjax.diffusion.pallas_ddim import ddim_sample_pallas, pallas_applies
from survjax.diffusion.schedules import linear_schedule

DIM = 32


@pytest.fixture(scope="module")
def denoiser():
  model = ConditionalDenoiser(DIM, 2, 4, 2, 2, rngs=nnx.Rngs(0))
  model.out.kernel[...] = 0.05 * jax.random.normal(jax.random.key(1), (DIM, DIM))
  return nnx.split(model)


@pytest.mark.parametrize("clip_x0", [None, 3.0])
def test_pallas_loop_equals_xla_sampler(denoiser, clip_x0):
  graphdef, state = denoiser
  schedule = linear_schedule(1000)
  cond = jax.random.normal(jax.random.key(2), (3, 2, DIM))
  kw = dict(num_steps=8, num_samples=5, clip_x0=clip_x0)

  @jax.jit
  def both(state, cond):
    model = nnx.merge(graphdef, state)
    return (ddim.ddim_sample(model, cond, jax.random.key(3), schedule, **kw),
            ddim_sample_pallas(model, cond, jax.random.key(3), schedule, interpret=True, **kw))

  (m_x, s_x), (m_p, s_p) = both(state, cond)
  s_x, s_p = np.asarray(s_x), np.asarray(s_p)
  assert s_p.shape == s_x.shape == (3, 5, DIM)
  scale = np.abs(s_x).max()
  assert scale > 1.0  # non-trivial samples
  np.testing.assert_allclose(s_p, s_x, rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(np.asarray(m_p), np.asarray(m_x), rtol=0, atol=1e-5 * scale)


def test_make_sampler_kernel_option(denoiser):
  graphdef, state = denoiser
  schedule = linear_schedule(1000)
  cond = jax.random.normal(jax.random.key(4), (2, 2, DIM))
  kw = dict(schedule=schedule, num_steps=4, num_samples=3)
  _, s_x = ddim.make_sampler(graphdef, **kw)(state, cond, jax.random.key(5))
  _, s_p = ddim.make_sampler(graphdef, kernel="pallas", **kw)(state, cond, jax.random.key(5))
  scale = float(jnp.abs(s_x).max())
  np.testing.assert_allclose(np.asarray(s_p), np.asarray(s_x), rtol=0, atol=1e-5 * scale)
  with pytest.raises(ValueError, match="kernel must be"):
    ddim.make_sampler(graphdef, kernel="triton", **kw)
  with pytest.raises(ValueError, match="float32 only"):
    ddim.make_sampler(graphdef, kernel="pallas", precision="bfloat16", **kw)


def test_pallas_applies_only_where_implemented(denoiser):
  graphdef, state = denoiser
  model = nnx.merge(graphdef, state)
  cond = jnp.zeros((1, 2, DIM))
  assert pallas_applies(model, cond, 0.0) is None
  assert "eta" in pallas_applies(model, cond, 1.0)
  narrow = ConditionalDenoiser(DIM, 1, 4, 2, 2, latent_dim=8, rngs=nnx.Rngs(0))
  assert "in_proj" in pallas_applies(narrow, cond, 0.0)
  assert "ConditionalDenoiser" in pallas_applies(lambda z, t, c: z, cond, 0.0)
  with pytest.raises(ValueError, match="does not apply"):
    ddim_sample_pallas(model, cond, jax.random.key(0), linear_schedule(100), eta=0.5,
                       num_steps=2)
