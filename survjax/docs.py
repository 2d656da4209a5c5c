"""Generated result tables: README and ``docs/results/<name>.md`` from committed JSON.

  python -m survjax.docs            # rewrite the generated parts
  python -m survjax.docs --check    # exit 1 if a generated part is out of date (a test)

Every result a document quotes lives in ``docs/results/runs/<name>.json`` (a run's
``results.json``) or ``docs/results/compare/<name>.json`` (a `survjax.compare` table),
written by ``scripts/reproduce_results.sh``, which reruns them from a fresh clone.
A document marks each generated part with ``<!-- generated: NAME -->`` ... ``<!-- end
generated -->``; this module owns the text between the markers and nothing else, so no
number in a table can drift from the JSON it came from.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "docs" / "results" / "runs"
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)",
                    re.S)


def load_runs(directory: Path = RUNS) -> dict[str, dict]:
  return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def _cell(runs, run: str, row: str, std: bool = True) -> str:
  """``mean +- std`` of a scenario row's C-index ('' when the run or row is absent)."""
  scen = runs.get(run, {}).get("scenarios", {}).get(row)
  if scen is None:
    return ""
  if std:
    return f"{scen['c_index_mean']:.3f} +- {scen['c_index_std']:.3f}"
  return f"{scen['c_index_mean']:.3f}"


def _fills(runs, run, row):
  """``fill / zeros / mean`` of a MUST missing scenario."""
  parts = [_cell(runs, run, r, std=False) for r in (row, f"{row}/zeros", f"{row}/mean")]
  return " / ".join(parts) if all(parts) else ""


def _oracle(runs, run, row):
  scen = runs.get(run, {}).get("scenarios", {}).get(row, {})
  return "" if "oracle_c_index" not in scen else f"{scen['oracle_c_index']:.3f}"


def _reference(runs, run, model):
  """A scikit-survival reference row (``results["reference_rows"]``, by its key)."""
  rows = [r for r in runs.get(run, {}).get("reference_rows", []) if r.get("key") == model]
  if not rows:
    return ""
  return f"{rows[0]['c_index_mean']:.3f} +- {rows[0]['c_index_std']:.3f}"


def _table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows if any(r[1:])]
  return "\n".join(lines) + "\n"


def _room(runs, run, row):
  scen = runs.get(run, {}).get("scenarios", {}).get(row, {})
  if "oracle_const_c_index" not in scen or "oracle_c_index" not in scen:
    return ""
  return f"{scen['oracle_c_index'] - scen['oracle_const_c_index']:+.3f}"


def synthetic_table(runs) -> str:
  """MUST and the unimodal baselines on the embedded cohort (README)."""
  full, mp, mg = "full", "missing_pathology", "missing_genomics"
  rows = [
      ["MUST, diffusion fill (`configs/must.py`)", _cell(runs, "must", full),
       _cell(runs, "must", mp), _cell(runs, "must", mg)],
      ["MUST, zeros fill", "", _cell(runs, "must", f"{mp}/zeros"),
       _cell(runs, "must", f"{mg}/zeros")],
      ["MUST, training-mean fill", "", _cell(runs, "must", f"{mp}/mean"),
       _cell(runs, "must", f"{mg}/mean")],
      ["MUST, unimodal head", "", _cell(runs, "must", f"{mp}/unimodal"),
       _cell(runs, "must", f"{mg}/unimodal")],
      ["MUST, chosen on validation (`/auto`)", "", _cell(runs, "must", f"{mp}/auto"),
       _cell(runs, "must", f"{mg}/auto")],
      ["MUST `:paper`, diffusion / zeros / mean fill", _cell(runs, "must_paper", full),
       _fills(runs, "must_paper", mp), _fills(runs, "must_paper", mg)],
      ["MUST `:paper_decomp`, diffusion / zeros / mean fill",
       _cell(runs, "must_paper_decomp", full), _fills(runs, "must_paper_decomp", mp),
       _fills(runs, "must_paper_decomp", mg)],
      ["SNN, genomics only (`configs/snn.py`)", _cell(runs, "snn", full), "", ""],
      ["TransMIL, pathology only (`configs/transmil.py`)", _cell(runs, "transmil", full), "", ""],
      ["gated ABMIL, pathology only (`configs/abmil.py`)", _cell(runs, "abmil", full), "", ""],
      ["oracle (mean over the folds)", _oracle(runs, "must", full), _oracle(runs, "must", mp),
       _oracle(runs, "must", mg)],
      ["imputation room (oracle - constant-fill oracle)", "-", _room(runs, "must", mp),
       _room(runs, "must", mg)],
  ]
  return _table(["model", "full", "missing pathology", "missing genomics"], rows)


