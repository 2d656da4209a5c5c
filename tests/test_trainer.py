"""Trainer: learning, exact resume after an interruption, bounded compilations."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from survjax.checkpoint import Checkpointer
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.method import cohort_info
from survjax.train import sharding
from survjax.train.trainer import MetricsLog, Trainer, TrainingDiverged
from toy_method import ToyMethod


@pytest.fixture(scope="module")
def cohort():
  return make_synthetic_cohort(SyntheticSpec(n_patients=60, bag_min=10, bag_max=70, patch_dim=8))


def _fit(cohort, method, ckpt=None, mesh=None, fold=0, idx=None, log=None, every_s=0.0):
  mesh = mesh or sharding.make_mesh(1)
  trainer = Trainer(method, mesh=mesh, batch_size=16, max_instances=32, seed=3, progress=False,
                    checkpoint_every_s=every_s)
  model = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(0))
  idx = np.arange(48) if idx is None else idx
  trainer.fit(model, cohort, idx, fold=fold, checkpointer=ckpt, log=log)
  return trainer, model


def _flat(model):
  return jax.tree.leaves(jax.device_get(nnx.to_pure_dict(nnx.state(model))))


def test_training_lowers_the_loss(cohort, tmp_path):
  log = MetricsLog(tmp_path / "m.jsonl")
  _fit(cohort, ToyMethod(epochs=(8, 1)), log=log)
  rows = [json.loads(l) for l in open(tmp_path / "m.jsonl")]
  a = [r["loss"] for r in rows if r["stage"] == "a"]
  assert len(a) == 8 and a[-1] < a[0] - 0.05


def test_frozen_parameters_do_not_move(cohort):
  method = ToyMethod(epochs=(0, 2))
  model0 = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(0))
  before = jax.device_get(nnx.to_pure_dict(nnx.state(model0)))
  _, model = _fit(cohort, method)
  after = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
  np.testing.assert_array_equal(before["enc"]["genomics"]["kernel"], after["enc"]["genomics"]["kernel"])
  assert not np.array_equal(before["head"]["kernel"], after["head"]["kernel"])


class _Killed(Exception):
  pass


class _DyingCheckpointer(Checkpointer):
  """Stops the run (like a SIGKILL right after a save) after ``n`` saves."""

  def __init__(self, directory, n):
    super().__init__(directory)
    self.n = n

  def save(self, *a, **k):
    super().save(*a, **k)
    self.n -= 1
    if self.n == 0:
      raise _Killed


@pytest.mark.parametrize("kill_after", [2, 3, 5, 6])
def test_resume_is_bit_exact(cohort, tmp_path, kill_after):
  method = ToyMethod(epochs=(3, 2), feature_epochs=2)
  _, ref = _fit(cohort, method, ckpt=Checkpointer(tmp_path / "ref"))
  with pytest.raises(_Killed):
    _fit(cohort, method, ckpt=_DyingCheckpointer(tmp_path / "run", kill_after))
  _, resumed = _fit(cohort, method, ckpt=Checkpointer(tmp_path / "run"))
  for a, b in zip(_flat(ref), _flat(resumed)):
    np.testing.assert_array_equal(a, b)


class _DyingLog(MetricsLog):
  """Stops the run (like a SIGKILL) right after its ``n``-th epoch record."""

  def __init__(self, path, n):
    super().__init__(path)
    self.n = n

  def write(self, record, step=None):
    super().write(record, step)
    self.n -= 1
    if self.n == 0:
      raise _Killed


def _records(path):
  rows = [json.loads(line) for line in open(path)]
  return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("kill_after", [2, 4, 6])
def test_resumed_log_holds_each_epoch_once(cohort, tmp_path, kill_after):
  """Killed between checkpoints (saves only at stage ends: after records 3, 5 and 7), the
  resumed run replays the unsaved epochs; its log equals the uninterrupted run's."""
  method = ToyMethod(epochs=(3, 2), feature_epochs=2)
  _fit(cohort, method, log=MetricsLog(tmp_path / "ref.jsonl"), every_s=1e9)
  with pytest.raises(_Killed):
    _fit(cohort, method, ckpt=Checkpointer(tmp_path / "run"), every_s=1e9,
         log=_DyingLog(tmp_path / "run.jsonl", kill_after))
  assert len(_records(tmp_path / "run.jsonl")) == kill_after
  _fit(cohort, method, ckpt=Checkpointer(tmp_path / "run"), every_s=1e9,
       log=MetricsLog(tmp_path / "run.jsonl"))
  ref, run = _records(tmp_path / "ref.jsonl"), _records(tmp_path / "run.jsonl")
  assert len(ref) == 7
  assert [(r["stage"], r["epoch"]) for r in run] == [(r["stage"], r["epoch"]) for r in ref]
  for a, b in zip(ref, run):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], float):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, err_msg=k)
      else:
        assert a[k] == b[k], k


class _CountingCheckpointer(Checkpointer):
  def __init__(self, directory):
    super().__init__(directory)
    self.steps = []

  def save(self, step, *a, **k):
    super().save(step, *a, **k)
    self.steps.append(step)


