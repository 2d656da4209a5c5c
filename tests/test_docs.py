"""Generated documentation: every table agrees with the committed JSON it comes from."""

import json

from survjax import docs


def test_generated_tables_agree_with_the_committed_json():
  runs = docs.load_runs()
  stale = [str(p) for p in docs.documents() if docs.update(p.read_text(), runs) != p.read_text()]
  assert not stale, f"out of date (run python -m survjax.docs): {stale}"


def test_a_changed_number_changes_the_table(tmp_path):
  run = {"scenarios": {"full": {"c_index_mean": 0.7123, "c_index_std": 0.0311,
                                "per_fold": [0.7, 0.72], "oracle_c_index": 0.8}}}
  text = "a\n<!-- generated: scenarios.x -->\nold\n<!-- end generated -->\nb\n"
  out = docs.update(text, {"x": run})
  assert "| `full` | 0.712 +- 0.031 | 0.700, 0.720 | 0.800 |" in out
  assert out.startswith("a\n") and out.endswith("<!-- end generated -->\nb\n")
  run["scenarios"]["full"]["c_index_mean"] = 0.6
  assert "0.600 +- 0.031" in docs.update(out, {"x": run})
  assert docs.update(out, {"x": json.loads(json.dumps(run))}) == docs.update(out, {"x": run})


def test_every_benchmark_json_renders_with_its_provenance():
  """Each committed benchmark JSON renders as a table whose caption names the command,
  the machine and the commit (or says it was not recorded), and the torch version
  where torch was measured."""
  results = docs.REPO / "benchmarks" / "results"
  for path in sorted(results.glob("*.json")):
    data = json.loads(path.read_text())
    text = docs.bench_table(path.stem)
    caption = text.strip().splitlines()[-1]
    assert caption.startswith("`python") and " on " in caption, (path.name, caption)
    assert "commit `" in caption or "commit not recorded" in caption, caption
    if docs._torch_version(data):
      assert f"torch {docs._torch_version(data)}" in caption


def test_the_speed_section_has_no_hand_typed_table():
  """Every table line of the README's speed section lies inside a generated block."""
  readme = (docs.REPO / "README.md").read_text()
  section = readme[readme.index("## Speed\n"):]
  section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
  outside = docs._BLOCK.sub("", section)
  assert not [ln for ln in outside.splitlines() if ln.startswith("|")]
  assert "bench.sampling_latency_cpu_xeon" in section and "bench.train_throughput_gpu" in section


def test_a_sampling_benchmark_row_follows_its_json(monkeypatch):
  d = {"command": "python -m benchmarks.sampling_latency --quick",
       "git": {"commit": "0123456789abcdef", "modified_tracked_files": []},
       "device": {"cpu_model": "Test CPU", "cpu_threads": 2, "load_average_1min": 0.5,
                  "jax_version": "0.12.0"},
       "config": {"precision": "bfloat16", "kernel": "xla"},
       "matmul_gflops_per_s": {"1024x1024x1024_start": 100.0, "1024x1024x1024_end": 120.0,
                               "reference": 120.0, "15x256x256": 30.0,
                               "1024x1024x1024_bfloat16": 200.0},
       "jax": {"batch1": {"p50_ms": 40.0, "p90_ms": 44.0, "compile_s": 1.0,
                          "gflops_per_s": 60.0},
               "batch1_python_loop": {"p50_ms": 60.0},
               "sweep": [{"batch": 4, "patients_per_s": 50.0, "gflops_per_s": 90.0,
                          "pct_of_matmul_rate": 75.0, "pct_of_bf16_matmul_rate": 45.0}],
               "peak": {"batch": 4, "patients_per_s": 50.0, "pct_of_bf16_matmul_rate": 45.0}},
       "torch": {"torch_version": "2.14.1", "batch1_batched": {"p50_ms": 80.0},
                 "batch1_one_at_a_time": {"p50_ms": 400.0}, "check_max_rel_diff": 1e-6,
                 "sweep": [{"batch": 4, "patients_per_s": 25.0}]},
       "ratios": {"torch_batched_over_jax_scan": 2.0, "torch_one_at_a_time_over_jax_scan": 10.0}}
  monkeypatch.setattr(docs, "_bench", lambda name: d)
  text = docs.bench_table("sampling_latency_test")
  assert "| 40.0 ms / 44.0 ms (compile 1.0 s) | 80.0 ms (5 samples batched) | 2.00x |" in text
  assert "| throughput, batch 4 | 50.0 patients/s, 90 GFLOP/s (75% of the matmul rate) | " \
         "25.0 patients/s | 2.00x |" in text
  assert "bfloat16 matmuls" in text and "45% of the measured bfloat16 matmul rate" in text
  assert text.rstrip().endswith(
      "`python -m benchmarks.sampling_latency --quick` on Test CPU, 2 threads, load average "
      "0.5 during the run; commit `0123456789`; jax 0.12.0, torch 2.14.1.")
  d["error"] = "the pallas sampler did not compile: X"
  assert docs.bench_table("sampling_latency_test").startswith("Not measured")
