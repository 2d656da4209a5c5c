"""impuTMAE: MAE masking, the masked-patch loss, imputation, padding, and the synthetic
cohort's RNA/methylation additions (`survjax.models.imputmae`)."""

import dataclasses
import hashlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.imputmae import get_config  # noqa: E402
from survjax.data.batching import BatchSpec, make_batch  # noqa: E402
from survjax.data.synthetic import (SyntheticSpec, make_synthetic_cohort,  # noqa: E402
                                    reconstruction_floor)
from survjax.errors import InputError  # noqa: E402
from survjax.method import cohort_info  # noqa: E402
from survjax.models import get_method  # noqa: E402
from survjax.models.imputmae import masked_mse, random_masking  # noqa: E402


def _fingerprint(cohort) -> str:
  """Hash of every array of a cohort except the oracle (whose keys are the core's)."""
  h = hashlib.sha256()
  for a in (cohort.case_ids.astype("U"), cohort.time, cohort.event):
    h.update(np.ascontiguousarray(a).tobytes())
  for name in sorted(cohort.modalities):
    m = cohort.modalities[name]
    h.update(name.encode())
    h.update(m.available.tobytes())
    for arr in (m.bags if m.bags is not None else [m.values]):
      h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()[:16]


def _small_config(**synthetic):
  c = get_config("smoke")
  c.data.synthetic.update(dict(n_patients=48, rna_dim=300, dnam_dim=200, bag_min=8,
                               bag_max=40, patch_dim=16, **synthetic))
  c.model.dim, c.model.decoder.dim = 32, 32
  c.model.patch_size = ml_collections.ConfigDict(dict(default=64))
  c.model.decoder.depth = 1
  c.model.depth.default = 1
  c.model.impute_bag_len = 8
  c.model.modalities = ("rna", "pathology")   # one vector, one bag: small graphs to compile
  return c


def _setup(c, seed=0):
  cohort = make_synthetic_cohort(SyntheticSpec(**c.data.synthetic))
  method = get_method(c)
  model = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(seed))
  return cohort, method, model


def _jnp(batch):
  return jax.tree.map(jnp.asarray, batch)


def _jit(fn, model, *static):
  """``fn(model, *args)`` jitted over the model's state (eager NNX calls are slow);
  arguments at the positions ``static`` (counted after the model) are static."""
  graphdef, state = nnx.split(model)
  call = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a),
                 static_argnums=tuple(i + 1 for i in static))
  return lambda *a: call(state, *a)


def test_default_cohort_unchanged_by_the_additions():
  # Arrays of a cohort with the earlier default risk shares, coupling and risk scale (and
  # of one with rna/dnam, radiology and missingness): additions to the generator must
  # leave them as they are. First pinned at commit a80d9de, before missing_rna,
  # missing_dnam and reconstruction_floor existed; pinned again when censoring was made
  # machine-independent (times rounded to 1e-6, the patient censoring cuts at an event),
  # since the first pins hashed float64 times whose last bits followed numpy's SIMD
  # dispatch (they fail on an AMD EPYC with numpy 2.5.5). These give the same hashes under
  # numpy's AVX2 and AVX-512 loops.
  old = dict(share_shared=0.4, share_pathology=0.3, share_genomics=0.3, coupling=0.7,
             risk_std=1.5)
  assert _fingerprint(make_synthetic_cohort(SyntheticSpec(**old))) == "84f1c68a671999a1"
  spec = SyntheticSpec(rna_dnam=True, radiology=True, missing_pathology=0.2, seed=3,
                       n_patients=100, **old)
  assert _fingerprint(make_synthetic_cohort(spec)) == "f1b1e19012620b60"


