r"""Paired comparison of runs made on identical folds: what is a difference, what is noise.

  python -m survjax.compare runs/must runs/abmil runs/snn --reference abmil:full \
      --out docs/results/must_vs_unimodal

For every run and every scenario row (``<run>:<row>``, ``<run>`` the run directory's name,
so two runs of one method stay apart) the table gives the mean +- std
of the per-fold C-index and a 95% interval from a bootstrap over patients resampled
within each fold; the statistic is the mean over folds of the per-fold Harrell's C, so
the risks of different fold models are never ranked against each other. With
``--reference``, every row also gets its paired difference to that row: both are computed
on the same resampled patients in every bootstrap draw. "A beats B" only where that
interval excludes zero; otherwise the two are level.

Runs on different folds (another ``splits_fingerprint``, or other held-out patients) are
refused with one line. Writes ``<out>.md`` (the table) and ``<out>.png`` (forest plot).

A resample is a vector of patient counts ``w`` (multinomial), so each fold's statistic is

.. math::

  C(w) = \frac{\sum_{ij} w_i w_j \, K_{ij} \, (\mathbb{1}[r_i > r_j] + \tfrac12
         \mathbb{1}[r_i = r_j])}{\sum_{ij} w_i w_j K_{ij}},

with ``K_{ij}`` Harrell's comparability of patients ``i`` and ``j`` (``i`` has an event and
``t_i < t_j``, or ``t_i = t_j`` and ``j`` is censored): exactly the C-index of the
resampled patients (a patient's copies are never comparable with each other), computed
for all draws at once as two quadratic forms.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from survjax.errors import InputError
from survjax.io import atomic_save_figure, atomic_write_text


def _read_fold_risks(path: Path):
  expected = "expected columns case_id, time, event, <scenario rows> and a row per patient"
  try:
    with open(path, newline="") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise InputError(f"cannot read ({e}), {expected}", path=path) from None
  if len(rows) < 2 or rows[0][:3] != ["case_id", "time", "event"]:
    raise InputError(expected, path=path)
  header, body = rows[0], rows[1:]
  try:
    ids = np.array([r[0] for r in body])
    time = np.array([float(r[1]) for r in body])
    event = np.array([int(r[2]) for r in body], bool)
    risks = {name: np.array([float(r[3 + j]) for r in body])
             for j, name in enumerate(header[3:])}
  except (ValueError, IndexError):
    raise InputError(f"a row that is not a number per column, {expected}", path=path) from None
  return ids, time, event, risks


def load_run(path) -> dict:
  """A run directory's results.json and the out-of-fold risks of every fold it reports
  (``{fold: (case ids, time, event, {row: risk})}``)."""
  path = Path(path)
  try:
    results = json.loads((path / "results.json").read_text())
  except OSError:
    raise InputError("no results.json, expected a finished cross-validation run",
                     path=path) from None
  except ValueError as e:
    raise InputError(f"results.json is not JSON ({e}), expected a finished run's",
                     path=path) from None
  cv_config = results.get("config", {}).get("cv", {})
  expected = list(cv_config.get("folds") or range(int(results.get("folds") or 0)))
  present = {int(d.name[5:]): d / "risks.csv" for d in path.glob("fold_*")
             if d.name[5:].isdigit() and (d / "risks.csv").exists()}
  if not expected:   # a results.json without its folds: the risks files found
    expected = sorted(present)
  if not expected:
    raise InputError("no fold_<k>/risks.csv, expected an evaluated run", path=path)
  lacking = [k for k in expected if k not in present]
  if lacking:
    raise InputError(f"fold_{lacking[0]}/risks.csv is missing, expected the risks of every "
                     f"fold results.json reports ({expected})", path=path)
  return {"path": path, "name": path.name, "method": results.get("method"), "results": results,
          "folds": {k: _read_fold_risks(present[k]) for k in expected}}


def _pair_matrices(time, event, risk):
  """``K`` (comparable) and ``K * concordance`` for one fold's patients."""
  ti, tj = time[:, None], time[None, :]
  comparable = event[:, None] & ((ti < tj) | ((ti == tj) & ~event[None, :]))
  diff = risk[:, None] - risk[None, :]
  score = np.where(np.abs(diff) <= 1e-8, 0.5, (diff > 0).astype(float))
  return comparable.astype(float), comparable * score


