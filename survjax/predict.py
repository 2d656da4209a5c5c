"""Use a trained run: predict a new cohort with the fold models, and validate externally.

``predict_run(config, workdir, data)`` (the library call behind ``python -m survjax.main
--mode=predict``) restores every evaluated fold model of the run in ``workdir`` and, for
every patient of the new cohort described by ``data`` (a config ``data`` section), writes

* the risk of each fold model (``risk_fold<k>``, the method's ``"risk"`` output, higher =
  worse) and of their **ensemble**: the mean over folds of the *standardised* fold risks
  ``z_k = (r_k - mean_k) / std_k``, with ``mean_k``, ``std_k`` those of fold ``k``'s
  out-of-fold risks on the training cohort (so every fold model weighs the same whatever
  the scale of its output);
* the **risk group** (``high`` / ``low``) of the ensemble risk against the training
  cohort's cut-off: the median of the pooled standardised out-of-fold risks of the
  training cohort (each patient scored by the one fold model that did not train on it);
  per fold, ``group_fold<k>`` uses the median of fold ``k``'s out-of-fold risks;
* the predicted **survival curve** where the method's time model gives one: discrete-time
  methods with a ``survival`` hook give ``S`` at their time-bin edges, Cox methods
  ``S(t | x) = exp(-H0(t) exp(r))`` with Breslow's baseline cumulative hazard ``H0`` of
  the fold's training patients. The ensemble curve is the mean over folds of the fold
  curves (as step functions) on a common grid: the union of the fold bin edges
  (discrete-time) or the 10 %, 20 %, ..., 90 % quantiles of the training cohort's event
  times (Cox);
* which of the method's modalities were present. A patient's missing modalities go through
  the method's own missing path (the modalities it lacks are withheld from its batch, as
  in a ``missing_<m>`` scenario). A modality the whole new cohort lacks is added as
  unavailable for everyone.

When the new cohort has survival labels, it is also validated: Harrell's and Uno's C,
the time-dependent (cumulative/dynamic) AUC and the integrated Brier score of the ensemble,
with percentile bootstrap 95 % intervals over patients, Harrell's C per fold model, and a
Kaplan-Meier plot of the training-defined risk groups with the log-rank p-value
(``report.md``, ``km_external.png``).

Per-fold quantities fitted on the training cohort (out-of-fold risk statistics and
cut-offs, the bin edges, the Breslow baseline) are written by the cross-validation harness
into ``fold_<k>/predict.json`` (`fold_predict_info`). For a run trained before that file
existed they are recomputed here from the training cohort and the restored models (the
same computation; the output says ``"recomputed"``). The training cohort is read in any
case (``config.data``): the fold models are restored through the training code path,
which checks that the run directory was made with this configuration and cohort.

Everything the user can get wrong (an unknown run directory, a cohort whose modalities or
feature dimensions differ from training's, a modality the run never saw) raises
`InputError` before anything is written; outputs are written atomically.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from survjax import rundir
from survjax.data import check_plain_name
from survjax.data.batching import iterate_batches
from survjax.data.cohort import Cohort, Modality
from survjax.data.formats import impute_fold, standardize_fold
from survjax.errors import InputError
from survjax.evaluate.metrics import concordance_index
from survjax.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from survjax.train import sharding

log = logging.getLogger("survjax")

PREDICT_INFO = "predict.json"


# --------------------------------------------------------------------------- per fold


def natural_hidden(cohort: Cohort, modalities, idx) -> list[frozenset]:
  """Per patient of ``idx``, the method modalities it does not have (withheld from it)."""
  return [frozenset(m for m in modalities if not cohort.modalities[m].available[i])
          for i in np.asarray(idx)]


def breslow(time, event, risk) -> dict:
  r"""Breslow's baseline cumulative hazard of a Cox model from its training patients.

  .. math:: H_0(t) = \sum_{s \le t} \frac{d_s}{\sum_{j: t_j \ge s} e^{r_j}}

  over the distinct event times ``s`` (``d_s`` events at ``s``). Returns
  ``{"times": [S], "cumhaz": [S]}``; ``H0`` is a step function, 0 before the first time.
  """
  time = np.asarray(time, np.float64)
  event = np.asarray(event, bool)
  risk = np.asarray(risk, np.float64)
  shift = float(risk.max()) if risk.size else 0.0
  w = np.exp(risk - shift)
  s = np.unique(time[event])
  d = np.array([np.sum(event & (time == t)) for t in s], np.float64)
  den = np.array([w[time >= t].sum() for t in s])
  cumhaz = np.cumsum(d / den) * np.exp(-shift)
  return {"times": s.tolist(), "cumhaz": cumhaz.tolist()}


def _step(times, values, grid, before):
  """A right-continuous step function (``values[j]`` from ``times[j]``) at ``grid``."""
  j = np.searchsorted(np.asarray(times, np.float64), np.asarray(grid, np.float64),
                      side="right") - 1
  vals = np.asarray(values, np.float64)
  out = np.where(j >= 0, vals[..., np.clip(j, 0, None)] if vals.ndim == 1 else
                 vals[:, np.clip(j, 0, None)], before)
  return out


def _stats(r: np.ndarray) -> dict:
  r = np.asarray(r, np.float64)
  std = float(np.std(r))
  return {"n": int(r.size), "mean": float(np.mean(r)), "std": std if std > 0 else 1.0,
          "median": float(np.median(r))}


CUTOFF_PATIENTS = 64


def fold_predict_info(method, cohort, predictor, spec, model, k, tr, va, edges, key,
                      source: str = "training", scenarios=(), scenario_seed: int = 0) -> dict:
  """What predicting a new cohort needs from fold ``k``, fitted on the training cohort.

  Risks of the fold model on its training patients ``tr`` and held-out patients ``va``,
  each patient with the modalities it has (`natural_hidden`): their mean / std / median
  (``"train"``, ``"oof"``), the out-of-fold risks themselves (``oof_case_ids``,
  ``oof_risk``: the ensemble cut-off pools them), the time-bin edges (discrete-time) and
  Breslow's baseline from the training patients (Cox). Written by the CV harness to
  ``fold_<k>/predict.json``.

  With ``scenarios`` (the CV run's), also for the report: ``train_cutoff[row]``, the median
  risk of the fold's training patients (at most ``CUTOFF_PATIENTS`` of them, evenly
  spaced) under each scenario row (the KM risk groups of the
  held-out patients use it), and ``calibration``: the predicted survival of the held-out
  patients at the cohort's median follow-up time (discrete-time methods with a
  ``survival`` hook, Cox methods).
  """
  from survjax.evaluate import scenarios as scen
  tr, va = np.asarray(tr), np.asarray(va)
  risks = {}
  for name, idx, sub in (("train", tr, 0), ("oof", va, 1)):
    hidden = natural_hidden(cohort, method.modalities, idx)
    risks[name] = predictor.predict(model, cohort, idx, hidden, spec,
                                    jax.random.fold_in(key, 1000 + sub))["risk"]
  info = {"fold": int(k), "source": source, "time_model": method.time_model,
          "time_bins": None if edges is None else np.asarray(edges).tolist(),
          "train": _stats(risks["train"]), "oof": _stats(risks["oof"]),
          "oof_case_ids": cohort.case_ids[va].tolist(),
          "oof_risk": [float(x) for x in risks["oof"]]}
  if method.time_model == "cox":
    info["breslow"] = breslow(cohort.time[tr], cohort.event[tr], risks["train"])
  cut = {}
  # The cut-offs are medians: CUTOFF_PATIENTS evenly spaced training patients estimate
  # them well enough for a risk split, at a fraction of the cost of predicting every
  # training patient under every scenario (MUST samples a diffusion model per patient).
  sub = tr if len(tr) <= CUTOFF_PATIENTS else tr[
      np.linspace(0, len(tr) - 1, CUTOFF_PATIENTS).round().astype(int)]
  for s_i, name in enumerate(scenarios):
    hidden = scen.hidden_for(name, method.modalities, cohort.case_ids[sub], scenario_seed)
    preds = predictor.predict(model, cohort, sub, hidden, spec,
                              jax.random.fold_in(key, 2000 + s_i))
    for variant, r in preds.items():
      cut[name if variant == "risk" else f"{name}/{variant}"] = float(np.median(r))
  if cut:
    info["train_cutoff"] = cut
  if scenarios:
    lab = cohort.labelled
    horizon = float(np.median(cohort.time[lab]))
    surv = None
    hidden = natural_hidden(cohort, method.modalities, va)
    if method.time_model == "cox":
      h0 = _step(info["breslow"]["times"], info["breslow"]["cumhaz"], [horizon], 0.0)[0]
      surv = np.exp(-h0 * np.exp(risks["oof"]))
    elif getattr(method, "survival", None) is not None and edges is not None:
      s = _run_hook(lambda m, b, p: method.survival(m, b, p, None), model, cohort, va,
                    hidden, spec, predictor.mesh, method)
      s = np.stack(s)[:, :len(edges)]
      surv = _step(edges, s, [horizon], 1.0)[:, 0]
    if surv is not None:
      info["calibration"] = {"time": horizon, "oof_survival": [float(x) for x in surv]}
  return info


# --------------------------------------------------------------------------- the cohorts


def data_section(config, predict) -> object:
  """The new cohort's ``data`` section from the ``--predict.*`` flags.

  ``predict.data`` = ``path/to/config.py[:variant]``: that config's ``data`` section.
  Otherwise a copy of the training config's ``data`` with the file fields given
  (``predict.clinical_csv``, ``features_dir``, ``signatures_csv``, ``radiology_dir``)
  replaced and ``source = "files"``; fields not given keep the training values (the
  tabular columns, ``allow_missing``, ``impute``, ...).
  """
  if predict.get("data"):
    spec = str(predict.data)
    path, _, variant = spec.partition(":")
    if not Path(path).is_file():
      raise InputError("config file not found, expected --predict.data=<config.py>[:variant]",
                       path=path)
    import importlib.util
    mod_spec = importlib.util.spec_from_file_location("_survjax_predict_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
      mod_spec.loader.exec_module(mod)
      other = mod.get_config(variant) if variant else mod.get_config()
    except InputError:
      raise
    except Exception as e:
      raise InputError(f"cannot load the config ({type(e).__name__}: {e})", path=path) from e
    if "data" not in other:
      raise InputError("config has no data section", path=path)
    return other.data
  fields = ("clinical_csv", "features_dir", "signatures_csv", "radiology_dir")
  given = {f: predict.get(f) for f in fields if predict.get(f)}
  if not given:
    raise InputError("no new cohort given, expected --predict.data=<config.py> or "
                     "--predict.clinical_csv=<csv> (with --predict.features_dir=... where the "
                     "run read slides)", path="--predict")
  data = copy.deepcopy(config.data)
  with data.unlocked():
    data.source = "files"
    data.name = predict.get("name") or Path(given.get("clinical_csv", "cohort")).stem
    check_plain_name(data.name, "--predict.name")
    for f in fields:
      data.files[f] = given.get(f, "")
  return data


def check_compatible(train: Cohort, new: Cohort, method, source: str
                     ) -> tuple[Cohort, list[str]]:
  """The new cohort, checked against the training one (names, kinds, dims, tokens), and
  notes on what was changed (logged by the caller once nothing can fail, so that bad
  input stays one line).

  A modality the method reads that the whole new cohort lacks is added, unavailable for
  every patient; one it does not read is dropped, whatever its layout. A modality the run
  never saw, or one the method reads whose kind, feature dimension or token groups
  differ, raises `InputError`.
  """
  mods = {}
  for name, mod in new.modalities.items():
    if name not in train.modalities:
      raise InputError(f"modality {name!r} was not in the training cohort (it had "
                       f"{list(train.modalities)}), expected only modalities the run saw",
                       path=source)
    if name not in method.modalities:
      continue
    mods[name] = mod
    ref = train.modalities[name]
    if mod.kind != ref.kind:
      raise InputError(f"modality {name!r} is of kind {mod.kind!r}, the run was trained on "
                       f"kind {ref.kind!r}", path=source)
    if mod.dim != ref.dim:
      raise InputError(f"modality {name!r} has feature dimension {mod.dim}, the run was "
                       f"trained on dimension {ref.dim}", path=source)
    if mod.kind == "tokens" and mod.group_sizes != ref.group_sizes:
      raise InputError(f"modality {name!r} has tokens of sizes {list(mod.group_sizes)}, the "
                       f"run was trained on {list(ref.group_sizes)}", path=source)
    if mod.columns and ref.columns and tuple(mod.columns) != tuple(ref.columns):
      j = next(j for j, (a, b) in enumerate(zip(mod.columns, ref.columns)) if a != b)
      raise InputError(f"modality {name!r} column {j} is {mod.columns[j]!r}, the run was "
                       f"trained with {ref.columns[j]!r} there (same columns and categories "
                       "expected, in the same order)", path=source)
  n = len(new)
  notes = []
  for name in method.modalities:
    if name in mods:
      continue
    ref = train.modalities[name]
    avail = np.zeros(n, bool)
    if ref.kind == "bag":
      mods[name] = Modality("bag", avail, bags=[np.zeros((0, ref.dim), np.float16)] * n)
    else:
      shape = (n,) + ref.values.shape[1:]
      mods[name] = Modality(ref.kind, avail, values=np.zeros(shape, ref.values.dtype),
                            groups=ref.groups, columns=ref.columns)
    notes.append(f"the new cohort has no {name}: predicted without it for every patient")
  none = np.ones(n, bool)
  for name in method.modalities:
    none &= ~mods[name].available
  if none.any():
    i = int(np.argmax(none))
    raise InputError(f"none of the method's modalities {list(method.modalities)} is "
                     "available, expected at least one per patient", path=source,
                     case_id=new.case_ids[i])
  notes += [f"the new cohort's {name} is not read by {method.name}: ignored"
            for name in new.modalities if name not in mods]
  out = Cohort(name=new.name, case_ids=new.case_ids, time=new.time, event=new.event,
               modalities=mods, true_risk=None)
  if getattr(new, "imputation", None):
    out.imputation = new.imputation
  return out, notes


def _read_json(path: Path) -> dict:
  """A JSON file the training run wrote; an `InputError` if it is damaged."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise InputError(f"cannot read it ({e}), expected the JSON the training run wrote",
                     path=path) from None
  if not isinstance(value, dict):
    raise InputError("expected a JSON object, as the training run wrote it", path=path)
  return value