def test_natural_missingness_of_rna_and_dnam_touches_nothing_else():
  base = SyntheticSpec(rna_dnam=True, n_patients=200)
  a = make_synthetic_cohort(base)
  b = make_synthetic_cohort(SyntheticSpec(rna_dnam=True, n_patients=200, missing_dnam=0.3,
                                          missing_rna=0.1))
  np.testing.assert_array_equal(a.time, b.time)
  for name in ("pathology", "genomics"):
    np.testing.assert_array_equal(a.modalities[name].available, b.modalities[name].available)
  for name, frac in (("rna", 0.1), ("dnam", 0.3)):
    lost = ~b.modalities[name].available
    assert abs(lost.mean() - frac) < 0.08
    assert np.all(b.modalities[name].values[lost] == 0)
    np.testing.assert_array_equal(a.modalities[name].values[~lost],
                                  b.modalities[name].values[~lost])
  dnam = a.modalities["dnam"].values
  assert dnam.min() > 0 and dnam.max() < 1  # beta values
  floor = reconstruction_floor(base)
  np.testing.assert_allclose(floor["rna"], base.gene_noise**2)
  assert np.all(floor["dnam"] < dnam.var(axis=0).mean())
  assert set(floor) == {"pathology", "rna", "dnam"}
  # Every subset of the modalities has an exact oracle.
  assert len([k for k in a.true_risk if not k.startswith("const:")]) == 2 ** 4


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_masking_hides_exactly_the_ratio_of_real_patches_and_restores_order(ratio):
  lengths = np.array([0, 1, 2, 5, 8, 13, 16])
  n = 16
  real = jnp.asarray(np.arange(n)[None] < lengths[:, None])
  real = real.at[3].set(jnp.asarray(np.random.default_rng(0).permutation(real[3])))
  out = random_masking(real, ratio, jax.random.key(3))
  masked = np.asarray(out["masked"])
  length = np.asarray(real).sum(1)
  np.testing.assert_array_equal(masked.sum(1), np.floor(ratio * length))
  assert not np.any(masked & ~np.asarray(real))
  k = out["keep"].shape[1]
  assert k == n - int(np.floor(ratio * n))
  ids = np.asarray(out["ids_shuffle"])
  keep = np.asarray(out["keep"])
  for b in range(len(lengths)):
    kept_pos = set(ids[b, :k][keep[b]].tolist())
    assert len(kept_pos) == length[b] - np.floor(ratio * length[b])
    assert kept_pos.isdisjoint(np.flatnonzero(masked[b]))
    assert kept_pos | set(np.flatnonzero(masked[b])) == set(np.flatnonzero(real[b]))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(len(lengths), n)))
  shuffled = jnp.take_along_axis(x, out["ids_shuffle"], 1)
  np.testing.assert_array_equal(jnp.take_along_axis(shuffled, out["ids_restore"], 1), x)


