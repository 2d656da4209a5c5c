"""Noise schedules for the latent diffusion models and the DDIM step subsequence.

The forward process (MUST eq. 17; Ho et al. 2020) adds Gaussian noise in ``T`` steps,

    q(z_t | z_{t-1}) = N(z_t; sqrt(1 - beta_t) z_{t-1}, beta_t I),

so that, with ``alpha_t = 1 - beta_t`` and ``abar_t = prod_{i<=t} alpha_i``,

    q(z_t | z_0) = N(z_t; sqrt(abar_t) z_0, (1 - abar_t) I).

The MUST paper gives neither the schedule nor ``T`` (it says "noise schedule beta_t" and
"50-step DDIM"); we use the usual DDPM defaults, a linear schedule with ``T = 1000``,
``beta_1 = 1e-4``, ``beta_T = 0.02``, and offer the cosine schedule as an alternative.

Timesteps are 0-based as in the DDPM and DDIM reference code: ``t = 0, ..., T - 1`` and
``alphas_cumprod[t] = prod_{i=0}^{t} (1 - betas[i])``; the "previous" product of the last
DDIM step (t = 0 -> clean data) is taken to be 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
  """A discrete noise schedule (a pytree of float32 arrays of shape ``[T]``).

  Attributes:
    betas: ``beta_t``, the variance added at step ``t``.
    alphas: ``alpha_t = 1 - beta_t``.
    alphas_cumprod: ``abar_t = prod_{i<=t} alpha_i``.
  """

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def num_timesteps(self) -> int:
    """``T``, the number of diffusion steps."""
    return int(self.betas.shape[-1])


def _from_betas(betas: np.ndarray) -> Schedule:
  betas = np.asarray(betas, np.float64)
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)  # products in float64, then one rounding
  return Schedule(
      betas=jnp.asarray(betas, jnp.float32),
      alphas=jnp.asarray(alphas, jnp.float32),
      alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def linear_schedule(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:  # noqa: N803
  """The linear schedule of DDPM (Ho et al. 2020), our default for MUST.

      beta_t = beta_start + (beta_end - beta_start) * t / (T - 1),   t = 0, ..., T - 1.

  MUST (Sec. 3.5, suppl. 7.2) gives neither the schedule nor ``T``; these are the usual
  DDPM defaults (``T = 1000``, ``1e-4 .. 0.02``), for which ``abar_{T-1} ~ 4e-5``.

  Args:
    T: number of diffusion steps.
    beta_start: ``beta_0``.
    beta_end: ``beta_{T-1}``.

  Returns:
    The `Schedule`.
  """
  if T < 2:
    raise ValueError(f"linear_schedule needs T >= 2, got {T}")
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
  return _from_betas(np.linspace(beta_start, beta_end, T, dtype=np.float64))


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:  # noqa: N803
  """The cosine schedule of Nichol & Dhariwal (2021, eq. 17).

      f(t) = cos^2( (t / T + s) / (1 + s) * pi / 2 ),   abar(t) = f(t) / f(0),
      beta_t = min(1 - abar(t + 1) / abar(t), max_beta),   t = 0, ..., T - 1,

  and ``alphas_cumprod`` is recomputed from the clipped betas. Not specified by MUST; an
  alternative to `linear_schedule`.

  Args:
    T: number of diffusion steps.
    s: small offset that keeps ``beta_0`` from being vanishingly small.
    max_beta: clip for the betas near ``t = T`` (0.999 in the reference code).

  Returns:
    The `Schedule`.
  """
  if T < 1:
    raise ValueError(f"cosine_schedule needs T >= 1, got {T}")
  steps = np.arange(T + 1, dtype=np.float64) / T
  f = np.cos((steps + s) / (1.0 + s) * np.pi / 2.0) ** 2
  abar = f / f[0]
  betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
  return _from_betas(betas)


def ddim_timesteps(T: int, num_steps: int) -> np.ndarray:  # noqa: N803
  """The evenly spaced DDIM subsequence ``tau`` (ascending), as in the DDIM reference code.

      tau_i = i * floor(T / num_steps),   i = 0, ..., num_steps - 1,

  which is ``range(0, T, T // num_steps)`` of the reference code (``skip_type="uniform"``)
  whenever ``num_steps`` divides ``T`` (e.g. T = 1000, 50 steps: 0, 20, ..., 980), and its
  first ``num_steps`` entries otherwise. ``num_steps = T`` gives every step (DDPM).

  Args:
    T: number of diffusion steps of the schedule.
    num_steps: number of sampling steps, ``1 <= num_steps <= T``.

  Returns:
    int32 array ``[num_steps]``; samplers walk it from the end to the start.
  """
  if not 1 <= num_steps <= T:
    raise ValueError(f"need 1 <= num_steps <= T, got num_steps={num_steps}, T={T}")
  return (np.arange(num_steps, dtype=np.int64) * (T // num_steps)).astype(np.int32)
