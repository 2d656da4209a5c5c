"""K-fold cross-validation of any method under named missing-modality scenarios.

For each fold: fit time bins on the training patients (discrete-time methods), build and
train the model (resuming from the fold's checkpoints), predict the held-out patients
under every scenario, and write ``fold_<k>/risks.csv`` and ``fold_<k>/result.json``. A
fold whose ``result.json`` exists is not recomputed, so a killed run restarted with the
same command resumes at the fold (and, inside it, the epoch) where it stopped. Finally
``results.json``, ``report.md`` and the Kaplan-Meier figures are written from the fold
results. Every file is written atomically.

With ``config.eval.reference_models`` (e.g. ``("coxph", "rsf")``), scikit-survival
models are fitted on each fold's tabular data too (`survjax.evaluate.reference`); their
C-index per fold is kept in the fold's ``result.json`` under ``"reference"`` and ends up
in ``results["reference_rows"]`` and the report.
"""

from __future__ import annotations

import csv
import io
import json
import contextlib
import logging
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from survjax.checkpoint import Checkpointer
from survjax.compile_clock import CompileClock
from survjax.data.batching import BatchSpec, iterate_batches, make_batch
from survjax.data.formats import impute_fold, standardize_fold
from survjax import rundir
from survjax.data.splits import (cohort_fingerprint, folds_fingerprint, has_comparable_pair,
                                 inner_validation, load_or_make_folds)
from survjax.data.timebins import assign_time_bins, fit_time_bins
from survjax.environment import environment
from survjax.errors import InputError, check_count
from survjax.evaluate import scenarios as scen
from survjax.evaluate.metrics import concordance_index, uno_c
from survjax.evaluate.reference import check_reference_models, reference_fold
from survjax.evaluate.representations import representation_diagnostics
from survjax.io import atomic_write_json, atomic_write_text
from survjax.method import Method, cohort_info
from survjax.train import sharding
from survjax.train.trainer import MetricsLog, Trainer

log = logging.getLogger("survjax")


class Predictor:
  """Jitted prediction, compiled once per (present modalities, batch shape) for the run."""

  def __init__(self, method: Method, mesh):
    self.method = method
    self.mesh = mesh
    self.traces = 0

    def predict(graphdef, state, batch, key, present):
      self.traces += 1
      return method.predict(nnx.merge(graphdef, state), batch, present, key)

    self.representations = getattr(method, "representations", None)

    def representations(graphdef, state, batch):
      return self.representations(nnx.merge(graphdef, state), batch)

    self._predict = jax.jit(predict, static_argnums=(0, 4))
    self._representations = jax.jit(representations, static_argnums=0)

  def predict(self, model, cohort, idx, hidden, spec: BatchSpec, key, fill=0.0):
    """Risk variants ``{name: [len(idx)]}`` for patients ``idx`` with per-patient hidden sets."""
    graphdef, state = nnx.split(model)
    idx = np.asarray(idx)
    out: dict[str, np.ndarray] = {}
    by_pattern: dict[frozenset, list[int]] = {}
    for j, h in enumerate(hidden):
      by_pattern.setdefault(h, []).append(j)
    for h, rows in sorted(by_pattern.items(), key=lambda kv: sorted(kv[0])):
      present = frozenset(m for m in self.method.modalities if m not in h)
      for b_i, batch in enumerate(iterate_batches(cohort, idx[rows], spec, hide=h, fill=fill,
                                                  sort_by_length=True)):
        valid = batch["valid"]
        pos = {p: r for p, r in zip(idx[rows], rows)}
        res = self._predict(graphdef, state, sharding.shard_batch(batch, self.mesh),
                            jax.random.fold_in(key, b_i), present)
        for name, v in res.items():
          v = sharding.to_host(v)[valid]
          arr = out.setdefault(name, np.full(len(idx), np.nan))
          arr[[pos[p] for p in batch["index"][valid]]] = v
    return out

  def diagnostics(self, model, cohort, idx, spec):
    """Spreads and cosines of the method's `representations` over the patients ``idx``
    (`representation_diagnostics`); ``{}`` for a method without them."""
    if self.representations is None:
      return {}
    graphdef, state = nnx.split(model)
    reps: dict[str, list] = {}
    for batch in iterate_batches(cohort, idx, spec, sort_by_length=True):
      rep = self._representations(graphdef, state, sharding.shard_batch(batch, self.mesh))
      for k, v in rep.items():
        reps.setdefault(k, []).append(sharding.to_host(v)[batch["valid"]])
    return representation_diagnostics({k: np.concatenate(v) for k, v in reps.items()},
                                      tuple(getattr(self.method, "representation_pairs", ())))

  def latency(self, model, cohort, idx, present_sets, key, repeats: int = 5):
    """Batch-1 wall time per patient (ms, p50 over repeats, compile excluded)."""
    graphdef, state = nnx.split(model)
    spec = BatchSpec(batch_size=self.mesh.size)  # one real patient, the rest padding
    out = {}
    for name, hidden in present_sets.items():
      present = frozenset(m for m in self.method.modalities if m not in hidden)
      batch = sharding.shard_batch(make_batch(cohort, idx[:1], spec, hide=hidden), self.mesh)
      jax.block_until_ready(self._predict(graphdef, state, batch, key, present))
      times = []
      for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(self._predict(graphdef, state, batch, jax.random.fold_in(key, r),
                                            present))
        times.append(time.perf_counter() - t0)
      out[name] = round(1e3 * float(np.median(times)), 3)
    return out