def test_pretraining_masks_half_of_each_modality_per_patient():
  c = _small_config()
  cohort, method, model = _setup(c)
  batch = _jnp(make_batch(cohort, np.arange(12), BatchSpec(16, max_instances=32),
                          rng=np.random.default_rng(0)))
  c.model.modalities = ("rna", "dnam", "pathology")
  cohort, method, model = _setup(c)
  patches, enc = _jit(lambda mdl, b, k: (method.patchify(mdl, b), method.encode(
      mdl, method.patchify(mdl, b), 0.5, k)), model)(batch, jax.random.key(0))
  for m in method.modalities:
    length = np.asarray(patches[m]["real"]).sum(1)
    np.testing.assert_array_equal(np.asarray(enc[m]["masked"]).sum(1), length // 2)
  assert patches["rna"]["x"].shape[1:] == (5, 64)       # 300 values: 5 patches, last padded
  assert int(patches["rna"]["elem"].sum()) == 300


def test_never_hide_exempts_a_modality_from_whole_hiding():
  c = _small_config()
  c.model.modalities = ("rna", "dnam", "pathology")
  c.model.pretrain.never_hide = ("dnam",)
  cohort, method, model = _setup(c)
  batch = _jnp(make_batch(cohort, np.arange(12), BatchSpec(16, max_instances=32),
                          rng=np.random.default_rng(0)))
  patches, enc, _ = _jit(lambda mdl, b, k: method.reconstruct(mdl, b, k, hide_prob=1.0),
                         model)(batch, jax.random.key(0))
  for m in method.modalities:
    length = np.asarray(patches[m]["real"]).sum(1)
    masked = np.asarray(enc[m]["masked"]).sum(1)
    # hide_prob = 1 hides every real patch of the others; dnam keeps its usual half
    np.testing.assert_array_equal(masked, length // 2 if m == "dnam" else length)
  c.model.pretrain.never_hide = ("tiles",)
  with pytest.raises(InputError, match=r"never_hide: names \['tiles'\]"):
    get_method(c)


def test_masked_mse_counts_masked_entries_only():
  rng = np.random.default_rng(0)
  pred, target = (jnp.asarray(rng.normal(size=(3, 6, 4))) for _ in range(2))
  w = jnp.asarray(rng.uniform(size=(3, 6, 1)) < 0.5) & jnp.asarray(np.arange(4) < 3)
  loss = masked_mse(pred, target, w)
  expect = np.sum(np.where(w, (pred - target) ** 2, 0)) / np.sum(np.broadcast_to(w, pred.shape))
  np.testing.assert_allclose(loss, expect, rtol=1e-6)
  changed = jnp.where(w, pred, 1e3)   # anything at unmasked entries
  np.testing.assert_allclose(masked_mse(changed, target, w), loss, rtol=1e-6)
  assert masked_mse(pred, target, jnp.zeros_like(w)) == 0


def test_pretrain_loss_is_the_sum_of_masked_mses_and_ignores_missing_rows():
  c = _small_config(missing_dnam=0.5)
  c.model.modalities = ("rna", "dnam")
  cohort, method, model = _setup(c)
  idx = np.arange(16)
  batch = _jnp(make_batch(cohort, idx, BatchSpec(16, max_instances=32),
                          rng=np.random.default_rng(0)))
  key = jax.random.key(5)
  (loss, metrics), (patches, enc, pred) = _jit(
      lambda mdl, b, k: (method.pretrain_loss(mdl, b, k), method.reconstruct(mdl, b, k)),
      model)(batch, key)
  np.testing.assert_allclose(loss, sum(metrics.values()), rtol=1e-6)
  for m in method.modalities:
    w = (enc[m]["masked"] & batch["valid"][:, None])[..., None] & patches[m]["elem"]
    np.testing.assert_allclose(metrics[f"mse_{m}"], masked_mse(pred[m], patches[m]["x"], w),
                               rtol=1e-6)
  assert not np.any(np.asarray(enc["dnam"]["masked"])[~cohort.modalities["dnam"].available[idx]])


def test_a_fully_masked_modality_gives_the_encoder_no_information():
  c = _small_config(missing_rna=0.5, missing_pathology=0.5)
  cohort, method, model = _setup(c)
  idx = np.arange(16)
  raw = make_batch(cohort, idx, BatchSpec(16, max_instances=32), rng=np.random.default_rng(0))
  other = jax.tree.map(np.copy, raw)
  for m in ("rna", "pathology"):   # garbage where the modality is missing
    miss = ~raw["modalities"][m]["available"]
    other["modalities"][m]["x"][miss] = np.nan
  miss = ~raw["modalities"]["pathology"]["available"]
  other["modalities"]["pathology"]["mask"][miss, :5] = True   # even a stray mask
  key = jax.random.key(1)
  for b in (raw, other):
    b.update(_jnp(b))
  loss = _jit(method.pretrain_loss, model)
  np.testing.assert_array_equal(loss(_jnp(raw), key)[0], loss(_jnp(other), key)[0])
  for ratio in (0.5, 0.0):
    enc = _jit(lambda mdl, b: method.encode(mdl, method.patchify(mdl, b), ratio, key), model)
    e1, e2 = enc(_jnp(raw)), enc(_jnp(other))
    for m in method.modalities:
      np.testing.assert_array_equal(e1[m]["z"], e2[m]["z"])
  # A scenario's withheld modality (NaN everywhere) is never read.
  hidden = _jnp(make_batch(cohort, idx, BatchSpec(16), hide=("rna",), fill=np.nan))
  zeros = _jnp(make_batch(cohort, idx, BatchSpec(16), hide=("rna",)))
  present = frozenset({"pathology"})
  predict = _jit(method.predict, model, 1, 2)
  r1, r2 = predict(hidden, present, None), predict(zeros, present, None)
  for k in r1:
    assert np.all(np.isfinite(r1[k]))
    np.testing.assert_array_equal(r1[k], r2[k])


def test_padding_never_changes_an_output():
  c = _small_config(missing_pathology=0.3)
  cohort, method, model = _setup(c)
  idx = np.arange(12)
  small = _jnp(make_batch(cohort, idx, BatchSpec(12)))
  large = _jnp(make_batch(cohort, idx, BatchSpec(12), min_bucket={"pathology": 256}))
  assert small["modalities"]["pathology"]["x"].shape[1] == 64
  assert large["modalities"]["pathology"]["x"].shape[1] == 256
  key = jax.random.key(2)

  def everything(mdl, b, k):   # one compilation per bucket
    return {"pretrain": method.pretrain_loss(mdl, b, k)[1],
            "finetune": method.finetune_loss(mdl, b, k)[0],
            "full": method.predict(mdl, b, frozenset(method.modalities), None),
            "rna only": method.predict(mdl, b, frozenset({"rna"}), None)}

  run = _jit(everything, model)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               run(small, key), run(large, key))


def test_finetuning_trains_only_the_last_encoder_layers_fusion_and_head():
  c = _small_config()
  c.model.depth.default = 2
  _, method, model = _setup(c)
  norm, pre, ft = method.stages()
  assert norm.features is not None and norm.prepare is not None
  assert not pre.labels and ft.labels
  trainable = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(nnx.state(model, ft.trainable))}
  assert trainable and all(("'last'" in p or "'last_norm'" in p) and "encoders" in p
                           or "fusion" in p or "surv_head" in p for p in trainable)
  assert not any("decoder" in p or "layers" in p and "encoders" in p for p in trainable)
  assert any("encoders']['rna']['last']" in p for p in trainable)