def breast_table(runs) -> str:
  rows = [
      ["MUST (clinical tokens + gene tokens)", _cell(runs, "must_breast", "full"),
       _fills(runs, "must_breast", "missing_genes"),
       _fills(runs, "must_breast", "missing_clinical")],
      ["Cox PH (sksurv, same folds)", _reference(runs, "must_breast", "coxph"), "", ""],
      ["random survival forest (sksurv, same folds)", _reference(runs, "must_breast", "rsf"),
       "", ""],
  ]
  return _table(["model", "full", "missing genes (LDM / zeros / mean)",
                 "missing clinical (LDM / zeros / mean)"], rows)


def scenarios_table(runs, run: str) -> str:
  """Every scenario row of one run with its oracle (docs/results/<method>.md, configs)."""
  res = runs.get(run)
  if res is None:
    return f"(no committed result for `{run}`: run `bash scripts/reproduce_results.sh {run}`)\n"
  rows = []
  for row, s in res["scenarios"].items():
    oracle = _oracle(runs, run, row)
    if _room(runs, run, row):
      oracle += f" (room {_room(runs, run, row)})"
    chosen = s.get("chosen_per_fold")
    rows.append([f"`{row}`", f"{s['c_index_mean']:.3f} +- {s['c_index_std']:.3f}",
                 ", ".join(f"{v:.3f}" for v in s["per_fold"])
                 + (f" (chose {', '.join(chosen)})" if chosen else ""), oracle])
  for s in res.get("reference_rows", []):
    rows.append([f"{s['model']}, `{s['scenario']}`",
                 f"{s['c_index_mean']:.3f} +- {s['c_index_std']:.3f}",
                 ", ".join(f"{v:.3f}" for v in s.get("per_fold", [])), ""])
  text = _table(["scenario", "C-index", "per fold", "oracle"], rows)
  timing = res.get("timing", {})
  if "train_s_total" in timing:
    text += (f"\nTraining {timing['train_s_total']:.0f} s, evaluation "
             f"{timing.get('eval_s_total', 0):.0f} s in all folds; cohort "
             f"`{res.get('cohort_fingerprint', '?')}`, splits `{res.get('splits_fingerprint', '?')}`.\n")
  return text


def diagnostics_table(runs, run: str) -> str:
  diag = runs.get(run, {}).get("diagnostics", {})
  if not diag:
    return "(none)\n"
  return _table(["quantity", "held-out mean over folds"],
                [[f"`{k}`", f"{v:.3f}"] for k, v in diag.items()])


def _bench(name: str) -> dict | None:
  path = REPO / "benchmarks" / "results" / f"{name}.json"
  return json.loads(path.read_text()) if path.exists() else None


def _machine(d) -> str:
  dev = d.get("device", {})
  load = dev.get("load_average_1min")
  return (f"{dev.get('cpu_model', dev.get('device_kind', '?'))}, {dev.get('cpu_threads', '?')} "
          f"threads" + (f", load average {load:.1f} during the run" if load is not None else ""))


