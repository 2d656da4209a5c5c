"""Orbax checkpoints behind three calls: latest, save, restore.

A checkpoint holds the full model state (as a pure dict), the optimiser state of the
stage in progress, and a small JSON record of where training stands (stage, epoch). Orbax
writes each step into a temporary directory and renames it when complete, so a run
killed at any point finds either the previous checkpoint or the new one, never a torn
one. Saving is synchronous: resume must not depend on a background thread that a SIGKILL
would cut.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Checkpoints of one training run (one fold) in ``directory``."""

  def __init__(self, directory, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))

  def latest(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, model_state: dict, opt_state, meta: dict, best=None) -> None:
    """``best``: optional pytree kept beside the state (the best epoch's parameters of a
    stage that selects its epoch on validation)."""
    items = {"model": model_state, "opt": {"state": opt_state}}
    if best is not None:
      items["best"] = best
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore_meta(self, step: int) -> dict:
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, step: int, model_template: dict, opt_template, best_template=None):
    """Restores into the structure (and shardings) of the templates: ``(model, opt)``, or
    ``(model, opt, best)`` when ``best_template`` is given."""
    items = {"model": model_template, "opt": {"state": opt_template}}
    if best_template is not None:
      items["best"] = best_template
    abstract = jax.tree.map(_abstract, items)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    state = out["state"]
    if best_template is not None:
      return state["model"], state["opt"]["state"], state["best"]
    return state["model"], state["opt"]["state"]

  def close(self):
    self._manager.close()


def _abstract(x):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, np.ndarray):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x
