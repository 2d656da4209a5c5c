"""``results.json``, ``report.md`` and Kaplan-Meier figures from the fold results.

Kaplan-Meier stratification follows the MUST protocol (supp. 7.4): a median predicted
risk splits patients into high- and low-risk groups and a log-rank test compares them.
Risks of different folds come from different models and are not on one scale, so each
fold's held-out risks are split at a cut-off fitted on that fold's *training* patients:
the median risk the fold model gives them under the same scenario
(``fold_<k>/predict.json``, ``train_cutoff``); the held-out patients never set their own
threshold. The groups of all folds are pooled and one log-rank test is run on the pooled
cohort. (Runs without ``predict.json`` fall back to each fold's held-out median.) The
figures show 95 % pointwise bands (log-log) and the number at risk under the axis.

Calibration (``calibration.png``): at the cohort's median follow-up time, the held-out
patients' predicted survival (fold models' survival curves: discrete-time methods with a
``survival`` hook, Cox with a Breslow baseline) is compared with the Kaplan-Meier
survival observed in each decile of predicted survival. The C-index per fold is drawn as
a dot plot with the mean ± std over folds (``cindex_folds.png``).
"""

from __future__ import annotations

import csv
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from survjax.evaluate.km import plot_km, split_logrank
from survjax.io import atomic_save_figure, atomic_write_text


def _environment(fold_results) -> dict:
  """The folds' `survjax.environment` when they share one; else ``{"per_fold": [...]}``
  (a run resumed on another machine or package set; None for a fold that predates the
  record)."""
  envs = [f.get("environment") for f in fold_results]
  if envs and envs[0] is not None and all(e == envs[0] for e in envs):
    return envs[0]
  return {"per_fold": envs}


def _pooled_risks(workdir: Path, fold_results, row: str, cohort):
  times, events, risks = [], [], []
  pos = {c: i for i, c in enumerate(cohort.case_ids)}
  for fold in fold_results:
    path = workdir / f"fold_{fold['fold']}" / "risks.csv"
    if not path.exists():
      return None
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
    if not rows or row not in rows[0]:
      return None
    r = np.array([float(x[row]) for x in rows])
    idx = [pos[x["case_id"]] for x in rows]
    info = _predict_info(workdir, fold["fold"])
    cut = (info or {}).get("train_cutoff", {}).get(row)
    risks.append(r - (np.median(r) if cut is None else cut))
    times.append(cohort.time[idx])
    events.append(cohort.event[idx])
  return np.concatenate(times), np.concatenate(events), np.concatenate(risks)


def _predict_info(workdir: Path, k: int) -> dict | None:
  path = workdir / f"fold_{k}" / "predict.json"
  return json.loads(path.read_text()) if path.exists() else None


def calibration(workdir: Path, fold_results, cohort, bins: int = 10) -> dict | None:
  """Predicted vs Kaplan-Meier-observed survival at the median follow-up time, by decile
  of the held-out patients' predicted survival (pooled over folds); None without curves."""
  from survjax.evaluate.km import _km
  pos = {c: i for i, c in enumerate(cohort.case_ids)}
  pred, idx, horizon = [], [], None
  for fold in fold_results:
    info = _predict_info(workdir, fold["fold"])
    if not info or "calibration" not in info:
      return None
    horizon = info["calibration"]["time"]
    pred.append(np.asarray(info["calibration"]["oof_survival"]))
    idx += [pos[c] for c in info["oof_case_ids"]]
  pred = np.concatenate(pred)
  idx = np.asarray(idx)
  order = np.argsort(pred, kind="stable")
  out = []
  for group in np.array_split(order, min(bins, len(order))):
    t, e = cohort.time[idx[group]], cohort.event[idx[group]]
    kt, ks = _km(t, e)
    observed = float(ks[kt <= horizon][-1]) if (kt <= horizon).any() else 1.0
    out.append({"n": int(len(group)), "predicted": float(pred[group].mean()),
                "observed_km": observed})
  return {"time": float(horizon), "groups": out}


def plot_calibration(cal: dict, path, title: str) -> Path:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(4.2, 4.0), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  p = [g["predicted"] for g in cal["groups"]]
  o = [g["observed_km"] for g in cal["groups"]]
  ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
  ax.plot(p, o, "o-", color="tab:blue", markersize=4)
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel(f"predicted S(t = {cal['time']:.3g})")
  ax.set_ylabel("Kaplan-Meier observed S(t)")
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  return atomic_save_figure(fig, path)