def _check_run(workdir: Path, config, fingerprints: dict) -> None:
  """The run in ``workdir`` was trained with this config and cohort (`survjax.rundir`'s
  record), except that config keys added or removed since (by a newer survjax) are
  ignored: predict trains nothing, and a field the run never had cannot have changed it."""
  recorded = _read_json(workdir / "run.json")
  diffs = [f"{k} {recorded.get(k)} -> {fingerprints[k]}" for k in fingerprints
           if k in recorded and recorded[k] != fingerprints[k]]
  old, new = recorded.get("training_config", {}), rundir.training_config(config)
  diffs += [f"{k} {old[k]} -> {new[k]}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]
  if diffs:
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    raise InputError(f"the run here was trained with another configuration or cohort ({shown}), "
                     "expected the --config (and its data) the run was trained with",
                     path=workdir)


# --------------------------------------------------------------------------- hooks


def _run_hook(fn, model, cohort, idx, hidden, spec, mesh, method):
  """``fn(model, batch, present)`` per patient (numpy arrays, padding rows dropped)."""
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda g, s, b, present: fn(nnx.merge(g, s), b, present),
                   static_argnums=(0, 3))
  out = [None] * len(idx)
  by_pattern: dict[frozenset, list[int]] = {}
  for j, h in enumerate(hidden):
    by_pattern.setdefault(h, []).append(j)
  pos = {int(p): j for j, p in enumerate(idx)}
  for h, rows in by_pattern.items():
    present = frozenset(m for m in method.modalities if m not in h)
    for batch in iterate_batches(cohort, np.asarray(idx)[rows], spec, hide=h,
                                 sort_by_length=True):
      res = jitted(graphdef, state, sharding.shard_batch(batch, mesh), present)
      res = jax.tree.map(sharding.to_host, res)
      for b, p in enumerate(batch["index"]):
        if batch["valid"][b]:
          out[pos[int(p)]] = jax.tree.map(lambda a: np.asarray(a[b]), res)
  return out


