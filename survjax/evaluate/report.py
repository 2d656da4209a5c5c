"""``results.json``, ``report.md`` and Kaplan-Meier figures from the fold results.

Kaplan-Meier stratification follows the MUST protocol (supp. 7.4): the median predicted
risk splits patients into high- and low-risk groups and a log-rank test compares them.
Risks of different folds come from different models and are not on one scale, so each
fold's risks are centred on that fold's median before the out-of-fold predictions are
pooled: every patient is thereby split by the median of its own fold, and one log-rank
test is run on the pooled cohort.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from survjax.evaluate.km import median_split_logrank, plot_km
from survjax.io import atomic_write_text


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
    risks.append(r - np.median(r))
    times.append(cohort.time[idx])
    events.append(cohort.event[idx])
  return np.concatenate(times), np.concatenate(events), np.concatenate(risks)


def _summary(values):
  v = np.asarray(values, float)
  return float(np.mean(v)), float(np.std(v))


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
    pooled = _pooled_risks(workdir, fold_results, row, cohort)
    if pooled is not None:
      km = median_split_logrank(*pooled)
      entry["km_logrank_p"] = None if not np.isfinite(km["p_value"]) else float(km["p_value"])
      if write and "/" not in row:
        plot_km(km, workdir / f"km_{row}.png",
                title=f"{method.name} on {cohort.name}: {row} (median split, pooled folds)")
        entry["km_figure"] = f"km_{row}.png"
    scenarios[row] = entry
  diagnostics = {}
  for key in dict.fromkeys(k for f in fold_results for k in f.get("diagnostics", {})):
    vals = [f["diagnostics"][key] for f in fold_results if key in f.get("diagnostics", {})]
    diagnostics[key] = round(float(np.mean(vals)), 4)
  timing = {"train_s_total": round(sum(f["timing"]["train_s"] for f in fold_results), 2),
            "eval_s_total": round(sum(f["timing"]["eval_s"] for f in fold_results), 2)}
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
  results.update({
      "diagnostics": diagnostics,
      "timing": timing,
      "config": json.loads(config.to_json_best_effort()),
      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
  })
  if write:
    atomic_write_text(workdir / "report.md", render_report(results, cohort))
  return results


def render_report(results: dict, cohort=None) -> str:
  lines = [f"# {results['method']} on {results['dataset']}", ""]
  if cohort is not None:
    lines += ["```", cohort.summary(), "```", ""]
  lines += [f"{results['folds']}-fold cross-validation, patient-level, stratified by event "
            "and time. C-index (Harrell) on held-out patients, mean ± std over folds.", ""]
  has_oracle = any("oracle_c_index" in v for v in results["scenarios"].values())
  head = "| scenario | C-index | Uno's C |" + (" oracle C-index |" if has_oracle else "") + \
      " KM log-rank p | per fold |"
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  for name, v in results["scenarios"].items():
    p = v.get("km_logrank_p")
    cells = [f"`{name}`", f"{v['c_index_mean']:.3f} ± {v['c_index_std']:.3f}",
             f"{v['uno_c_mean']:.3f}" if "uno_c_mean" in v else "–"]
    if has_oracle:
      cells.append(f"{v['oracle_c_index']:.3f}" if "oracle_c_index" in v else "–")
    fig = f" ([KM]({v['km_figure']}))" if v.get("km_figure") else ""
    cells.append(("–" if p is None else f"{p:.2e}") + fig)
    cells.append(", ".join(f"{x:.3f}" for x in v["per_fold"]))
    lines.append("| " + " | ".join(cells) + " |")
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
  t = results["timing"]
  lines += ["", "## Timing", "", f"- device: {t.get('device')}",
            f"- training, all folds: {t.get('train_s_total')} s; evaluation: {t.get('eval_s_total')} s"]
  for k, v in t.get("predict_ms_per_patient_batched", {}).items():
    lines.append(f"- `{k}`: {v} ms per patient, batched")
  for k, v in t.get("latency_ms_batch1", {}).items():
    lines.append(f"- `{k}`: {v} ms for one patient alone (batch 1, p50)")
  lines.append("")
  return "\n".join(lines)