def _summary(values):
  v = np.asarray(values, float)
  return float(np.mean(v)), float(np.std(v))


def held_out_summary(fold_results) -> dict:
  """The method's ``held_out`` statistics over the folds: ``{name: {"mean", "std",
  "per_fold"}}`` (mean and std over the folds where the value is defined; ``per_fold``
  keeps None where it is not), names in first-seen order."""
  out = {}
  for name in dict.fromkeys(n for f in fold_results for n in f.get("held_out", {})):
    per = [f.get("held_out", {}).get(name) for f in fold_results]
    vals = [v for v in per if v is not None]
    entry = {"per_fold": [None if v is None else round(v, 6) for v in per]}
    if vals:
      mean, std = _summary(vals)
      entry.update(mean=round(mean, 6), std=round(std, 6))
    out[name] = entry
  return out


def write_outputs(workdir, method, cohort, config, folds, fold_results, *, write=True,
                  reference_models=()) -> dict:
  """Aggregates folds into the results dict; writes report.md and km_<scenario>.png.

  ``reference_models`` (keys of `survjax.evaluate.reference.MODELS`) become
  ``results["reference_rows"]`` from each fold's ``"reference"`` entry.
  """
  workdir = Path(workdir)
  rows = list(dict.fromkeys(r for f in fold_results for r in f["scenarios"]))
  scenarios = {}
  for row in rows:
    per = [f["scenarios"][row] for f in fold_results if row in f["scenarios"]]
    mean, std = _summary([p["c_index"] for p in per])
    entry = {"c_index_mean": round(mean, 4), "c_index_std": round(std, 4),
             "per_fold": [round(p["c_index"], 4) for p in per]}
    if all("uno_c" in p for p in per):
      entry["uno_c_mean"] = round(_summary([p["uno_c"] for p in per])[0], 4)
    if all("oracle_c_index" in p for p in per):
      o_mean, o_std = _summary([p["oracle_c_index"] for p in per])
      entry["oracle_c_index"] = round(o_mean, 4)
      entry["oracle_c_index_std"] = round(o_std, 4)
    if all("oracle_const_c_index" in p for p in per):
      # the most any fill of the withheld modalities can add over a constant one
      entry["oracle_const_c_index"] = round(_summary([p["oracle_const_c_index"]
                                                      for p in per])[0], 4)
    if all("chosen" in p for p in per):
      entry["chosen_per_fold"] = [p["chosen"] for p in per]
    pooled = _pooled_risks(workdir, fold_results, row, cohort)
    if pooled is not None:
      t_, e_, r_ = pooled   # risks relative to each fold's cut-off: high = above it
      km = split_logrank(t_, e_, r_ > 0, threshold=0.0)
      entry["km_logrank_p"] = None if not np.isfinite(km["p_value"]) else float(km["p_value"])
      if write and "/" not in row:
        plot_km(km, workdir / f"km_{row}.png",
                title=f"{method.name} on {cohort.name}: {row} (training-fold median cut-off, "
                      "pooled folds)")
        entry["km_figure"] = f"km_{row}.png"
    scenarios[row] = entry
  diagnostics = {}
  for key in dict.fromkeys(k for f in fold_results for k in f.get("diagnostics", {})):
    vals = [f["diagnostics"][key] for f in fold_results if key in f.get("diagnostics", {})]
    diagnostics[key] = round(float(np.mean(vals)), 4)
  held_out = held_out_summary(fold_results)
  timing = {"train_s_total": round(sum(f["timing"]["train_s"] for f in fold_results), 2),
            "eval_s_total": round(sum(f["timing"]["eval_s"] for f in fold_results), 2)}
  if all("predict_info_s" in f["timing"] for f in fold_results):
    timing["predict_info_s_total"] = round(
        sum(f["timing"]["predict_info_s"] for f in fold_results), 2)
  for part in ("train", "eval", "predict_info"):   # compile seconds inside the totals above
    clocks = [f["timing"].get(f"{part}_compile") for f in fold_results]
    if clocks and None not in clocks:   # not for a run resumed over folds that predate it
      timing[f"{part}_compile_s_total"] = round(sum(c["total"] for c in clocks), 2)
      timing[f"{part}_persistent_cache_hits"] = sum(c["persistent_cache_hits"] for c in clocks)
  per_patient = {}
  for f in fold_results[1:] or fold_results:  # fold 0's times include compilation
    for k, v in f["timing"].items():
      if k.startswith("predict_ms_per_patient/"):
        per_patient.setdefault(k.split("/", 1)[1], []).append(v)
  timing["predict_ms_per_patient_batched"] = {k: round(float(np.median(v)), 3)
                                              for k, v in per_patient.items()}
  for f in fold_results:
    if "latency_ms_batch1" in f["timing"]:
      timing["latency_ms_batch1"] = f["timing"]["latency_ms_batch1"]
  timing["device"] = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}"
  timing["host"] = platform.node() and platform.processor() or platform.machine()
  results = {
      "method": method.name,
      "dataset": cohort.name,
      "n_patients": int(len(cohort)),
      "n_events": int(cohort.event.sum()),
      "folds": len(fold_results),
      "scenarios": scenarios,
  }
  if reference_models:
    from survjax.evaluate.reference import reference_rows
    results["reference_rows"] = reference_rows(fold_results, reference_models)
    timing["reference_s_total"] = round(sum(
        v.get("fit_s", 0.0) for f in fold_results for v in f.get("reference", {}).values()), 2)
  if held_out:
    results["held_out"] = held_out
  results.update({
      "diagnostics": diagnostics,
      "timing": timing,
      "environment": _environment(fold_results),
      "config": json.loads(config.to_json_best_effort()),
      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
  })
  cal = calibration(workdir, fold_results, cohort)
  if cal is not None:
    results["calibration"] = cal
  if write:
    if scenarios:
      plot_cindex_per_fold(results, workdir / "cindex_folds.png")
      results["cindex_figure"] = "cindex_folds.png"
    if cal is not None:
      plot_calibration(cal, workdir / "calibration.png",
                       f"{method.name} on {cohort.name}: calibration, held-out deciles")
    atomic_write_text(workdir / "report.md", render_report(results, cohort))
  return results