# --------------------------------------------------------------------------- main call


def predict_run(config, workdir, data, *, out_dir=None, attention: bool = False,
                bootstrap: int = 200, seed: int = 0) -> dict:
  """Predicts the cohort ``data`` with the fold models of the run in ``workdir``.

  Args:
    config: the run's config (the one it was trained with).
    workdir: the run directory.
    data: the new cohort's ``data`` section (see `data_section`).
    out_dir: where the outputs go (default ``<workdir>/predictions/<cohort name>``).
    attention: also write ``attention/<slide_id>_attention.h5`` (MIL methods, via the
      method's ``attention`` hook).
    bootstrap: bootstrap resamples for the external-validation intervals.
    seed: bootstrap seed.

  Returns:
    The ``predictions.json`` dict.
  """
  from survjax.data import load_cohort
  from survjax.evaluate.cv import Predictor, _train_fold, cohort_folds, eval_batch_spec
  from survjax.models import get_method
  from survjax.train.trainer import Trainer

  workdir = Path(workdir)
  if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
    raise InputError(f"{bootstrap!r} resamples, expected an integer >= 0",
                     path="--predict.bootstrap")
  if not (workdir / "run.json").is_file():
    raise InputError("no trained run here (run.json missing), expected the --workdir of a "
                     "run trained with --mode=cv", path=workdir)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.tensorboard_dir = ""
    config.progress = False
  method = get_method(config)
  train = load_cohort(config.data)
  folds, fingerprints = cohort_folds(train, config)
  _check_run(workdir, config, fingerprints)
  done = [k for k in range(len(folds))
          if (workdir / f"fold_{k}" / "result.json").is_file()]
  if not done:
    raise InputError("no evaluated fold (fold_<k>/result.json), expected a run trained and "
                     "evaluated with --mode=cv", path=workdir)
  source = getattr(data.files, "clinical_csv", "") if data.source == "files" else data.source
  tab = {k: m.columns for k, m in train.modalities.items() if m.kind == "tokens"}
  new, notes = check_compatible(train, load_cohort(data, labels=False, tabular_columns=tab),
                                method, source or "predict data")
  if attention and getattr(method, "attention", None) is None:
    raise InputError(f"method {method.name} has no attention hook, expected a MIL method "
                     "(abmil, ...) for --predict.attention", path="--predict.attention")
  if attention and data.source != "files":
    raise InputError("attention maps need slide files (data.source='files') for the patch "
                     "coordinates", path="--predict.attention")
  if new.labelled.any():   # external validation: what its C-index needs, before predicting
    lab = new.labelled
    if lab.sum() < 2 or not new.event[lab].any():
      raise InputError(f"{int(lab.sum())} labelled patient(s) with {int(new.event[lab].sum())} "
                       "event(s): too few for the external validation, expected at least 2 "
                       "patients and 1 event (or no time/event, to predict only)",
                       path=source or "predict data")
  given_out = bool(out_dir)
  out_dir = Path(out_dir) if out_dir else workdir / "predictions" / new.name
  rundir.check_creatable(out_dir, "--predict.out" if given_out else "--workdir")

  mesh = sharding.make_mesh(config.mesh.num_devices)
  trainer = Trainer(method, mesh=mesh, batch_size=config.train.batch_size,
                    max_instances=config.train.max_instances or None, seed=config.seed,
                    progress=False, buckets=config.data.buckets or None)
  predictor = Predictor(method, mesh)
  spec = eval_batch_spec(config, mesh)
  n = len(new)
  all_idx = np.arange(n)
  hidden = natural_hidden(new, method.modalities, all_idx)
  fold_out, infos = {}, {}
  survival_hook = getattr(method, "survival", None)
  attn = {}
  for k in done:
    tr, va = folds[k]
    # data.files.impute and the standardisation flags: the training fold's column
    # statistics (recomputed from the training cohort and folds), for both cohorts.
    train_i = impute_fold(train, tr)
    train_k = standardize_fold(train_i, tr)
    new_k = standardize_fold(impute_fold(new, tr, reference=train), tr, reference=train_i)
    model, edges, _ = _train_fold(method, train_k, config, workdir, "eval", trainer, k, tr)
    key = jax.random.fold_in(jax.random.key(config.seed + 17), k)
    info_path = workdir / f"fold_{k}" / PREDICT_INFO
    if info_path.is_file():
      info = _read_json(info_path)
    else:
      info = fold_predict_info(method, train_k, predictor, spec, model, k, tr, va, edges, key,
                               source="recomputed at predict time (run trained before "
                               "fold_<k>/predict.json existed)")
    infos[k] = info
    risk = predictor.predict(model, new_k, all_idx, hidden, spec, key)["risk"]
    entry = {"risk": risk}
    if method.time_model == "discrete" and survival_hook is not None and info["time_bins"]:
      s = _run_hook(lambda m, b, p: survival_hook(m, b, p, None), model, new_k, all_idx,
                    hidden, spec, mesh, method)
      entry["surv_at_edges"] = np.stack(s)[:, :len(info["time_bins"])]
    elif method.time_model == "cox":
      b = info["breslow"]
      entry["breslow"] = b
    if attention:
      attn[k] = _run_hook(lambda m, b, p: method.attention(m, b), model, new_k, all_idx,
                          hidden, spec, mesh, method)
    fold_out[k] = entry

  result = _assemble(method, train, new, infos, fold_out, hidden, done)
  if new.labelled.any():
    result["external_validation"] = external_validation(train, new, result, bootstrap, seed)
  attention_files = {}
  if attention:
    attention_files = _attention_payloads(new, data, attn, done, method)
    result["attention_files"] = sorted(attention_files)
  # Everything is computed: write.
  for name, payload in attention_files.items():
    atomic_write_bytes(out_dir / "attention" / name, payload)
  atomic_write_text(out_dir / "predictions.csv", _predictions_csv(result))
  if "external_validation" in result:
    from survjax.evaluate.km import plot_km
    ev = result["external_validation"]
    plot_km(ev["km"], out_dir / "km_external.png",
            title=f"{method.name}: {new.name}, training-defined risk groups")
    ev["km"] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in ev["km"].items() if k not in ("curves", "bands", "groups")}
    ev["km_figure"] = "km_external.png"
    atomic_write_text(out_dir / "report.md", render_external_report(result))
  if notes:
    result["notes"] = notes
  atomic_write_json(out_dir / "predictions.json", result)
  for note in notes:
    log.info(note)
  result["out_dir"] = str(out_dir)
  return result


