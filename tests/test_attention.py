"""Attention hooks of the TransMIL baseline and MUST, MUST's survival hook.

The ABMIL hook is tested in tests/test_predict.py (with the CLI and the heatmap). Here:
the scores sum to one over each bag's real patches, are exactly zero at padding, and do
not change when the bag is padded to a larger bucket (or the padding moves); the TransMIL
row matches a numpy softmax of the last layer's class-token query; MUST's ``S(k)`` is the
discrete-time curve of `survjax.survival` from the head's logits and gives `predict`'s
risk.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import must as must_config
from survjax import survival
from survjax.data.batching import BatchSpec, make_batch
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.method import cohort_info
from survjax.models import get_method
from survjax.models.baselines import TransMILModel, Unimodal
from survjax.nn.core import LN_EPS


def _jit_hook(hook, model):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, b: hook(nnx.merge(graphdef, s), b))
  return lambda batch: jax.tree.map(np.asarray, fn(state, batch))


def _check_scores(a, mask):
  a = np.asarray(a, np.float64)
  assert np.isfinite(a).all()
  assert (a[~mask] == 0).all()
  assert (a >= 0).all()
  real = mask.any(axis=1)
  np.testing.assert_allclose(a.sum(axis=1)[real], 1.0, rtol=1e-5)
  assert (a[~real] == 0).all()  # an empty bag: no weight anywhere


# ---- TransMIL baseline -------------------------------------------------------------------

LENGTHS = (5, 11, 1, 9, 0)   # 9: a perfect square (no wrap-around slots); 0: empty bag


def _transmil_setup():
  cfg = ml_collections.ConfigDict(dict(dim=16, num_heads=2, num_landmarks=4, num_bins=4))
  method = Unimodal(name="transmil", modality="pathology", cfg=cfg)
  model = TransMILModel(6, cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  bags = [rng.normal(size=(n, 6)).astype(np.float16) for n in LENGTHS]
  return method, model, bags


def _padded(bags, n, interleave=False):
  """``{"pathology": {"x", "mask"}}`` with the bags padded to ``n`` (at the end, or with
  the padding spread between the patches) and the positions of each bag's patches."""
  x = np.zeros((len(bags), n, bags[0].shape[1]), np.float16)
  mask = np.zeros((len(bags), n), bool)
  pos = []
  for i, bag in enumerate(bags):
    p = (np.sort(np.random.default_rng(i).choice(n, len(bag), replace=False)) if interleave
         else np.arange(len(bag)))
    x[i, p], mask[i, p] = bag, True
    pos.append(p)
  batch = {"modalities": {"pathology": {"x": jnp.asarray(x), "mask": jnp.asarray(mask)}}}
  return batch, mask, pos


def test_transmil_attention_sums_to_one_zero_at_padding_and_padding_invariant():
  method, model, bags = _transmil_setup()
  hook = _jit_hook(method.attention, model)
  ref = None
  # 12: S = 16 grid slots > N; 30: S = 36; 49: a square bucket (S = N).
  for n, interleave in ((12, False), (30, False), (49, False), (30, True)):
    batch, mask, pos = _padded(bags, n, interleave)
    a = hook(batch)["pathology"]
    assert a.shape == (len(bags), n)
    _check_scores(a, mask)
    per_bag = [a[i, p] for i, p in enumerate(pos)]
    if ref is None:
      ref = per_bag
      assert per_bag[2][0] == pytest.approx(1.0)  # one patch: all the weight
      assert max(np.ptp(s) for s in per_bag if len(s) > 1) > 1e-4  # not uniform
    for got, want in zip(per_bag, ref):
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert Unimodal(name="snn", modality="genomics", cfg=method.cfg).attention is None