def cohort_folds(cohort, config, check=None):
  """The run's folds (index arrays into ``cohort``, labelled patients only) and
  ``{"cohort_fingerprint", "splits_fingerprint"}``; ``check(folds)`` runs before any
  split file is written.

  Folds are read from or written to ``cv.splits_dir/<dataset>`` (see
  `survjax.data.splits`); for the embedded synthetic data the folder name carries the
  cohort fingerprint, the number of folds and the split seed, so every draw, knob setting
  and partition has its own folds.
  """
  lab = np.flatnonzero(cohort.labelled)
  ids, t, e = cohort.case_ids[lab], cohort.time[lab], cohort.event[lab]
  fingerprint = cohort_fingerprint(ids, t, e)
  dataset = cohort.name
  if config.data.source == "synthetic":
    dataset = f"{cohort.name}-{fingerprint}-{config.cv.num_folds}folds-seed{config.cv.seed}"
  def to_cohort(folds):
    return [(lab[tr], lab[va]) for tr, va in folds]
  if config.cv.splits_dir:
    rundir.check_creatable(Path(config.cv.splits_dir), "config.cv.splits_dir")
  folds = load_or_make_folds(ids, t, e, num_folds=config.cv.num_folds, seed=config.cv.seed,
                             splits_dir=config.cv.splits_dir or None, dataset=dataset,
                             check=None if check is None else lambda f: check(to_cohort(f)))
  folds = to_cohort(folds)
  return folds, {"cohort_fingerprint": fingerprint,
                 "splits_fingerprint": folds_fingerprint(cohort.case_ids, folds)}


def _cindex(time_, event, risk):
  return float(concordance_index(time_, event, risk)[0])


def run_cv(method: Method, cohort, config, workdir, *, mode: str = "cv",
           restart: bool = False) -> dict:
  """Cross-validates ``method`` on ``cohort``; returns the ``results.json`` dict.

  ``config.eval.require`` (optional, e.g. ``("rna",)``): every scenario is evaluated on
  the test patients that have those modalities in the data, the others as they are
  (impuTMAE's protocol: all patients with RNA, the rest naturally missing); training is
  unchanged.

  Args:
    mode: "cv" trains and evaluates every fold; "train" only trains (checkpoints);
      "eval" evaluates folds whose training finished (re-evaluating every fold); "tune"
      scores the config's ``tune.grid`` on the inner validation splits
      (`survjax.evaluate.tune`; ``method`` is rebuilt for every grid point).

  Each fold's training patients give up a stratified inner validation part
  (``cv.val_fraction``), on which stages with ``select`` choose their epoch; the test fold
  is read once, at the end.

  Bad input (scenario names, reference models, a method modality the cohort lacks, folds
  without events, an unwritable workdir, a run directory made with another configuration
  or in use by another process) raises `InputError` before anything is written to the run
  directory (see `survjax.rundir`; ``restart`` moves an old run aside). SIGTERM during the
  run raises `Terminated` (a `SystemExit`, status 143) so that nothing is left
  half-written.
  """
  workdir = Path(workdir)
  with _terminate_as_exception():
    return _run_cv(method, cohort, config, workdir, mode, restart)


