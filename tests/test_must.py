"""MUST: subspace algebra, decomposition on a trained toy, missing-modality path, padding."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import must as must_config
from survjax import survival
from survjax.data.batching import BatchSpec, make_batch
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.data.timebins import assign_time_bins, fit_time_bins
from survjax.evaluate.cv import Predictor
from survjax.method import cohort_info
from survjax.models import get_method
from survjax.models.must import decomposition_losses, fit_latent
from survjax.errors import InputError
from survjax.train import sharding
from survjax.train.sharding import make_mesh
from survjax.train.trainer import Trainer


def _tiny_config(**model) -> ml_collections.ConfigDict:
  c = must_config.get_config("smoke")
  m = c.model
  m.dim, m.num_heads, m.num_landmarks, m.rank, m.head_hidden = 32, 4, 8, 8, 32
  m.ldm.num_layers, m.ldm.num_heads, m.ldm.ddim_steps, m.ldm.num_samples = 1, 4, 5, 2
  for k, v in model.items():
    m[k] = v
  return c


@pytest.fixture(scope="module")
def toy():
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=48, seed=3, patch_dim=16,
                                               bag_min=12, bag_max=60))
  config = _tiny_config()
  method = get_method(config)
  bins = assign_time_bins(cohort.time, fit_time_bins(cohort.time, cohort.event, 4))
  return cohort, method, bins


def _model(method, cohort, seed=0):
  return method.build(cohort_info(cohort, method.modalities), nnx.Rngs(seed))


def _predict(method, model, batch, present, key):
  """``method.predict`` jitted as the Predictor runs it (eager dispatch is slow)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, b, k: method.predict(nnx.merge(graphdef, s), b, present, k))
  return {k: np.asarray(v) for k, v in fn(state, batch, key).items()}


def _representations(method, model, batch):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, b: method.representations(nnx.merge(graphdef, s), b))
  return {k: np.asarray(v) for k, v in fn(state, batch).items()}


def test_subspace_projector_is_idempotent_and_orthonormal(toy):
  cohort, method, _ = toy
  model = _model(method, cohort)
  # Any parameter value, not just the initial one, gives an orthonormal B.
  model.subspace[...] = jax.random.normal(jax.random.key(1), model.subspace[...].shape) * 3.0
  b = model.basis()
  d, r = b.shape
  assert (d, r) == (32, 8)
  np.testing.assert_allclose(b.T @ b, np.eye(r), atol=2e-6)
  p = b @ b.T
  np.testing.assert_allclose(p @ p, p, atol=2e-6)
  np.testing.assert_allclose(np.trace(p), r, atol=1e-4)
  x = jax.random.normal(jax.random.key(2), (5, d))
  np.testing.assert_allclose(model.project_shared(x), x @ p, atol=1e-5)