def test_decoder_imputation_beats_mean_imputation_on_held_out_patients():
  # RNA and methylation both read [s, a_G]: each predicts the other up to the noise. A
  # quick pretraining (800 steps of 32 patients, about 25 s) on short vectors; 30% of the
  # patients lack each, and pretrain.hide_modality = 0.3 hides an available one entirely.
  c = _small_config(missing_rna=0.3, missing_dnam=0.3)
  c.data.synthetic.update(dict(n_patients=400, rna_dim=64, dnam_dim=64))
  c.model.modalities = ("rna", "dnam")
  c.model.patch_size.default = 16
  cohort, method, model = _setup(c)
  train, test = np.arange(320), np.arange(320, 400)
  method.fit_stats(model, method.collect_stats(
      model, _jnp(make_batch(cohort, train, BatchSpec(len(train))))))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, key):
    def loss(p):
      return method.pretrain_loss(nnx.merge(graphdef, p, rest), batch, key)[0]
    grads = jax.grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  rng = np.random.default_rng(0)
  spec = BatchSpec(32)
  for it in range(800):
    batch = _jnp(make_batch(cohort, rng.choice(train, 32, replace=False), spec))
    params, opt = step(params, opt, batch, jax.random.key(it))
  model = nnx.merge(graphdef, params, rest)
  batch = _jnp(make_batch(cohort, test, BatchSpec(len(test))))
  floor = reconstruction_floor(SyntheticSpec(**c.data.synthetic))
  impute = _jit(method.impute, model, 1)
  for target, source in (("dnam", "rna"), ("rna", "dnam")):
    have = cohort.modalities[target].available
    rows = have[test]   # held-out patients with the target to compare against
    pred = np.asarray(impute(batch, frozenset({source}))[target])[rows]
    truth = cohort.modalities[target].values[test][rows]
    mean = cohort.modalities[target].values[train][have[train]].mean(0)
    mse_model = np.mean((pred - truth) ** 2)
    mse_mean = np.mean((mean - truth) ** 2)
    lowest = floor[target][test][rows].mean()
    print(f"{target} from {source}: decoder {mse_model:.4f}, training mean {mse_mean:.4f}, "
          f"noise floor {lowest:.4f}")
    assert lowest < mse_model < 0.85 * mse_mean