def check_settings(config, method: Method) -> None:
  """The run's sizes and each training stage's settings, before anything is written: a
  value no run can use is one `InputError` naming its key, not a traceback mid-run or a
  run that trains nothing."""
  train, ev, cv_ = config.train, config.eval, config.cv
  check_count(train.batch_size, "config.train.batch_size", 1, "a batch size")
  check_count(train.get("accumulate", 1), "config.train.accumulate", 1, "a number of steps")
  check_count(train.max_instances or 0, "config.train.max_instances", 0, "an instance cap")
  check_count(ev.batch_size, "config.eval.batch_size", 1, "a batch size")
  check_count(ev.get("max_instances") or 0, "config.eval.max_instances", 0, "an instance cap")
  check_count(cv_.num_folds, "config.cv.num_folds", 2, "a number of folds")
  check_count(cv_.seed, "config.cv.seed", 0, "a split seed")
  if method.time_model == "discrete":
    check_count(method.num_bins, "config.model.num_bins", 1, "a number of time bins")
  fraction = cv_.get("val_fraction", 0.0)
  if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
    raise InputError(f"{fraction!r} is out of range, expected 0 <= fraction < 1",
                     path="config.cv.val_fraction")
  for size in config.data.get("buckets") or ():
    check_count(size, "config.data.buckets", 1, "a bag length")
  wanted, have = config.mesh.get("num_devices") or 0, jax.device_count()
  check_count(wanted, "config.mesh.num_devices", -1, "a device count")
  if wanted > have:
    raise InputError(f"{wanted} devices asked for, {have} available, expected at most {have} "
                     "(-1 or 0: all)", path="config.mesh.num_devices")
  stages = method.stages()
  for stage in stages:
    where = f"config.model (stage {stage.name!r})"
    check_count(stage.epochs, where, 0, "a number of epochs")
    check_count(stage.patience, where, 0, "a patience")
    if stage.select not in (None, "c_index", "loss"):
      raise InputError(f"select={stage.select!r}, expected 'c_index', 'loss' or None",
                       path=where)
    if stage.features is not None:
      check_count(stage.steps_per_epoch, where, 1, "a number of steps per epoch")
      check_count(stage.batch_size, where, 1, "a batch size")
  if stages and not any(stage.epochs for stage in stages):
    raise InputError(f"every stage ({', '.join(s.name for s in stages)}) has 0 epochs, "
                     "expected a run that trains", path="config.model")


def _check_fold_parts(method, cohort, config, folds, run_folds) -> None:
  """Each fold's inner validation part scores a C-index (two patients, a comparable pair)
  and its fitting part fits the time bins, checked before a fold trains rather than
  after the folds before it did."""
  for k in run_folds:
    fit_idx, val_idx = fold_validation(cohort, config, k, folds[k][0])
    if config.cv.get("val_fraction", 0.0) > 0 and not has_comparable_pair(
        cohort.time[val_idx], cohort.event[val_idx]):
      raise InputError(f"fold {k}: its inner validation part ({len(val_idx)} patients, "
                       f"{int(cohort.event[val_idx].sum())} event(s)) has no comparable pair, "
                       "so its C-index is undefined; expected a larger part or more patients",
                       path="config.cv.val_fraction")
    if method.time_model == "discrete":
      try:
        fit_time_bins(cohort.time[fit_idx], cohort.event[fit_idx], method.num_bins)
      except InputError as e:
        raise InputError(f"fold {k}: {e}", path="config.model.num_bins") from None


