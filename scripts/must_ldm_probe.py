"""Probe of MUST's latent diffusion on a trained fold of the main job (diagnostic script).

    python -m survjax.main --config=configs/must.py --workdir=runs/must   # first
    RUN=runs/must FOLD=1 RETRAIN=0 PYTHONPATH=. python scripts/must_ldm_probe.py [ldm_key=value ...]

Loads fold FOLD's final checkpoint from RUN (default runs/must), optionally (RETRAIN=1)
retrains only the two denoisers with the given ``model.ldm`` overrides (e.g.
``steps=4000 steps_per_epoch=1000``, ``cond_noise=0.5``; with RETRAIN=0 the overrides
must match the run's, e.g. ``latent_dim=0 condition_source=c_hat`` for a run of
``configs/must.py:paper_ldm``, and sampling-only ones such as ``num_samples=50`` may
differ), and prints as JSON lines: the held-out C-index of the LDM / zeros / mean
fills; per missing modality, the spread of the individual DDIM samples in the diffused
coordinates (1 = the training latents'), the centred per-patient correlation of c~
with c^, the share of u's variance in its top 4 principal directions (for a bag
modality also its first direction's share and |correlation| with the log bag length),
the C-index and
the squared error (relative to the training mean's) of the generated u, the training
and held-out R^2 and the fill C-index of ridge regressions of u on the standardised
c~, projected (as the head reads it) and not (as the denoiser does by default), fit on
the training patients, and the C-index of the true u used as the fill; the C-index with both modalities from c^ alone (both u^ at their
training means) against the full input; and the denoiser's noise-prediction loss on training and held-out
latents at t = 100 / 500 / 900 with the true, the shuffled and a zero condition. The
figures quoted in configs/must.py come from ``RETRAIN=0`` on fold 1 of the main job,
and, for ``:paper_decomp`` (the previous default; same checkpoints layout), on folds 0
and 1 (with ``num_samples=50`` too) and on fold 1 of the LDM ablations listed there.
"""
import os
FOLD=int(os.environ.get("FOLD","0")); RETRAIN=os.environ.get("RETRAIN","1")=="1"
import sys, json, time, dataclasses, numpy as np, jax
from flax import nnx
from configs import must as mc
from survjax.data import load_cohort
from survjax.data.splits import load_or_make_folds
from survjax.data.timebins import fit_time_bins, assign_time_bins
from survjax.data.batching import BatchSpec
from survjax.models.must import MUST
from survjax.method import cohort_info
from survjax.checkpoint import Checkpointer
from survjax.train import sharding
from survjax.train.trainer import Trainer, _state_dict
from survjax.evaluate.cv import Predictor, _cindex
from survjax.evaluate import scenarios as scen

c = mc.get_config("")
for kv in sys.argv[1:]:
  k, v = kv.split("=")
  old = c.model.ldm[k]
  c.model.ldm[k] = (v in ("1", "true", "True") if isinstance(old, bool) else
                    v if isinstance(old, str) else type(old)(v))
cohort = load_cohort(c.data)
folds = load_or_make_folds(cohort.case_ids, cohort.time, cohort.event, num_folds=5, seed=0, splits_dir="splits", dataset=cohort.name)
tr, va = folds[FOLD]
bins = assign_time_bins(cohort.time, fit_time_bins(cohort.time[tr], cohort.event[tr], 4))
method = MUST(c.model, accumulate=c.train.accumulate)
model = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(0))
fresh_den = nnx.state(model.denoisers)
stages = method.stages()
last = stages[-1]
g, trn, rest = nnx.split(model, last.trainable, ...)
ck = Checkpointer(f"{os.environ.get('RUN', 'runs/must')}/fold_{FOLD}/checkpoints")
tmpl = _state_dict(model)
ms, _ = ck.restore(ck.latest(), tmpl, jax.tree.map(lambda x: x, last.optimizer.init(trn)))
st = nnx.state(model); nnx.replace_by_pure_dict(st, ms); nnx.update(model, st)
if RETRAIN: nnx.update(model.denoisers, fresh_den)

@dataclasses.dataclass
class OnlyLDM:
  inner: MUST
  def __getattr__(self, a): return getattr(self.inner, a)
  def stages(self): return [s for s in self.inner.stages() if s.name.startswith("ldm")]