def test_checkpoint_interval_saves_stage_ends_and_resumes_exactly(cohort, tmp_path):
  """With a long interval only each stage's last epoch is saved (global steps 3, 5, 7 for
  3 + 2 + 2 epochs); a run killed after the first save resumes to the same parameters."""
  method = ToyMethod(epochs=(3, 2), feature_epochs=2)
  _, ref = _fit(cohort, method)
  counting = _CountingCheckpointer(tmp_path / "count")
  _fit(cohort, method, ckpt=counting, every_s=1e9)
  assert counting.steps == [3, 5, 7]
  with pytest.raises(_Killed):
    _fit(cohort, method, ckpt=_DyingCheckpointer(tmp_path / "run", 1), every_s=1e9)
  _, resumed = _fit(cohort, method, ckpt=Checkpointer(tmp_path / "run"), every_s=1e9)
  for a, b in zip(_flat(ref), _flat(resumed)):
    np.testing.assert_array_equal(a, b)


def test_one_compilation_per_stage_and_bucket_across_folds(cohort):
  method = ToyMethod(epochs=(2, 1), feature_epochs=1)
  mesh = sharding.make_mesh(1)
  trainer = Trainer(method, mesh=mesh, batch_size=16, max_instances=32, seed=0, progress=False)
  info = cohort_info(cohort, method.modalities)
  for fold in range(3):
    model = method.build(info, nnx.Rngs(fold))
    trainer.fit(model, cohort, np.arange(fold, 48 + fold), fold=fold)
  # max_instances=32 puts every training bag in the 64 bucket: one trace per stage.
  assert trainer.traces["step:a"] == 1 and trainer.traces["step:b"] == 1
  assert trainer.traces["chunk:c"] == 1
  assert trainer.traces["features:c"] <= 2  # whole bags: 64 and 256 buckets at most


@pytest.mark.parametrize("second", ["keeps_encoder", "moves_encoder"])
def test_a_feature_pass_is_reused_only_while_what_it_reads_is_unchanged(cohort, second):
  """Stage d shares stage c's features function. When c trains only `aux` (not read by
  the features), d reuses c's pass; when c's prepare shifts an encoder bias, d runs its
  own. Either way d's features equal a fresh pass on the model as d finds it."""
  method = ToyMethod(epochs=(1, 1), feature_epochs=1, second_feature_stage=second)
  trainer = Trainer(method, mesh=sharding.make_mesh(1), batch_size=16, max_instances=32,
                    seed=0, progress=False)
  seen = {}
  original = trainer._cache_features

  def recording(s_idx, model, *a, **k):
    feats = original(s_idx, model, *a, **k)
    if trainer.stages[s_idx].name == "d":
      trainer._feature_memo.clear()
      seen["fresh"] = original(s_idx, model, *a, **k)
    seen[trainer.stages[s_idx].name] = feats
    return feats

  trainer._cache_features = recording
  model = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(0))
  trainer.fit(model, cohort, np.arange(48))
  if second == "keeps_encoder":
    assert trainer.feature_passes == {"c": 1, "d:reused": 1, "d": 1}   # + the fresh pass
    assert seen["d"] is seen["c"]
  else:
    assert trainer.feature_passes == {"c": 1, "d": 2}
    assert not np.array_equal(np.asarray(seen["d"]["h"]), np.asarray(seen["c"]["h"]))
  np.testing.assert_array_equal(np.asarray(seen["d"]["h"]), np.asarray(seen["fresh"]["h"]))


def test_a_leaf_donated_to_a_step_since_the_pass_counts_as_changed():
  """A feature pass remembers the leaves it read; one a later training step took as a
  donated buffer is gone, and the pass is redone rather than the comparison failing."""
  from survjax.train.trainer import _same_leaf
  old = jnp.arange(3.0)
  assert _same_leaf(old, jnp.arange(3.0)) and not _same_leaf(old, jnp.arange(3.0) + 1)
  new = jax.jit(lambda a: a + 0.0, donate_argnums=0)(old)
  assert old.is_deleted()
  assert _same_leaf(old, new) is False


def test_divergence_names_step_fold_and_checkpoint(cohort, tmp_path):
  bad = make_synthetic_cohort(SyntheticSpec(n_patients=60, bag_min=10, bag_max=70, patch_dim=8))
  bad.modalities["genomics"].values[5, 0] = np.inf
  with pytest.raises(TrainingDiverged, match=r"fold 0, stage 'a', epoch \d+, step \d+; last good checkpoint"):
    _fit(bad, ToyMethod(epochs=(2, 1)), ckpt=Checkpointer(tmp_path / "c"))


def test_accumulated_schedule_runs_over_updates_not_micro_batches():
  # `accumulate` micro-batches of the same gradient make one update of that gradient, so
  # 10 micro-batches at accumulate 2 (schedule given in micro-batches: 10 total, 2 warm-up)
  # must equal 5 plain updates of a 5-update schedule (1 warm-up), step by step.
  from survjax.train.optim import make_optimizer
  params = {"w": jnp.arange(4.0)}
  grad = {"w": jnp.array([0.3, -1.0, 2.0, 0.5])}

  def run(accumulate, total, warmup, steps):
    tx = make_optimizer(1e-2, 1e-3, accumulate=accumulate, schedule="cosine",
                        total_steps=total, warmup_steps=warmup)
    p, state, seen = params, tx.init(params), []
    for _ in range(steps):
      upd, state = tx.update(grad, state, p)
      p = optax.apply_updates(p, upd)
      seen.append(p["w"])
    return seen

  acc = run(2, 10, 2, 10)
  plain = run(1, 5, 1, 5)
  for i in range(5):
    np.testing.assert_allclose(acc[2 * i + 1], plain[i], rtol=1e-6, atol=1e-7)
