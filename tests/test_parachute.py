"""PARACHUTE: Hutchinson curvature, GCS, LocXEmb fast form, per-patient invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import parachute as parachute_config
from survjax import curvature, survival
from survjax.data.batching import BatchSpec, make_batch
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.method import cohort_info
from survjax.models import get_method
from survjax.models.parachute import locxemb_dense, locxemb_rank1


def _config(variant="", **model):
  c = parachute_config.get_config(variant)
  m = c.model
  m.dim, m.num_heads, m.hazard_hidden, m.dce_hidden, m.topk = 16, 2, 16, 8, 4
  m.attn_dropout = 0.0   # fewer random ops to compile; dropout stays in adapters and hazard
  for k, v in model.items():
    if isinstance(v, dict):
      m[k].update(v)
    else:
      m[k] = v
  return c


@pytest.fixture(scope="module")
def cohort():
  return make_synthetic_cohort(SyntheticSpec(
      n_patients=40, seed=5, patch_dim=8, bag_min=10, bag_max=30, radiology=True,
      radiology_dim=8, slices_min=4, slices_max=12, share_radiology=0.3, share_genomics=0.0,
      missing_radiology=0.2))


def _setup(cohort, **model):
  method = get_method(_config(**model))
  net = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(0))
  return method, net


def _batch(cohort, idx, size=16, **kw):
  spec = BatchSpec(size, buckets=(16, 32, 64))
  return jax.tree.map(jnp.asarray, make_batch(cohort, idx, spec, **kw))


def _risk(method, net, batch, present=("radiology", "pathology")):
  return np.asarray(method.predict(net, batch, frozenset(present), None)["risk"])


# ---- curvature ---------------------------------------------------------------------


def _toy_loss(w, t, e):
  def loss(f):   # non-convex in f: Cox through a tanh layer
    return survival.cox_partial_nll(jnp.tanh(f) @ w, t, e, jnp.ones_like(t))
  return loss


@jax.jit
def _hutchinson_case(f, w, t, e, key):
  loss = _toy_loss(w, t, e)
  b, d = f.shape
  hess = jax.hessian(loss)(f).reshape(b * d, b * d)
  probes = curvature.rademacher_probes(key, 4000, (b, d))
  g, hv = curvature.hessian_vector_products(loss, f, probes)
  _, est = curvature.hutchinson_rows(loss, f, key, 4000)
  trace = curvature.hutchinson_trace(loss, f, key, 4000)
  return hess, probes, g, jax.grad(loss)(f), hv, est, trace


def test_hutchinson_matches_exact_hessian():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  b, d = 5, 3
  f = jax.random.normal(k1, (b, d))
  hess, probes, g, g_ref, hv, est, trace = _hutchinson_case(
      f, jax.random.normal(k2, (d,)), jnp.arange(1.0, b + 1), jnp.array([1., 0, 1, 1, 0]), k3)
  exact_rows = jnp.einsum("bdbd->b", hess.reshape(b, d, b, d))
  np.testing.assert_allclose(g, g_ref, rtol=1e-6)
  # Each probe: r^T H r of the explicit Hessian, row by row.
  np.testing.assert_allclose(hv, jnp.einsum("ij,pj->pi", hess, probes.reshape(len(probes), -1)
                                            ).reshape(hv.shape), rtol=1e-4, atol=1e-6)
  # Unbiased for each row's block trace: within 5 Monte-Carlo sigmas of 4000 probes.
  per_probe = jnp.sum(probes * hv, axis=-1)                # [P, B]
  np.testing.assert_allclose(est, per_probe.mean(0), rtol=1e-5, atol=1e-7)
  p = len(probes)
  sigma = per_probe.std(0) / np.sqrt(p)
  assert np.all(np.abs(est - exact_rows) <= 5 * sigma + 1e-6), (est, exact_rows, sigma)
  assert abs(trace - jnp.trace(hess)) <= 5 * per_probe.sum(1).std() / np.sqrt(p) + 1e-6


def test_gcs_scale_is_safe_for_negative_curvature():
  c = jnp.array([-1e3, -1.0, -1e-3, 0.0, 0.5, 1e6])
  w = curvature.gcs_gate(c, jnp.ones_like(c), jnp.array([1, 0, 1, 0, 1, 0]), curvature.GCSGate())
  s = curvature.gcs_scale(c, w, gamma=1e3)
  assert np.all(np.isfinite(s)) and np.all(s > 0) and np.all(s <= 1)
  np.testing.assert_array_equal(s[:4], 1.0)     # no damping without positive curvature
  g = jnp.ones((6, 3))
  steered = jax.grad(lambda f: jnp.sum(curvature.steer_cotangent(f, s) * g))(g)
  np.testing.assert_allclose(steered, g * s[:, None])


# ---- LocXEmb -----------------------------------------------------------------------


@pytest.mark.parametrize("d,k", [(8, 16), (20, 4), (64, 16), (100, 16), (33, 1)])
def test_locxemb_rank1_equals_dense(d, k):
  kx, ky = jax.random.split(jax.random.key(d + k))
  x = jax.random.normal(kx, (6, d))
  y = jax.random.normal(ky, (6, d)).at[0].set(jnp.round(jax.random.normal(ky, (d,))))  # ties
  pos, neg = locxemb_rank1(x, y, k)
  n = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  dpos, dneg = locxemb_dense(n(x)[..., None], n(y)[..., None], k, normalize=False)
  np.testing.assert_allclose(pos, dpos, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(neg, dneg, rtol=1e-6, atol=1e-7)


# ---- the model ---------------------------------------------------------------------


def test_risk_does_not_depend_on_batch_composition(cohort):
  method, net = _setup(cohort)
  a = _risk(method, net, _batch(cohort, np.arange(0, 16)))
  b = _risk(method, net, _batch(cohort, np.r_[np.arange(7, -1, -1), np.arange(20, 27)]))
  np.testing.assert_allclose(b[:8], a[:8][::-1], rtol=1e-5, atol=1e-6)
  # The public code's cross-batch attention does depend on it (the parity option).
  method, net = _setup(cohort, reference_cross_batch_attention=True)
  a = _risk(method, net, _batch(cohort, np.arange(0, 16)))
  b = _risk(method, net, _batch(cohort, np.r_[np.arange(7, -1, -1), np.arange(20, 27)]))
  assert np.max(np.abs(b[:8] - a[:8][::-1])) > 1e-4


def test_padding_invariance(cohort):
  method, net = _setup(cohort)
  idx = np.arange(16)
  a = _risk(method, net, _batch(cohort, idx))
  b = _risk(method, net, _batch(cohort, idx, min_bucket={"radiology": 64, "pathology": 64}))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden", ["radiology", "pathology"])
def test_predict_never_reads_a_hidden_modality(cohort, hidden):
  method, net = _setup(cohort)
  present = {"radiology", "pathology"} - {hidden}
  idx = np.arange(16)
  nan = _risk(method, net, _batch(cohort, idx, hide=[hidden], fill=np.nan), present)
  zero = _risk(method, net, _batch(cohort, idx, hide=[hidden]), present)
  assert np.all(np.isfinite(nan))
  np.testing.assert_array_equal(nan, zero)


def _grads(method, net, batch, key):
  graphdef, state = nnx.split(net)
  loss_fn = method.stages()[0].loss_fn

  def f(s):
    return loss_fn(nnx.merge(graphdef, s), batch, key)

  return jax.jit(jax.value_and_grad(f, has_aux=True))(state), state


def test_gcs_zero_gate_is_plain_descent_and_steering_stays_finite(cohort):
  batch, key = _batch(cohort, np.arange(11)), jax.random.key(3)   # 5 padded rows
  method_plain, net = _setup(cohort, gcs=dict(enabled=False))
  ((loss_plain, _), g_plain), state = _grads(method_plain, net, batch, key)
  # w = 0: the GCS step is plain gradient descent, exactly.
  off = dict(a_curv=0.0, a_grad=0.0, a_missing=0.0, bias=-np.inf)
  method, _ = _setup(cohort, gcs=dict(enabled=True, **off))
  ((loss_gcs, metrics), g_gcs), _ = _grads(method, net, batch, key)
  # The steering factor is exactly 1; the two programs differ only in XLA's fusion of
  # the same float ops, so the gradients agree to float32 rounding (ulps), not bitwise.
  assert float(metrics["gate_mean"]) == 0.0 and float(metrics["scale_mean"]) == 1.0
  np.testing.assert_array_equal(loss_gcs, loss_plain)
  same = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9)
  jax.tree.map(same, g_gcs, g_plain)
  tx = optax.sgd(1e-2)
  step = lambda g: optax.apply_updates(state, tx.update(g, tx.init(state), state)[0])
  jax.tree.map(same, step(g_gcs), step(g_plain))
  # Strong steering, a gate that opens on negative curvature: finite, and only the fusion
  # encoder's gradient changes (the hazard net gets the plain Cox gradient).
  method, _ = _setup(cohort, gcs=dict(enabled=True, gamma=1e4, a_curv=-50.0))
  ((loss, metrics), g), _ = _grads(method, net, batch, key)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  jax.tree.map(same, g["hazard"], g_plain["hazard"])
  enc, enc_plain = g["path"]["fc_in"]["kernel"][...], g_plain["path"]["fc_in"]["kernel"][...]
  assert float(metrics["scale_mean"]) < 1.0
  assert np.linalg.norm(enc) < np.linalg.norm(enc_plain)


def test_reference_parachute_cindex_is_the_public_codes_swapped_metric():
  """The transcription equals a plain loop over the code's pair rule with time and risk
  swapped, and differs from Harrell's C (which it is not)."""
  import numpy as np
  from survjax.evaluate.metrics import concordance_index
  from survjax.models.parachute import reference_parachute_cindex

  rng = np.random.default_rng(0)
  n = 60
  time = rng.exponential(size=n) + 0.01
  event = rng.uniform(size=n) < 0.5
  risk = -np.log(time) + rng.normal(size=n)
  num = den = 0.0
  for i in range(n):
    for j in range(n):
      if risk[j] < risk[i] and event[j]:      # code: event_times = risk, observed of j
        den += 1
        num += 1.0 if time[j] > time[i] else 0.5 if abs(time[j] - time[i]) < 1e-8 else 0.0
  got = reference_parachute_cindex(risk, time, event)
  assert got == pytest.approx(num / den, abs=1e-9)
  assert abs(got - concordance_index(time, event, risk)[0]) > 0.01