def _train_main(method, model, cohort, bins, steps, seed=0):
  """A few plain AdamW steps of the stage-2 loss (eq. 16) on the whole toy cohort."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(3e-3)
  opt = tx.init(params)
  spec = BatchSpec(batch_size=48, max_instances=32)
  batch = make_batch(cohort, np.arange(len(cohort.time)), spec, bins=bins,
                     rng=np.random.default_rng(seed))

  @jax.jit
  def step(params, opt, key):
    def loss_of(p):
      return method.main_loss(nnx.merge(graphdef, p, rest), batch, key)
    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, aux

  for i in range(steps):
    params, opt, loss, aux = step(params, opt, jax.random.key(i))
  nnx.update(model, params)
  return {k: float(v) for k, v in aux.items()}, batch


def _decomposition_error(model, batch, centred=False):
  """Mean ||g - (u^ + c^)|| / ||g|| per modality; ``centred``: every vector minus its
  batch mean first, the error of the patient-level parts."""
  comp = model.components(batch)
  rel = []
  for g, u, c in (("g_p", "u_p", "c_gp"), ("g_g", "u_g", "c_pg")):
    vecs = [comp[g], comp[u] + comp[c]]
    if centred:
      vecs = [v - jnp.mean(v, 0) for v in vecs]
    err = jnp.linalg.norm(vecs[0] - vecs[1], axis=-1)
    rel.append(float(jnp.mean(err / jnp.linalg.norm(vecs[0], axis=-1))))
  return rel, comp


@pytest.mark.parametrize("relative", [True, False])
def test_decomposition_identity_holds_on_a_trained_toy(toy, relative):
  cohort, _, bins = toy
  method = get_method(_tiny_config(decomp_relative=relative))
  model = _model(method, cohort)
  batch = make_batch(cohort, np.arange(len(cohort.time)), BatchSpec(48, max_instances=32),
                     bins=bins, rng=np.random.default_rng(0))
  before, _ = _decomposition_error(model, batch)
  centred_before, _ = _decomposition_error(model, batch, centred=True)
  aux, batch = _train_main(method, model, cohort, bins, steps=150)
  after, comp = _decomposition_error(model, batch)
  centred_after, _ = _decomposition_error(model, batch, centred=True)
  # Eq. 10: g_m = u^_m + c^ is learnt (relative error well below its value at init) ...
  assert max(after) < 0.35 and all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
  if relative:  # ... for the patient-level parts too (measured 0.17 / 0.12, from 1.5 / 1.2)
    assert max(centred_after) < 0.35, (centred_before, centred_after)
  else:  # eq. 13 as written fits the common offset (raw 0.07 / 0.06), not the patients
    assert min(centred_after) > 0.5, (centred_before, centred_after)
  # ... while the algebra of eq. 9 holds exactly: u^ in the complement, c^ in the subspace.
  b = model.basis()
  for u in ("u_p", "u_g"):
    np.testing.assert_allclose(comp[u] @ b, 0.0, atol=1e-4)
  for c in ("c_pg", "c_gp"):
    np.testing.assert_allclose(comp[c] - (comp[c] @ b) @ b.T, 0.0, atol=1e-4)
  # Shared components align across modalities (eq. 14).
  cos = jnp.sum(comp["c_pg"] * comp["c_gp"], -1) / (
      jnp.linalg.norm(comp["c_pg"], axis=-1) * jnp.linalg.norm(comp["c_gp"], axis=-1))
  assert float(jnp.mean(cos)) > 0.8


def test_main_loss_gradients_are_finite_with_padded_rows_and_unpaired_patients(toy):
  cohort, _, bins = toy
  method = get_method(_tiny_config(train_patients="any"))  # the unpaired branch (supp. 8.2)
  model = _model(method, cohort)
  spec = BatchSpec(batch_size=16, max_instances=32)
  # 6 real patients in a batch of 16: the padded rows have empty bags (zero c_{P<-G}).
  batch = make_batch(cohort, np.arange(6), spec, bins=bins, rng=np.random.default_rng(0))
  batch["modalities"]["genomics"]["available"][2] = False  # one unpaired patient (supp. 8.2)
  graphdef, state = nnx.split(model)

  def loss_of(s):
    return method.main_loss(nnx.merge(graphdef, s), batch, jax.random.key(0))[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_of))(state)
  assert np.isfinite(float(loss))
  bad = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(grads)
         if not np.all(np.isfinite(np.asarray(v)))]
  assert not bad, bad


_COMPONENTS = ("g_p", "g_g", "u_p", "u_g", "c_pg", "c_gp")


def _offset_components(rng, eps, n=10, d=6):
  """``x_i = m_x + eps z_{x,i}`` with eq. 10 holding for the offsets, not for the z."""
  m = {k: rng.normal(size=d) for k in ("u_p", "u_g", "c")}
  z = {k: rng.normal(size=(n, d)) for k in _COMPONENTS}
  offset = dict(u_p=m["u_p"], u_g=m["u_g"], c_pg=m["c"], c_gp=m["c"],
                g_p=m["u_p"] + m["c"], g_g=m["u_g"] + m["c"])
  return {k: jnp.asarray(offset[k] + eps * z[k], jnp.float32) for k in _COMPONENTS}


def test_decomposition_losses_match_a_per_patient_loop():
  """Eq. 13-14, absolute and relative, against a loop over the weighted patients; rows
  of weight 0 (padding, unpaired) do not count, whatever they hold."""
  rng = np.random.default_rng(0)
  comp = _offset_components(rng, eps=0.5, n=9)
  w = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0], np.float32)
  garbage = {k: v.at[7:].set(1e3) for k, v in comp.items()}
  rows = [i for i in range(9) if w[i]]
  x = {k: np.asarray(v, np.float64)[rows] for k, v in comp.items()}

  def mean_sq(a):
    return np.mean([np.sum(r ** 2) for r in a])

  res_p = mean_sq(x["g_p"] - x["u_p"] - x["c_gp"])
  res_g = mean_sq(x["g_g"] - x["u_g"] - x["c_pg"])
  res_sh = mean_sq(x["c_pg"] - x["c_gp"])

  def var(a):
    return mean_sq(a - np.mean(a, 0))

  expected = {False: (res_p + res_g, res_sh),
              True: (res_p / var(x["g_p"]) + res_g / var(x["g_g"]),
                     res_sh / (0.5 * (var(x["c_pg"]) + var(x["c_gp"]))))}
  for relative in (False, True):
    got = decomposition_losses(garbage, jnp.asarray(w), relative=relative)
    np.testing.assert_allclose(got, expected[relative], rtol=1e-5, err_msg=str(relative))


def test_relative_decomposition_losses_do_not_reward_collapse():
  """Shrinking every vector towards its offset (``x_i = m_x + eps z_i``) lowers eq. 13-14
  as written by eps^2; the relative form stays where it is (and is scale-invariant). A
  batch with one paired patient has no between-patient variance: relative terms 0."""
  w = jnp.ones((10,))
  absolute, relative = {}, {}
  for eps in (1.0, 0.01):
    comp = _offset_components(np.random.default_rng(1), eps)
    absolute[eps] = np.asarray(decomposition_losses(comp, w, relative=False))
    relative[eps] = np.asarray(decomposition_losses(comp, w, relative=True))
  np.testing.assert_allclose(absolute[0.01], 1e-4 * absolute[1.0], rtol=1e-4)
  np.testing.assert_allclose(relative[0.01], relative[1.0], rtol=1e-3)
  assert np.all(relative[1.0] > 0.5)
  scaled = {k: 7.0 * v for k, v in _offset_components(np.random.default_rng(1), 1.0).items()}
  np.testing.assert_allclose(decomposition_losses(scaled, w, relative=True), relative[1.0],
                             rtol=1e-5)
  one = jnp.zeros((10,)).at[3].set(1.0)
  np.testing.assert_array_equal(decomposition_losses(scaled, one, relative=True), (0.0, 0.0))


def test_decomp_stop_gradient_removes_exactly_the_gradient_through_g(toy):
  """``decomp_stop_gradient``: eq. 13 treats g as the target. The gradient of the main loss
  changes by exactly the vector-Jacobian product of theta -> g with L_decomp's cotangent
  ``2 lambda_dec w_i (g_i - u^_i - c^_i) / sum w``, nothing else."""
  cohort, _, bins = toy
  plain = get_method(_tiny_config(decomp_relative=False))
  stopped = get_method(_tiny_config(decomp_relative=False, decomp_stop_gradient=True))
  model = _model(plain, cohort)
  batch = make_batch(cohort, np.arange(10), BatchSpec(batch_size=12, max_instances=32),
                     bins=bins, rng=np.random.default_rng(0))
  key = jax.random.key(3)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def grad_of(method):
    def loss_of(p):
      return method.main_loss(nnx.merge(graphdef, p, rest), batch, key)[0]
    return jax.jit(jax.grad(loss_of))(params)

  k_enc, _ = jax.random.split(key)  # as main_loss splits its key

  def globals_of(p):
    comp = nnx.merge(graphdef, p, rest).components(batch, k_enc)
    return comp["g_p"], comp["g_g"]

  comp = nnx.merge(graphdef, params, rest).components(batch, k_enc)
  w = jnp.asarray(batch["valid"], jnp.float32)[:, None]
  scale = 2.0 * plain.cfg.lambda_dec / jnp.sum(w)
  cotangent = (scale * w * (comp["g_p"] - comp["u_p"] - comp["c_gp"]),
               scale * w * (comp["g_g"] - comp["u_g"] - comp["c_pg"]))
  _, vjp = jax.vjp(globals_of, params)
  (through_g,) = vjp(cotangent)
  diff = jax.tree.map(lambda a, b: a - b, grad_of(plain), grad_of(stopped))
  largest = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(through_g))
  assert largest > 1e-3
  for (path, d), r in zip(jax.tree_util.tree_leaves_with_path(diff),
                          jax.tree.leaves(through_g)):
    np.testing.assert_allclose(d, r, rtol=1e-3, atol=1e-5 * largest,
                               err_msg=jax.tree_util.keystr(path))


def test_recovered_shared_component_lies_in_the_subspace(toy):
  """The head's c~ is P (g - u^) by default (eq. 20 as written, g - u^, with projection
  off); the denoiser's condition is g - u^ by default, P (g - u^) with
  ``ldm.project_condition``, at training (the surrogate condition of supp. 8.2) alike.
  The two switches are independent."""
  cohort, _, bins = toy
  batch = make_batch(cohort, np.arange(8), BatchSpec(batch_size=8), bins=bins)
  for project_head, project_cond in itertools.product((True, False), repeat=2):
    config = _tiny_config(project_recovered_shared=project_head)
    config.model.ldm.condition_source = "c_tilde"
    config.model.ldm.project_condition = project_cond
    method = get_method(config)
    model = _model(method, cohort)
    comp = model.components(batch)
    raw = np.asarray(comp["g_p"] - comp["u_p"])
    for project, c_tilde in (
        (project_cond, np.asarray(method.ldm_features(model, batch)["cond_g"])),
        (project_head, np.asarray(method.recover_shared(model, comp["g_p"], comp["u_p"])))):
      if project:
        np.testing.assert_allclose(np.asarray(model.project_shared(c_tilde)), c_tilde,
                                   atol=1e-5)
        assert np.abs(c_tilde - raw).max() > 1e-3  # the residual was removed
      else:
        np.testing.assert_allclose(c_tilde, raw, atol=1e-6)


def test_missing_modality_prediction_composes_eqs_20_to_22(toy):
  """With genomics missing, the risk is phi([u^_P; P (g_P - u^_P); u~_G]) with u~_G the
  DDIM mean conditioned on the unprojected g_P - u^_P (the defaults), composed by hand."""
  cohort, method, bins = toy
  assert method.cfg.project_recovered_shared and not method.cfg.ldm.project_condition
  model = _model(method, cohort)
  den = model.denoisers["genomics"]  # zero output at init: move it off, so it reads c
  graphdef, params = nnx.split(den, nnx.Param)
  nnx.update(den, jax.tree.map(lambda a: a + 0.05, params))
  batch = make_batch(cohort, np.arange(8), BatchSpec(batch_size=8), bins=bins,
                     hide=("genomics",), fill=np.nan)
  key = jax.random.key(4)
  got = _predict(method, model, batch, frozenset({"pathology"}), key)
  g, u_p = model.specific_only(batch, "pathology")
  u_gen = method.generate(model, "genomics", g - u_p, key)
  logits = model.head(u_p, model.project_shared(g - u_p), u_gen)
  want = np.asarray(survival.discrete_time_risk(logits))
  np.testing.assert_allclose(got["diffusion"], want, rtol=1e-4, atol=1e-5)
  # Conditioning the denoiser on the projected c~ instead changes the fill.
  u_proj = method.generate(model, "genomics", model.project_shared(g - u_p), key)
  assert np.abs(np.asarray(u_proj - u_gen)).max() > 1e-6


@pytest.mark.parametrize("latent_dim", [0, 3, 60])
def test_fit_latent_whitens_the_principal_coordinates(latent_dim):
  """z = ((u - mu) V) / s against a numpy SVD: identity covariance on the fitting set,
  decode(encode(u)) = the projection on the top-k principal subspace (k = 0: per-dimension
  standardisation); more coordinates than patients: the extra ones stay zero."""
  n, d = 40, 12
  rng = np.random.default_rng(0)
  u = (rng.normal(size=(n, 4)) @ rng.normal(size=(4, d)) * 3.0
       + 0.1 * rng.normal(size=(n, d)) + 5.0).astype(np.float32)
  mean, basis, scale = (np.asarray(a) for a in fit_latent(jnp.asarray(u), latent_dim))
  z = (u - mean) @ basis / scale
  np.testing.assert_allclose(mean, u.mean(0), rtol=1e-5)
  if latent_dim == 0:
    np.testing.assert_allclose(z, (u - u.mean(0)) / (u.std(0) + 1e-3), rtol=1e-4, atol=1e-5)
    return
  k_used = min(latent_dim, d)  # at most min(n, d) principal directions exist
  cov = z.T @ z / n
  np.testing.assert_allclose(cov[:k_used, :k_used], np.eye(k_used), atol=2e-3)
  np.testing.assert_array_equal(z[:, k_used:], 0.0)
  _, _, vt = np.linalg.svd(u - u.mean(0), full_matrices=False)
  v = vt[:k_used].T
  recon = (z * scale) @ basis.T + mean
  np.testing.assert_allclose(recon, u.mean(0) + (u - u.mean(0)) @ v @ v.T, atol=1e-3)


def test_ldm_stage_diffuses_the_fitted_coordinates(toy):
  """The LDM stage's `prepare` stores the fitted statistics, and `encode_latent` /
  `decode_latent` apply them: the training latents come out whitened."""
  cohort, _, bins = toy
  config = _tiny_config()
  config.model.ldm.latent_dim = 8   # whitened principal coordinates (the default is 0: all)
  method = get_method(config)
  model = _model(method, cohort)
  batch = make_batch(cohort, np.arange(24), BatchSpec(batch_size=24), bins=bins)
  feats = method.ldm_features(model, batch)
  k = method.cfg.ldm.latent_dim
  assert model.denoisers["genomics"].latent_dim == k
  prepare, _ = method._ldm_stage_fns("genomics")
  prepare(model, feats)
  z = np.asarray(model.encode_latent("genomics", feats["z_g"]))
  assert z.shape == (24, k)
  np.testing.assert_allclose(z.T @ z / 24, np.eye(k), atol=5e-3)
  mean, basis, scale = fit_latent(jnp.asarray(feats["z_g"]), k)
  np.testing.assert_allclose(np.asarray(model.decode_latent("genomics", jnp.asarray(z))),
                             np.asarray((z * scale) @ basis.T + mean), atol=1e-5)


@pytest.mark.parametrize("missing", ["genomics", "pathology"])
def test_missing_modality_path_never_reads_the_missing_inputs(toy, missing):
  cohort, method, bins = toy
  model = _model(method, cohort)
  have = "pathology" if missing == "genomics" else "genomics"
  spec = BatchSpec(batch_size=8)
  idx = np.arange(8)
  batch_nan = make_batch(cohort, idx, spec, bins=bins, hide=(missing,), fill=np.nan)
  batch_zero = make_batch(cohort, idx, spec, bins=bins, hide=(missing,), fill=0.0)
  assert np.isnan(np.asarray(batch_nan["modalities"][missing]["x"], np.float32)).all()
  key = jax.random.key(0)
  out_nan = _predict(method, model, batch_nan, frozenset({have}), key)
  out_zero = _predict(method, model, batch_zero, frozenset({have}), key)
  assert set(out_nan) == {"risk", "diffusion", "zeros", "mean", "unimodal"}
  for k in out_nan:
    assert np.all(np.isfinite(out_nan[k])), k
    np.testing.assert_array_equal(out_nan[k], out_zero[k])


def test_full_prediction_is_invariant_to_bag_padding(toy):
  cohort, method, bins = toy
  model = _model(method, cohort)
  idx = np.arange(6)
  small = make_batch(cohort, idx, BatchSpec(batch_size=6, buckets=(64,)), bins=bins)
  large = make_batch(cohort, idx, BatchSpec(batch_size=8, buckets=(256,)), bins=bins)
  full = frozenset({"pathology", "genomics"})
  r_small = _predict(method, model, small, full, jax.random.key(0))["risk"]
  r_large = _predict(method, model, large, full, jax.random.key(0))["risk"][:6]
  np.testing.assert_allclose(r_small, r_large, rtol=1e-5, atol=1e-5)
  # The vectors of the decomposition diagnostics too.
  rep_small = _representations(method, model, small)
  rep_large = _representations(method, model, large)
  assert len(rep_small) == 8
  for k in rep_small:
    np.testing.assert_allclose(rep_small[k], rep_large[k][:6], atol=1e-5, err_msg=k)


def test_representation_diagnostics_centre_over_all_held_out_patients(toy):
  """Spread and centred cosines are taken over every held-out patient at once: batches of
  4 (three batches, bag buckets 64) give what one batch of 10 gives, and both match a
  slow per-patient loop over `components`."""
  cohort, method, bins = toy
  model = _model(method, cohort)
  predictor = Predictor(method, sharding.make_mesh(1))
  idx = np.arange(5, 15)
  by_4 = predictor.diagnostics(model, cohort, idx, BatchSpec(batch_size=4))
  by_10 = predictor.diagnostics(model, cohort, idx, BatchSpec(batch_size=10, buckets=(256,)))
  assert by_4.keys() == by_10.keys()
  for k in by_4:
    np.testing.assert_allclose(by_4[k], by_10[k], atol=1e-5, err_msg=k)
  graphdef, state = nnx.split(model)
  comp = jax.jit(lambda s, b: nnx.merge(graphdef, s).components(b))(
      state, make_batch(cohort, idx, BatchSpec(batch_size=10), bins=bins))
  comp = {k: np.asarray(v, np.float64) for k, v in comp.items()}
  a = comp["c_pg"] - comp["c_pg"].mean(0)
  b = comp["c_gp"] - comp["c_gp"].mean(0)
  ref = np.mean([a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i])
                 for i in range(len(idx))])
  np.testing.assert_allclose(by_4["cos_centred(c_P<-G,c_G<-P)"], ref, atol=1e-5)
  raw = np.mean([comp["c_pg"][i] @ comp["c_gp"][i] / np.linalg.norm(comp["c_pg"][i])
                 / np.linalg.norm(comp["c_gp"][i]) for i in range(len(idx))])
  np.testing.assert_allclose(by_4["cos(c_P<-G,c_G<-P)"], raw, atol=1e-5)
  g = comp["g_g"]
  spread = sum(np.mean((g[:, d] - g[:, d].mean()) ** 2) for d in range(g.shape[1]))
  np.testing.assert_allclose(by_4["spread(g_G)"], spread / np.mean(np.sum(g * g, 1)),
                             rtol=1e-5)
  assert {"cos(u_P,u_G)", "spread(u_P+c_G<-P)", "cos_centred(g_P,g_G)"} <= by_4.keys()


def test_generated_component_follows_the_ldm_not_the_fill(toy):
  """The DDIM output depends on the denoiser weights; the zeros/mean rows do not."""
  cohort, method, bins = toy
  model = _model(method, cohort)
  batch = make_batch(cohort, np.arange(8), BatchSpec(batch_size=8), bins=bins,
                     hide=("genomics",))
  present = frozenset({"pathology"})
  out1 = _predict(method, model, batch, present, jax.random.key(0))
  den = model.denoisers["genomics"]
  leaves = jax.tree.leaves(nnx.state(den, nnx.Param))
  graphdef, params = nnx.split(den, nnx.Param)
  params = jax.tree.map(lambda a: a + 0.05, params)
  nnx.update(den, params)
  out2 = _predict(method, model, batch, present, jax.random.key(0))
  assert leaves
  assert not np.allclose(out1["diffusion"], out2["diffusion"])
  for row in ("risk", "zeros", "mean"):  # risk: the imputer's fill (the default)
    np.testing.assert_array_equal(out1[row], out2[row])


@pytest.mark.parametrize("variant", ["smoke", "paper_schedule", "no_warmup", "cond_c",
                                     "paper_ldm", "rank16", "train_missing", "paper_decomp",
                                     "decomp_sg", "smoke,decomp_sg", "paper_missing",
                                     "missing_zeros"])
def test_every_documented_config_variant_builds(variant):
  """Each variant named in configs/must.py's docstring parses into a MUST method."""
  config = must_config.get_config(variant)
  method = get_method(config)
  assert method.stages()[0].name == ("main" if variant == "no_warmup" else "warmup")
  assert config.model.decomp_stop_gradient == ("decomp_sg" in variant)
  assert config.model.decomp_relative == (variant.split(",")[-1] not in ("paper_decomp",
                                                                          "decomp_sg"))
  with pytest.raises(ValueError, match="unknown variant"):
    must_config.get_config("decomp")


