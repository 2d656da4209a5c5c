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


def _fills(runs, run, row, variants=("zeros", "mean")):
  """``fill / <variant> / ...`` of a MUST missing scenario (its row, then its variants)."""
  parts = [_cell(runs, run, r, std=False) for r in (row, *(f"{row}/{v}" for v in variants))]
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
      ["MUST, imputer fill (`configs/must.py`)", _cell(runs, "must", full),
       _cell(runs, "must", mp), _cell(runs, "must", mg)],
      ["MUST, diffusion fill (the paper's, same network)", "",
       _cell(runs, "must", f"{mp}/diffusion"), _cell(runs, "must", f"{mg}/diffusion")],
      ["MUST, zeros fill", "", _cell(runs, "must", f"{mp}/zeros"),
       _cell(runs, "must", f"{mg}/zeros")],
      ["MUST, training-mean fill", "", _cell(runs, "must", f"{mp}/mean"),
       _cell(runs, "must", f"{mg}/mean")],
      ["MUST, unimodal head", "", _cell(runs, "must", f"{mp}/unimodal"),
       _cell(runs, "must", f"{mg}/unimodal")],
      ["MUST, chosen on validation (`/auto`)", "", _cell(runs, "must", f"{mp}/auto"),
       _cell(runs, "must", f"{mg}/auto")],
      ["MUST `:paper_missing` (head trained on complete pairs), diffusion / zeros / mean fill",
       _cell(runs, "must_paper_missing", full), _fills(runs, "must_paper_missing", mp),
       _fills(runs, "must_paper_missing", mg)],
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
  def fills(row):  # the default's fill / the diffusion fill / zeros
    return _fills(runs, "must_breast", row, ("diffusion", "zeros"))
  rows = [
      ["MUST (clinical tokens + gene tokens)", _cell(runs, "must_breast", "full"),
       fills("missing_genes"), fills("missing_clinical")],
      ["Cox PH (sksurv, same folds)", _reference(runs, "must_breast", "coxph"), "", ""],
      ["random survival forest (sksurv, same folds)", _reference(runs, "must_breast", "rsf"),
       "", ""],
  ]
  return _table(["model", "full", "missing genes (imputer / LDM / zeros)",
                 "missing clinical (imputer / LDM / zeros)"], rows)


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
    compiling = ""
    if "train_compile_s_total" in timing:
      compiling = (f" (compiling {timing['train_compile_s_total']:.0f} s and "
                   f"{timing.get('eval_compile_s_total', 0):.0f} s of them)")
    text += (f"\nTraining {timing['train_s_total']:.0f} s, evaluation "
             f"{timing.get('eval_s_total', 0):.0f} s in all folds{compiling}; cohort "
             f"`{res.get('cohort_fingerprint', '?')}`, splits `{res.get('splits_fingerprint', '?')}`.\n")
  return text


def diagnostics_table(runs, run: str) -> str:
  diag = runs.get(run, {}).get("diagnostics", {})
  if not diag:
    return "(none)\n"
  return _table(["quantity", "held-out mean over folds"],
                [[f"`{k}`", f"{v:.3f}"] for k, v in diag.items()])


def _run_folds(res) -> list[int]:
  """Fold numbers a run evaluated, in order (``config.cv.folds``, else all)."""
  cv = res.get("config", {}).get("cv", {})
  return list(cv.get("folds") or range(res.get("folds", 0)))


