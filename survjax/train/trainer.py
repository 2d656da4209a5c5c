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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.extend import core as jax_core
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


def _same_leaf(old, new) -> bool:
  """The same array object, or equal shape, dtype and values (PRNG keys by their data).
  A deleted ``old`` was donated to a training step since, so it changed."""
  if old is new:
    return True
  if isinstance(old, jax.Array) and old.is_deleted():
    return False
  if not hasattr(old, "dtype") or not hasattr(new, "dtype"):
    return type(old) is type(new) and old == new
  if getattr(old, "shape", None) != getattr(new, "shape", None) or old.dtype != new.dtype:
    return False
  if jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key):
    old, new = jax.random.key_data(old), jax.random.key_data(new)
  return bool(np.array_equal(sharding.to_host(old), sharding.to_host(new)))


class Trainer:
  """Runs a method's stages for one fold at a time; reuse one Trainer across folds.

  Args:
    method: the method (its stages are fixed at construction).
    mesh: device mesh for data parallelism.
    batch_size: patients per batch-stage step (rounded up to the device count).
    max_instances: per-bag instance cap during training (None = whole bags).
    seed: run seed.
    progress: show a progress bar.
    eval_max_instances: per-bag cap when scoring the inner validation split (the run's
      ``eval.max_instances``; None = whole bags, evenly spaced instances otherwise).
    checkpoint_every_s: save a checkpoint after an epoch once this many seconds have
      passed since the last save, and always after a stage's last epoch (0: after every
      epoch). A killed run resumes from the last save and, since every epoch's data order
      and keys derive from (seed, fold, stage, epoch), reaches the same result whichever
      epoch that was; saving MUST's 100 MB state after each 2-second epoch took a third
      of its training time.
  """

  def __init__(self, method: Method, *, mesh, batch_size: int, max_instances: int | None,
               seed: int = 0, progress: bool = True, buckets=None,
               checkpoint_every_s: float = 0.0, eval_max_instances: int | None = None,
               skip_missing_path: bool = False):
    self.method = method
    self.checkpoint_every_s = float(checkpoint_every_s)
    self.eval_max_instances = eval_max_instances
    self.stages = [s for s in method.stages()
                   if not (skip_missing_path and s.missing_path_only)]
    self.mesh = mesh
    self.spec = BatchSpec(batch_size=sharding.round_up_batch(batch_size, mesh),
                          max_instances=max_instances,
                          **({} if buckets is None else {"buckets": tuple(buckets)}))
    self.seed = seed
    self.progress = progress and jax.process_index() == 0
    self.traces = collections.Counter()
    self.chosen_epochs: dict[int, dict[str, int]] = {}
    self._val_predict = {}
    self._val_losses: dict[str, Any] = {}
    self._steps: dict[tuple[int, int | None], Any] = {}
    self._chunks: dict[tuple[int, int | None], Any] = {}
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
    # The last feature pass of each features function, reused by a later stage when
    # nothing it reads has changed (`_cache_features`); `feature_passes` counts the
    # passes run and reused, per stage.
    self._feature_memo: dict[Any, dict] = {}
    self.feature_passes = collections.Counter()

  def _total_steps(self, stage: Stage, n_patients: int) -> int:
    per_epoch = (stage.steps_per_epoch if stage.features is not None
                 else num_batches(n_patients, self.spec.batch_size))
    return stage.epochs * per_epoch

  def _optimizer(self, s_idx: int, n_patients: int):
    """The stage's optax transformation and the key its jitted functions are cached by
    (a fixed optimiser: one per stage; one built from the stage's step count: one per
    distinct count, so folds of equal size share a compilation)."""
    stage = self.stages[s_idx]
    if isinstance(stage.optimizer, optax.GradientTransformation):
      return stage.optimizer, (s_idx, None)
    total = self._total_steps(stage, n_patients)
    return stage.optimizer(total), (s_idx, total)

  def _batch_spec(self, stage: Stage) -> BatchSpec:
    if stage.max_instances is None:
      return self.spec
    return dataclasses.replace(self.spec, max_instances=stage.max_instances or None)

  # ---- jitted pure functions (built once per run) -------------------------------------

  def _make_step(self, stage: Stage, tx):

    def step(graphdef, trainable, opt_state, rest, batch, key):
      self.traces[f"step:{stage.name}"] += 1

      def loss_of(tr):
        return stage.loss_fn(nnx.merge(graphdef, tr, rest), batch, key)

      (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      trainable = optax.apply_updates(trainable, updates)
      return trainable, opt_state, loss, metrics

    return jax.jit(step, static_argnums=0, donate_argnums=(1, 2))

  def _make_chunk(self, stage: Stage, tx):
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
          checkpointer: Checkpointer | None = None, log: MetricsLog | None = None,
          val_idx=None) -> nnx.Module:
    """Trains ``model`` in place through every stage, resuming from ``checkpointer``.

    ``val_idx``: the fold's inner validation patients, on which stages with ``select``
    choose their epoch (`chosen_epochs` records it per fold and stage).
    """
    log = log or MetricsLog(None)
    self._feature_memo.clear()
    nnx.update(model, sharding.replicate(nnx.state(model), self.mesh))
    resume = self._resume_point(checkpointer)
    self._rewind_log(log, fold, resume)
    global_step = 0
    for s_idx, stage in enumerate(self.stages):
      if resume is not None and resume["stage"] > s_idx:
        global_step += stage.epochs  # finished before the checkpoint; restored further on
        continue
      patients = self.stage_patients(stage, cohort, train_idx)
      tx, cache_key = self._optimizer(s_idx, len(patients))
      graphdef, trainable, rest = _split(model, stage)
      opt_state = sharding.replicate(tx.init(trainable), self.mesh)
      first_epoch = 0
      selection = None
      if resume is not None:  # the checkpoint lies inside this stage
        selecting = stage.select is not None and val_idx is not None
        has_best = selecting and resume.get("best_epoch") is not None
        opt_state, best = self._restore(model, checkpointer, resume["step"], opt_state,
                                        nnx.to_pure_dict(trainable) if has_best else None)
        if has_best:
          best_state = jax.device_get(trainable)
          nnx.replace_by_pure_dict(best_state, best)
          selection = {"epoch": resume["best_epoch"], "score": resume["best_score"],
                       "state": best_state}
        first_epoch, resume = resume["epoch"] + 1, None
        graphdef, trainable, rest = _split(model, stage)
      if first_epoch < stage.epochs:
        selection = self._run_stage(s_idx, model, cohort, patients, bins, fold, first_epoch,
                                    tx, cache_key, opt_state, global_step, checkpointer, log,
                                    val_idx, selection)
      if selection is not None:  # leave the stage with the chosen epoch's parameters
        nnx.update(model, sharding.replicate(selection["state"], self.mesh))
        self.chosen_epochs.setdefault(fold, {})[stage.name] = selection["epoch"]
      global_step += stage.epochs
    return model

  def stage_patients(self, stage: Stage, cohort, train_idx) -> np.ndarray:
    """The fold's training patients a stage trains on (see `Stage.patients`, `Stage.labels`)."""
    patients = np.asarray(train_idx)
    if not stage.labels:
      patients = np.union1d(patients, np.flatnonzero(~cohort.labelled))
    if stage.patients == "complete":
      need = stage.requires or self.method.modalities
      patients = patients[cohort.complete(need)[patients]]
    return patients

  def _resume_point(self, checkpointer) -> dict | None:
    """``{"step", "stage", "epoch", ...}`` of the latest checkpoint, or None."""
    if checkpointer is None or checkpointer.latest() is None:
      return None
    step = checkpointer.latest()
    return {"step": step, **checkpointer.restore_meta(step)}

  def _rewind_log(self, log, fold, resume) -> None:
    """Drops the epochs logged after the last checkpoint (or all, with none): the run is
    about to replay them."""
    order = {stage.name: i for i, stage in enumerate(self.stages)}
    done = (resume["stage"], resume["epoch"]) if resume is not None else (-1, -1)
    log.rewind(lambda r: r.get("fold") != fold
               or (order.get(r.get("stage"), len(order)), r.get("epoch", 0)) <= done)

  def _run_stage(self, s_idx, model, cohort, patients, bins, fold, first_epoch, tx, cache_key,
                 opt_state, global_step, checkpointer, log, val_idx=None, selection=None):
    """Epochs ``first_epoch ..`` of stage ``s_idx``; checkpoints as configured.

    Returns the stage's selection ``{"epoch", "score", "state"}`` (the best validation
    epoch so far and its trainable state on the host) for a stage with ``select``, else
    None.
    """
    stage = self.stages[s_idx]
    selecting = stage.select is not None and val_idx is not None and len(val_idx) > 0
    graphdef, trainable, rest = _split(model, stage)
    if stage.features is not None:
      feats = self._cache_features(s_idx, model, cohort, patients, bins)
      if stage.prepare is not None:
        # Deterministic in the cached features, so a resumed run sets the same values.
        stage.prepare(model, feats)
        # prepare() may leave host-placed arrays: re-place them like the rest of the
        # state, or the next jitted call would see new input shardings and recompile.
        nnx.update(model, sharding.replicate(nnx.state(model), self.mesh))
        graphdef, trainable, rest = _split(model, stage)
      if cache_key not in self._chunks:
        self._chunks[cache_key] = self._make_chunk(stage, tx)
      chunk = self._chunks[cache_key]
    elif cache_key not in self._steps:
      self._steps[cache_key] = self._make_step(stage, tx)
    last_save = time.monotonic()
    bar = tqdm(total=stage.epochs, initial=first_epoch, desc=f"fold {fold} {stage.name}",
               disable=not self.progress, leave=False, unit="ep")
    for epoch in range(first_epoch, stage.epochs):
      t0 = time.perf_counter()
      key = self._key(fold, s_idx, epoch)
      if stage.features is None:
        trainable, opt_state, losses, metrics = self._batch_epoch(
            s_idx, cache_key, graphdef, trainable, opt_state, rest, cohort, patients, bins,
            key, fold, epoch)
      else:
        trainable, opt_state, losses, metrics = chunk(graphdef, trainable, opt_state, rest,
                                                      feats, key)
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
      stop = False
      if selecting:
        score = self.validation_score(stage, model, cohort, val_idx, bins)
        record[f"val_{stage.select}"] = score
        sign = 1.0 if stage.select == "c_index" else -1.0
        if selection is None or sign * score > sign * selection["score"]:
          selection = {"epoch": epoch, "score": score, "state": jax.device_get(trainable)}
        stop = bool(stage.patience) and epoch - selection["epoch"] >= stage.patience
      log.write(record, step=global_step + epoch)
      bar.set_postfix(loss=f"{record['loss']:.4f}")
      bar.update(1)
      due = (stop or epoch + 1 == stage.epochs
             or time.monotonic() - last_save >= self.checkpoint_every_s)
      if checkpointer is not None and jax.process_count() > 1:
        # Saving is collective (orbax syncs the processes), and each process's clock
        # crosses checkpoint_every_s after its own epoch: process 0 decides for all, or
        # one process waits in the save for another that went on training.
        due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
      if checkpointer is not None and due:
        meta = {"stage": s_idx, "epoch": stage.epochs - 1 if stop else epoch,
                "stage_name": stage.name, "fold": fold}
        if selection is not None:
          meta.update(best_epoch=selection["epoch"], best_score=selection["score"])
        checkpointer.save(global_step + epoch + 1, _state_dict(model), opt_state, meta,
                          best=None if selection is None
                          else nnx.to_pure_dict(selection["state"]))
        last_save = time.monotonic()
      if stop:
        break
    bar.close()
    return selection

  def validation_score(self, stage: Stage, model, cohort, val_idx, bins) -> float:
    """Stage ``select`` metric on the inner validation patients. ``c_index``: Harrell's C
    of ``predict``'s risk on the complete validation patients, shown every modality or,
    with ``stage.select_present``, each of those subsets in turn (the mean of the C's)."""
    graphdef, state = nnx.split(model)
    val_idx = np.asarray(val_idx)
    spec = dataclasses.replace(self.spec, max_instances=self.eval_max_instances)
    key = jax.random.key(self.seed + 7)
    if stage.select == "c_index":
      from survjax.evaluate.metrics import concordance_index
      val_idx = val_idx[cohort.complete(self.method.modalities)[val_idx]]
      presents = tuple(frozenset(p) for p in
                       stage.select_present or (tuple(self.method.modalities),))
      scores = []
      for risk in self._validation_risks(presents, graphdef, state, cohort, val_idx, spec,
                                         bins, key):
        if not np.all(np.isfinite(risk)):
          return float("-inf")
        scores.append(concordance_index(cohort.time[val_idx], cohort.event[val_idx], risk)[0])
      return float(np.mean(scores))
    if stage.select == "loss":
      losses, weights = [], []
      for batch in iterate_batches(cohort, val_idx, spec, bins=bins, sort_by_length=True):
        loss, _ = self._val_loss(stage)(graphdef, state, sharding.shard_batch(batch, self.mesh),
                                         key)
        losses.append(float(loss))
        weights.append(int(batch["valid"].sum()))
      return float(np.average(losses, weights=weights))
    raise ValueError(f"stage {stage.name}: select={stage.select!r}, expected 'c_index' or 'loss'")

  def _validation_risks(self, presents, graphdef, state, cohort, val_idx, spec, bins, key):
    """``predict``'s risk of ``val_idx`` shown each of the ``presents`` modality subsets,
    all from one jitted program per batch shape: the subsets' shared work (MUST's
    pathology encoder, run for both modalities and for pathology alone) is one
    computation there, merged by XLA's common-subexpression elimination."""
    if presents not in self._val_predict:
      def predict(graphdef, state, batch, key):
        self.traces["validation"] += 1
        model = nnx.merge(graphdef, state)
        return tuple(self.method.predict(model, batch, present, key)["risk"]
                     for present in presents)
      self._val_predict[presents] = jax.jit(predict, static_argnums=0)
    risks = np.empty((len(presents), len(val_idx)))
    pos = {p: j for j, p in enumerate(val_idx)}
    for batch in iterate_batches(cohort, val_idx, spec, bins=bins, sort_by_length=True):
      out = self._val_predict[presents](graphdef, state,
                                        sharding.shard_batch(batch, self.mesh), key)
      rows = [pos[p] for p in batch["index"][batch["valid"]]]
      for j, risk in enumerate(out):
        risks[j, rows] = sharding.to_host(risk)[batch["valid"]]
    return risks

  def _val_loss(self, stage: Stage):
    if stage.name not in self._val_losses:
      def loss(graphdef, state, batch, key):
        self.traces[f"validation_loss:{stage.name}"] += 1
        return stage.loss_fn(nnx.merge(graphdef, state), batch, key)
      self._val_losses[stage.name] = jax.jit(loss, static_argnums=0)
    return self._val_losses[stage.name]

  def _restore(self, model, checkpointer, step, opt_template, best_template=None):
    """Restores the model in place; returns ``(opt_state, best)`` (best: the stored
    best-epoch trainable state, None unless ``best_template`` is given and one was saved)."""
    best = None
    restored = checkpointer.restore(step, _state_dict(model), opt_template, best_template)
    model_state, opt_state = restored[:2]
    if len(restored) == 3:
      best = jax.device_get(restored[2])
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, model_state)
    nnx.update(model, sharding.replicate(state, self.mesh))
    return sharding.replicate(opt_state, self.mesh), best

  def _batch_epoch(self, s_idx, cache_key, graphdef, trainable, opt_state, rest, cohort,
                   patients, bins, key, fold, epoch):
    order_rng = np.random.default_rng([self.seed, fold, s_idx, epoch])
    sample_rng = np.random.default_rng([self.seed, fold, s_idx, epoch, 1])
    losses, metrics = [], []
    spec = self._batch_spec(self.stages[s_idx])
    for i, batch in enumerate(iterate_batches(cohort, patients, spec, bins=bins,
                                              shuffle_rng=order_rng, sample_rng=sample_rng)):
      batch = sharding.shard_batch(batch, self.mesh)
      trainable, opt_state, loss, m = self._steps[cache_key](
          graphdef, trainable, opt_state, rest, batch, jax.random.fold_in(key, i))
      losses.append(loss)
      metrics.append(m)
    losses = np.asarray(jax.device_get(losses))
    metrics = {k: np.asarray([m[k] for m in jax.device_get(metrics)]) for k in (metrics[0] if metrics else {})}
    return trainable, opt_state, losses, metrics

  def _cache_features(self, s_idx, model, cohort, patients, bins):
    """Stage ``s_idx``'s frozen features of ``patients`` (whole bags), replicated.

    A stage whose features function, patients and bins are those of an earlier pass in
    this fit reuses that pass when every state leaf the function reads is unchanged
    (the leaves its jaxpr takes as inputs): MUST's second LDM stage reads the encoders,
    which the first LDM stage did not train. The reused features are the same arrays the
    pass would compute again.
    """
    stage = self.stages[s_idx]
    fn = self._feature_fns[s_idx]
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    spec = dataclasses.replace(self.spec, max_instances=None)
    patients = np.asarray(patients)
    bins = None if bins is None else np.asarray(bins)
    memo = self._feature_memo.get(fn)
    if memo is not None and self._features_unchanged(memo, stage, graphdef, state, leaves,
                                                     cohort, patients, bins, spec):
      self.feature_passes[f"{stage.name}:reused"] += 1
      return memo["feats"]
    parts = []
    for batch in iterate_batches(cohort, patients, spec, bins=bins, sort_by_length=True):
      out = fn(graphdef, state, sharding.shard_batch(batch, self.mesh))
      parts.append(jax.tree.map(lambda a: sharding.to_host(a)[batch["valid"]], out))
    feats = sharding.replicate(jax.tree.map(lambda *xs: np.concatenate(xs), *parts), self.mesh)
    self.feature_passes[stage.name] += 1
    self._feature_memo[fn] = {"graphdef": graphdef, "leaves": leaves, "patients": patients,
                              "bins": bins, "feats": feats}
    return feats

  def _features_unchanged(self, memo, stage, graphdef, state, leaves, cohort, patients, bins,
                          spec) -> bool:
    """Whether ``memo``'s feature pass holds for the model and patients as they are now."""
    same_rows = (np.array_equal(memo["patients"], patients)
                 and (memo["bins"] is None) == (bins is None)
                 and (bins is None or np.array_equal(memo["bins"], bins)))
    if not same_rows or memo["graphdef"] != graphdef or len(memo["leaves"]) != len(leaves):
      return False
    if "reads" not in memo:
      batch = next(iter(iterate_batches(cohort, patients, spec, bins=bins,
                                        sort_by_length=True)))
      closed = jax.make_jaxpr(lambda st, b: stage.features(nnx.merge(graphdef, st), b))(
          state, batch)
      used = {v for eqn in closed.jaxpr.eqns for v in eqn.invars
              if not isinstance(v, jax_core.Literal)}
      used |= {v for v in closed.jaxpr.outvars if not isinstance(v, jax_core.Literal)}
      memo["reads"] = [i for i, v in enumerate(closed.jaxpr.invars[:len(leaves)]) if v in used]
    return all(_same_leaf(memo["leaves"][i], leaves[i]) for i in memo["reads"])

  def num_steps(self, n_patients: int) -> int:
    return sum(self._total_steps(s, n_patients) for s in self.stages)