def test_held_out_reconstruction_mse_matches_a_direct_computation():
  # The core's held_out hook: per modality, pooled MSE in raw units on the test patients
  # that have it, against the training-fold mean and the cohort's noise floor.
  c = _small_config(missing_rna=0.3, missing_pathology=0.3)
  c.model.held_out = ml_collections.ConfigDict(dict(batch_size=64, max_instances=16))
  cohort, method, model = _setup(c)
  train, test = np.arange(30), np.arange(30, 48)
  method.fit_stats(model, method.collect_stats(
      model, _jnp(make_batch(cohort, train, BatchSpec(len(train))))))
  key = jax.random.key(4)
  out = method.held_out(model, cohort, test, train, key)
  assert set(out) == {f"{w}/{m}/{v}" for w, m in (("masked", "rna"), ("masked", "pathology"),
                                                   ("imputed", "rna"))
                      for v in ("model", "mean_fill", "floor")}
  floor = cohort.reconstruction_floor
  np.testing.assert_array_equal(floor["rna"], reconstruction_floor(
      SyntheticSpec(**c.data.synthetic))["rna"])
  rna = cohort.modalities["rna"]
  have = test[rna.available[test]]
  assert 0 < len(have) < len(test)   # natural missingness: those without RNA do not count
  # imputed: RNA rebuilt from pathology alone, every entry.
  batch = _jnp(make_batch(cohort, have, BatchSpec(len(have), max_instances=16)))
  pred = np.asarray(_jit(method.impute, model, 1)(batch, frozenset({"pathology"}))["rna"])
  truth = rna.values[have].astype(np.float64)
  train_mean = rna.values[train[rna.available[train]]].astype(np.float64).mean(0)
  np.testing.assert_allclose(out["imputed/rna/model"], np.mean((pred - truth) ** 2),
                             rtol=1e-4)
  np.testing.assert_allclose(out["imputed/rna/mean_fill"], np.mean((train_mean - truth) ** 2),
                             rtol=1e-6)
  np.testing.assert_allclose(out["imputed/rna/floor"], floor["rna"][have].mean(), rtol=1e-6)
  # masked: the hook's one batch (sorted by bag length) with its key, hidden entries only.
  from survjax.data.batching import iterate_batches
  (sorted_batch,) = iterate_batches(cohort, test, BatchSpec(64, max_instances=16),
                                    sort_by_length=True)
  patches, enc, rec = _jit(lambda mdl, b, k: method.reconstruct(mdl, b, k, hide_prob=0.0),
                           model)(_jnp(sorted_batch), jax.random.fold_in(key, 0))
  rows = np.flatnonzero(sorted_batch["valid"])
  for m in ("rna", "pathology"):
    st = model.stats[m]
    std, mu = np.asarray(st["std"][...]), np.asarray(st["mean"][...])
    x = sorted_batch["modalities"][m]["x"].astype(np.float64)
    hidden = np.asarray(enc[m]["masked"])
    y = np.asarray(rec[m])
    avail = cohort.modalities[m].available[sorted_batch["index"]]
    sq, sq_mean, n, fl = 0.0, 0.0, 0, 0.0
    mod = cohort.modalities[m]
    if m == "rna":
      mean = train_mean
    else:
      mean = np.concatenate([mod.bags[i] for i in train if mod.available[i]]).astype(
          np.float64).mean(0)
    for r in rows[avail[rows]]:
      if m == "rna":   # patch j covers entries [64 j, 64 j + 64)
        cols = np.concatenate([np.arange(64 * j, min(64 * j + 64, x.shape[1]))
                               for j in np.flatnonzero(hidden[r])])
        p = y[r].reshape(-1)[cols] * std[cols] + mu[cols]
        t = x[r, cols]
        mf = mean[cols]
      else:
        p = y[r][hidden[r]] * std + mu
        t = x[r][hidden[r]]
        mf = np.broadcast_to(mean, t.shape)
      sq += np.sum((p - t) ** 2)
      sq_mean += np.sum((mf - t) ** 2)
      n += t.size
      fl += t.size * floor[m][sorted_batch["index"][r]]
    assert n > 0
    np.testing.assert_allclose(out[f"masked/{m}/model"], sq / n, rtol=1e-4)
    np.testing.assert_allclose(out[f"masked/{m}/mean_fill"], sq_mean / n, rtol=1e-4)
    np.testing.assert_allclose(out[f"masked/{m}/floor"], fl / n, rtol=1e-6)