def held_out_table(runs, spec: str) -> str:
  """A method's ``held_out`` statistics (`survjax.method`), names ``<row>/<column>``
  pivoted: one row per ``<row>``, one column per ``<column>``, mean +- std over folds.
  ``spec`` = ``<run>`` or ``<run>.<other run>...``: with several runs, each row shows
  every run's ``model`` column beside the first run's other columns, over the folds
  all of them evaluated (so the columns are paired)."""
  names = spec.split(".")
  missing = [n for n in names if n not in runs or not runs[n].get("held_out")]
  if missing:
    return (f"(no committed held-out statistics for `{missing[0]}`: run "
            f"`bash scripts/reproduce_results.sh {missing[0]}`)\n")
  folds = [_run_folds(runs[n]) for n in names]
  common = [k for k in folds[0] if all(k in f for f in folds[1:])]

  def cell(run_i, name):
    entry = runs[names[run_i]]["held_out"].get(name)
    if entry is None:
      return ""
    pos = {k: j for j, k in enumerate(folds[run_i])}
    vals = [entry["per_fold"][pos[k]] for k in common if pos[k] < len(entry["per_fold"])]
    vals = [v for v in vals if v is not None]
    if not vals:
      return ""
    mean, std = sum(vals) / len(vals), (sum((v - sum(vals) / len(vals)) ** 2
                                             for v in vals) / len(vals)) ** 0.5
    return f"{mean:.4g} +- {0.0 if std < 1e-9 * abs(mean) else std:.2g}"

  held = runs[names[0]]["held_out"]
  rows = list(dict.fromkeys(n.rpartition("/")[0] or n for n in held))
  cols = list(dict.fromkeys(n.rpartition("/")[2] for n in held if "/" in n)) or ["value"]
  if len(names) > 1:
    cols = ["model"] + [c for c in cols if c != "model"]
    header = ["quantity"] + [f"model (`{n}`)" for n in names] + [c for c in cols[1:]]
    body = [[f"`{r}`"] + [cell(i, f"{r}/model") for i in range(len(names))]
            + [cell(0, f"{r}/{c}") for c in cols[1:]] for r in rows]
  else:
    header = ["quantity"] + cols
    body = [[f"`{r}`"] + [cell(0, f"{r}/{c}" if "/" in next(iter(held)) else r) for c in cols]
            for r in rows]
  text = _table(header, body)
  return text + f"\nFolds {', '.join(map(str, common))}; mean +- std over them.\n"


def _bench(name: str) -> dict | None:
  path = REPO / "benchmarks" / "results" / f"{name}.json"
  return json.loads(path.read_text()) if path.exists() else None


def _machine(d) -> str:
  dev = d.get("device", {})
  load = dev.get("load_average_1min")
  return (f"{dev.get('cpu_model', dev.get('device_kind', '?'))}, {dev.get('cpu_threads', '?')} "
          f"threads" + (f", load average {load:.1f} during the run" if load is not None else ""))


def _commit(d) -> str:
  """The commit a benchmark JSON was measured at (and whether the checkout differed)."""
  git = d.get("git") or {}
  if not git.get("commit"):
    return "commit not recorded (measured before the benchmark recorded it)"
  dirty = git.get("modified_tracked_files") or []
  return f"commit `{git['commit'][:10]}`" + (
      f" with local changes to {len(dirty)} tracked file" + ("s" if len(dirty) != 1 else "")
      if dirty else "")


def _torch_version(d) -> str | None:
  """The PyTorch version a benchmark's reference ran on, wherever the JSON keeps it."""
  for path in (("torch", "torch_version"), ("torch_eager", "torch_version"),
               ("torch_settings", "torch_version")):
    node = d
    for k in path:
      node = node.get(k) if isinstance(node, dict) else None
    if isinstance(node, str):
      return node
  for model in ("transmil", "abmil"):
    rows = ((d.get("mil") or {}).get(model) or {}).get("torch") or []
    if rows and isinstance(rows[0], dict) and rows[0].get("torch_version"):
      return rows[0]["torch_version"]
  return None


def _caption(d, command: str) -> str:
  """``command`` on machine, commit, versions: the provenance line under a speed table."""
  dev = d.get("device", {})
  versions = [f"jax {dev['jax_version']}"] if dev.get("jax_version") else []
  tv = _torch_version(d)
  if tv:
    versions.append(f"torch {tv}")
  return (f"\n`{d.get('command') or command}` on {_machine(d)}; {_commit(d)}"
          + (f"; {', '.join(versions)}" if versions else "") + ".\n")


def _patches(n: int) -> str:
  """1024 -> 1k, 65536 -> 64k, 10000 -> 10k, 200000 -> 200k."""
  return f"{n // 1024}k" if n % 1024 == 0 else f"{n / 1000:g}k"