def _run_cv(method: Method, cohort, config, workdir: Path, mode: str, restart: bool) -> dict:

  # Everything a user can get wrong is checked before the first file is written.
  check_settings(config, method)
  if mode == "tune":
    from survjax.evaluate.tune import grid_points
    grid_points(config)
  scenario_names = scen.expand(config.eval.scenarios, method.modalities)
  ref_models = check_reference_models(config.eval.get("reference_models", ()), cohort)
  missing = [m for m in method.modalities if m not in cohort.modalities]
  if missing:
    raise InputError(f"method {method.name} needs modality {missing[0]!r}, cohort "
                     f"{cohort.name!r} has {list(cohort.modalities)}", path="config.data")
  require = tuple(config.eval.get("require", ()) or ())
  unknown = [m for m in require if m not in cohort.modalities]
  if unknown:
    raise InputError(f"eval.require names modality {unknown[0]!r}, expected one of "
                     f"{list(cohort.modalities)}", path="config.eval.require")
  if method.time_model not in ("discrete", "cox"):
    raise InputError(f"method {method.name} has time_model {method.time_model!r}, expected "
                     "'discrete' or 'cox'", path="config.method")
  if jax.process_count() > 1:   # for callers that ran jax.distributed.initialize themselves
    sharding.same_program_on_every_process()
  mesh = sharding.make_mesh(config.mesh.num_devices)
  def check(folds):
    if mode != "tune":   # --mode=tune scores on inner parts of its own
      ks = list(config.cv.folds) or range(len(folds))
      _check_fold_parts(method, cohort, config, folds, [k for k in ks if 0 <= k < len(folds)])
  rundir.check_creatable(Path(workdir), "--workdir")   # before split files are written
  folds, fingerprints = cohort_folds(cohort, config, check=check)
  run_folds = list(config.cv.folds) if config.cv.folds else list(range(len(folds)))
  bad = [k for k in run_folds if not 0 <= k < len(folds)]
  if bad:
    raise InputError(f"fold {bad[0]} does not exist, expected folds 0 to {len(folds) - 1}",
                     path="config.cv.folds")

  def run():
    if mode == "tune":
      from survjax.evaluate.tune import run_tune
      from survjax.models import get_method
      return run_tune(cohort, config, workdir, folds=folds, run_folds=run_folds,
                      make_method=get_method)
    return _folds(method, cohort, config, workdir, mode, folds, run_folds, mesh,
                  scenario_names, ref_models, fingerprints)

  if jax.process_index() != 0:
    return run()
  if restart:
    aside = rundir.restart(workdir)
    if aside is not None:
      log.info("moved the previous run aside to %s", aside)
  rundir.check_writable(workdir)
  with rundir.locked(workdir):
    rundir.check_or_record(workdir, config, fingerprints)
    return run()