meth = OnlyLDM(method)
mesh = sharding.make_mesh(1)
t0 = time.time()
trainer = Trainer(meth, mesh=mesh, batch_size=32, max_instances=32, seed=0, progress=False)
from survjax.train.trainer import MetricsLog
from pathlib import Path
import os
lp=Path(os.environ.get("LOSS_LOG", "/tmp/must_ldm_probe_loss.jsonl"))
lp.unlink(missing_ok=True)
if RETRAIN: trainer.fit(model, cohort, tr, bins=bins, fold=FOLD, log=MetricsLog(lp))
t1 = time.time()
pred = Predictor(method, mesh)
spec = BatchSpec(batch_size=80)
out = {"args": sys.argv[1:], "train_s": round(t1 - t0, 1)}
for i, name in enumerate(["missing_pathology", "missing_genomics"]):
  hidden = scen.hidden_for(name, method.modalities, len(va), 0)
  p = pred.predict(model, cohort, va, hidden, spec, jax.random.key(i))
  out[name] = {k: round(_cindex(cohort.time[va], cohort.event[va], v), 4) for k, v in p.items()}
print(json.dumps(out), flush=True)
# Diagnosis on complete test batches: generated vs true u, and an oracle fill.
import jax.numpy as jnp
from survjax.data.batching import make_batch
from survjax import survival
batch = make_batch(cohort, va, BatchSpec(batch_size=len(va)), bins=bins)
comp = model.components(batch)
name_p, name_g = method.modalities
diag = {}
tr_c = tr[cohort.complete(method.modalities)[tr]]
tb = make_batch(cohort, tr_c, BatchSpec(batch_size=len(tr), max_instances=None), bins=bins)
tcomp = model.components(tb)
c_hat = 0.5 * (comp["c_pg"] + comp["c_gp"])
for have, missing, u_true, u_have in ((name_p, name_g, comp["u_g"], comp["u_p"]), (name_g, name_p, comp["u_p"], comp["u_g"])):
  g, u_h = model.specific_only(batch, have)
  c_t = method.recover_shared(model, g, u_h)
  smp = method.sample_latent(model, missing, method.diffusion_condition(model, g, u_h),
                             jax.random.key(5))
  gen = model.decode_latent(missing, smp.mean(axis=1))   # = method.generate(..., key(5))
  # Spread of the individual DDIM samples in the diffused coordinates, whose training
  # latents have unit standard deviation per coordinate (1 = the data's spread).
  spread = float(jnp.mean(jnp.std(smp.reshape(-1, smp.shape[-1]), 0)))
  # How well c~ (one modality) matches c^ (both): centred per-patient correlation.
  a_, b_ = np.asarray(c_t - c_t.mean(0)), np.asarray(c_hat - c_hat.mean(0))
  c_corr = float(np.mean(np.sum(a_ * b_, 1) / np.linalg.norm(a_, axis=1) / np.linalg.norm(b_, axis=1)))
  # Share of the training u's variance in its top 4 principal directions.
  ut = np.asarray(tcomp["u_g"] if missing == name_g else tcomp["u_p"])[:len(tr_c)]
  sv2 = np.linalg.svd(ut - ut.mean(0), compute_uv=False) ** 2
  top4 = float(sv2[:4].sum() / sv2.sum())
  zs = model.encode_latent(missing, gen)
  zt = model.encode_latent(missing, u_true)
  print(missing, "z-space norms gen", float(jnp.mean(jnp.linalg.norm(zs, axis=-1))), "true", float(jnp.mean(jnp.linalg.norm(zt, axis=-1))), "scale min/max", float(model.latent_scale[missing][...].min()), float(model.latent_scale[missing][...].max()))
  mean = model.latent_mean[missing][...]
  def rel(x): return float(jnp.mean(jnp.sum((x - u_true) ** 2, -1)) / jnp.mean(jnp.sum((mean - u_true) ** 2, -1)))
  if have == name_p:
    r_or = survival.discrete_time_risk(model.head(u_h, c_t, u_true))
  else:
    r_or = survival.discrete_time_risk(model.head(u_true, c_t, u_h))
  # Ridge regressions of the true u on c~ over the training patients (E[u | c] if
  # linear), c~ as the head reads it (P (g - u^)) and as the denoiser does (g - u^ by
  # default): standardised with training statistics, top 32 principal components,
  # lambda 100. Training R^2, held-out R^2 (1 - squared error over the training mean's)
  # and the C-index of the ridge fill.
  gt, uht = model.specific_only(tb, have)
  d = {"sample_spread_over_data": round(spread, 3), "c_tilde_c_hat_corr": round(c_corr, 3),
       "u_top4_variance_share": round(top4, 3)}
  # What the first principal direction of a bag modality's held-out u is: its share of
  # the variance and its |correlation| with the log bag length (nothing the other
  # modality can predict).
  bags = cohort.modalities[missing].bags
  if bags is not None:
    uv = np.asarray(u_true)[:len(va)]
    uu, sv, _ = np.linalg.svd(uv - uv.mean(0), full_matrices=False)
    log_len = np.log([len(bags[i]) for i in va])
    d["u_pc1_variance_share"] = round(float(sv[0] ** 2 / np.sum(sv ** 2)), 3)
    d["u_pc1_abs_corr_log_bag_length"] = round(abs(float(np.corrcoef(uu[:, 0], log_len)[0, 1])), 3)
  for src, fn in (("P(g-u)", method.recover_shared), ("g-u", lambda _, g_, u_: g_ - u_)):
    ct = np.asarray(fn(model, gt, uht))[:len(tr_c)]
    c_mu, c_sd, u_mu = ct.mean(0), ct.std(0) + 1e-6, ut.mean(0)
    _, _, vt = np.linalg.svd((ct - c_mu) / c_sd, full_matrices=False)
    pcs = vt[:32].T
    X = (ct - c_mu) / c_sd @ pcs
    W = np.linalg.solve(X.T @ X + 100.0 * np.eye(X.shape[1]), X.T @ (ut - u_mu))
    ridge_r2 = 1 - np.sum((X @ W + u_mu - ut) ** 2) / np.sum((ut - u_mu) ** 2)
    ridge = jnp.asarray((np.asarray(fn(model, g, u_h)) - c_mu) / c_sd @ pcs @ W + u_mu)
    if have == name_p:
      r_ridge = survival.discrete_time_risk(model.head(u_h, c_t, ridge))
    else:
      r_ridge = survival.discrete_time_risk(model.head(ridge, c_t, u_h))
    d[f"ridge_on_{src}"] = {"train_r2": round(float(ridge_r2), 3),
                            "heldout_r2": round(1 - rel(ridge), 3),
                            "fill_c": round(_cindex(cohort.time[va], cohort.event[va], np.asarray(r_ridge)[:len(va)]), 4)}
  d.update({"gen_mse_over_mean_mse": round(rel(gen), 3), "gen_norm": float(jnp.mean(jnp.linalg.norm(gen, axis=-1))), "true_norm": float(jnp.mean(jnp.linalg.norm(u_true, axis=-1))),
            "oracle_fill_c": round(_cindex(cohort.time[va], cohort.event[va], np.asarray(r_or)[:len(va)]), 4)})
  diag[f"missing_{missing}"] = d