def test_unimodal_decoder_sees_no_other_modality():
  # :unimodal_pretrain (paper Table 4's unimodal row): changing RNA changes nothing in the
  # reconstruction of pathology, and the reverse, unlike the multimodal decoder.
  c = _small_config()
  c.model.decoder.cross_modal = False
  cohort, method, model = _setup(c)
  raw = make_batch(cohort, np.arange(8), BatchSpec(8, max_instances=16))
  other = jax.tree.map(np.copy, raw)
  other["modalities"]["rna"]["x"] = other["modalities"]["rna"]["x"] + 3.0
  rec = _jit(lambda mdl, b, k: method.reconstruct(mdl, b, k, hide_prob=0.0)[2], model)
  key = jax.random.key(0)
  a, b = rec(_jnp(raw), key), rec(_jnp(other), key)
  np.testing.assert_array_equal(a["pathology"], b["pathology"])
  assert not np.allclose(a["rna"], b["rna"])
  c.model.decoder.cross_modal = True
  _, method, model = _setup(c)
  rec = _jit(lambda mdl, b, k: method.reconstruct(mdl, b, k, hide_prob=0.0)[2], model)
  assert not np.allclose(rec(_jnp(raw), key)["pathology"], rec(_jnp(other), key)["pathology"])


# ---- raw WSI tiles (:tiles) ----------------------------------------------------------------


def test_tile_patches_cut_raster_order_and_invert():
  from survjax.models.imputmae import tile_patches, tile_unpatch
  img = np.random.default_rng(0).integers(0, 255, size=(2, 3, 32, 48, 3)).astype(np.float32)
  p = tile_patches(jnp.asarray(img), 16)
  assert p.shape == (2, 3, 6, 16 * 16 * 3)
  # patch (row 1, column 2) of tile (1, 2) is the pixel block [16:32, 32:48], row by row
  np.testing.assert_array_equal(p[1, 2, 1 * 3 + 2], img[1, 2, 16:32, 32:48].reshape(-1))
  np.testing.assert_array_equal(tile_unpatch(p, 16, 32, 48), img)