def bootstrap_cindex(folds, rows, num_draws: int = 1000, seed: int = 0):
  """Per row, the point estimate and the ``[num_draws]`` bootstrap draws of the mean over
  folds of the per-fold C-index. ``folds``: list of ``(time, event, {row: risk})``; every
  row is evaluated on the same resampled patients (paired)."""
  rng = np.random.default_rng(seed)
  point = {r: [] for r in rows}
  draws = {r: np.zeros(num_draws) for r in rows}
  for time, event, risks in folds:
    n = len(time)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=num_draws).astype(float)
    for r in rows:
      k, ks = _pair_matrices(time, event, risks[r])
      point[r].append(ks.sum() / k.sum())
      num = np.einsum("bi,ij,bj->b", weights, ks, weights)
      den = np.einsum("bi,ij,bj->b", weights, k, weights)
      draws[r] += np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.5) / len(folds)
  return {r: float(np.mean(v)) for r, v in point.items()}, draws


def compare(run_dirs, reference: str | None = None, num_draws: int = 1000, seed: int = 0):
  """The comparison table as a list of dicts (see the module docstring)."""
  runs = [load_run(p) for p in run_dirs]
  names = [r["name"] for r in runs]
  if len(set(names)) < len(names):
    raise InputError(f"two runs share a directory name ({names}), expected distinct names: "
                     "rows are labelled <run directory name>:<row>", path=run_dirs[0])
  first = runs[0]
  for run in runs[1:]:
    a = first["results"].get("splits_fingerprint")
    b = run["results"].get("splits_fingerprint")
    if a and b and a != b:   # without fingerprints, the patients of each fold are compared
      raise InputError(f"runs are on different folds ({first['path']}: {a}, {run['path']}: {b}),"
                       " expected runs made on identical folds", path=run["path"])
    if sorted(run["folds"]) != sorted(first["folds"]):
      raise InputError(f"runs evaluated different folds ({first['path']}: "
                       f"{sorted(first['folds'])}, {run['path']}: {sorted(run['folds'])}), "
                       "expected the same folds", path=run["path"])
  labels, folds = [], []
  for k, (ids, time, event, _) in first["folds"].items():
    order = np.argsort(ids)
    fold_risks = {}
    for run in runs:
      r_ids, _, _, risks = run["folds"][k]
      pos = {c: i for i, c in enumerate(r_ids)}
      if set(pos) != set(ids):
        raise InputError(f"runs are on different folds (fold {k} holds other patients than in "
                         f"{first['path']}), expected runs made on identical folds",
                         path=run["path"])
      take = np.array([pos[c] for c in ids[order]])
      for row, values in risks.items():
        fold_risks[f"{run['name']}:{row}"] = values[take]
    folds.append((time[order], event[order], fold_risks))
  labels = list(folds[0][2])
  if reference is not None and reference not in labels:
    raise InputError(f"unknown reference row {reference!r}, expected one of {labels}",
                     path="--reference")
  point, draws = bootstrap_cindex(folds, labels, num_draws, seed)
  table = []
  for label in labels:
    name, row = label.split(":", 1)
    run = next(r for r in runs if r["name"] == name)
    scen = run["results"]["scenarios"].get(row, {})
    entry = {"row": label, "c_index": round(point[label], 4),
             "c_index_std": scen.get("c_index_std"),
             "ci95": [round(float(np.percentile(draws[label], 2.5)), 4),
                      round(float(np.percentile(draws[label], 97.5)), 4)],
             "oracle_c_index": scen.get("oracle_c_index")}
    if scen.get("oracle_const_c_index") is not None and entry["oracle_c_index"] is not None:
      entry["imputation_room"] = round(entry["oracle_c_index"] - scen["oracle_const_c_index"], 4)
    if reference is not None and label != reference:
      d = draws[label] - draws[reference]
      lo, hi = np.percentile(d, [2.5, 97.5])
      entry["diff"] = round(point[label] - point[reference], 4)
      entry["diff_ci95"] = [round(float(lo), 4), round(float(hi), 4)]
      entry["verdict"] = "better" if lo > 0 else "worse" if hi < 0 else "level"
    table.append(entry)
  return table