def _assemble(method, train, new, infos, fold_out, hidden, done) -> dict:
  n = len(new)
  z = np.stack([(fold_out[k]["risk"] - infos[k]["oof"]["mean"]) / infos[k]["oof"]["std"]
                for k in done])
  ensemble = z.mean(axis=0)
  pooled = np.concatenate([(np.asarray(infos[k]["oof_risk"]) - infos[k]["oof"]["mean"])
                           / infos[k]["oof"]["std"] for k in done])
  cutoff = float(np.median(pooled))
  grid = None
  curves = {}
  if method.time_model == "discrete" and all("surv_at_edges" in fold_out[k] for k in done):
    grid = np.unique(np.concatenate([infos[k]["time_bins"] for k in done]))
    for k in done:
      curves[k] = _step(infos[k]["time_bins"], fold_out[k]["surv_at_edges"], grid, 1.0)
  elif method.time_model == "cox":
    lab = train.labelled
    ev_times = train.time[lab & train.event]
    grid = np.unique(np.quantile(ev_times, np.linspace(0.1, 0.9, 9)))
    for k in done:
      h0 = _step(fold_out[k]["breslow"]["times"], fold_out[k]["breslow"]["cumhaz"], grid, 0.0)
      curves[k] = np.exp(-h0[None, :] * np.exp(fold_out[k]["risk"])[:, None])
  ens_curve = np.mean([curves[k] for k in done], axis=0) if curves else None
  patients = []
  for i in range(n):
    p = {"case_id": str(new.case_ids[i]),
         "present": [m for m in method.modalities if m not in hidden[i]],
         "risk": {str(k): float(fold_out[k]["risk"][i]) for k in done},
         "risk_ensemble": float(ensemble[i]),
         "group": "high" if ensemble[i] > cutoff else "low",
         "group_fold": {str(k): "high" if fold_out[k]["risk"][i] > infos[k]["oof"]["median"]
                        else "low" for k in done}}
    if new.labelled[i]:
      p["time"], p["event"] = float(new.time[i]), bool(new.event[i])
    if ens_curve is not None:
      p["survival"] = [float(v) for v in ens_curve[i]]
      p["survival_fold"] = {str(k): [float(v) for v in curves[k][i]] for k in done}
    if method.time_model == "discrete" and curves:
      p["survival_at_bin_edges"] = {str(k): [float(v) for v in fold_out[k]["surv_at_edges"][i]]
                                    for k in done}
    patients.append(p)
  return {
      "method": method.name, "time_model": method.time_model, "training_cohort": train.name,
      "cohort": new.name, "n_patients": n, "modalities": list(method.modalities),
      "folds": [int(k) for k in done],
      "ensemble": ("mean over fold models of (risk_k - mean_k) / std_k, mean_k and std_k "
                   "of fold k's out-of-fold risks on the training cohort"),
      "standardisation": {str(k): {"mean": infos[k]["oof"]["mean"], "std": infos[k]["oof"]["std"]}
                          for k in done},
      "cutoff": {"ensemble": cutoff,
                 "rule": "median of the training cohort's pooled standardised out-of-fold risks",
                 "fold": {str(k): infos[k]["oof"]["median"] for k in done}},
      "fold_info_source": {str(k): infos[k].get("source", "training") for k in done},
      "survival_times": None if grid is None else [float(t) for t in grid],
      "time_bins": {str(k): infos[k]["time_bins"] for k in done}
      if method.time_model == "discrete" else None,
      "patients": patients,
  }