def _folds(method, cohort, config, workdir, mode, folds, run_folds, mesh, scenario_names,
           ref_models, fingerprints) -> dict:
  """Trains and evaluates the folds ``run_folds``; writes results.json (process 0)."""
  from survjax.evaluate.report import write_outputs

  trainer = Trainer(method, mesh=mesh, batch_size=config.train.batch_size,
                    max_instances=config.train.max_instances or None, seed=config.seed,
                    progress=config.progress, buckets=config.data.buckets or None,
                    checkpoint_every_s=config.train.get("checkpoint_every_s", 0.0),
                    eval_max_instances=config.eval.max_instances or None)
  predictor = Predictor(method, mesh)
  eval_spec = eval_batch_spec(config, mesh)
  fold_results = []
  is_main = jax.process_index() == 0
  require = tuple(config.eval.get("require", ()) or ())
  for k in run_folds:
    tr, va = folds[k]
    # Per-fold transforms fitted on the training patients only: data.files.impute, then
    # the loader's standardisation flags (cohort.standardize).
    cohort_k = standardize_fold(impute_fold(cohort, tr), tr)
    if require:   # evaluated on the test patients that have these modalities in the data
      va = va[cohort.complete(require)[va]]
      if len(va) < 2 or not cohort.event[va].any():
        raise InputError(f"fold {k} keeps {len(va)} test patients with {list(require)} "
                         "and no event among them, expected at least two patients and one "
                         "event", path="config.eval.require")
    result_path = workdir / f"fold_{k}" / "result.json"
    if mode == "cv" and result_path.exists():
      fold = json.loads(result_path.read_text())
      log.info("fold %d: already evaluated, reusing %s", k, result_path)
      todo = [m for m in ref_models if m not in fold.get("reference", {})]
      if todo:  # asked for after the fold was evaluated
        fold.setdefault("reference", {}).update(_reference(cohort_k, tr, va, todo, config, k))
        if is_main:
          atomic_write_json(result_path, fold)
      fold_results.append(fold)
      continue
    train_clock = CompileClock()
    model, edges, train_s = _train_fold(method, cohort_k, config, workdir, mode, trainer, k, tr)
    train_compile = train_clock.rounded()
    if mode == "train":
      continue
    eval_clock = CompileClock()
    fold = _evaluate_fold(method, cohort_k, config, workdir, predictor, eval_spec, model, k, tr,
                          va, scenario_names, ref_models,
                          latency=config.eval.latency and k == run_folds[-1])
    fold["time_bins"] = None if edges is None else edges.tolist()
    fold["timing"]["train_s"] = round(train_s, 2)
    # Compile time inside train_s and eval_s (tracing, lowering, XLA or a cache read).
    fold["timing"]["train_compile"] = train_compile
    fold["timing"]["eval_compile"] = eval_clock.rounded()
    fold["chosen_epochs"] = trainer.chosen_epochs.get(k, {})
    # What --mode=predict needs from this fold (survjax.predict): out-of-fold risk
    # statistics and cut-off, bin edges, Breslow baseline. Written before result.json.
    from survjax.predict import PREDICT_INFO, fold_predict_info
    t_info, info_clock = time.perf_counter(), CompileClock()
    predict_info = fold_predict_info(method, cohort_k, predictor, eval_spec, model, k, tr, va,
                                     edges, jax.random.fold_in(jax.random.key(config.seed + 17), k),
                                     scenarios=scenario_names, scenario_seed=config.cv.seed)
    # Apart from eval_s: the risks of the training patients under every scenario (the KM
    # cut-offs), the out-of-fold statistics and the calibration curve.
    fold["timing"]["predict_info_s"] = round(time.perf_counter() - t_info, 2)
    fold["timing"]["predict_info_compile"] = info_clock.rounded()
    if is_main:
      atomic_write_json(workdir / f"fold_{k}" / PREDICT_INFO, predict_info)
      atomic_write_json(result_path, fold)
    fold_results.append(fold)
    log.info("fold %d: %s", k, ", ".join(f"{n}={v['c_index']:.3f}"
                                          for n, v in fold["scenarios"].items()))
  if mode == "train":
    return {}
  results = write_outputs(workdir, method, cohort, config, folds, fold_results,
                          write=is_main, reference_models=ref_models)
  results.update(fingerprints)
  results["chosen_epochs"] = {str(f["fold"]): f.get("chosen_epochs", {}) for f in fold_results}
  results["timing"]["predict_traces"] = predictor.traces
  results["timing"]["train_traces"] = dict(trainer.traces)
  if is_main:
    atomic_write_json(workdir / "results.json", results)
  return results


def eval_batch_spec(config, mesh) -> BatchSpec:
  """The batches of evaluation (``eval.batch_size`` rounded up to the mesh, whole bags
  unless ``eval.max_instances``, the run's buckets)."""
  return BatchSpec(batch_size=sharding.round_up_batch(config.eval.batch_size, mesh),
                   max_instances=config.eval.max_instances or None,
                   **({"buckets": tuple(config.data.buckets)} if config.data.buckets else {}))


def scenario_cindex(predictor, model, cohort, idx, name, modalities, seed, spec, key) -> dict:
  """Harrell's C of each risk variant ``{variant: C}`` on the labelled patients of ``idx``
  with scenario ``name``'s modalities hidden (drawn per case id with split seed ``seed``)."""
  idx = idx[np.isfinite(cohort.time[idx])]
  hidden = scen.hidden_for(name, modalities, cohort.case_ids[idx], seed)
  preds = predictor.predict(model, cohort, idx, hidden, spec, key)
  return {v: _cindex(cohort.time[idx], cohort.event[idx], r)
          for v, r in preds.items() if np.all(np.isfinite(r))}