# Where the head takes its risk from with both modalities: c^ alone (both u^ at their
# training means) against the full input.
mp = jnp.broadcast_to(model.latent_mean[name_p][...], comp["u_p"].shape)
mg = jnp.broadcast_to(model.latent_mean[name_g][...], comp["u_g"].shape)
ci = lambda r: round(_cindex(cohort.time[va], cohort.event[va], np.asarray(survival.discrete_time_risk(r))[:len(va)]), 4)
diag["full"] = {"all": ci(model.head(comp["u_p"], c_hat, comp["u_g"])), "c_hat_only": ci(model.head(mp, c_hat, mg))}
print(json.dumps(diag), flush=True)
# ---- does the denoiser use its condition? eps-loss with true vs shuffled conditions
for have, missing, u_all, comp_src in ((name_p, name_g, "u_g", None), (name_g, name_p, "u_p", None)):
  den = model.denoisers[missing]
  for split, cmp_, bt in (("train", tcomp, tb), ("val", comp, batch)):
    g_, uh_ = model.specific_only(bt, have)
    ct = model.standardize_condition(missing, method.diffusion_condition(model, g_, uh_))
    if method.cfg.ldm.condition_source == "c_hat":
      ct_hat = model.standardize_condition(missing, cmp_["c_gp"] if missing == name_g else cmp_["c_pg"])
    else:
      ct_hat = ct
    z0 = model.encode_latent(missing, cmp_[u_all])
    n = z0.shape[0]
    res = {}
    for tt in (100, 500, 900):
      eps = jax.random.normal(jax.random.key(tt), z0.shape)
      ab = method._schedule().alphas_cumprod[tt]
      zt = jnp.sqrt(ab) * z0 + jnp.sqrt(1 - ab) * eps
      tv = jnp.full((n,), tt, jnp.int32)
      for nm, cc in (("c_tilde", ct), ("c_hat", ct_hat), ("shuffled", ct[::-1]), ("zero", jnp.zeros_like(ct))):
        cond = model.condition(missing, cc, True)
        res[f"t{tt}/{nm}"] = round(float(jnp.mean(jnp.sum((den(zt, tv, cond) - eps) ** 2, -1))), 2)
    print(missing, split, json.dumps(res), "cond norm tilde/hat", float(jnp.mean(jnp.linalg.norm(ct, axis=-1))), float(jnp.mean(jnp.linalg.norm(ct_hat, axis=-1))), flush=True)
