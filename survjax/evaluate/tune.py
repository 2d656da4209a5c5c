"""Hyper-parameter choice that never sees a test fold (``--mode=tune``).

  python -m survjax.main --config=configs/must.py --mode=tune --workdir=runs/must_tune \\
      --config.data.synthetic.seed=1

A config declares its grid as ``tune.grid = (("model.stage2.lr", (2e-4, 1e-3)),
("model.rank", (16, 64)))``. Every point of the grid is trained on each fold's
training patients less the inner validation part (``cv.val_fraction``) and scored by the
C-index of its prediction with every modality on that validation part; a point's score is
the mean over folds. Stages that only serve a missing modality (``Stage.missing_path_only``,
e.g. MUST's denoisers) are not trained: they cannot change that score. Before a fold is
touched, the labels of its test patients are blanked (NaN time, no event) in the cohort
the fold trains on, so no path can read them; its features are imputed and standardised with the training fold's statistics (as in CV).
``tune.json`` in the workdir has every point's per-fold scores and the chosen one, and the
log ends with the chosen values as command-line overrides for ``--mode=cv``.

``tune.scenarios`` (default ``("full",)``) scores a point by the mean over those scenarios
of the validation C-index of the method's ``risk`` with the scenario's modalities hidden
(e.g. ``("missing_pathology", "missing_genomics")`` for the parameters of a missing
path); every stage is then trained.

Choose defaults on a development draw of the synthetic cohort (another
``data.synthetic.seed``) and report on draws the choice never saw.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from survjax.data.formats import impute_fold, standardize_fold
from survjax.data.splits import inner_validation
from survjax.data.timebins import assign_time_bins, fit_time_bins
from survjax.errors import InputError
from survjax.evaluate import scenarios as scen
from survjax.io import atomic_write_json
from survjax.method import cohort_info
from survjax.train import sharding
from survjax.train.trainer import Trainer

log = logging.getLogger("survjax")


def grid_points(config) -> list[dict]:
  """The grid's points as ``[{dotted key: value}, ...]`` (validated against the config)."""
  grid = config.get("tune", {}).get("grid", ()) if hasattr(config, "get") else ()
  if not grid:
    raise InputError("no tune.grid, expected e.g. tune.grid = (('model.lr', (1e-3, 1e-4)),)",
                     path="config.tune.grid")
  keys, values = [], []
  expected = "expected pairs (key, (value, ...)), e.g. (('model.lr', (1e-3, 1e-4)),)"
  for item in grid:
    if (not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str)
        or not isinstance(item[1], (tuple, list)) or not item[1]):
      raise InputError(f"grid entry {item!r}, {expected}", path="config.tune.grid")
    key, vals = item
    node = config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        raise InputError(f"unknown config key {key!r} in the tuning grid", path="config.tune.grid")
      node = node[part]
    keys.append(key)
    values.append(tuple(vals))
  return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def with_overrides(config, overrides: dict):
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    for key, value in overrides.items():
      node = cfg
      *parents, last = key.split(".")
      for part in parents:
        node = node[part]
      node[last] = value
  return cfg


def blank_labels(cohort, idx):
  """A shallow copy of ``cohort`` whose patients ``idx`` have no survival label."""
  time_ = cohort.time.copy()
  event = cohort.event.copy()
  time_[idx] = np.nan
  event[idx] = False
  return dataclasses.replace(cohort, time=time_, event=event)


def _scenario_scores(method, model, cohort, val_idx, scenarios, config, mesh, k) -> dict:
  """Validation C-index of the method's ``risk`` under each scenario (its missing path)."""
  from survjax.evaluate.cv import Predictor, eval_batch_spec, scenario_cindex
  spec = eval_batch_spec(config, mesh)
  predictor = Predictor(method, mesh)
  key = jax.random.fold_in(jax.random.key(config.seed + 23), k)
  return {name: scenario_cindex(predictor, model, cohort, val_idx, name, method.modalities,
                                config.cv.seed, spec, jax.random.fold_in(key, s_i))["risk"]
          for s_i, name in enumerate(scenarios)}