def fold_validation(cohort, config, k, tr):
  """Fold ``k``'s training patients split into (fit, inner validation) (`inner_validation`)."""
  return inner_validation(tr, cohort.time, cohort.event, config.cv.get("val_fraction", 0.0),
                          config.cv.seed + k)


def _train_fold(method, cohort, config, workdir, mode, trainer, k, tr):
  """Builds and trains (or, with mode "eval", restores) fold ``k``'s model on its
  training patients less the inner validation part; returns (model, bin edges, seconds)."""
  t0 = time.perf_counter()
  fold_dir = workdir / f"fold_{k}"
  fit_idx, val_idx = fold_validation(cohort, config, k, tr)
  edges = bins = None
  if method.time_model == "discrete":
    edges = fit_time_bins(cohort.time[fit_idx], cohort.event[fit_idx], method.num_bins)
    bins = assign_time_bins(cohort.time, edges)
  model = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(config.seed * 1000 + k))
  ckpt = Checkpointer(fold_dir / "checkpoints")
  if mode == "eval" and ckpt.latest() is None:
    raise InputError(f"fold {k} has no checkpoint, expected a trained run (use --mode=cv)",
                     path=fold_dir / "checkpoints")
  trainer.fit(model, cohort, fit_idx, bins=bins, fold=k, checkpointer=ckpt, val_idx=val_idx,
              log=MetricsLog(fold_dir / "metrics.jsonl" if mode != "eval" else None,
                             Path(config.tensorboard_dir) / f"fold_{k}"
                             if config.tensorboard_dir else None))
  return model, edges, time.perf_counter() - t0


def _evaluate_fold(method, cohort, config, workdir, predictor, eval_spec, model, k, tr, va,
                   scenario_names, ref_models, *, latency: bool) -> dict:
  """Fold ``k``'s test patients under every scenario: C-index, Uno's C, oracle; writes
  ``risks.csv`` (process 0) and returns the fold's result dict."""
  t1 = time.perf_counter()
  key = jax.random.fold_in(jax.random.key(config.seed + 17), k)
  fold = {"fold": k, "n_train": int(len(tr)), "n_test": int(len(va)), "scenarios": {},
          "validation": {}, "timing": {}, "environment": environment()}
  val_idx = fold_validation(cohort, config, k, tr)[1]
  risks_table = {}
  for s_i, name in enumerate(scenario_names):
    hidden = scen.hidden_for(name, method.modalities, cohort.case_ids[va], config.cv.seed)
    ts = time.perf_counter()
    preds = predictor.predict(model, cohort, va, hidden, eval_spec, jax.random.fold_in(key, s_i))
    fold["timing"][f"predict_ms_per_patient/{name}"] = round(
        1e3 * (time.perf_counter() - ts) / len(va), 3)
    # The oracle sees what the model sees: the scenario's withheld modalities and the
    # ones a patient lacks in the data (natural missingness).
    lacking = [frozenset(m for m in method.modalities if not cohort.modalities[m].available[i])
               for i in va]
    withheld = [h | l for h, l in zip(hidden, lacking)]
    oracle = scen.oracle_risk(cohort.true_risk, method.modalities, withheld, va,
                              list(cohort.modalities))
    oracle_const = scen.oracle_risk(cohort.true_risk, method.modalities, withheld, va,
                                    constant_fill=True)
    if len(preds) > 1 and len(val_idx):
      choice = _choose_variant(predictor, model, cohort, val_idx, name, method, config,
                               eval_spec, jax.random.fold_in(key, 1000 + s_i))
      if choice is not None:
        fold["validation"][name] = choice
        preds["auto"] = preds[choice["chosen"]]
    for variant, risk in preds.items():
      row = name if variant == "risk" else f"{name}/{variant}"
      if not np.all(np.isfinite(risk)):
        raise FloatingPointError(f"fold {k}, scenario {row}: non-finite predicted risk")
      entry = {"c_index": _cindex(cohort.time[va], cohort.event[va], risk)}
      try:
        entry["uno_c"] = float(uno_c(cohort.time[tr], cohort.event[tr], cohort.time[va],
                                     cohort.event[va], risk))
      except Exception as e:  # Uno's C needs test times inside the training follow-up
        log.debug("uno_c unavailable: %s", e)
      if oracle is not None:
        entry["oracle_c_index"] = _cindex(cohort.time[va], cohort.event[va], oracle)
      if oracle_const is not None and any(withheld):
        entry["oracle_const_c_index"] = _cindex(cohort.time[va], cohort.event[va], oracle_const)
      if variant == "auto":
        entry["chosen"] = fold["validation"][name]["chosen"]
      fold["scenarios"][row] = entry
      risks_table[row] = risk
  fold["diagnostics"] = predictor.diagnostics(model, cohort, va, eval_spec)
  held_out = getattr(method, "held_out", None)
  if held_out is not None:   # the method's own statistics on this fold's test patients
    th = time.perf_counter()
    stats = held_out(model, cohort, np.asarray(va), np.asarray(tr),
                     jax.random.fold_in(key, 2000))
    fold["held_out"] = {str(n): None if v is None else float(v) for n, v in stats.items()}
    fold["timing"]["held_out_s"] = round(time.perf_counter() - th, 2)
  if ref_models:
    fold["reference"] = _reference(cohort, tr, va, ref_models, config, k)
  if latency:
    present_sets = {name: scen.hidden_for(name, method.modalities, ["-"], 0)[0]
                    for name in scenario_names if "pct_" not in name}
    fold["timing"]["latency_ms_batch1"] = predictor.latency(model, cohort, va, present_sets, key)
  fold["timing"]["eval_s"] = round(time.perf_counter() - t1, 2)
  if jax.process_index() == 0:
    _write_risks(workdir / f"fold_{k}" / "risks.csv", cohort, va, risks_table)
  return fold