# --------------------------------------------------------------------------- validation


def _metrics(train, t, e, risk, surv, grid) -> dict:
  from survjax.evaluate.metrics import cumulative_auc, integrated_brier, uno_c
  lab = train.labelled
  tt, te = train.time[lab], train.event[lab]
  out = {"c_index": float(concordance_index(t, e, risk)[0])}
  tau = None
  if (e & (t > tt.max())).any():
    tau = float(tt.max())
  try:
    out["uno_c"] = uno_c(tt, te, t, e, risk, tau=tau)
  except InputError as err:
    out["uno_c_unavailable"] = str(err)
  if grid is not None:
    keep = (t <= tt.max()) if tau is not None else np.ones(len(t), bool)
    try:
      auc, mean_auc, kept = cumulative_auc(tt, te, t[keep], e[keep], risk[keep], grid)
      out["td_auc_mean"] = mean_auc
      out["td_auc"] = {f"{x:g}": float(a) for x, a in zip(kept, auc)}
    except InputError as err:
      out["td_auc_unavailable"] = str(err)
    if surv is not None:
      try:
        out["ibs"] = integrated_brier(tt, te, t[keep], e[keep], surv[keep], grid)
      except InputError as err:
        out["ibs_unavailable"] = str(err)
  return out


def external_validation(train, new, result, bootstrap: int, seed: int) -> dict:
  """Metrics of the ensemble on the labelled patients of ``new``, with bootstrap CIs."""
  from survjax.evaluate.km import split_logrank
  lab = np.flatnonzero(new.labelled)
  pats = [result["patients"][i] for i in lab]
  t, e = new.time[lab], new.event[lab]
  risk = np.array([p["risk_ensemble"] for p in pats])
  grid = None if result["survival_times"] is None else np.asarray(result["survival_times"])
  surv = (np.array([p["survival"] for p in pats]) if grid is not None and "survival" in pats[0]
          else None)
  point = _metrics(train, t, e, risk, surv, grid)
  rng = np.random.default_rng(seed)
  samples: dict[str, list] = {}
  for _ in range(bootstrap):
    b = rng.integers(0, len(lab), len(lab))
    if not e[b].any():
      continue
    with np.errstate(all="ignore"):
      try:
        m = _metrics(train, t[b], e[b], risk[b], None if surv is None else surv[b], grid)
      except (InputError, ValueError, ZeroDivisionError):
        continue
    for key in ("c_index", "uno_c", "td_auc_mean", "ibs"):
      if key in m and np.isfinite(m[key]):
        samples.setdefault(key, []).append(m[key])
  ci = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
        for k, v in samples.items() if len(v) >= 10}
  per_fold = {}
  for k in result["folds"]:
    r = np.array([p["risk"][str(k)] for p in pats])
    per_fold[str(k)] = float(concordance_index(t, e, r)[0])
  high = np.array([p["group"] == "high" for p in pats])
  km = split_logrank(t, e, high, threshold=result["cutoff"]["ensemble"])
  return {"n": int(len(lab)), "n_events": int(e.sum()), "metrics": point,
          "bootstrap_ci95": ci, "bootstrap_resamples": int(bootstrap),
          "c_index_per_fold": per_fold, "km": km,
          "logrank_p": float(km["p_value"]) if np.isfinite(km["p_value"]) else None}


