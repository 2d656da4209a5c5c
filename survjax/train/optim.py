r"""The optimiser every method builds its stages from: AdamW with optional clipping,
a learning-rate schedule and gradient accumulation.

.. math::

  g \leftarrow g \cdot \min(1, c / \|g\|_2), \qquad
  \theta \leftarrow \theta - \eta_t \big(\mathrm{Adam}(g) + \lambda \theta\big)

with ``c`` = ``grad_clip`` (no clipping when 0) and ``eta_t`` the schedule. Methods pass
what they read from their own config section; the core reads nothing from it.
"""

from __future__ import annotations

from typing import Any, Callable

import optax


def lr_schedule(lr: float, schedule: str = "constant", *, total_steps: int = 0,
                warmup_steps: int = 0, end_fraction: float = 0.0):
  """A float (``constant``, no warm-up) or an optax schedule.

  Args:
    lr: peak learning rate.
    schedule: ``"constant"`` or ``"cosine"`` (decays to ``end_fraction * lr`` at
      ``total_steps``).
    total_steps: optimiser steps of the whole stage (cosine only).
    warmup_steps: linear warm-up from 0 to ``lr`` first.
  """
  if schedule == "constant":
    if not warmup_steps:
      return lr
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
        [warmup_steps])
  if schedule == "cosine":
    if total_steps <= 0:
      raise ValueError("a cosine schedule needs total_steps > 0")
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else lr, lr, warmup_steps, max(total_steps, warmup_steps + 1),
        end_value=end_fraction * lr)
  raise ValueError(f"unknown schedule {schedule!r}, expected 'constant' or 'cosine'")


def make_optimizer(lr: float | Callable, weight_decay: float = 0.0, grad_clip: float = 0.0,
                   accumulate: int = 1, schedule: str = "constant", *, total_steps: int = 0,
                   warmup_steps: int = 0, decay_mask: Any = None
                   ) -> optax.GradientTransformation:
  """AdamW, clipped by global norm when ``grad_clip > 0``, accumulated over ``accumulate``
  steps (`optax.MultiSteps`) when ``accumulate > 1``.

  Args:
    lr: learning rate, or an optax schedule (then ``schedule`` is ignored).
    weight_decay: decoupled weight decay.
    grad_clip: global-norm clip (0 = none).
    accumulate: micro-batches per update.
    schedule, total_steps, warmup_steps: see `lr_schedule`; the steps count micro-batches
      (the schedule runs over ``ceil(total_steps / accumulate)`` updates).
    decay_mask: optax ``mask`` of the parameters that weight decay applies to (e.g. not
      norms and biases), or None for all.
  """
  if not callable(lr):
    # total_steps and warmup_steps count micro-batches; the schedule inside MultiSteps
    # advances once per update, i.e. every `accumulate` micro-batches.
    per_update = lambda n: -(-n // accumulate)
    lr = lr_schedule(lr, schedule, total_steps=per_update(total_steps),
                     warmup_steps=per_update(warmup_steps))
  tx = optax.adamw(lr, weight_decay=weight_decay, mask=decay_mask)
  if grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return optax.MultiSteps(tx, accumulate) if accumulate > 1 else tx


def matrices_only(params) -> Any:
  """Decay mask: weight decay on parameters of rank >= 2 only (not norms, biases, 1-d)."""
  import jax
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)