def test_synthetic_tiles_are_opt_in_and_read_the_factors_up_to_a_shift():
  spec = dict(n_patients=30, rna_dnam=True, missing_pathology=0.3)
  base = make_synthetic_cohort(SyntheticSpec(**spec))
  with_tiles = make_synthetic_cohort(SyntheticSpec(wsi_tiles=True, **spec))
  assert "tiles" not in base.modalities
  assert _fingerprint(base) == _fingerprint(
      dataclasses.replace(with_tiles, modalities={k: v for k, v in with_tiles.modalities.items()
                                                  if k != "tiles"}))
  tiles = with_tiles.modalities["tiles"]
  assert tiles.kind == "patches" and tiles.values.shape == (30, 4, 64, 64, 3)
  assert tiles.values.dtype == np.uint8
  np.testing.assert_array_equal(tiles.available, with_tiles.modalities["pathology"].available)
  assert not tiles.values[~tiles.available].any()
  # The pathology oracle keys gain tiles, which reveal what the pathology bag reveals.
  np.testing.assert_array_equal(with_tiles.true_risk["rna+tiles"],
                                with_tiles.true_risk["pathology+rna"])
  # Two tiles of one patient are one image circularly shifted, up to two draws of the
  # noise: the best shift leaves 2 x the floor; another patient's tile leaves more.
  floor = with_tiles.reconstruction_floor["tiles"][0]
  np.testing.assert_allclose(floor, 8.0**2 + 1 / 12)

  def best_shift_mse(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return min(np.mean((np.roll(a, (dy, dx), axis=(0, 1)) - b) ** 2)
               for dy in range(64) for dx in range(64))

  i, j = np.flatnonzero(tiles.available)[:2]
  same = best_shift_mse(tiles.values[i, 0], tiles.values[i, 1])
  assert 0.85 * 2 * floor < same < 1.15 * 2 * floor
  assert best_shift_mse(tiles.values[i, 0], tiles.values[j, 0]) > 2 * same


def _tile_config(**synthetic):
  c = _small_config(**synthetic)
  c.data.synthetic.update(dict(wsi_tiles=True, tile_size=32, tiles_per_patient=3))
  c.model.modalities = ("rna", "tiles")
  c.model.tile = ml_collections.ConfigDict(dict(patch=16))
  return c


def test_tiles_mask_half_of_each_tile_and_a_missing_slide_gives_no_information():
  c = _tile_config(missing_pathology=0.4)
  cohort, method, model = _setup(c)
  idx = np.arange(12)
  raw = make_batch(cohort, idx, BatchSpec(12))
  miss = ~raw["modalities"]["tiles"]["available"]
  assert miss[:12].any() and not miss[:12].all()
  other = jax.tree.map(np.copy, raw)
  other["modalities"]["tiles"]["x"][miss] = 200   # garbage where the slide is missing
  key = jax.random.key(3)
  run = _jit(lambda mdl, b, k: (method.patchify(mdl, b),
                                method.encode(mdl, method.patchify(mdl, b), 0.5, k),
                                method.pretrain_loss(mdl, b, k),
                                method.reconstruct(mdl, b, k)), model)
  (patches, enc, loss, (_, enc_r, pred)), (_, enc2, loss2, _) = (run(_jnp(raw), key),
                                                                 run(_jnp(other), key))
  assert patches["tiles"]["x"].shape == (12, 3 * 4, 16 * 16 * 3)   # 3 tiles x 2x2 patches
  masked = np.asarray(enc["tiles"]["masked"]).reshape(12, 3, 4)
  avail = ~miss
  np.testing.assert_array_equal(masked[avail].sum(-1), 2)   # half of every tile
  assert not masked[~avail].any()
  np.testing.assert_array_equal(enc["tiles"]["z"], enc2["tiles"]["z"])
  np.testing.assert_array_equal(loss[0], loss2[0])
  # the loss is the masked MSE over the tiles' ViT patches (transposed-convolution head)
  w = (enc_r["tiles"]["masked"] & jnp.asarray(raw["valid"])[:, None])[..., None]
  np.testing.assert_allclose(loss[1]["mse_tiles"],
                             masked_mse(pred["tiles"], patches["tiles"]["x"], w), rtol=1e-6)
  # predictions never read a withheld slide
  predict = _jit(method.predict, model, 1, 2)
  r1 = predict(_jnp(raw), frozenset({"rna"}), None)
  r2 = predict(_jnp(other), frozenset({"rna"}), None)
  for k in r1:
    np.testing.assert_array_equal(r1[k], r2[k])


def test_tile_encoder_cls_is_the_mean_over_tiles_and_held_out_reports_tiles():
  c = _tile_config()
  cohort, method, model = _setup(c)
  batch = _jnp(make_batch(cohort, np.arange(4), BatchSpec(4)))
  patches = _jit(method.patchify, model)(batch)
  cls = _jit(lambda mdl, b: method.encode(mdl, method.patchify(mdl, b), 0.0, None)
             ["tiles"]["z"][:, 0], model)(batch)
  x = np.asarray(patches["tiles"]["x"]).reshape(4 * 3, 4, -1)
  z, _ = _jit(lambda mdl, x: mdl.encoders["tiles"](
      x, jnp.broadcast_to(jnp.arange(4), (12, 4)), jnp.ones((12, 4), bool)), model)(x)
  np.testing.assert_allclose(cls, np.asarray(z[:, 0]).reshape(4, 3, -1).mean(1), rtol=1e-5,
                             atol=1e-6)
  out = method.held_out(model, cohort, np.arange(40, 48), np.arange(40), jax.random.key(0))
  assert {"masked/tiles/model", "masked/tiles/mean_fill", "masked/tiles/floor"} <= set(out)
  assert out["masked/tiles/floor"] == pytest.approx(8.0**2 + 1 / 12)