def run_tune(cohort, config, workdir, *, folds, run_folds, make_method) -> dict:
  """Scores every grid point on the inner validation split of each fold in ``run_folds``.

  Args:
    folds: ``[(train_idx, test_idx), ...]`` of the run (`survjax.evaluate.cv.cohort_folds`).
    make_method: ``config -> Method`` (`survjax.models.get_method`).
  """
  if config.cv.get("val_fraction", 0.0) <= 0:
    raise InputError("tuning needs an inner validation split, expected cv.val_fraction > 0",
                     path="config.cv.val_fraction")
  points = grid_points(config)
  mesh = sharding.make_mesh(config.mesh.num_devices)
  scenarios = tuple(config.tune.get("scenarios", ("full",)))
  scen.expand(scenarios, make_method(config).modalities)   # unknown names: one clear line
  table = []
  for p_i, overrides in enumerate(points):
    cfg = with_overrides(config, overrides)
    method = make_method(cfg)
    trainer = Trainer(method, mesh=mesh, batch_size=cfg.train.batch_size,
                      max_instances=cfg.train.max_instances or None, seed=cfg.seed,
                      progress=cfg.progress, buckets=cfg.data.buckets or None,
                      eval_max_instances=cfg.eval.max_instances or None,
                      skip_missing_path=scenarios == ("full",))
    scores, per_scenario = [], {name: [] for name in scenarios}
    t0 = time.perf_counter()
    for k in run_folds:
      tr, te = folds[k]
      # The per-fold transforms of the CV loop (fitted on the training fold), then the
      # fold's test labels are blanked so that they cannot be read below.
      seen = blank_labels(standardize_fold(impute_fold(cohort, tr), tr), te)
      fit_idx, val_idx = inner_validation(tr, seen.time, seen.event, cfg.cv.val_fraction,
                                          cfg.cv.seed + k)
      bins = None
      if method.time_model == "discrete":
        bins = assign_time_bins(seen.time, fit_time_bins(seen.time[fit_idx],
                                                         seen.event[fit_idx], method.num_bins))
      model = method.build(cohort_info(seen, method.modalities),
                           nnx.Rngs(cfg.seed * 1000 + k))
      trainer.fit(model, seen, fit_idx, bins=bins, fold=k, val_idx=val_idx)
      if scenarios == ("full",):
        score_stage = dataclasses.replace(trainer.stages[-1], select="c_index")
        scores.append(trainer.validation_score(score_stage, model, seen, val_idx, bins))
        continue
      fold_scores = _scenario_scores(method, model, seen, val_idx, scenarios, cfg, mesh, k)
      for name, value in fold_scores.items():
        per_scenario[name].append(round(value, 4))
      scores.append(float(np.mean(list(fold_scores.values()))))
    entry = {"overrides": overrides, "val_c_index_per_fold": [round(s, 4) for s in scores],
             "val_c_index_mean": round(float(np.mean(scores)), 4),
             "chosen_epochs": trainer.chosen_epochs, "seconds": round(time.perf_counter() - t0, 1)}
    if scenarios != ("full",):
      entry["val_c_index_per_scenario"] = per_scenario
    table.append(entry)
    log.info("tune %d/%d %s: validation C-index %.4f", p_i + 1, len(points), overrides,
             entry["val_c_index_mean"])
  best = max(range(len(table)), key=lambda i: table[i]["val_c_index_mean"])
  out = {"grid": [list(g) for g in config.tune.grid], "scenarios": list(scenarios),
         "folds": list(run_folds),
         "points": table, "chosen": table[best]["overrides"],
         "cv_flags": " ".join(f"--config.{k}={v}" for k, v in table[best]["overrides"].items())}
  if jax.process_index() == 0:
    atomic_write_json(Path(workdir) / "tune.json", out)
  return out