def test_unimodal_heads_read_what_one_modality_gives_and_train_alone(toy):
  """The `unimodal` risk is the modality's head on [u^_m; P(g_m - u^_m)] computed from that
  modality alone, and its stage changes no parameter outside the unimodal heads."""
  cohort, method, bins = toy
  model = _model(method, cohort)
  batch = make_batch(cohort, np.arange(8), BatchSpec(batch_size=8), bins=bins, hide=("genomics",))
  out = _predict(method, model, batch, frozenset({"pathology"}), jax.random.key(0))
  g, u = model.specific_only(batch, "pathology")
  x = jnp.concatenate([u, model.project_shared(g - u)], -1)
  expected = survival.discrete_time_risk(model.unimodal_heads["pathology"](x))
  np.testing.assert_allclose(out["unimodal"], np.asarray(expected), rtol=1e-4, atol=1e-5)

  stage = next(s for s in method.stages() if s.name == "unimodal_heads")
  assert stage.missing_path_only and stage.features is not None
  before = nnx.to_pure_dict(nnx.state(model))
  only = type("UnimodalOnly", (type(method),), {"stages": lambda self: [stage]})(method.cfg)
  trainer = Trainer(only, mesh=make_mesh(1), batch_size=8, max_instances=16, progress=False)
  trainer.fit(model, cohort, np.arange(32), bins=bins)
  after = nnx.to_pure_dict(nnx.state(model))
  changed = {"/".join(str(k.key) for k in path) for path, a in jax.tree_util.tree_flatten_with_path(before)[0]
             if not np.array_equal(a, _at(after, path))}
  assert changed and all(p.startswith("unimodal_heads") for p in changed), sorted(changed)[:5]


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_decomposition_losses_need_two_patients_per_batch():
  config = _tiny_config()
  config.train.batch_size = 1
  with pytest.raises(InputError, match="train.batch_size 1 leaves eq. 13-14"):
    get_method(config)


