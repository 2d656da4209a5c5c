"""The benchmark scripts run end to end in --quick mode and write the agreed JSON fields.

Each runs as a subprocess, as a user would run it (fresh JAX: scaling.py sets its own
fake CPU device count). No timing is asserted: the machine is shared.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(module, tmp_path, *extra, timeout=300):
  out = tmp_path / f"{module}.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick",
                         "--out", str(out), *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = json.loads(proc.stdout)  # stdout carries the JSON only
  written = json.loads(out.read_text())
  assert printed == written
  return written


def _check_device(result):
  for key in ("device_kind", "platform", "num_devices", "cpu_model", "cpu_threads",
              "jax_version"):
    assert key in result["device"]


def test_cindex_quick_agrees_with_sksurv(tmp_path):
  r = _run("cindex", tmp_path)
  assert r["benchmark"] == "cindex" and r["mode"] == "quick"
  _check_device(r)
  assert r["all_agree"] is True
  assert r["result_fields"] == ["cindex", "concordant", "discordant", "tied_risk",
                                "tied_time"]
  assert len(r["sizes"]) >= 2
  for row in r["sizes"]:
    assert row["agree"] is True
    assert row["survjax"]["result"] == row["sksurv"]["result"]
    assert row["survjax"]["p50_ms"] > 0 and row["sksurv"]["p50_ms"] > 0
    assert row["speedup"] > 0
    assert 0 < row["censoring_rate"] < 1
    assert row["unique_times"] < row["n"] and row["unique_risks"] < row["n"]  # ties
  assert set(r["speedups"]) == {str(row["n"]) for row in r["sizes"]}


@pytest.mark.slow
def test_scaling_quick_strong_and_weak(tmp_path):
  r = _run("scaling", tmp_path)
  assert r["benchmark"] == "scaling" and r["mode"] == "quick"
  _check_device(r)
  assert r["device"]["num_devices"] == 8  # the script's own fake CPU devices
  assert r["model"]["name"] == "abmil" and "step" in r["model"]
  assert "overhead" in r["note"]
  for kind in ("strong", "weak"):
    rows = r[kind]
    assert [row["num_devices"] for row in rows] == [1, 2, 4, 8]
    for row in rows:
      assert row["p50_ms"] > 0 and row["p90_ms"] >= row["p50_ms"] * 0.999
      assert row["compile_s"] > 0 and row["patients_per_s"] > 0 and row["efficiency"] > 0
      assert row["global_batch"] == row["per_device_batch"] * row["num_devices"]
  assert {row["global_batch"] for row in r["strong"]} == {r["strong_global_batch"]}
  assert {row["per_device_batch"] for row in r["weak"]} == {r["weak_per_device_batch"]}


def test_sampling_latency_quick(tmp_path):
  r = _run("sampling_latency", tmp_path, "--no-torch", "--batch-sizes", "1,2",
           "--repeats", "2", "--unroll-variants", "2")
  assert r["benchmark"] == "sampling_latency" and r["mode"] == "quick"
  _check_device(r)
  assert r["command"].endswith("-m benchmarks.sampling_latency --quick --out "
                               f"{tmp_path / 'sampling_latency.json'} --no-torch "
                               "--batch-sizes 1,2 --repeats 2 --unroll-variants 2")
  assert len(r["git"]["commit"]) == 40
  assert r["config"]["precision"] == "float32" and r["config"]["kernel"] == "xla"
  assert r["torch"] is None and r["torch_unavailable_reason"] == "--no-torch"
  jx = r["jax"]
  assert jx["batch1"]["p50_ms"] > 0 and jx["batch1"]["compile_s"] > 0
  assert jx["batch1_python_loop"]["p50_ms"] > 0
  assert [v["unroll"] for v in jx["batch1_unroll_variants"]] == [2]
  assert [row["batch"] for row in jx["sweep"]] == [1, 2]
  for row in jx["sweep"]:
    assert row["patients_per_s"] > 0 and row["gflops_per_s"] > 0
  # 16.94 MFLOP per denoiser call (see denoiser_flops), 50 steps x 5 samples per patient.
  assert r["flops"]["per_patient"] == r["flops"]["per_call_per_latent"] * 250
  assert r["matmul_gflops_per_s"]["1024x1024x1024_start"] > 0


def test_sampling_latency_bfloat16_records_the_bf16_matmul_rate(tmp_path):
  r = _run("sampling_latency", tmp_path, "--no-torch", "--batch-sizes", "2", "--repeats", "2",
           "--precision", "bfloat16")
  assert r["config"]["precision"] == "bfloat16"
  assert r["matmul_gflops_per_s"]["1024x1024x1024_bfloat16"] > 0
  assert r["jax"]["sweep"][0]["pct_of_bf16_matmul_rate"] > 0


def test_matmul_flops_closed_forms():
  """`benchmarks.common.matmul_flops` against ``2 m n k`` per product, counted through
  jit, scan (times its length), cond (the costlier branch) and autodiff."""
  sys.path.insert(0, str(ROOT))
  import jax
  import jax.numpy as jnp

  from benchmarks.common import matmul_flops

  m, k, n = 8, 16, 32
  x, w = jnp.ones((m, k)), jnp.ones((k, n))
  product = 2 * m * k * n
  assert matmul_flops(jax.make_jaxpr(lambda x, w: x @ w)(x, w)) == product
  assert matmul_flops(jax.make_jaxpr(jax.jit(lambda x, w: x @ w))(x, w)) == product

  def scanned(x, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w[:, :k]), None), x, None, length=5)[0]
  assert matmul_flops(jax.make_jaxpr(scanned)(x, w)) == 5 * 2 * m * k * k

  def loss(x, w):
    return jnp.sum(jnp.tanh(x @ w))
  # forward, then dL/dx = g w^T and dL/dw = x^T g: three products of the same size
  assert matmul_flops(jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(x, w)) == 3 * product
  assert matmul_flops(jax.make_jaxpr(jax.grad(loss, 1))(x, w)) == 2 * product

  batched = jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(
      jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6)))
  assert matmul_flops(batched) == 2 * 3 * 4 * 5 * 6

  def branch(p, x, w):
    return jax.lax.cond(p, lambda: x @ w, lambda: jnp.zeros((m, n)))
  assert matmul_flops(jax.make_jaxpr(branch)(True, x, w)) == product
  assert matmul_flops(jax.make_jaxpr(lambda x: jnp.tanh(x) + 1)(x)) == 0
  # a product no output reads is dropped, inside a nested jit too
  unused = jax.jit(lambda x, w: (x @ w, (x @ w) @ w.T)[0])
  assert matmul_flops(jax.make_jaxpr(unused)(x, w)) == product