def render_external_report(result: dict) -> str:
  ev = result["external_validation"]
  m, ci = ev["metrics"], ev["bootstrap_ci95"]

  def cell(key):
    if key not in m:
      return "–"
    lo_hi = f" [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if key in ci else ""
    return f"{m[key]:.3f}{lo_hi}"

  p = ev["logrank_p"]
  lines = [f"# {result['method']} on {result['cohort']} (external validation)", "",
           f"Fold models {result['folds']} of the run trained on {result['training_cohort']}; "
           f"{ev['n']} labelled patients, {ev['n_events']} events. Ensemble risk: "
           f"{result['ensemble']}. Intervals: percentile bootstrap 95 % over patients "
           f"({ev['bootstrap_resamples']} resamples).", "",
           "| metric | ensemble |", "|---|---|",
           f"| C-index (Harrell) | {cell('c_index')} |",
           f"| C-index (Uno) | {cell('uno_c')} |",
           f"| time-dependent AUC (mean) | {cell('td_auc_mean')} |",
           f"| integrated Brier score | {cell('ibs')} |", ""]
  for key in ("uno_c_unavailable", "td_auc_unavailable", "ibs_unavailable"):
    if key in m:
      lines.append(f"- {key.replace('_', ' ')}: {m[key]}")
  if result["survival_times"] is None:
    lines.append("- no survival curve from this method: no time-dependent AUC or Brier score")
  lines += ["", "| fold model | C-index (Harrell) |", "|---|---|"]
  lines += [f"| {k} | {v:.3f} |" for k, v in ev["c_index_per_fold"].items()]
  lines += ["", f"Risk groups from the training cohort's cut-off ({result['cutoff']['rule']}): "
            f"{ev['km']['n_high']} high, {ev['km']['n_low']} low; log-rank p = "
            + ("n/a" if p is None or not np.isfinite(p) else f"{p:.3g}")
            + ". ![KM](km_external.png)", ""]
  return "\n".join(lines)