def test_imputer_fill_is_the_risk_and_the_imputer_only_regresses(toy):
  """With ``fill = "imputer"`` the one-modality risk is phi([u^_P; P(g_P - u^_P); f_G(x)])
  with x = [u^_P; P(g_P - u^_P)], composed by hand; ``fill = "diffusion"`` makes the
  diffusion row the risk. In the main stage's one-modality losses, L_impute equals a
  numpy reference and trains the imputers only, while the survival loss of the missing
  path reaches the encoders but not the imputers (their output is held fixed)."""
  cohort, method, bins = toy
  assert method.fill == "imputer" and method.cfg.missing_weight > 0
  model = _model(method, cohort)
  batch = make_batch(cohort, np.arange(8), BatchSpec(batch_size=8), bins=bins,
                     hide=("genomics",), fill=np.nan)
  present = frozenset({"pathology"})
  got = _predict(method, model, batch, present, jax.random.key(0))
  g, u = model.specific_only(batch, "pathology")
  c_tilde = model.project_shared(g - u)
  u_fill = model.imputers["genomics"](jnp.concatenate([u, c_tilde], -1))
  want = survival.discrete_time_risk(model.head(u, c_tilde, u_fill))
  np.testing.assert_allclose(got["risk"], np.asarray(want), rtol=1e-4, atol=1e-5)
  diffusion = get_method(_tiny_config(fill="diffusion"))
  by_diffusion = _predict(diffusion, model, batch, present, jax.random.key(0))
  np.testing.assert_array_equal(by_diffusion["risk"], got["diffusion"])
  np.testing.assert_array_equal(by_diffusion["imputer"], got["risk"])

  full = make_batch(cohort, np.arange(12), BatchSpec(batch_size=16), bins=bins)
  weights = jnp.asarray(full["valid"], jnp.float32)
  graphdef, state = nnx.split(model)

  def losses(s):
    m = nnx.merge(graphdef, s)
    return method.one_modality_losses(m, m.components(full), full, weights, jax.random.key(1))

  l_miss, l_imp = jax.jit(losses)(state)
  comp = jax.jit(lambda s: nnx.merge(graphdef, s).components(full))(state)
  ref = 0.0
  w = np.asarray(weights)
  for have, miss, name in (("p", "g", "genomics"), ("g", "p", "pathology")):
    x = jnp.concatenate([comp[f"u_{have}"], model.project_shared(comp[f"g_{have}"]
                                                                  - comp[f"u_{have}"])], -1)
    pred, target = np.asarray(model.imputers[name](x)), np.asarray(comp[f"u_{miss}"])
    centre = (w[:, None] * target).sum(0) / w.sum()
    ref += ((w * ((pred - target) ** 2).sum(1)).sum()
            / (w * ((target - centre) ** 2).sum(1)).sum())
  np.testing.assert_allclose(float(l_imp), ref, rtol=1e-4)

  def norms(tree):
    return {jax.tree_util.keystr(p): float(jnp.abs(v).max())
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  g_imp = norms(jax.jit(jax.grad(lambda s: losses(s)[1]))(state))
  g_miss = norms(jax.jit(jax.grad(lambda s: losses(s)[0]))(state))
  assert all(v == 0 for k, v in g_imp.items() if "imputers" not in k)
  assert any(v > 0 for k, v in g_imp.items() if "imputers" in k)
  assert all(v == 0 for k, v in g_miss.items() if "imputers" in k)
  assert any(v > 0 for k, v in g_miss.items() if "encoder_p" in k)
  assert any(v > 0 for k, v in g_miss.items() if "encoder_g" in k)


def test_a_fill_the_model_lacks_is_refused():
  with pytest.raises(InputError, match="fill 'imputer' is not available"):
    get_method(_tiny_config(imputer=False))
  with pytest.raises(InputError, match="fill 'unknown' is not available"):
    get_method(_tiny_config(fill="unknown"))


def test_bfloat16_matmuls_move_the_risks_little(toy):
  """``precision = "bfloat16"`` (TransMIL and the denoiser; float32 accumulation) on the
  same parameters: every risk row within 3% of the float32 row's range, and not equal
  (the bf16 path is taken)."""
  cohort, method, bins = toy
  bf16 = get_method(_tiny_config(precision="bfloat16"))
  info = cohort_info(cohort, method.modalities)
  m32, m16 = method.build(info, nnx.Rngs(0)), bf16.build(info, nnx.Rngs(0))
  for hide, present in (((), {"pathology", "genomics"}), (("pathology",), {"genomics"}),
                        (("genomics",), {"pathology"})):
    batch = make_batch(cohort, np.arange(16), BatchSpec(batch_size=16), bins=bins, hide=hide)
    r32 = _predict(method, m32, batch, frozenset(present), jax.random.key(0))
    r16 = _predict(bf16, m16, batch, frozenset(present), jax.random.key(0))
    for row in r32:
      np.testing.assert_allclose(r16[row], r32[row], atol=0.03 * np.ptp(r32[row]), err_msg=row)
    if "pathology" in present:
      assert not np.array_equal(r16["risk"], r32["risk"])