def plot_cindex_per_fold(results: dict, path) -> Path:
  """Dot plot of the C-index per fold for every scenario row, with the mean ± std over
  folds (the numbers of ``results["scenarios"]``); written atomically."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  rows = list(results["scenarios"])
  fig = Figure(figsize=(6.0, 0.9 + 0.35 * len(rows)), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for y, name in enumerate(rows):
    v = results["scenarios"][name]
    ax.scatter(v["per_fold"], [y] * len(v["per_fold"]), s=14, color="tab:blue", zorder=2)
    ax.errorbar([v["c_index_mean"]], [y], xerr=[v["c_index_std"]], fmt="D", color="black",
                markersize=4, capsize=3, zorder=3)
  ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels(rows, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("C-index (dots: folds; diamond: mean ± std)")
  ax.set_title(f"{results['method']} on {results['dataset']}", fontsize=9)
  fig.tight_layout()
  return atomic_save_figure(fig, path)


def render_report(results: dict, cohort=None) -> str:
  lines = [f"# {results['method']} on {results['dataset']}", ""]
  if cohort is not None:
    lines += ["```", cohort.summary(), "```", ""]
  lines += [f"{results['folds']}-fold cross-validation, patient-level, stratified by event "
            "and time. C-index (Harrell) on held-out patients, mean ± std over folds.", ""]
  require = (results.get("config", {}).get("eval", {}) or {}).get("require") or ()
  if require:
    lines += [f"Evaluated on the held-out patients that have {', '.join(require)} in the "
              "data (`eval.require`); their other modalities as they are (natural "
              "missingness, which the oracle counts as withheld).", ""]
  has_oracle = any("oracle_c_index" in v for v in results["scenarios"].values())
  has_room = any("oracle_const_c_index" in v for v in results["scenarios"].values())
  head = ("| scenario | C-index | Uno's C |" + (" oracle C-index |" if has_oracle else "")
          + (" imputation room |" if has_room else "") + " KM log-rank p | per fold |")
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  for name, v in results["scenarios"].items():
    p = v.get("km_logrank_p")
    cells = [f"`{name}`", f"{v['c_index_mean']:.3f} ± {v['c_index_std']:.3f}",
             f"{v['uno_c_mean']:.3f}" if "uno_c_mean" in v else "–"]
    if has_oracle:
      cells.append(f"{v['oracle_c_index']:.3f}" if "oracle_c_index" in v else "–")
    if has_room:
      cells.append(f"{v['oracle_c_index'] - v['oracle_const_c_index']:+.3f}"
                   if "oracle_const_c_index" in v and "oracle_c_index" in v else "–")
    fig = f" ([KM]({v['km_figure']}))" if v.get("km_figure") else ""
    cells.append(("–" if p is None else f"{p:.2e}") + fig)
    cells.append(", ".join(f"{x:.3f}" for x in v["per_fold"]))
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  if has_room:
    lines += ["Imputation room: the oracle minus the oracle with the withheld modality's "
              "specific factors at their mean, the most any fill can add over a constant "
              "one.", ""]
  chosen = {n: v["chosen_per_fold"] for n, v in results["scenarios"].items()
            if "chosen_per_fold" in v}
  if chosen:
    lines += ["`/auto` rows use, per fold, the variant with the best C-index on the inner "
              "validation patients: " + "; ".join(
                  f"`{n}`: {', '.join(c)}" for n, c in chosen.items()) + ".", ""]
  if results.get("cindex_figure"):
    lines += [f"C-index per fold: [{results['cindex_figure']}]({results['cindex_figure']}). "
              "KM figures: median split with 95 % bands (log-log) and the number at risk "
              "under the axis.", ""]
  cal = results.get("calibration")
  if cal:
    lines += [f"Calibration at the median follow-up time t = {cal['time']:.3g} (held-out "
              "patients by decile of predicted survival, pooled over folds; "
              "[calibration.png](calibration.png)):", "",
              "| decile | n | predicted S(t) | Kaplan-Meier S(t) |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {g['n']} | {g['predicted']:.3f} | {g['observed_km']:.3f} |"
              for i, g in enumerate(cal["groups"])]
    lines.append("")
  lines.append("Rows `scenario/variant` are alternative predictions for the same scenario "
               "(for example the missing part filled with zeros or the training mean "
               "instead of the generative model).")
  if results.get("reference_rows"):
    lines += ["", "## Reference models on the same folds", "",
              "scikit-survival models fitted on each fold's training patients using the "
              "tabular modalities (training-fold mean imputation and standardisation), "
              "same C-index code.", "",
              "| model | scenario | C-index | per fold |", "|---|---|---|---|"]
    for r in results["reference_rows"]:
      lines.append(f"| {r['model']} | `{r['scenario']}` | {r['c_index_mean']:.3f} ± "
                   f"{r['c_index_std']:.3f} | {', '.join(f'{x:.3f}' for x in r['per_fold'])} |")
  if results.get("diagnostics"):
    lines += ["", "## Diagnostics (held-out patients, mean over folds)", "",
              "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in results["diagnostics"].items()]
    if any(k.startswith(("spread(", "cos_centred(")) for k in results["diagnostics"]):
      lines += ["", "`spread(x)`: share of x's mean square that varies between patients "
                "(0 = the same vector for all); `cos_centred(a,b)`: the cosine after "
                "subtracting each vector's mean over the held-out patients, i.e. how the "
                "patient-level parts align (`cos(a,b)` also counts the common offsets)."]
  if results.get("held_out"):
    lines += ["", "## Held-out statistics of the method (test patients of each fold)", "",
              "| quantity | mean ± std over folds | per fold |", "|---|---|---|"]
    for k, v in results["held_out"].items():
      per = ", ".join("-" if x is None else f"{x:.4g}" for x in v["per_fold"])
      mean = f"{v['mean']:.4g} ± {v['std']:.2g}" if "mean" in v else "-"
      lines.append(f"| `{k}` | {mean} | {per} |")
  t = results["timing"]
  lines += ["", "## Timing", "", f"- device: {t.get('device')}",
            f"- training, all folds: {t.get('train_s_total')} s; evaluation: {t.get('eval_s_total')} s"
            + (f"; what `--mode=predict` needs (training-patient cut-offs, out-of-fold "
               f"statistics, calibration): {t['predict_info_s_total']} s"
               if "predict_info_s_total" in t else "")]
  if "train_compile_s_total" in t:
    lines.append(f"- of which compiling (tracing, lowering, XLA): training "
                 f"{t['train_compile_s_total']} s, evaluation {t.get('eval_compile_s_total')} s"
                 + (f", predict information {t['predict_info_compile_s_total']} s"
                    if "predict_info_compile_s_total" in t else "")
                 + f"; persistent-cache hits {t['train_persistent_cache_hits']} + "
                 f"{t.get('eval_persistent_cache_hits')}"
                 + (f" + {t['predict_info_persistent_cache_hits']}"
                    if "predict_info_persistent_cache_hits" in t else ""))
  for k, v in t.get("predict_ms_per_patient_batched", {}).items():
    lines.append(f"- `{k}`: {v} ms per patient, batched")
  for k, v in t.get("latency_ms_batch1", {}).items():
    lines.append(f"- `{k}`: {v} ms for one patient alone (batch 1, p50)")
  lines.append("")
  return "\n".join(lines)