def bench_table(name: str) -> str:
  """A benchmark JSON of ``benchmarks/results/`` as a table (README speed section)."""
  d = _bench(name)
  if d is None:
    return f"(no benchmarks/results/{name}.json)\n"
  if name.startswith("gcs_step"):
    rows = []
    for key in ("probes_0", "probes_1", "probes_4", "probes_16"):
      j, t = d["jax"].get(key), d.get("torch_eager", {}).get(key)
      if j is None:
        continue
      n = key.split("_")[1]
      label = "no GCS" if n == "0" else f"GCS, {n} probe" + ("s" if n != "1" else "")
      rows.append([label, f"{j['p50_ms']:.1f} / {j['p90_ms']:.1f} ms (compile {j['compile_s']:.0f} s)",
                   "" if t is None else f"{t['p50_ms']:.0f} ms",
                   "" if t is None else f"{t['p50_ms'] / j['p50_ms']:.1f}x"])
    text = _table(["PARACHUTE training step", "JAX p50 / p90", "PyTorch eager p50",
                   "PyTorch / JAX"], rows)
    command = "python -m benchmarks.gcs_step --torch-python=..."
  elif name.startswith("uot"):
    pr = d["problem"]
    rows = [["ott-jax, jitted vmap", f"{d['ott_jax']['p50_ms']:.0f} ms", "1.0x"],
            ["POT, loop over patients", f"{d['pot_loop']['p50_ms']:.0f} ms",
             f"{d['speedup_p50']['pot_loop/ott_jax']:.2f}x"],
            ["PyTorch, batched log-domain", f"{d['torch_batched']['p50_ms']:.0f} ms",
             f"{d['speedup_p50']['torch_batched/ott_jax']:.2f}x"]]
    text = _table([f"unbalanced Sinkhorn, {pr['patients']} patients x {pr['tokens']} tokens x "
                   f"{pr['prototypes']} prototypes + dustbin", "p50", "time / ott-jax"], rows)
    command = "python -m benchmarks.uot --torch-python=..."
  elif name.startswith("mae_pretrain"):
    j, t = d["jax"]["step"], d["torch"]["step"]
    rows = [["JAX (jit)", f"{j['p50_ms']:.0f} / {j['p90_ms']:.0f} ms", "1.0x"],
            ["PyTorch eager", f"{t['p50_ms']:.0f} / {t['p90_ms']:.0f} ms",
             f"{t['p50_ms'] / j['p50_ms']:.1f}x"]]
    text = _table(["impuTMAE pretraining step (batch 32)", "p50 / p90", "time / JAX"], rows)
    command = "python -m benchmarks.mae_pretrain --torch-python=..."
  elif name.startswith("gene_groups"):
    rows = []
    for r in d["rows"]:
      st, pg = r["stacked"], r.get("per_group") or {}
      old = (f"{pg['compile_s']:.1f} s / {pg['step']['p50_ms']:.1f} ms" if pg.get("finished")
             else pg.get("reason", "not run"))
      rows.append([f"{r['groups']}" + (" (one column each)" if r["one_column_groups"] else ""),
                   f"{r['columns']}", f"{st['compile_s']:.1f} s / {st['step']['p50_ms']:.1f} ms",
                   old])
    text = _table(["gene groups", "columns", "stacked: compile / step p50",
                   "per-group loop: compile / step p50"], rows)
    command = d.get("command", "python -m benchmarks.gene_groups")
  else:
    raise KeyError(f"no table for benchmark {name!r}")
  return text + f"\n`{command}` on {_machine(d)}.\n"


def _compare_json(name: str) -> dict | None:
  """A committed `survjax.compare` result (docs/results/compare/<name>.json), if any."""
  path = REPO / "docs" / "results" / "compare" / f"{name}.json"
  return json.loads(path.read_text()) if path.exists() else None


def compare_table(name: str) -> str:
  from survjax.compare import to_markdown
  data = _compare_json(name)
  if data is None:
    return f"(no committed comparison `{name}`: run `bash scripts/reproduce_results.sh`)\n"
  return to_markdown(data["rows"], data.get("reference"), data.get("command", ""))


