"""The generic trainer: stages of pure, jitted steps over ``(graphdef, state)``.

Each stage splits the NNX model once into ``graphdef``, the trainable state (the stage's
filter) and the frozen rest. The step is a plain `jax.jit` of a pure function

    (trainable, opt_state, rest, batch, key) -> (trainable', opt_state', loss, metrics)

with ``trainable`` and ``opt_state`` donated (after the call the returned state is the
only live copy). The jitted functions are built once per run, with the graphdef as a
static argument, so a whole cross-validation compiles a step once per stage and bucket,
not once per fold; `Trainer.traces` counts the traces so tests can hold it to that.

Keys are folded from (seed, fold, stage, epoch, step) and the data order from the same
tuple, so a run restored from the checkpoint of epoch ``e`` replays epoch ``e + 1``
exactly as an uninterrupted run would.

Feature stages (MUST's latent diffusion) first map the training patients through the
frozen model once, then run their optimiser steps as one `jax.lax.scan` per chunk over
random minibatches of the cached features: no Python loop per step.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from survjax.checkpoint import Checkpointer
from survjax.data.batching import BatchSpec, iterate_batches, num_batches
from survjax.io import atomic_write_text
from survjax.method import Method, Stage
from survjax.train import sharding


class TrainingDiverged(RuntimeError):
  """Raised when a loss becomes NaN or inf; the message names step, fold and checkpoint."""


@dataclasses.dataclass
class MetricsLog:
  """Append-only JSONL metrics (one object per epoch); optional TensorBoard mirror."""

  path: Path | None
  tensorboard_dir: Path | None = None

  def __post_init__(self):
    self._tb = None
    if self.tensorboard_dir is not None and jax.process_index() == 0:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(self.tensorboard_dir))
      except ImportError:
        self._tb = None

  def rewind(self, keep) -> None:
    """Drops the records for which ``keep(record)`` is false (atomically).

    A run killed between two checkpoints has logged epochs its resumed run replays;
    the trainer rewinds the log to the checkpoint so each epoch appears once.
    """
    if self.path is None or jax.process_index() != 0 or not self.path.exists():
      return
    with open(self.path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if keep(r)]
    if len(kept) == len(records):
      return
    atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

  def write(self, record: dict, step: int | None = None) -> None:
    if self.path is None or jax.process_index() != 0:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None and step is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ("epoch", "fold"):
          self._tb.add_scalar(f"{record.get('stage', 'train')}/{k}", v, step)


def _split(model, stage: Stage):
  return nnx.split(model, stage.trainable, ...)


def _state_dict(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model))


class Trainer:
  """Runs a method's stages for one fold at a time; reuse one Trainer across folds.

  Args:
    method: the method (its stages are fixed at construction).
    mesh: device mesh for data parallelism.
    batch_size: patients per batch-stage step (rounded up to the device count).
    max_instances: per-bag instance cap during training (None = whole bags).
    seed: run seed.
    progress: show a progress bar.
    checkpoint_every_s: save a checkpoint after an epoch once this many seconds have
      passed since the last save, and always after a stage's last epoch (0: after every
      epoch). A killed run resumes from the last save and, since every epoch's data order
      and keys derive from (seed, fold, stage, epoch), reaches the same result whichever
      epoch that was; saving MUST's 100 MB state after each 2-second epoch took a third
      of its training time.
  """

  def __init__(self, method: Method, *, mesh, batch_size: int, max_instances: int | None,
               seed: int = 0, progress: bool = True, buckets=None,
               checkpoint_every_s: float = 0.0):
    self.method = method
    self.checkpoint_every_s = float(checkpoint_every_s)
    self.stages = method.stages()
    self.mesh = mesh
    self.spec = BatchSpec(batch_size=sharding.round_up_batch(batch_size, mesh),
                          max_instances=max_instances,
                          **({} if buckets is None else {"buckets": tuple(buckets)}))
    self.seed = seed
    self.progress = progress and jax.process_index() == 0
    self.traces = collections.Counter()
    self._steps = [self._make_step(i, s) for i, s in enumerate(self.stages)]
    self._chunks = [self._make_chunk(i, s) if s.features else None
                    for i, s in enumerate(self.stages)]
    # Stages that share a features function (MUST's two LDM stages) share its jit, so
    # it compiles once per run.
    shared = {}
    self._feature_fns = []
    for s in self.stages:
      if s.features is None:
        self._feature_fns.append(None)
        continue
      ident = (getattr(s.features, "__func__", s.features), id(getattr(s.features, "__self__", None)))
      if ident not in shared:
        shared[ident] = jax.jit(self._features_fn(s), static_argnums=0)
      self._feature_fns.append(shared[ident])

  # ---- jitted pure functions (built once per run) -------------------------------------

  def _make_step(self, index: int, stage: Stage):
    tx = stage.optimizer

    def step(graphdef, trainable, opt_state, rest, batch, key):
      self.traces[f"step:{stage.name}"] += 1

      def loss_of(tr):
        return stage.loss_fn(nnx.merge(graphdef, tr, rest), batch, key)

      (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      trainable = optax.apply_updates(trainable, updates)
      return trainable, opt_state, loss, metrics

    return jax.jit(step, static_argnums=0, donate_argnums=(1, 2))

  def _make_chunk(self, index: int, stage: Stage):
    tx = stage.optimizer
    steps, bs = stage.steps_per_epoch, stage.batch_size

    def chunk(graphdef, trainable, opt_state, rest, feats, key):
      self.traces[f"chunk:{stage.name}"] += 1
      n = jax.tree.leaves(feats)[0].shape[0]

      def body(carry, k):
        tr, os = carry
        k_idx, k_loss = jax.random.split(k)
        rows = jax.random.randint(k_idx, (bs,), 0, n)
        mb = jax.tree.map(lambda a: a[rows], feats)
        mb["valid"] = jnp.ones((bs,), bool)

        def loss_of(t):
          return stage.loss_fn(nnx.merge(graphdef, t, rest), mb, k_loss)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(tr)
        updates, os = tx.update(grads, os, tr)
        return (optax.apply_updates(tr, updates), os), (loss, metrics)

      (trainable, opt_state), (losses, metrics) = jax.lax.scan(
          body, (trainable, opt_state), jax.random.split(key, steps))
      return trainable, opt_state, losses, metrics

    return jax.jit(chunk, static_argnums=0, donate_argnums=(1, 2))

  def _features_fn(self, stage: Stage):
    def features(graphdef, state, batch):
      self.traces[f"features:{stage.name}"] += 1  # the first stage of those sharing it
      return stage.features(nnx.merge(graphdef, state), batch)
    return features

  # ---- the loop -----------------------------------------------------------------------

  def _key(self, fold, stage_idx, epoch):
    key = jax.random.key(self.seed)
    for v in (fold, stage_idx, epoch):
      key = jax.random.fold_in(key, v)
    return key

  def fit(self, model: nnx.Module, cohort, train_idx, *, bins=None, fold: int = 0,
          checkpointer: Checkpointer | None = None, log: MetricsLog | None = None) -> nnx.Module:
    """Trains ``model`` in place through every stage, resuming from ``checkpointer``."""
    log = log or MetricsLog(None)
    model_state = sharding.replicate(nnx.state(model), self.mesh)
    nnx.update(model, model_state)
    resume = None
    if checkpointer is not None and checkpointer.latest() is not None:
      step = checkpointer.latest()
      resume = {"step": step, **checkpointer.restore_meta(step)}
    # Epochs logged after the last checkpoint (or with none) are about to be replayed.
    order = {stage.name: i for i, stage in enumerate(self.stages)}
    done = (resume["stage"], resume["epoch"]) if resume is not None else (-1, -1)
    log.rewind(lambda r: r.get("fold") != fold
               or (order.get(r.get("stage"), len(order)), r.get("epoch", 0)) <= done)
    global_step = 0
    last_save = time.monotonic()
    for s_idx, stage in enumerate(self.stages):
      first_epoch = 0
      graphdef, trainable, rest = _split(model, stage)
      opt_state = sharding.replicate(stage.optimizer.init(trainable), self.mesh)
      if resume is not None and resume["stage"] > s_idx:
        global_step += stage.epochs  # finished before the checkpoint; restored further on
        continue
      if resume is not None and resume["stage"] == s_idx:
        opt_state = self._restore(model, checkpointer, resume["step"], opt_state, stage)
        if resume["epoch"] + 1 >= stage.epochs:  # the checkpoint closed this stage
          global_step += stage.epochs
          resume = None
          continue
        graphdef, trainable, rest = _split(model, stage)
        first_epoch = resume["epoch"] + 1
      patients = np.asarray(train_idx)
      if stage.patients == "complete":
        need = stage.requires or self.method.modalities
        patients = patients[cohort.complete(need)[patients]]
      if stage.features is not None:
        feats = self._cache_features(s_idx, model, cohort, patients, bins)
        if stage.prepare is not None:
          # Deterministic in the cached features, so a resumed run sets the same values.
          stage.prepare(model, feats)
          # prepare() may leave host-placed arrays: re-place them like the rest of the
          # state, or the next jitted call would see new input shardings and recompile.
          nnx.update(model, sharding.replicate(nnx.state(model), self.mesh))
          graphdef, trainable, rest = _split(model, stage)
      bar = tqdm(total=stage.epochs, initial=first_epoch, desc=f"fold {fold} {stage.name}",
                 disable=not self.progress, leave=False, unit="ep")
      for epoch in range(first_epoch, stage.epochs):
        t0 = time.perf_counter()
        key = self._key(fold, s_idx, epoch)
        if stage.features is None:
          trainable, opt_state, losses, metrics = self._batch_epoch(
              s_idx, graphdef, trainable, opt_state, rest, cohort, patients, bins, key,
              fold, epoch)
        else:
          trainable, opt_state, losses, metrics = self._chunks[s_idx](
              graphdef, trainable, opt_state, rest, feats, key)
          losses = np.asarray(losses)
          metrics = jax.tree.map(np.asarray, metrics)
        nnx.update(model, trainable)
        record = {"fold": fold, "stage": stage.name, "epoch": epoch,
                  "loss": float(np.mean(losses)),
                  **{k: float(np.mean(v)) for k, v in metrics.items()},
                  "seconds": round(time.perf_counter() - t0, 3)}
        if not np.all(np.isfinite(losses)):
          bad = int(np.argmax(~np.isfinite(losses)))
          last = checkpointer.latest() if checkpointer is not None else None
          where = (f"{checkpointer.directory}/{last}" if last is not None else "none")
          raise TrainingDiverged(
              f"loss became {losses[bad]} at fold {fold}, stage {stage.name!r}, epoch {epoch}, "
              f"step {bad}; last good checkpoint: {where}")
        log.write(record, step=global_step + epoch)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        bar.update(1)
        due = (epoch + 1 == stage.epochs
               or time.monotonic() - last_save >= self.checkpoint_every_s)
        if checkpointer is not None and due:
          checkpointer.save(global_step + epoch + 1, _state_dict(model), opt_state,
                            {"stage": s_idx, "epoch": epoch, "stage_name": stage.name,
                             "fold": fold})
          last_save = time.monotonic()
      bar.close()
      global_step += stage.epochs
      resume = None
    return model

  def _restore(self, model, checkpointer, step, opt_template, stage):
    model_state, opt_state = checkpointer.restore(step, _state_dict(model), opt_template)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, model_state)
    nnx.update(model, sharding.replicate(state, self.mesh))
    return sharding.replicate(opt_state, self.mesh)

  def _batch_epoch(self, s_idx, graphdef, trainable, opt_state, rest, cohort, patients, bins,
                   key, fold, epoch):
    order_rng = np.random.default_rng([self.seed, fold, s_idx, epoch])
    sample_rng = np.random.default_rng([self.seed, fold, s_idx, epoch, 1])
    losses, metrics = [], []
    for i, batch in enumerate(iterate_batches(cohort, patients, self.spec, bins=bins,
                                              shuffle_rng=order_rng, sample_rng=sample_rng)):
      batch = sharding.shard_batch(batch, self.mesh)
      trainable, opt_state, loss, m = self._steps[s_idx](
          graphdef, trainable, opt_state, rest, batch, jax.random.fold_in(key, i))
      losses.append(loss)
      metrics.append(m)
    losses = np.asarray(jax.device_get(losses))
    metrics = {k: np.asarray([m[k] for m in jax.device_get(metrics)]) for k in (metrics[0] if metrics else {})}
    return trainable, opt_state, losses, metrics

  def _cache_features(self, s_idx, model, cohort, patients, bins):
    graphdef, state = nnx.split(model)
    spec = dataclasses.replace(self.spec, max_instances=None)
    parts = []
    for batch in iterate_batches(cohort, patients, spec, bins=bins, sort_by_length=True):
      out = self._feature_fns[s_idx](graphdef, state, sharding.shard_batch(batch, self.mesh))
      parts.append(jax.tree.map(lambda a: sharding.to_host(a)[batch["valid"]], out))
    feats = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    return sharding.replicate(feats, self.mesh)

  def num_steps(self, n_patients: int) -> int:
    return sum(s.epochs * (num_batches(n_patients, self.spec.batch_size) if s.features is None
                           else s.steps_per_epoch) for s in self.stages)
