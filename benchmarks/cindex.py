"""Harrell's C-index: survjax's exact vectorised one against scikit-survival's.

    PYTHONPATH=. python -m benchmarks.cindex                 # n = 1k, 10k, 100k
    PYTHONPATH=. python -m benchmarks.cindex --quick --out /tmp/c.json   # seconds

`survjax.evaluate.metrics.concordance_index` (``O(n log^2 n)``, numpy) and
``sksurv.metrics.concordance_index_censored`` (the reference, a loop over the events) on
the same synthetic data per size: event times with ties (rounded to whole months, so many
patients share a time, and events and censorings meet at equal times), about 40%
censoring, and risks with ties (rounded to 2 decimals). Each call returns
``(cindex, concordant, discordant, tied_risk, tied_time)``; ``agree`` is True when all five
are identical (exact equality, no tolerance). survjax is timed over repeats (p50/p90);
sksurv once per size past 10k (it is quadratic), and not at all when its estimated time
(the previous size's, scaled by ``(n / n_prev)^2``) exceeds ``--sksurv-budget``
seconds, which is then recorded under ``skipped``. ``speedup`` = sksurv / survjax (p50).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import common

SIZES = (1000, 10000, 100000)
QUICK_SIZES = (1000, 5000)


def make_data(n: int, seed: int = 0, censoring: float = 0.4):
  """Times with ties (whole months), ~``censoring`` censored, risks with ties (2 decimals)."""
  rng = np.random.default_rng(seed)
  risk_true = rng.standard_normal(n)
  t_event = rng.exponential(30.0 * np.exp(-risk_true))
  t_cens = rng.exponential(30.0 * (1 - censoring) / censoring, n)
  event = t_event <= t_cens
  time_ = np.ceil(np.minimum(t_event, t_cens))  # whole months: many ties
  risk = np.round(risk_true + rng.standard_normal(n), 2)  # noisy predictions, tied
  return time_.astype(np.float64), event, risk.astype(np.float64)


def _timed(fn, repeats: int):
  times, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, common.summarize(times)


def _as_list(res):
  return [float(res[0])] + [int(x) for x in res[1:]]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/cindex_<platform>.json)")
  p.add_argument("--quick", action="store_true", help="n = 1k, 5k")
  p.add_argument("--sizes", default=None, help="comma-separated patient counts")
  p.add_argument("--repeats", type=int, default=None, help="survjax repeats (20, quick 5)")
  p.add_argument("--sksurv-budget", type=float, default=None,
                 help="skip sksurv at a size whose estimated time exceeds this many seconds "
                      "(default 300, quick 20)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  from sksurv import __version__ as sksurv_version
  from sksurv.metrics import concordance_index_censored

  from survjax.evaluate.metrics import concordance_index

  sizes = (tuple(int(x) for x in args.sizes.split(",") if x) if args.sizes
           else QUICK_SIZES if args.quick else SIZES)
  repeats = args.repeats or (5 if args.quick else 20)
  budget = args.sksurv_budget or (20.0 if args.quick else 300.0)
  out_path = args.out or common.default_out("cindex")
  info = common.device_info()
  common.log(f"device: {info['cpu_model']}, {info['cpu_threads']} threads, load "
             f"{info['load_average_1min']}; sksurv {sksurv_version}")
  t_run = time.perf_counter()
  rows, prev = [], None
  for n in sizes:
    time_, event, risk = make_data(n, args.seed + n)
    row = {"n": n, "events": int(event.sum()), "censoring_rate": float(1 - event.mean()),
           "unique_times": int(np.unique(time_).size),
           "unique_risks": int(np.unique(risk).size)}
    ours, stats = _timed(lambda: concordance_index(time_, event, risk), repeats)
    row["survjax"] = dict(stats, result=_as_list(ours))
    est = None if prev is None else prev[1] * (n / prev[0]) ** 2
    if est is not None and est > budget:
      row["sksurv"] = None
      row["skipped"] = (f"sksurv estimated {est:.0f} s (quadratic from n={prev[0]}) exceeds "
                        f"--sksurv-budget {budget:.0f} s")
      row["agree"] = None
      common.log(f"  n={n:7d}: survjax p50 {stats['p50_ms']:9.2f} ms; {row['skipped']}")
      rows.append(row)
      continue
    ref_repeats = 1 if n > 10000 else (3 if n > 1000 else 5)
    ref, ref_stats = _timed(lambda: concordance_index_censored(event, time_, risk),
                            ref_repeats)
    prev = (n, ref_stats["p50_ms"] * 1e-3)
    row["sksurv"] = dict(ref_stats, result=_as_list(ref))
    row["agree"] = bool(_as_list(ours) == _as_list(ref))
    row["speedup"] = ref_stats["p50_ms"] / stats["p50_ms"]
    common.log(f"  n={n:7d}: survjax p50 {stats['p50_ms']:9.2f} ms, sksurv p50 "
               f"{ref_stats['p50_ms']:10.1f} ms ({ref_repeats}x), speed-up "
               f"{row['speedup']:8.1f}, C = {ours[0]:.6f}, identical: {row['agree']}")
    rows.append(row)
  checked = [r["agree"] for r in rows if r["agree"] is not None]
  result = {
      "benchmark": "cindex",
      "mode": "quick" if args.quick else "full",
      "device": info,
      "git": common.git_state(),
      "versions": {"sksurv": sksurv_version, "numpy": np.__version__},
      "data": "times ceil(exponential) months (ties, events and censorings at equal "
              "times), ~40% censored, risks rounded to 2 decimals (ties); seed + n",
      "result_fields": ["cindex", "concordant", "discordant", "tied_risk", "tied_time"],
      "agreement": "exact equality of all five fields",
      "sizes": rows,
      "all_agree": bool(checked) and all(checked),
      "speedups": {str(r["n"]): r.get("speedup") for r in rows},
      "sksurv_budget_s": budget,
      "total_s": time.perf_counter() - t_run,
      "load_average_1min_end": os.getloadavg()[0],
  }
  common.emit(out_path, result)
  return 0 if result["all_agree"] else 1


if __name__ == "__main__":
  sys.exit(main())
