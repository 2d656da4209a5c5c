"""Tests of survjax.diffusion: schedules, denoiser, loss and the DDIM sampler.

Statistical checks use a fixed seed and tolerances from the standard error (SE) of the
estimate, so they are deterministic and would fail for an off-by-one in the schedule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from survjax.diffusion.ddim import ddim_sample, make_sampler
from survjax.diffusion.denoiser import ConditionalDenoiser, denoising_loss, timestep_embedding
from survjax.diffusion.schedules import cosine_schedule, ddim_timesteps, linear_schedule

# ---------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_ddpm_defaults():
  sch = linear_schedule()
  betas = np.asarray(sch.betas, np.float64)
  assert sch.num_timesteps == 1000
  np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-4)
  np.testing.assert_allclose(sch.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
  assert 3e-5 < float(sch.alphas_cumprod[-1]) < 5e-5  # abar_T ~ exp(-sum beta)


def test_cosine_schedule():
  sch = cosine_schedule(T=1000)
  ab = np.asarray(sch.alphas_cumprod, np.float64)
  t = np.arange(1, 1001) / 1000
  f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(ab[:-1], f[:-1], rtol=1e-4, atol=1e-7)  # last beta is clipped
  assert np.all(np.diff(ab) < 0)
  np.testing.assert_allclose(float(sch.betas.max()), 0.999, rtol=1e-6)  # the clip


def test_ddim_timesteps():
  np.testing.assert_array_equal(ddim_timesteps(1000, 50), np.arange(0, 1000, 20))
  np.testing.assert_array_equal(ddim_timesteps(1000, 1000), np.arange(1000))
  assert len(ddim_timesteps(1000, 3)) == 3
  with pytest.raises(ValueError):
    ddim_timesteps(10, 11)


# ----------------------------------------------------------------------------- denoiser


def _small_denoiser(seed=0, random_out=True):
  model = ConditionalDenoiser(dim=16, num_layers=2, num_heads=2, mlp_ratio=2,
                              num_cond_tokens=2, rngs=nnx.Rngs(seed))
  if random_out:  # the zero read-out would make every eps 0
    key = jax.random.key(seed + 100)
    model.out.kernel[...] = 0.3 * jax.random.normal(key, model.out.kernel[...].shape)
  return model


@pytest.mark.parametrize("latent_dim", [None, 8])
def test_zero_initialised_output_gives_zero_eps(latent_dim):
  """Also with a latent narrower than the tokens (in/out projections, MUST's k = 8)."""
  model = ConditionalDenoiser(dim=32, num_layers=2, num_heads=4, latent_dim=latent_dim,
                              rngs=nnx.Rngs(0))
  width = latent_dim or 32
  graphdef, state = nnx.split(model)
  z = jax.random.normal(jax.random.key(1), (3, width))
  t = jnp.array([0, 10, 999])
  cond = jax.random.normal(jax.random.key(2), (3, 2, 32))
  apply = jax.jit(lambda st: nnx.merge(graphdef, st)(z, t, cond))
  eps = apply(state)
  assert eps.shape == (3, width)
  np.testing.assert_array_equal(eps, 0.0)
  # ... and the read-out still receives a gradient, so training can move it.
  grads = jax.jit(jax.grad(lambda st: jnp.sum(z * apply(st))))(state)
  assert float(jnp.abs(grads["out"]["kernel"][...]).max()) > 0
  with pytest.raises(ValueError):
    model(z, jnp.zeros(3, jnp.int32), cond[:, :1])
  with pytest.raises(ValueError):
    model(jnp.zeros((3, width + 1)), jnp.zeros(3, jnp.int32), cond)


def test_last_layer_trim_is_exact():
  """The denoiser computes only the z position in its last layer; check against full."""
  model = _small_denoiser()
  z = jax.random.normal(jax.random.key(1), (4, 16))
  t = jnp.array([0, 5, 500, 999])
  cond = jax.random.normal(jax.random.key(2), (4, 2, 16))
  graphdef, state = nnx.split(model)

  def full(st):  # every layer over every position
    m = nnx.merge(graphdef, st)
    temb = m.time_fc2(jax.nn.silu(m.time_fc1(timestep_embedding(t, 16))))
    x = jnp.concatenate([(z + temb)[:, None], cond + m.type_embed[...][None]], axis=1)
    for layer in m.layers:
      x = layer(x)
    return m.out(m.ln_out(x[:, 0]))

  trimmed = jax.jit(lambda st: nnx.merge(graphdef, st)(z, t, cond))(state)
  np.testing.assert_allclose(trimmed, jax.jit(full)(state), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- (a) scan == reference


def _ddim_sample_reference(
    eps_fn,
    cond: jax.Array,
    key: jax.Array,
    schedule,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    num_samples: int = 5,
    dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Slow step-by-step DDIM, one sample at a time: the test oracle for `ddim_sample`.

  A plain Python loop written from the textbook update (no precomputed coefficients,
  float64 arithmetic around ``eps_fn``), with the same noise contract as `ddim_sample`
  (see the docstring of `survjax.diffusion.ddim`).

  Args:
    eps_fn: ``(z [1, D], t int32[1], cond [1, ...]) -> eps [1, D]``.
    cond: condition array ``[B, ...]``.
    key: PRNG key.
    schedule: the noise schedule (`survjax.diffusion.schedules.Schedule`).
    num_steps: DDIM steps.
    eta: DDIM stochasticity.
    num_samples: samples per patient.
    dim: latent width; defaults to ``cond.shape[-1]``.

  Returns:
    ``(mean [B, D], samples [B, S, D])`` as float64 numpy arrays.
  """
  b = cond.shape[0]
  dim = cond.shape[-1] if dim is None else dim
  T = schedule.num_timesteps  # noqa: N806
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  skip = T // num_steps
  seq = list(range(0, T, skip))[:num_steps]
  k_init, k_steps = jax.random.split(key)
  z_init = np.asarray(jax.random.normal(k_init, (b, num_samples, dim)), np.float64)
  step_noise = [
      np.asarray(jax.random.normal(jax.random.fold_in(k_steps, i), (b, num_samples, dim)),
                 np.float64)
      for i in range(num_steps)] if eta > 0 else None
  out = np.zeros((b, num_samples, dim))
  for p in range(b):
    for s in range(num_samples):
      z = z_init[p, s]
      for i, t in enumerate(reversed(seq)):
        t_prev = t - skip
        a_t = abar[t]
        a_prev = abar[t_prev] if t_prev >= 0 else 1.0
        eps = np.asarray(eps_fn(
            jnp.asarray(z[None], jnp.float32), jnp.array([t], jnp.int32), cond[p:p + 1]),
            np.float64)[0]
        z0_hat = (z - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
        sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        z = (np.sqrt(a_prev) * z0_hat
             + np.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps)
        if eta > 0:
          z = z + sigma * step_noise[i][p, s]
      out[p, s] = z
  return out.mean(axis=1), out


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_scan_sampler_matches_reference_loop(eta):
  model = _small_denoiser()
  graphdef, state = nnx.split(model)
  sch = linear_schedule(T=100)
  cond = jax.random.normal(jax.random.key(2), (2, 2, 16))
  key = jax.random.key(3)
  sampler = make_sampler(graphdef, schedule=sch, num_steps=10, eta=eta, num_samples=3)
  mean, samples = sampler(state, cond, key)
  eps_fn = jax.jit(lambda z, t, c: nnx.merge(graphdef, state)(z, t, c))
  ref_mean, ref_samples = _ddim_sample_reference(
      eps_fn, cond, key, sch, num_steps=10, eta=eta, num_samples=3)
  assert samples.shape == (2, 3, 16) and mean.shape == (2, 16)
  assert np.abs(ref_samples).max() > 1.0  # a non-trivial trajectory
  np.testing.assert_allclose(samples, ref_samples, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
  # Passing z_T explicitly (donated) is the same as drawing it from the key.
  z_init = jax.random.normal(jax.random.split(key)[0], (2, 3, 16))
  _, samples2 = sampler(state, cond, key, z_init)
  np.testing.assert_allclose(samples2, samples, rtol=1e-6, atol=1e-6)


def test_x0_clipping_bounds_each_step_and_is_inert_when_loose():
  """clip_x0: a loose bound gives the plain DDIM update; a tight one keeps every predicted
  clean latent, hence the final sample (abar_prev = 1 at the last step), inside it."""
  model = _small_denoiser()
  graphdef, state = nnx.split(model)
  den = nnx.merge(graphdef, state)
  sch = linear_schedule(T=100)
  cond = jax.random.normal(jax.random.key(2), (2, 2, 16))
  key = jax.random.key(3)
  plain, _ = ddim_sample(den, cond, key, sch, num_steps=10, num_samples=3)
  loose, _ = ddim_sample(den, cond, key, sch, num_steps=10, num_samples=3, clip_x0=1e6)
  np.testing.assert_allclose(loose, plain, rtol=1e-4, atol=1e-4)
  _, tight = ddim_sample(den, cond, key, sch, num_steps=10, num_samples=3, clip_x0=0.5)
  assert np.abs(np.asarray(tight)).max() <= 0.5 + 1e-5
  assert np.abs(np.asarray(plain)).max() > 0.5


@pytest.mark.parametrize("option", [{"chunk_rows": 4}, {"chunk_rows": 9},
                                    {"chunk_rows": 100}, {"unroll": 2}, {"unroll": True}])
def test_chunked_or_unrolled_sampler_gives_the_same_samples(option):
  """Chunking the rows (9 = 3 patients x 3 samples; 4 needs padding) or unrolling the step
  loop (2 does not divide the 5 steps; True: all of them) changes nothing."""
  model = _small_denoiser()
  sch = linear_schedule(T=50)
  cond = jax.random.normal(jax.random.key(2), (3, 2, 16))
  run = lambda **kw: jax.jit(lambda k: ddim_sample(  # noqa: E731
      model, cond, k, sch, num_steps=5, eta=0.7, num_samples=3, **kw))(jax.random.key(4))
  mean, samples = run(**option)
  ref_mean, ref_samples = run()
  np.testing.assert_allclose(samples, ref_samples, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ (b) Gaussian toys

MU, S = 1.5, 0.5


def _exact_eps(schedule):
  """eps*(z_t, t) = E[eps | z_t] for z_0 ~ N(mu, s^2), mu given per row by ``cond``."""
  ab_all = schedule.alphas_cumprod

  def eps_fn(z, t, mu):
    ab = ab_all[t][:, None]
    return jnp.sqrt(1 - ab) * (z - jnp.sqrt(ab) * mu) / (ab * S**2 + 1 - ab)

  return eps_fn


def _exact_moments(schedule, num_steps, eta, mu):
  """Mean and std of the sampler's output for the toy, by exact moment propagation.

  With eps* affine in z, a DDIM step is z' = a z + b + sigma n, so
  m' = a m + b and v' = a^2 v + sigma^2, starting from z_T ~ N(0, 1). Written from the
  textbook form of the step, independently of the sampler.
  """
  ab = np.asarray(schedule.alphas_cumprod, np.float64)
  seq = ddim_timesteps(schedule.num_timesteps, num_steps)
  m, v = 0.0, 1.0
  for j in range(num_steps - 1, -1, -1):
    a_t, a_p = ab[seq[j]], (ab[seq[j - 1]] if j > 0 else 1.0)
    g = np.sqrt(1 - a_t) / (a_t * S**2 + 1 - a_t)  # eps* = g (z - sqrt(a_t) mu)
    sig = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    # z' = sqrt(a_p) (z - sqrt(1-a_t) eps*) / sqrt(a_t) + sqrt(1 - a_p - sig^2) eps* + sig n
    ce = np.sqrt(max(1 - a_p - sig**2, 0.0)) - np.sqrt(a_p) * np.sqrt(1 - a_t) / np.sqrt(a_t)
    a = np.sqrt(a_p / a_t) + ce * g
    b = -ce * g * np.sqrt(a_t) * mu
    m, v = a * m + b, a * a * v + sig**2
  return m, np.sqrt(v)


def _check_moments(x, mu, num_steps, eta, schedule, *, discretisation_tol):
  n = x.size
  se_mean, se_std = S / np.sqrt(n), S / np.sqrt(2 * n)
  exact_m, exact_s = _exact_moments(schedule, num_steps, eta, mu)
  # The discrete sampler targets N(mu, s^2) up to its discretisation error (and the
  # z_T ~ N(0, 1) vs N(sqrt(abar_T) mu, .) mismatch, which grows with |mu|) ...
  scale = max(S, abs(mu))
  assert abs(exact_m - mu) < discretisation_tol * scale
  assert abs(exact_s - S) < discretisation_tol * scale
  # ... and the implementation reproduces its exact output law within 4.5 SE.
  assert abs(x.mean() - exact_m) < 4.5 * se_mean, (x.mean(), exact_m, se_mean)
  assert abs(x.std() - exact_s) < 4.5 * se_std, (x.std(), exact_s, se_std)
  # In plain terms: mean mu and std s within 4.5 SE plus the discretisation error.
  assert abs(x.mean() - mu) < 4.5 * se_mean + abs(exact_m - mu)
  assert abs(x.std() - S) < 4.5 * se_std + abs(exact_s - S)


@pytest.mark.parametrize("num_steps,eta,disc_tol", [
    (1000, 1.0, 0.01),  # DDPM ancestral sampling
    (1000, 0.0, 0.01),  # deterministic DDIM, fine steps
    (50, 0.0, 0.06),    # MUST's setting: 50 DDIM steps
])
def test_gaussian_toy_recovers_data_distribution(num_steps, eta, disc_tol):
  sch = linear_schedule()
  eps = _exact_eps(sch)
  n = 20_000
  run = jax.jit(lambda key: ddim_sample(
      lambda z, t, c: eps(z, t, MU), jnp.zeros((1, 1)), key, sch,
      num_steps=num_steps, eta=eta, num_samples=n)[1])
  x = np.asarray(run(jax.random.key(11)), np.float64)
  assert x.shape == (1, n, 1)
  _check_moments(x, MU, num_steps, eta, sch, discretisation_tol=disc_tol)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_conditional_gaussian_toy_per_condition(eta):
  """z_0 | c ~ N(a c, s^2): the per-patient samples follow their own condition."""
  a = 1.5
  conds = np.array([-1.0, 0.5, 2.0])
  sch = linear_schedule()
  eps = _exact_eps(sch)
  n = 20_000
  run = jax.jit(lambda key: ddim_sample(
      lambda z, t, c: eps(z, t, a * c), jnp.asarray(conds)[:, None], key, sch,
      num_steps=1000, eta=eta, num_samples=n))
  mean, x = run(jax.random.key(12))
  x = np.asarray(x, np.float64)
  assert x.shape == (3, n, 1)
  np.testing.assert_allclose(mean[:, 0], x.mean(axis=(1, 2)), rtol=1e-5)
  for i, c in enumerate(conds):
    _check_moments(x[i], a * c, 1000, eta, sch, discretisation_tol=0.01)


# -------------------------------------------------------------------- (c) compile once


class _CountingDenoiser(ConditionalDenoiser):
  traces = 0

  def __call__(self, z, t, cond):
    type(self).traces += 1  # Python side effect: runs only while tracing
    return super().__call__(z, t, cond)


def test_sampler_compiles_once_per_signature():
  _CountingDenoiser.traces = 0
  model = _CountingDenoiser(dim=16, num_layers=1, num_heads=2, mlp_ratio=2,
                            rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  sampler = make_sampler(graphdef, schedule=linear_schedule(100), num_steps=5,
                         eta=0.5, num_samples=2)
  cond = jnp.ones((3, 2, 16))
  for i in range(4):
    state = jax.tree.map(lambda p: p + 0.01, state)  # new weights, same shapes
    mean, _ = sampler(state, cond * i, jax.random.key(i))
    mean.block_until_ready()
  assert _CountingDenoiser.traces == 1  # one trace of the denoiser for 4 calls (scan body)
  sampler(state, jnp.ones((5, 2, 16)), jax.random.key(0))  # a new batch size
  sampler(state, jnp.ones((5, 2, 16)), jax.random.key(1))
  assert _CountingDenoiser.traces == 2


# ------------------------------------------------------------- (d) loss at the optimum


def test_denoising_loss_is_minimised_by_exact_predictor():
  """L(eps*) = E_t[abar s^2 / (abar s^2 + 1 - abar)] (the residual variance of E[eps|z_t])."""
  sch = linear_schedule()
  eps = _exact_eps(sch)
  n = 200_000
  z0 = MU + S * jax.random.normal(jax.random.key(0), (n, 1))
  key = jax.random.key(1)
  loss = lambda f: float(denoising_loss(f, z0, None, key, sch))  # noqa: E731
  exact = lambda z, t, c: eps(z, t, MU)  # noqa: E731
  ab = np.asarray(sch.alphas_cumprod, np.float64)
  v = ab * S**2 / (ab * S**2 + 1 - ab)  # Var(eps | z_t), per t
  expected = v.mean()
  se = np.sqrt((3 * (v**2).mean() - expected**2) / n)  # r ~ N(0, v_t): E r^4 = 3 v_t^2
  got = loss(exact)
  assert abs(got - expected) < 4 * se, (got, expected, se)
  # Any other predictor does worse on the same draws.
  for other in (lambda z, t, c: 1.1 * exact(z, t, c), lambda z, t, c: 0.9 * exact(z, t, c),
                lambda z, t, c: exact(z, t, c) + 0.1, lambda z, t, c: jnp.zeros_like(z)):
    assert loss(other) > got + 1e-3
  # The trivial predictor eps = 0 has loss E||eps||^2 = 1 per dimension.
  assert abs(loss(lambda z, t, c: jnp.zeros_like(z)) - 1.0) < 4 * np.sqrt(2 / n)


def test_denoising_loss_trains_the_denoiser_module():
  """The loss is differentiable through the NNX module (functional split/merge)."""
  model = _small_denoiser(random_out=False)
  graphdef, state = nnx.split(model)
  z0 = jax.random.normal(jax.random.key(0), (8, 16))
  cond = jax.random.normal(jax.random.key(1), (8, 2, 16))
  sch = linear_schedule(100)
  f = jax.jit(jax.value_and_grad(
      lambda st: denoising_loss(nnx.merge(graphdef, st), z0, cond, jax.random.key(2), sch)))
  val, grads = f(state)
  assert np.isfinite(float(val))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