# --------------------------------------------------------------------------- outputs


def _predictions_csv(result: dict) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  folds = [str(k) for k in result["folds"]]
  mods = result["modalities"]
  times = result["survival_times"] or []
  labelled = any("time" in p for p in result["patients"])
  head = ["case_id"] + (["time", "event"] if labelled else []) + \
      [f"present_{m}" for m in mods] + [f"risk_fold{k}" for k in folds] + \
      ["risk_ensemble", "risk_group"] + [f"group_fold{k}" for k in folds] + \
      [f"S({t:g})" for t in times]
  w.writerow(head)
  for p in result["patients"]:
    row = [p["case_id"]]
    if labelled:
      row += [f"{p['time']:.6g}", int(p["event"])] if "time" in p else ["", ""]
    row += [int(m in p["present"]) for m in mods]
    row += [f"{p['risk'][k]:.8g}" for k in folds]
    row += [f"{p['risk_ensemble']:.8g}", p["group"]] + [p["group_fold"][k] for k in folds]
    row += [f"{v:.6g}" for v in p.get("survival", [])]
    w.writerow(row)
  return buf.getvalue()


def _slide_coords(table_row_slides, features_dir, lengths):
  """Per slide: its patch coordinates (CLAM's ``coords`` of the .h5), or the patch index
  ``[[i, 0], ...]`` where the feature file has none (.npy, .pt)."""
  import h5py
  from survjax.data.formats import FEATURE_EXTENSIONS, _find_file, _slide_candidates
  out = []
  for sid, n in zip(table_row_slides, lengths):
    f = _find_file(_slide_candidates(Path(features_dir), sid, FEATURE_EXTENSIONS))
    coords, source = None, "index"
    if f is not None and f.suffix.lower() in (".h5", ".hdf5"):
      with h5py.File(f, "r") as h:
        if "coords" in h:
          coords = np.asarray(h["coords"][()]).reshape(-1, 2)
          source = "coords"
    if coords is None or len(coords) != n:
      coords, source = np.stack([np.arange(n), np.zeros(n, np.int64)], axis=1), "index"
    out.append((sid, coords, source))
  return out