def _choose_variant(predictor, model, cohort, val_idx, name, method, config, spec, key):
  """The risk variant of scenario ``name`` (e.g. a method's fill: diffusion, zeros,
  mean, a unimodal head) with the best C-index on the fold's inner validation patients,
  under the same scenario: ``{"chosen": variant, "c_index": {variant: C}}``; the test
  fold is never read. None when the validation part has no comparable pair."""
  if not np.any(cohort.event[val_idx]):   # unlabelled patients have no event either
    return None
  scores = scenario_cindex(predictor, model, cohort, val_idx, name, method.modalities,
                           config.cv.seed, spec, key)
  if not scores:
    return None
  return {"chosen": max(scores, key=lambda v: (scores[v], v == "risk")), "c_index": scores}


def _reference(cohort, tr, va, models, config, k) -> dict:
  t0 = time.perf_counter()
  out = reference_fold(cohort, tr, va, models, seed=config.seed, fold=k,
                       coxph_alpha=config.eval.get("reference_coxph_alpha", 1.0))
  log.info("fold %d: reference %s (%.1f s)", k, ", ".join(
      f"{m}={v['c_index']:.3f}" for m, v in out.items()), time.perf_counter() - t0)
  return out


class Terminated(SystemExit):
  """SIGTERM, raised in the main thread so that clean-up runs (exit status 143)."""


@contextlib.contextmanager
def _terminate_as_exception():
  """Turns SIGTERM into `Terminated` while the run lasts (main thread only).

  A terminated run then unwinds like an exception: the temporary file of an atomic
  write in progress is removed and nothing half-written stays behind; checkpoints and
  fold results already written are kept, so the same command resumes. Outside the main
  thread (or where signals cannot be set) the default behaviour stays.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    del frame
    raise Terminated(128 + signum)

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _write_risks(path, cohort, idx, table):
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  names = list(table)
  w.writerow(["case_id", "time", "event"] + names)
  for j, i in enumerate(idx):
    w.writerow([cohort.case_ids[i], f"{cohort.time[i]:.6g}", int(cohort.event[i])]
               + [f"{table[n][j]:.8g}" for n in names])
  atomic_write_text(path, buf.getvalue())