def test_parachute_runs_from_the_users_file_layout(tmp_path):
  """MCAT CSV + per-slide features + radiology/<case_id>.npy (some cases without one)
  through the command line: every scenario is reported, nothing is read from synthetic."""
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path

  from file_cohort import files_args, write_file_cohort

  repo = Path(__file__).resolve().parents[1]
  c = write_file_cohort(tmp_path / "cohort", n_patients=40)
  rad = tmp_path / "cohort" / "radiology"
  rad.mkdir()
  rng = np.random.default_rng(0)
  for i, case in enumerate(c["case_ids"]):
    if i % 7:   # every seventh case has no radiology
      np.save(rad / f"{case}.npy", rng.normal(size=(int(rng.integers(4, 12)), 8)).astype(np.float32))
  args = files_args(c, **{"data.files.radiology_dir": rad, "cv.num_folds": 2,
                          "cv.splits_dir": tmp_path / "splits", "eval.latency": False,
                          "eval.scenarios": "('full','missing_radiology','missing_pathology')",
                          "progress": False, "model.epochs": 2})
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "survjax.main", "--config=configs/parachute.py:smoke",
                      f"--workdir={tmp_path / 'run'}", *args], cwd=repo, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  res = json.loads((tmp_path / "run" / "results.json").read_text())
  assert res["n_patients"] == 40 and res["dataset"] != "synthetic"
  assert set(res["scenarios"]) == {"full", "missing_radiology", "missing_pathology"}
  for s in res["scenarios"].values():
    assert 0.0 <= s["c_index_mean"] <= 1.0 and "oracle_c_index" not in s