def _attention_payloads(new, data, attn, done, method) -> dict[str, bytes]:
  """``{<slide_id>_attention.h5: bytes}``: per slide, CLAM's layout (``coords [N, 2]``,
  ``scores [N]``); scores are the case's attention over all its patches, averaged over
  fold models (so they sum to one over a one-slide case's patches)."""
  import h5py
  from survjax.data.formats import read_clinical_csv, read_features, _find_file, \
      _slide_candidates, FEATURE_EXTENSIONS
  table = read_clinical_csv(data.files.clinical_csv)
  features_dir = data.files.features_dir
  pos = {c: i for i, c in enumerate(new.case_ids)}
  out = {}
  for ci, cid in enumerate(table.case_ids):
    i = pos[str(cid)]
    per_mod = [a[i] for a in (attn[k] for k in done)]
    if not per_mod or "pathology" not in per_mod[0]:
      continue
    if not new.modalities["pathology"].available[i]:
      continue
    length = len(new.modalities["pathology"].bags[i])
    scores = np.mean([np.asarray(pm["pathology"], np.float64)[:length] for pm in per_mod],
                     axis=0)
    slides = table.slide_ids[ci]
    lengths = []
    for sid in slides:
      f = _find_file(_slide_candidates(Path(features_dir), sid, FEATURE_EXTENSIONS))
      lengths.append(len(read_features(f, case_id=cid)))
    start = 0
    for sid, coords, source in _slide_coords(slides, features_dir, lengths):
      m = len(coords)
      buf = io.BytesIO()
      with h5py.File(buf, "w") as h:
        h["coords"] = coords
        h["scores"] = scores[start:start + m].astype(np.float32)
        h.attrs["case_id"] = str(cid)
        h.attrs["slide_id"] = sid
        h.attrs["coords_source"] = source
        h.attrs["method"] = method.name
      start += m
      stem = sid[: -len(Path(sid).suffix)] if sid.lower().endswith(
          (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn")) else sid
      out[f"{stem}_attention.h5"] = buf.getvalue()
  return out