DRAWS = (0, 2, 3, 4)   # MUST's default draw and its evaluation draws (scripts/reproduce_results.sh)


def _compare_rows(name: str) -> dict | None:
  """MUST's rows of a committed comparison by scenario row (the competitor is the
  reference)."""
  data = _compare_json(name)
  if data is None:
    return None
  return {r["row"].split(":", 1)[1]: r for r in data["rows"] if r["row"].startswith("must")}


def _diff(row) -> str:
  if row is None or "diff" not in row:
    return ""
  lo, hi = row["diff_ci95"]
  return f"{row['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] {row['verdict']}"


def draws_table() -> str:
  """MUST against what a user could do instead, on each synthetic draw: paired
  differences (95% bootstrap interval, verdict) from the committed comparisons
  ``draw<seed>_*`` (docs/results/must.md)."""
  spec = [  # (question, comparison, MUST row)
      ("both: MUST vs ABMIL (pathology)", "pathology_present", "full"),
      ("both: MUST vs SNN (genomics)", "genomics_present", "full"),
  ]
  for missing, present, comp, ref in (("genomics", "pathology", "pathology_present", "ABMIL"),
                                      ("pathology", "genomics", "genomics_present", "SNN")):
    for variant in ("", "/unimodal", "/auto"):
      what = {"": "diffusion fill", "/unimodal": "unimodal head", "/auto": "auto"}[variant]
      spec.append((f"{missing} missing: MUST {what} vs {ref} ({present})", comp,
                   f"missing_{missing}{variant}"))
    spec.append((f"{missing} missing: diffusion fill vs zeros", f"fill_{missing}",
                 f"missing_{missing}"))
  rows = []
  for question, comp, row in spec:
    cells = [question]
    for s in DRAWS:
      table = _compare_rows(f"draw{s}_{comp}")
      cells.append(_diff(None if table is None else table.get(row)))
    rows.append(cells)
  rooms = ["imputation room (oracle - constant-fill oracle): pathology / genomics missing"]
  for s in DRAWS:
    table = _compare_rows(f"draw{s}_fill_pathology") or {}
    r = [table.get(f"missing_{m}", {}).get("imputation_room") for m in ("pathology", "genomics")]
    rooms.append(" / ".join(f"{x:+.3f}" for x in r) if None not in r else "")
  rows.append(rooms)
  return _table(["paired difference, 95% CI"] + [f"draw {s}" for s in DRAWS], rows)


def draws_cindex_table(runs) -> str:
  """C-index (mean over folds) of MUST's rows and the unimodal baselines on each draw, and
  their mean over the evaluation draws 2-4 (docs/results/must.md)."""
  rows = []
  spec = [("MUST", "must", "full"), ("ABMIL (pathology)", "abmil", "full"),
          ("SNN (genomics)", "snn", "full")]
  for missing in ("pathology", "genomics"):
    for variant in ("", "/zeros", "/mean", "/unimodal", "/auto"):
      spec.append((f"MUST, {missing} missing, {variant[1:] or 'diffusion fill'}",
                   "must", f"missing_{missing}{variant}"))
  for label, run, row in spec:
    values = []
    for s in DRAWS:
      scen = runs.get(run + ("" if s == 0 else f"_seed{s}"), {}).get("scenarios", {}).get(row)
      values.append(None if scen is None else scen["c_index_mean"])
    held_out = [v for s, v in zip(DRAWS, values) if s != 0 and v is not None]
    rows.append([label] + ["" if v is None else f"{v:.3f}" for v in values]
                + [f"{sum(held_out) / len(held_out):.3f}" if len(held_out) == 3 else ""])
  return _table(["C-index, mean over folds"] + [f"draw {s}" for s in DRAWS]
                + ["mean, draws 2-4"], rows)