def test_transmil_attention_is_the_class_token_softmax_row_of_the_last_layer():
  """A numpy reference from the last layer's input: per head softmax over the class token
  and the H^2 grid slots of (LN(x_cls) W_Q / sqrt(d_h)) . (LN(x_j) W_K), mean over heads,
  grid slots j < L (real patch j), renormalised."""
  _, model, bags = _transmil_setup()
  enc = model.encoder
  batch, mask, _ = _padded(bags, 30)
  x = batch["modalities"]["pathology"]["x"].astype(jnp.float32)
  graphdef, state = nnx.split(enc)
  fn = jax.jit(lambda s, x, m: (nnx.merge(graphdef, s).attention(x, m),
                                nnx.merge(graphdef, s)._last_layer_input(x, m, None)))
  got, (seq, seq_mask) = fn(state, x, jnp.asarray(mask))
  got = np.asarray(got)
  seq, seq_mask = np.asarray(seq, np.float64), np.asarray(seq_mask)
  norm = enc.layer2.norm
  mu, var = seq.mean(-1, keepdims=True), seq.var(-1, keepdims=True)
  ln = (seq - mu) / np.sqrt(var + LN_EPS) * np.asarray(norm.scale[...]) + np.asarray(
      norm.bias[...])
  h, dh = enc.layer2.attn.num_heads, enc.layer2.attn.dim_head
  kernel = np.asarray(enc.layer2.attn.to_qkv.kernel[...], np.float64)
  for b, n_real in enumerate(LENGTHS):
    if n_real == 0:
      continue
    q = (ln[b, 0] @ kernel[:, :h * dh]).reshape(h, dh) / np.sqrt(dh)
    k = (ln[b] @ kernel[:, h * dh:2 * h * dh]).reshape(-1, h, dh)
    s = np.einsum("hc,shc->hs", q, k)
    s = np.where(seq_mask[b][None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    row = (p / p.sum(-1, keepdims=True)).mean(0)
    want = row[1:1 + n_real] / row[1:1 + n_real].sum()
    np.testing.assert_allclose(got[b, :n_real], want, rtol=2e-5, atol=1e-7)


def test_transmil_attention_chunked_path_equals_unchunked():
  """Bags past ``chunk_threshold`` (embedding and first layer in chunks, PPEG in place)
  give the same scores."""
  from survjax.nn.transmil import TransMIL
  _, _, bags = _transmil_setup()
  batch, mask, _ = _padded(bags, 30, interleave=True)
  x = batch["modalities"]["pathology"]["x"]
  out = []
  for chunking in ({}, dict(chunk_threshold=10, chunk_size=4)):
    enc = TransMIL(6, dim=16, num_heads=2, num_landmarks=4, rngs=nnx.Rngs(0), **chunking)
    graphdef, state = nnx.split(enc)
    fn = jax.jit(lambda s, x, m: nnx.merge(graphdef, s).attention(x, m))
    out.append(np.asarray(fn(state, x, jnp.asarray(mask))))
  assert out[1].shape == (len(bags), 30)
  _check_scores(out[1], mask)
  np.testing.assert_allclose(out[1], out[0], atol=1e-5, rtol=1e-5)


# ---- MUST ---------------------------------------------------------------------------------

def _tiny_must_config(**model) -> ml_collections.ConfigDict:
  c = must_config.get_config("smoke")
  m = c.model
  m.dim, m.num_heads, m.num_landmarks, m.rank, m.head_hidden = 32, 4, 8, 8, 32
  m.ldm.num_layers, m.ldm.num_heads, m.ldm.ddim_steps, m.ldm.num_samples = 1, 4, 5, 2
  m.update(model)
  return c


@pytest.fixture(scope="module")
def must_toy():
  cohort = make_synthetic_cohort(SyntheticSpec(n_patients=8, seed=3, patch_dim=16,
                                               bag_min=3, bag_max=40))
  method = get_method(_tiny_must_config())
  model = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(0))
  den = model.denoisers  # zero output at init: move them off, so the fill depends on c
  for m in method.modalities:
    graphdef, params = nnx.split(den[m], nnx.Param)
    nnx.update(den[m], jax.tree.map(lambda a: a + 0.05, params))
  return cohort, method, model


@pytest.mark.parametrize("hook", ["attention", "specific_attention"])
def test_must_attention_sums_to_one_zero_at_padding_and_padding_invariant(must_toy, hook):
  cohort, method, model = must_toy
  fn = _jit_hook(getattr(method, hook), model)
  idx = np.arange(6)
  small = make_batch(cohort, idx, BatchSpec(batch_size=6, buckets=(64,)))
  large = make_batch(cohort, idx, BatchSpec(batch_size=8, buckets=(256,)))
  a_small = fn(small)
  a_large = fn(large)
  assert set(a_small) == {"pathology"}   # genomics is not a bag
  m_small = small["modalities"]["pathology"]["mask"]
  m_large = large["modalities"]["pathology"]["mask"]
  assert m_small.sum(1).min() >= 3 and m_small.sum(1).max() < 64
  _check_scores(a_small["pathology"], m_small)
  _check_scores(a_large["pathology"], m_large)
  np.testing.assert_allclose(a_large["pathology"][:6, :64], a_small["pathology"],
                             atol=1e-5, rtol=1e-5)
  # A patient without the slide (the predict path runs the hook on every patient): zeros.
  hidden = make_batch(cohort, idx, BatchSpec(batch_size=6, buckets=(64,)),
                      hide=("pathology",))
  a = fn(hidden)["pathology"]
  assert np.isfinite(a).all() and (a == 0).all()


def test_must_attention_hook_needs_a_pathology_modality():
  c = _tiny_must_config()
  c.model.modalities = ("genomics", "clinical")
  assert get_method(c).attention is None


def _survival_and_risk(method, model, present):
  """Jitted ``(batch, key) -> S`` and ``(batch, key) -> predict's risk`` under ``present``."""
  graphdef, state = nnx.split(model)
  surv = jax.jit(lambda s, b, k: method.survival(nnx.merge(graphdef, s), b, present, k))
  risk = jax.jit(lambda s, b, k: method.predict(nnx.merge(graphdef, s), b, present, k))
  return (lambda b, k: np.asarray(surv(state, b, k)),
          lambda b, k: np.asarray(risk(state, b, k)["risk"]))


def _reference_curve(logits):
  """``S(k) = prod_{j<=k} (1 - sigmoid(logit_j))`` (`survjax.survival`), in numpy."""
  logits = np.asarray(logits, np.float64)
  return np.cumprod(1.0 - 1.0 / (1.0 + np.exp(-logits)), axis=-1)


def _check_curve(s, k):
  assert s.shape[1] == k and np.isfinite(s).all()
  assert (s > 0).all() and (s <= 1).all()
  assert (np.diff(s, axis=1) <= 0).all()


def test_must_survival_with_both_modalities(must_toy):
  cohort, method, model = must_toy
  batch = make_batch(cohort, np.arange(6), BatchSpec(batch_size=6))
  full = frozenset(method.modalities)
  surv, risk = _survival_and_risk(method, model, full)
  s, risk = surv(batch, None), risk(batch, jax.random.key(0))
  _check_curve(s, method.num_bins)
  def head_logits(model, batch):
    comp = model.components(batch)
    return model.head(comp["u_p"], 0.5 * (comp["c_pg"] + comp["c_gp"]), comp["u_g"])

  logits = _jit_hook(head_logits, model)(batch)
  np.testing.assert_allclose(s, _reference_curve(logits), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_reference_curve(logits), survival.survival_curve(logits),
                             rtol=1e-5)  # the numpy reference is the module's convention
  np.testing.assert_allclose(-s.sum(axis=1), risk, rtol=1e-5, atol=1e-6)
  assert np.ptp(s[:, -1]) > 0  # patients differ


@pytest.mark.parametrize("fill", ["imputer", "diffusion"])
@pytest.mark.parametrize("missing", ["genomics", "pathology"])
def test_must_survival_with_one_modality_is_the_fill_paths_head(must_toy, missing, fill):
  """S from phi([u^_P; P (g - u^); u_fill]) (or the mirror), u_fill the imputer's (the
  default) or the DDIM mean with the hook's key (``fill = "diffusion"``); the same curve
  `predict`'s risk comes from; the missing data never read."""
  cohort, _, model = must_toy
  method = get_method(_tiny_must_config(fill=fill))
  have = "pathology" if missing == "genomics" else "genomics"
  batch = make_batch(cohort, np.arange(6), BatchSpec(batch_size=6), hide=(missing,),
                     fill=np.nan)
  key = jax.random.key(3)
  surv, risk = _survival_and_risk(method, model, frozenset({have}))
  s, risk = surv(batch, key), risk(batch, key)
  _check_curve(s, method.num_bins)
  np.testing.assert_allclose(-s.sum(axis=1), risk, rtol=1e-5, atol=1e-6)
  def head_logits(model, batch):
    g, u = model.specific_only(batch, have)
    c = model.project_shared(g - u)
    if fill == "diffusion":
      u_fill = method.generate(model, missing, g - u, key)
    else:
      u_fill = model.imputers[missing](jnp.concatenate([u, c], -1))
    return model.head(u, c, u_fill) if have == "pathology" else model.head(u_fill, c, u)

  logits = _jit_hook(head_logits, model)(batch)
  np.testing.assert_allclose(s, _reference_curve(logits), rtol=1e-4, atol=1e-6)
  # predict.py calls the hook with key None: a fixed key.
  np.testing.assert_array_equal(surv(batch, None), surv(batch, jax.random.key(0)))
