r"""Hutchinson curvature estimates and Gradient Curvature Steering (PARACHUTE, eq. 9-10).

Pure functions of arrays and explicit PRNG keys. The loss is seen as a function of the
per-patient features ``f`` ``[B, D]`` (the fused representation, upstream of the hazard
network), with gradient ``g = dL/df`` and Hessian ``H = d^2L/df^2`` ``[B D, B D]``.

Curvature (Hutchinson, 1989) with Rademacher probes ``r ~ U{-1, +1}^{B x D}``:

.. math::

  c_b = \frac{1}{P} \sum_{p=1}^{P} \sum_{d} r^{(p)}_{bd} \, (H r^{(p)})_{bd},
  \qquad \mathbb{E}[c_b] = \mathrm{tr}(H_{bb}),

an unbiased estimate of the trace of patient ``b``'s diagonal ``D x D`` block of the
Hessian (the off-block terms vanish in expectation because the probes of different
patients are independent). One Hessian-vector product per probe serves every patient.
``H r`` is computed forward-over-reverse (``jax.linearize`` of ``jax.grad``, i.e. a
``jax.jvp`` of the gradient), vmapped over the probes. The paper's central difference
``(g(f + eps r) - g(f - eps r))^T r / (2 eps)`` is the same quantity up to ``O(eps^2)``;
the JVP is its ``eps -> 0`` limit, exact in floating point up to rounding.

Steering (eq. 10): with the gate

.. math::

  w_b = \sigma(a_1 c_b + a_2 \|g_b\| + a_3 m_b + c_0),

``m_b = 1`` when patient ``b`` misses a modality, the steered feature gradient is

.. math::

  \tilde g_b = (1 - w_b) g_b + w_b \frac{g_b}{1 + \gamma \max(c_b, 0)}
             = s_b \, g_b, \qquad s_b = 1 - w_b + \frac{w_b}{1 + \gamma \max(c_b, 0)}.

The paper writes ``1 + gamma c_b``; a Hutchinson estimate (and the true trace of a
non-convex loss) can be negative, where ``1 + gamma c_b`` crosses zero and the update
explodes or flips. We clamp the curvature at 0 in the denominator, so ``s_b`` lies in
``(0, 1]``: steering only ever damps a patient's gradient, and a step stays finite for any
curvature. Because ``g~_b`` is ``s_b g_b`` with ``s_b`` a function of the forward pass only,
the steered backward is one cotangent rescaling (`steer_cotangent`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


def rademacher_probes(key: jax.Array, num_probes: int, shape: tuple[int, ...],
                      dtype=jnp.float32) -> jax.Array:
  """``[num_probes, *shape]`` i.i.d. ``+-1`` entries."""
  return jax.random.rademacher(key, (num_probes,) + tuple(shape), dtype=dtype)


def hessian_vector_products(loss: Callable[[jax.Array], jax.Array], f: jax.Array,
                            probes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gradient and Hessian-vector products of ``loss`` at ``f``, forward-over-reverse.

  Args:
    loss: scalar function of ``f``.
    f: the point, any shape.
    probes: ``[P, *f.shape]`` tangent vectors ``v``.

  Returns:
    ``(grad, hvps)``: ``grad = dL/df`` like ``f`` and ``hvps[p] = H v_p``.
  """
  grad, hvp = jax.linearize(jax.grad(loss), f)   # jvp of grad, linearised once
  return grad, jax.vmap(hvp)(probes)


def hutchinson_rows(loss: Callable[[jax.Array], jax.Array], f: jax.Array, key: jax.Array,
                    num_probes: int = 4) -> tuple[jax.Array, jax.Array]:
  """Per-row Hutchinson curvature ``c_b`` (the module equation) and the gradient.

  Args:
    loss: scalar function of ``f`` ``[B, D]``.
    f: ``[B, D]`` per-patient features.
    key: PRNG key of the probes.
    num_probes: ``P``.

  Returns:
    ``(g, c)``: ``g = dL/df`` ``[B, D]`` and ``c`` ``[B]``, an unbiased estimate of the
    trace of each row's diagonal Hessian block.
  """
  probes = rademacher_probes(key, num_probes, f.shape, f.dtype)
  g, hv = hessian_vector_products(loss, f, probes)
  quad = jnp.sum(probes * hv, axis=tuple(range(2, hv.ndim)))   # [P, B]: r_b^T (H r)_b
  return g, jnp.mean(quad, axis=0)


def hutchinson_trace(loss: Callable[[jax.Array], jax.Array], f: jax.Array, key: jax.Array,
                     num_probes: int = 4) -> jax.Array:
  """Hutchinson estimate of ``tr(H)``: ``(1/P) sum_p r_p^T H r_p`` (the sum of `hutchinson_rows`)."""
  return jnp.sum(hutchinson_rows(loss, f, key, num_probes)[1])


@dataclasses.dataclass(frozen=True)
class GCSGate:
  """Constants of the GCS gate and damping (module equation).

  The paper does not say how ``a_1, a_2, a_3, c_0, gamma`` are set. In the public code
  the gate is an ``nn.Linear(3, 1)`` outside the optimiser and ``gamma`` a parameter that
  receives no gradient (the replaced cotangent does not flow back into it), so all five
  stay at their random initial values. No loss determines them: the Cox loss cannot
  (they only reshape its gradient, they are not in its forward graph). We therefore use
  documented fixed constants: a gate that leans on missing-modality patients (``a_3``)
  and on high curvature (``a_1``), with ``c_0 = 0``.

  Curvature and gradient norm enter the gate on the per-patient scale: they are measured
  on the Cox loss times its number of events (the sum over events rather than the mean),
  so the gate does not change with the batch size. ``s_b`` itself is scale-free.
  """

  a_curv: float = 1.0
  a_grad: float = 1.0
  a_missing: float = 1.0
  bias: float = 0.0
  gamma: float = 1.0


def gcs_gate(curvature: jax.Array, grad_norm: jax.Array, missing: jax.Array,
             gate: GCSGate) -> jax.Array:
  """``w_b = sigmoid(a_1 c_b + a_2 ||g_b|| + a_3 m_b + c_0)``, ``[B]``."""
  z = (gate.a_curv * curvature + gate.a_grad * grad_norm
       + gate.a_missing * missing.astype(curvature.dtype) + gate.bias)
  return jax.nn.sigmoid(z)


def gcs_scale(curvature: jax.Array, weight: jax.Array, gamma: float) -> jax.Array:
  """``s_b = 1 - w_b + w_b / (1 + gamma max(c_b, 0))`` in ``(0, 1]`` (``g~_b = s_b g_b``)."""
  return 1.0 - weight + weight / (1.0 + gamma * jnp.maximum(curvature, 0.0))


@jax.custom_vjp
def steer_cotangent(f: jax.Array, scale: jax.Array) -> jax.Array:
  """Identity on ``f`` ``[B, D]``; the backward multiplies row ``b`` of the cotangent by
  ``scale_b``. Nothing flows into ``scale`` (it is a statistic of the forward pass)."""
  return f


def _steer_fwd(f, scale):
  return f, scale


def _steer_bwd(scale, g):
  shape = (-1,) + (1,) * (g.ndim - 1)
  return g * scale.reshape(shape).astype(g.dtype), jnp.zeros_like(scale)


steer_cotangent.defvjp(_steer_fwd, _steer_bwd)