def _ms(x: float) -> str:
  return f"{x:.2f} ms" if x < 1 else (f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms")


def _pct(x: float) -> str:
  return f"{x:.0f}%" if x >= 10 else f"{x:.1f}%"


def _flops(g: float) -> str:
  """GFLOP/s as GFLOP/s or TFLOP/s."""
  return f"{g / 1000:.1f} TFLOP/s" if g >= 1000 else f"{g:.0f} GFLOP/s"


def _sampling_table(d) -> str:
  """`benchmarks.sampling_latency`: batch-1 latency and the throughput sweep."""
  cfg = d.get("config", {})
  variant = ", ".join(x for x in (
      "the fused Pallas kernel" if cfg.get("kernel", "xla") != "xla" else "",
      "bfloat16 matmuls, float32 accumulation"
      if cfg.get("precision", "float32") != "float32" else "") if x)
  if "error" in d:
    return f"Not measured ({variant or 'default sampler'}): {d['error']}\n"
  j, t, r = d["jax"], d.get("torch") or {}, d.get("ratios") or {}
  b1 = j["batch1"]
  rows = [["1 patient, 50 steps x 5 samples, one `lax.scan` (p50 / p90)",
           f"{_ms(b1['p50_ms'])} / {_ms(b1['p90_ms'])} (compile {b1['compile_s']:.1f} s)",
           _ms(t["batch1_batched"]["p50_ms"]) + " (5 samples batched)" if t else "",
           f"{r['torch_batched_over_jax_scan']:.2f}x" if r else ""]]
  if t:
    rows.append(["the same, torch one sample at a time (the paper's loop)", "",
                 _ms(t["batch1_one_at_a_time"]["p50_ms"]),
                 f"{r['torch_one_at_a_time_over_jax_scan']:.1f}x"])
  rows.append(["the same, a Python loop around a jitted step",
               _ms(j["batch1_python_loop"]["p50_ms"]), "",
               f"(loop / scan: {j['batch1_python_loop']['p50_ms'] / b1['p50_ms']:.2f})"])
  for v in j.get("batch1_unroll_variants") or []:
    rows.append([f"the same, scan unrolled by {v['unroll']}", _ms(v["p50_ms"]), "",
                 f"{b1['p50_ms'] / v['p50_ms']:.2f}x of the default"])
  torch_sweep = {s["batch"]: s for s in t.get("sweep", [])}
  for s in j["sweep"]:
    ts = torch_sweep.get(s["batch"])
    rows.append([f"throughput, batch {s['batch']}",
                 f"{s['patients_per_s']:.1f} patients/s, {_flops(s['gflops_per_s'])} "
                 f"({_pct(s['pct_of_matmul_rate'])} of the matmul rate)",
                 "" if ts is None else f"{ts['patients_per_s']:.1f} patients/s",
                 "" if ts is None else f"{s['patients_per_s'] / ts['patients_per_s']:.2f}x"])
  mm = d.get("matmul_gflops_per_s", {})
  ref = mm.get("reference") or max(v for k, v in mm.items()
                                    if k.startswith(("1024x", "8192x")) and isinstance(v, float))
  small, chained = mm.get("15x256x256"), mm.get("15x256x256_chained20")
  text = _table(["MUST DDIM sampler (4-layer 256-d denoiser)",
                 f"survjax (JAX{', ' + variant if variant else ''})",
                 "PyTorch eager", "PyTorch time / JAX time"], rows)
  text += (f"\nBatch 1 runs at {_flops(b1['gflops_per_s'])}, "
           f"{_pct(100 * b1['gflops_per_s'] / ref)} of the measured large-matmul rate "
           f"({_flops(ref)})" + (f"; XLA runs the batch-1 matmul shape [15, 256] x "
                                  f"[256, 256] at {_flops(small)}" if small else "")
           + (f" one product per call and at {_flops(chained)} "
              f"({_pct(100 * chained / ref)} of the large-matmul rate) with 20 dependent "
              f"products in one call, its kernel's own rate" if chained else "")
           + ".")
  tm = t.get("matmul_gflops_per_s") or {}
  pairs = [(k.split("x")[0], mm[k], tm[k]) for k in mm if k.endswith("_chained20") and k in tm]
  if pairs:
    text += (" The same products chained 20 to a call, `[M, 256] x [256, 256]` for M = "
             + ", ".join(m for m, _, _ in pairs) + " (one call's rows at batch 1, 16, 64): "
             + ", ".join(_flops(j) for _, j, _ in pairs) + " in XLA:CPU, "
             + ", ".join(_flops(q) for _, _, q in pairs) + " in PyTorch.")
  if "omp_wait_policy" in t:
    text += (f" PyTorch ran with `OMP_WAIT_POLICY={t['omp_wait_policy']}`."
             if t["omp_wait_policy"] else " PyTorch ran with OpenMP's default wait policy.")
  if t.get("check_max_rel_diff") is not None:
    text += f" Samples agree with torch's to {t['check_max_rel_diff']:.1e} (relative)."
  peak = j.get("peak") or {}
  bf16 = mm.get(next((k for k in mm if k.endswith("_bfloat16")), ""), None)
  if bf16 and peak.get("pct_of_bf16_matmul_rate") is not None:
    text += (f" Peak: {peak['patients_per_s']:.0f} patients/s at batch {peak['batch']}, "
             f"{_pct(peak['pct_of_bf16_matmul_rate'])} of the measured bfloat16 matmul "
             f"rate ({_flops(bf16)}).")
  return text + "\n"


def _mil_rows(d, model: str) -> list[list[str]]:
  m = (d.get("mil") or {}).get(model)
  if not m:
    return []
  torch_by_n = {r["n"]: r for r in m.get("torch", []) if isinstance(r, dict) and "n" in r}
  rows = []
  for jr in m.get("jax", []):
    n, tr = jr["n"], torch_by_n.get(jr["n"])
    # device_peak_mb: the accelerator's allocator peak (None on the CPU: the process's RSS)
    mem = lambda r: r["memory"].get("device_peak_mb") or r["memory"]["peak_mb"]  # noqa: E731
    jt = jr["forward"]["p50_ms"]
    rows.append([f"{'TransMIL' if model == 'transmil' else 'gated ABMIL'} forward, "
                 f"{_patches(n)} patches"
                 + (" (chunked path)" if jr.get("chunked") else "")
                 + (f", {jr['precision']} matmuls" if jr.get("precision", "float32")
                    != "float32" else ""),
                 f"{_ms(jt)}, peak {mem(jr) / 1024:.2f} GB",
                 "" if tr is None else f"{_ms(tr['forward']['p50_ms'])}, peak "
                 f"{mem(tr) / 1024:.2f} GB",
                 "" if tr is None else f"{tr['forward']['p50_ms'] / jt:.2f}x"])
  return rows


def _train_table(d) -> str:
  """`benchmarks.train_throughput`: MIL forwards against torch, MUST's training step."""
  rows = _mil_rows(d, "transmil") + _mil_rows(d, "abmil")
  for n, p in sorted((d.get("mil") or {}).get("transmil_paired", {}).items(),
                     key=lambda kv: int(kv[0])):
    rows.append([f"TransMIL forward, {_patches(int(n))} patches, median of "
                 f"{p['num_rounds']} alternating rounds",
                 _ms(sum(r["jax_p50_ms"] for r in p["rounds"]) / len(p["rounds"]))
                 + " (mean of the rounds' p50)",
                 _ms(sum(r["torch_p50_ms"] for r in p["rounds"]) / len(p["rounds"])),
                 f"{p['median_torch_over_jax']:.2f}x (JAX faster in {p['jax_faster_rounds']} "
                 f"of {p['num_rounds']})"])
  must = d.get("must") or {}
  for s in must.get("sizes", []):
    rows.append([f"MUST stage-2 training step, {must['batch_patients']} patients, bags of "
                 f"{s['bag'] // 1024}k",
                 f"{_ms(s['p50_ms'])} (compile {s['compile_s']:.0f} s; "
                 f"{_ms(s['ms_per_1k_patches'])} per 1k patches)", "", ""])
  for s in must.get("skipped", []):
    rows.append([f"MUST stage-2 training step, bags of {_patches(s['bag'])}",
                 f"skipped: {s['reason']}", "", ""])
  mem = ("device peak memory" if d.get("device", {}).get("platform") == "gpu"
         else "whole-process peak RSS")
  return _table(["forward (in 1024, dim 512) / training step", f"survjax (JAX), {mem}",
                 "PyTorch eager", "PyTorch time / JAX time"], rows)


def _cindex_table(d) -> str:
  rows = [[f"{s['n']:,}", f"{s['survjax']['p50_ms']:.1f} ms",
           "" if "sksurv" not in s else f"{s['sksurv']['p50_ms']:.0f} ms",
           f"{s['speedup']:.0f}x" if s.get("speedup") else "",
           "yes" if s.get("agree") else "no"] for s in d["sizes"]]
  return _table(["Harrell's C-index, patients", "survjax p50", "scikit-survival p50",
                 "speed-up", "all five outputs identical"], rows)


def _scaling_table(d) -> str:
  weak = {w["num_devices"]: w for w in d.get("weak", [])}
  rows = []
  for s in d.get("strong", []):
    w = weak.get(s["num_devices"])
    rows.append([f"{s['num_devices']}", f"{_ms(s['p50_ms'])} ({s['patients_per_s']:.1f} "
                 "patients/s)",
                 "" if w is None else f"{_ms(w['p50_ms'])} (global batch {w['global_batch']})"])
  return (_table(["devices", f"strong scaling, global batch {d.get('strong_global_batch', '?')}",
                  f"weak scaling, {d.get('weak_per_device_batch', '?')} per device"], rows)
          + ("\n" + d["note"] + ".\n" if d.get("note") else ""))


def _profile_table(d) -> str:
  """`benchmarks.profile_must_step`: MUST's step, forward against backward, by op kind."""
  rounds = d["times"]
  med = lambda k: sorted(r[k] for r in rounds)[len(rounds) // 2]  # noqa: E731
  fwd, vg, step = med("forward_ms"), med("value_and_grad_ms"), med("step_ms")
  cost = d["xla_cost"]
  rows = [["forward (the loss alone)", _ms(fwd), f"{cost['forward']['gflop']:.1f} GFLOP, "
           f"{cost['forward']['bytes_accessed_gb']:.2f} GB accessed"],
          ["value_and_grad (forward + backward)", _ms(vg),
           f"{cost['value_and_grad']['gflop']:.1f} GFLOP, "
           f"{cost['value_and_grad']['bytes_accessed_gb']:.2f} GB accessed"],
          ["backward alone (value_and_grad - forward)", f"{_ms(vg - fwd)} "
           f"({(vg - fwd) / fwd:.1f}x the forward)",
           f"{cost['value_and_grad']['gflop'] - cost['forward']['gflop']:.1f} GFLOP"],
          ["training step (value_and_grad + optimiser)", _ms(step), ""]]
  tr = d["trace"]
  for k, v in tr["by_direction_ms"].items():
    rows.append([f"traced value_and_grad: {k}", _ms(v),
                 f"{100 * v / tr['total_ms']:.0f}% of the traced thunk time"])
  for k, v in list(tr["by_kind_ms"].items())[:8]:
    rows.append([f"traced value_and_grad: `{k}` thunks", _ms(v),
                 f"{100 * v / tr['total_ms']:.0f}%"])
  s = d["setup"]
  return _table([f"MUST main-stage step, {s['batch']} patients x {s['bag']} patches "
                 "(p50; median of alternating rounds)", "time", "XLA cost / share"], rows)


def _must_fold_table(d) -> str:
  """`benchmarks.must_fold`: one fold of the main job's training, part by part."""
  parts, stages, fit = d["parts"], d["stages"], d["parts"]["fit"]["seconds"]
  labels = {"batch_epochs": "batch epochs (warm-up and main stages, first epochs compiling)",
            "validation": "inner-validation scoring after each main epoch",
            "feature_passes": "frozen feature passes of the feature stages (calls include "
                              "reused passes)",
            "feature_stage_chunks": "scanned chunks of the feature stages (LDMs, unimodal heads)",
            "xla_compile": "XLA compile time (inside the parts above)"}
  rows = [[f"{labels[k]}", f"{parts[k]['seconds']:.1f} s", str(parts[k]["calls"]),
           f"{100 * parts[k]['seconds'] / fit:.0f}%"] for k in labels if k in parts]
  short = {"batch_epochs": "batch epochs", "validation": "inner-validation scoring",
           "feature_passes": "feature passes", "feature_stage_chunks": "feature-stage chunks"}
  for k, m in d.get("matmul", {}).items():
    rows.append([f"matmuls of the {short[k]}: {m['gflop']:.0f} GFLOP, timed at the 1024^3 "
                 f"rate ({d['matmul_rate_gflop_s']:.0f} GFLOP/s)",
                 f"{m['at_matmul_rate_s']:.1f} s", "",
                 f"the part runs {m['run_s']:.1f} s besides compiling, "
                 f"{100 * m['share_of_matmul_rate']:.0f}% of that rate"])
  if d.get("feature_passes"):
    rows.append(["feature passes run / reused", "", ", ".join(
        f"{k}: {v}" for k, v in d["feature_passes"].items()), ""])
  for name, st in stages.items():
    rows.append([f"stage `{name}`: {st['epochs']} epochs", f"{st['seconds']:.1f} s",
                 "", f"first epoch {st['first_epoch_s']:.1f} s"])
  return _table([f"{d['setup']['config']}, fold {d['setup']['fold']}: training "
                 f"{fit:.0f} s", "time", "calls", "share of training / note"], rows)


def _warm_start_table(d) -> str:
  """`benchmarks.warm_start`: a config cold, then warm from the persistent cache."""
  rows = []
  for name, r in d["runs"].items():
    cache = "an empty cache" if name == "cold" else "the cold run's cache"
    parts = [r[p] for p in ("train", "eval", "predict_info")]
    rows.append([f"{name} ({cache})", f"{r['wall_s']:.0f} s"]
                + [f"{p['s']:.0f} s ({p['compile_s']:.0f} s)" for p in parts]
                + [f"{r['outside_s']:.0f} s", f"{r['compile_s']:.0f} s",
                   str(sum(p["persistent_cache_hits"] for p in parts))])
  return _table([f"`{d['setup']['config']}`", "process wall time", "training (compiling)",
                 "evaluation (compiling)", "predict information (compiling)",
                 "the rest (start-up, cohort, reports)", "compiling in all",
                 "executables read from the cache"], rows)


def bench_table(name: str) -> str:
  """A benchmark JSON of ``benchmarks/results/`` as a table (README speed section)."""
  d = _bench(name)
  if d is None:
    return (f"(pending: no `benchmarks/results/{name}.json` yet"
            + ("; `bash benchmarks/run_gpu.sh` writes it" if name.endswith("_gpu") else "")
            + ")\n")
  if name.startswith("sampling_latency"):
    return _sampling_table(d) + _caption(d, "python -m benchmarks.sampling_latency "
                                            "(flags not recorded)")
  if name.startswith("train_throughput"):
    return _train_table(d) + _caption(d, "python -m benchmarks.train_throughput")
  if name.startswith("cindex"):
    return _cindex_table(d) + _caption(d, "python -m benchmarks.cindex")
  if name.startswith("scaling"):
    return _scaling_table(d) + _caption(d, "python -m benchmarks.scaling")
  if name.startswith("profile_must_step"):
    return _profile_table(d) + _caption(d, "python -m benchmarks.profile_must_step")
  if name.startswith("must_fold"):
    return _must_fold_table(d) + _caption(d, "python -m benchmarks.must_fold")
  if name.startswith("warm_start"):
    return _warm_start_table(d) + _caption(d, "python -m benchmarks.warm_start")
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
    base = d["ott_jax"]
    labels = [("ott_jax", "ott-jax, TTA's settings (a loop per patient)"),
              ("ott_jax_whole_batch", "ott-jax, the same vmapped over the batch"),
              ("ott_jax_lse", "ott-jax, log domain, no over-relaxation"),
              ("pot_loop", "POT float64, loop over patients"),
              ("pot_loop_float32", "POT float32, loop over patients"),
              ("torch_batched", "PyTorch, batched log-domain")]
    rows = [[label, f"{d[k]['p50_ms']:.0f} ms", f"{d[k]['p50_ms'] / base['p50_ms']:.2f}x",
             f"{d[k]['cpu_p50_ms'] / base['cpu_p50_ms']:.2f}x"]
            for k, label in labels if k in d]
    text = _table([f"unbalanced Sinkhorn, {pr['patients']} patients x {pr['tokens']} tokens x "
                   f"{pr['prototypes']} prototypes + dustbin", "p50", "time / ott-jax",
                   "CPU time / ott-jax"], rows)
    command = "python -m benchmarks.uot --torch-python=..."
  elif name.startswith("tta_step"):
    sh, j = d["shapes"], d["jax"]
    base = j["p50_ms"]
    rows = [[f"JAX (jit), ott-jax solver (compile {j['compile_s']:.0f} s)",
             f"{_ms(j['p50_ms'])} / {_ms(j['p90_ms'])}",
             f"{_ms(j['sinkhorn']['p50_ms'])} ({max(j['sinkhorn']['iterations_max'])})",
             "1.00x"]]
    for r in d.get("torch_eager_runs", []):
      if "p50_ms" not in r:
        rows.append([f"PyTorch eager, {r['config']}", r.get("error", "no result"), "", ""])
        continue
      rows.append([f"PyTorch eager, {r['config']}", f"{_ms(r['p50_ms'])} / {_ms(r['p90_ms'])}",
                   f"{_ms(r['sinkhorn']['p50_ms'])} ({max(r['sinkhorn']['iterations'])})",
                   f"{r['p50_ms'] / base:.2f}x"])
    text = _table([f"TTA training step, {sh['batch']} patients x ({sh['bag']} patches + "
                   f"{len(sh['gene_groups'])} gene groups), d {sh['dim']}, "
                   f"{sh['prototypes']} prototypes", "p50 / p90",
                   "Sinkhorn p50 (max iterations)", "time / JAX"], rows)
    command = "python -m benchmarks.tta_step --torch-python=..."
  elif name.startswith("mae_pretrain"):
    j, t = d["jax"]["step"], d["torch"]["step"]
    rounds = d.get("rounds")
    ratio = (f"{d['torch_over_jax_p50']:.2f}x (median of {len(rounds)} alternating rounds; "
             f"JAX faster in {d['jax_faster_rounds']})" if rounds
             else f"{t['p50_ms'] / j['p50_ms']:.1f}x")
    rows = [["JAX (jit)", f"{j['p50_ms']:.0f} / {j['p90_ms']:.0f} ms", "1.0x"],
            ["PyTorch eager", f"{t['p50_ms']:.0f} / {t['p90_ms']:.0f} ms", ratio]]
    if d["jax"].get("step_gflop"):
      gf = d["jax"]["step_gflop"]
      rows.append(["JAX's step: XLA's FLOP count, and that over its p50",
                   f"{gf:.1f} GFLOP", f"{gf / j['p50_ms'] * 1e3:.0f} GFLOP/s"])
    jm, tm = d["jax"].get("matmul"), d["torch"].get("matmul")
    if jm and tm:   # the step's products alone, each framework's own kernels
      jr, tr = [r["gflops"] for r in jm], [r["gflops"] for r in tm]
      rel = [a / b for a, b in zip(jr, tr)]
      rows.append([f"its matmuls alone ({', '.join(r['shape'] for r in jm)}), GFLOP/s",
                   f"JAX {min(jr):.0f}-{max(jr):.0f}",
                   f"torch {min(tr):.0f}-{max(tr):.0f} (JAX at {min(rel):.2f}-{max(rel):.2f}x "
                   f"torch's rate)"])
    md = d["model"]
    vec, wsi = md["encoder_depth"], md.get("pathology_encoder_depth", md["encoder_depth"])
    depth = f"{vec}" if wsi == vec else f"{vec} (vectors) / {wsi} (WSI)"
    text = _table([f"impuTMAE pretraining step, batch {d['shapes']['batch']}, {md['dim']}-d, "
                   f"encoders {depth} layers, decoder {md['decoder_depth']}", "p50 / p90",
                   "time / JAX"], rows)
    command = d.get("command", "python -m benchmarks.mae_pretrain --torch-python=...")
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
  return text + _caption(d, command)


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
  """MUST's rows of a committed comparison by ``<run>:<row>``, the run named without its
  draw suffix (``must_seed2`` -> ``must``; the competitor is the reference)."""
  data = _compare_json(name)
  if data is None:
    return None
  out = {}
  for r in data["rows"]:
    run, row = r["row"].split(":", 1)
    if run.startswith("must"):
      out[f"{re.sub(r'_seed[0-9]+$', '', run)}:{row}"] = r
  return out


def _diff(row) -> str:
  if row is None or "diff" not in row:
    return ""
  lo, hi = row["diff_ci95"]
  return f"{row['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] {row['verdict']}"


# MUST's missing-modality paths as the draws tables name them: (label, run, row suffix).
# `must` is the default (the missing path trained in the main stage, the imputer's fill);
# `must_paper_missing` the head trained on complete pairs with the diffusion fill,
# `must_paper_imputer` the same head with the imputer's fill, `must_missing_zeros` the
# missing path trained (and read) with zeros in the missing slot.
_MISSING_PATHS = (("imputer fill (default)", "must", ""),
                  ("diffusion fill", "must", "/diffusion"),
                  ("unimodal head", "must", "/unimodal"),
                  ("auto", "must", "/auto"),
                  ("`:paper_missing`, diffusion fill", "must_paper_missing", ""),
                  ("`:paper_missing`, auto", "must_paper_missing", "/auto"),
                  ("`:paper_imputer`, imputer fill", "must_paper_imputer", ""),
                  ("`:missing_zeros`, zeros", "must_missing_zeros", ""))


def draws_table() -> str:
  """MUST against what a user could do instead, on each synthetic draw: paired
  differences (95% bootstrap interval, verdict) from the committed comparisons
  ``draw<seed>_*`` (docs/results/must.md)."""
  spec = [  # (question, comparison, MUST run:row)
      ("both: MUST vs ABMIL (pathology)", "pathology_present", "must:full"),
      ("both: MUST vs SNN (genomics)", "genomics_present", "must:full"),
      ("both: `:paper_missing` vs ABMIL (pathology)", "pathology_present",
       "must_paper_missing:full"),
  ]
  for missing, present, comp, ref in (("genomics", "pathology", "pathology_present", "ABMIL"),
                                      ("pathology", "genomics", "genomics_present", "SNN")):
    for label, run, variant in _MISSING_PATHS:
      spec.append((f"{missing} missing: MUST {label} vs {ref} ({present})", comp,
                   f"{run}:missing_{missing}{variant}"))
    for label, variant in (("imputer fill", ""), ("diffusion fill", "/diffusion")):
      spec.append((f"{missing} missing: {label} vs zeros (same network)", f"fill_{missing}",
                   f"must:missing_{missing}{variant}"))
    for label, variant in (("imputer fill", ""), ("diffusion fill", "/diffusion")):
      spec.append((f"{missing} missing: `:paper_imputer` {label} vs zeros (same network)",
                   f"paper_head_fill_{missing}", f"must_paper_imputer:missing_{missing}{variant}"))
    spec.append((f"{missing} missing: imputer fill vs `:missing_zeros` (trained with zeros)",
                 f"trained_fill_{missing}", f"must:missing_{missing}"))
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
    r = [table.get(f"must:missing_{m}", {}).get("imputation_room")
         for m in ("pathology", "genomics")]
    rooms.append(" / ".join(f"{x:+.3f}" for x in r) if None not in r else "")
  rows.append(rooms)
  return _table(["paired difference, 95% CI"] + [f"draw {s}" for s in DRAWS], rows)


def draws_cindex_table(runs) -> str:
  """C-index (mean over folds) of MUST's rows and the unimodal baselines on each draw, and
  their mean over the evaluation draws 2-4 (docs/results/must.md)."""
  rows = []
  spec = [("MUST", "must", "full"), ("MUST `:paper_missing`", "must_paper_missing", "full"),
          ("ABMIL (pathology)", "abmil", "full"), ("SNN (genomics)", "snn", "full")]
  for missing in ("pathology", "genomics"):
    for label, run, variant in _MISSING_PATHS[:2] + (("zeros", "must", "/zeros"),
                                                     ("mean", "must", "/mean")) + _MISSING_PATHS[2:]:
      spec.append((f"MUST, {missing} missing, {label}", run, f"missing_{missing}{variant}"))
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


def _env_caption(env) -> str:
  if not env:
    return "not recorded (the run predates `survjax.environment`)"
  if "per_fold" in env:
    return "differs between folds (see the JSON)"
  pk = env["packages"]
  return (f"{env['cpu_model']} ({', '.join(env['cpu_flags'])}), jax {pk['jax']}, "
          f"numpy {pk['numpy']}, flax {pk['flax']}")


def rerun_table(runs, name: str) -> str:
  """A committed run against its rerun from a fresh clone in another environment
  (``docs/results/reruns/<name>.json``): how far the C-indexes move when only package
  versions and the machine change."""
  path = REPO / "docs" / "results" / "reruns" / f"{name}.json"
  if name not in runs or not path.exists():
    return f"(no committed rerun `docs/results/reruns/{name}.json`)\n"
  old, new = runs[name], json.loads(path.read_text())
  rows = []
  for row, a in old["scenarios"].items():
    b = new["scenarios"].get(row)
    if b is None:
      continue
    folds = [y - x for x, y in zip(a["per_fold"], b["per_fold"], strict=True)]
    rows.append([f"`{row}`", f"{a['c_index_mean']:.3f}", f"{b['c_index_mean']:.3f}",
                 f"{b['c_index_mean'] - a['c_index_mean']:+.3f}",
                 f"{max(folds, key=abs):+.3f}"])
  def same(key, other="another"):
    return "the same" if old.get(key) == new.get(key) else other
  return (_table(["scenario", "committed", "rerun", "rerun - committed", "largest fold change"],
                 rows)
          + f"\nCommitted run: environment {_env_caption(old.get('environment'))}; cohort "
            f"`{old.get('cohort_fingerprint')}`. Rerun (`docs/results/reruns/{name}.json`): "
            f"{_env_caption(new.get('environment'))}; cohort "
            f"`{new.get('cohort_fingerprint')}` ({same('cohort_fingerprint')} fingerprint), "
            f"{same('splits_fingerprint', 'other')} splits.\n")


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
  if kind == "held_out":
    return held_out_table(runs, run)
  if kind == "compare":
    return compare_table(run)
  if kind == "bench":
    return bench_table(run)
  if kind == "draws":
    return draws_table() if run == "must" else draws_cindex_table(runs)
  if kind == "tune":
    return tune_table(run)
  if kind == "rerun":
    return rerun_table(runs, run)
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