def tune_table(name: str) -> str:
  """A committed ``--mode=tune`` result (docs/results/tune/<name>.json)."""
  path = REPO / "docs" / "results" / "tune" / f"{name}.json"
  if not path.exists():
    return (f"(no committed tuning `{name}`: run `bash scripts/reproduce_results.sh` "
            "for its `must_tune*` entries)\n")
  data = json.loads(path.read_text())
  by_scenario = data.get("scenarios", ["full"]) != ["full"]
  rows = []
  for p in data["points"]:
    row = [", ".join(f"`{k}={v}`" for k, v in p["overrides"].items()),
           f"{p['val_c_index_mean']:.3f}", ", ".join(f"{v:.3f}" for v in p["val_c_index_per_fold"])]
    if by_scenario:
      row.append(", ".join(f"`{n}` {sum(v) / len(v):.3f}"
                           for n, v in p["val_c_index_per_scenario"].items()))
    rows.append(row + ["chosen" if p["overrides"] == data["chosen"] else ""])
  scored = ", ".join(f"`{s}`" for s in data.get("scenarios", ["full"]))
  return _table(["point", f"inner-validation C-index ({scored}; mean over folds)", "per fold"]
                + (["per scenario"] if by_scenario else []) + [""], rows)


def oracles_table() -> str:
  """The synthetic cohort's oracles as its knobs move (docs/results/cohort_oracles.json)."""
  path = REPO / "docs" / "results" / "cohort_oracles.json"
  if not path.exists():
    return "(no committed oracle table: run `python scripts/cohort_oracles.py`)\n"
  rows = []
  for r in json.loads(path.read_text())["rows"]:
    rows.append([r["setting"], f"{r['full']:.3f}", f"{r['pathology']:.3f}", f"{r['genomics']:.3f}",
                 f"{r['full'] - max(r['pathology'], r['genomics']):+.3f}",
                 f"{r['pathology'] - r['pathology, constant fill']:+.3f}",
                 f"{r['genomics'] - r['genomics, constant fill']:+.3f}"])
  return (_table(["setting", "oracle: both", "pathology alone", "genomics alone",
                  "both - best alone", "room, genomics missing", "room, pathology missing"],
                 rows)
          + "\nMean over draws 0-4 of 400 patients; `python scripts/cohort_oracles.py`.\n")


def render(name: str, runs) -> str:
  """The text of generated block ``name``."""
  if name == "synthetic":
    return synthetic_table(runs)
  if name == "breast":
    return breast_table(runs)
  if name == "oracles":
    return oracles_table()
  kind, _, run = name.partition(".")
  if kind == "scenarios":
    return scenarios_table(runs, run)
  if kind == "diagnostics":
    return diagnostics_table(runs, run)
  if kind == "compare":
    return compare_table(run)
  if kind == "bench":
    return bench_table(run)
  if kind == "draws":
    return draws_table() if run == "must" else draws_cindex_table(runs)
  if kind == "tune":
    return tune_table(run)
  raise KeyError(f"unknown generated block {name!r}")


def documents() -> list[Path]:
  """README, docs/results/*.md and the configs' docstrings."""
  docs = ([REPO / "README.md"] + sorted((REPO / "docs" / "results").glob("*.md"))
          + sorted((REPO / "configs").glob("*.py")))
  return [p for p in docs if p.exists()]


def update(text: str, runs) -> str:
  return _BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), runs) + m.group(4), text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m survjax.docs", description=__doc__.split("\n\n")[0])
  p.add_argument("--check", action="store_true", help="exit 1 if a document is out of date")
  args = p.parse_args(argv)
  runs = load_runs()
  stale = []
  for path in documents():
    text = path.read_text()
    new = update(text, runs)
    if new != text:
      stale.append(path)
      if not args.check:
        path.write_text(new)
  for path in stale:
    print(f"{'out of date' if args.check else 'updated'}: {path.relative_to(REPO)}")
  return 1 if (args.check and stale) else 0


if __name__ == "__main__":
  sys.exit(main())