def to_markdown(table, reference=None, command: str = "") -> str:
  lines = []
  if command:
    lines += [f"`{command}`", ""]
  room = any("imputation_room" in e for e in table)
  if room:
    lines += ["room: the oracle minus the constant-fill oracle (the withheld modality's "
              "specific factors at their mean), the most any fill can add over zeros or the "
              "mean.", ""]
  head = "| row | C-index (mean over folds) | 95% CI | oracle |" + (" room |" if room else "")
  sep = "|---|---|---|---|" + ("---|" if room else "")
  if reference:
    head += f" vs `{reference}` | 95% CI of the difference | |"
    sep += "---|---|---|"
  lines += [head, sep]
  for e in table:
    oracle = "" if e["oracle_c_index"] is None else f"{e['oracle_c_index']:.3f}"
    line = (f"| `{e['row']}` | {e['c_index']:.3f}"
            + (f" +- {e['c_index_std']:.3f}" if e["c_index_std"] is not None else "")
            + f" | {e['ci95'][0]:.3f} to {e['ci95'][1]:.3f} | {oracle} |")
    if room:
      line += f" {e['imputation_room']:+.3f} |" if "imputation_room" in e else " |"
    if reference:
      if "diff" in e:
        line += (f" {e['diff']:+.3f} | {e['diff_ci95'][0]:+.3f} to {e['diff_ci95'][1]:+.3f} |"
                 f" {e['verdict']} |")
      else:
        line += " (reference) | | |"
    lines.append(line)
  return "\n".join(lines) + "\n"


def forest_plot(table, reference, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [e for e in table if "diff" in e] if reference else table
  fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
  for y, e in enumerate(rows[::-1]):
    mid, (lo, hi) = (e["diff"], e["diff_ci95"]) if reference else (e["c_index"], e["ci95"])
    color = {"better": "tab:green", "worse": "tab:red"}.get(e.get("verdict"), "tab:gray")
    ax.plot([lo, hi], [y, y], color=color, lw=2)
    ax.plot([mid], [y], "o", color=color)
  ax.set_yticks(range(len(rows)), [e["row"] for e in rows[::-1]], fontsize=8)
  if reference:
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel(f"C-index difference to {reference} (95% paired bootstrap CI)")
  else:
    ax.set_xlabel("C-index (95% bootstrap CI)")
  fig.tight_layout()
  atomic_save_figure(fig, path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m survjax.compare", description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+", help="run directories (results.json + fold_<k>/risks.csv)")
  p.add_argument("--reference", help="row to compare against, <run directory name>:<scenario row>")
  p.add_argument("--out", help="write <out>.md, <out>.json and <out>.png")
  p.add_argument("--draws", type=int, default=1000)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    if args.draws < 1:
      raise InputError(f"{args.draws} bootstrap draws, expected at least 1", path="--draws")
    if args.out:
      from survjax.rundir import check_creatable
      check_creatable(Path(args.out).parent, "--out")
    table = compare(args.runs, args.reference, args.draws, args.seed)
  except InputError as e:
    print(f"survjax.compare: bad input: {e}", file=sys.stderr)
    return 2
  command = "python -m survjax.compare " + " ".join(argv if argv is not None else sys.argv[1:])
  md = to_markdown(table, args.reference, command)
  print(md)
  if args.out:
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".md"), md)
    atomic_write_text(out.with_suffix(".json"), json.dumps(
        {"command": command, "reference": args.reference, "draws": args.draws,
         "seed": args.seed, "rows": table}, indent=1) + "\n")
    forest_plot(table, args.reference, out.with_suffix(".png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
