"""Data parallelism on 8 fake CPU devices, and a real two-process (multi-host) run."""

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from survjax.data.batching import BatchSpec, make_batch
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort
from survjax.evaluate.cv import Predictor
from survjax.method import cohort_info
from survjax.train import sharding
from survjax.train.trainer import Trainer
from toy_method import ToyMethod

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cohort():
  return make_synthetic_cohort(SyntheticSpec(n_patients=50, bag_min=10, bag_max=60, patch_dim=8))


def test_eight_devices_are_there():
  assert jax.device_count() == 8


def _train(cohort, n_devices, batch_size):
  method = ToyMethod(epochs=(2, 1))
  trainer = Trainer(method, mesh=sharding.make_mesh(n_devices), batch_size=batch_size,
                    max_instances=32, seed=1, progress=False)
  model = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(0))
  trainer.fit(model, cohort, np.arange(40))
  return trainer, model


@pytest.mark.parametrize("batch_size", [16, 13])
def test_training_on_8_devices_matches_one_device(cohort, batch_size):
  # 13 does not divide by 8: the batch is rounded up to 16 and padded with masked patients,
  # so both runs see identical batches.
  t1, m1 = _train(cohort, 1, 16)
  t8, m8 = _train(cohort, 8, batch_size)
  assert t8.spec.batch_size == 16
  flat1 = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m1))))
  flat8 = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m8))))
  assert flat1.keys() == flat8.keys()
  # The head's bias shifts every risk equally, which the Cox partial likelihood ignores:
  # its true gradient is 0, so Adam turns float rounding (~1e-8, different for a sharded
  # reduction) into full-size steps. It is the one parameter the loss does not identify.
  unidentified = [k for k in flat1 if jax.tree_util.keystr(k) == "['head']['bias']"]
  assert len(unidentified) == 1
  for k in flat1:
    if k not in unidentified:
      np.testing.assert_allclose(np.asarray(flat1[k]), np.asarray(flat8[k]), rtol=2e-5,
                                 atol=2e-6, err_msg=jax.tree_util.keystr(k))
  # Parameters are replicated and batches split over the 8 devices.
  leaf = jax.tree.leaves(nnx.state(m8))[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_sharded_batch_is_split_over_devices(cohort):
  mesh = sharding.make_mesh(8)
  batch = sharding.shard_batch(make_batch(cohort, np.arange(16), BatchSpec(16)), mesh)
  x = batch["modalities"]["pathology"]["x"]
  assert {s.data.shape[0] for s in x.addressable_shards} == {2}


def test_evaluation_on_8_devices_gives_the_same_risks(cohort):
  method = ToyMethod()
  model = method.build(cohort_info(cohort, method.modalities), nnx.Rngs(0))
  idx = np.arange(50)
  hidden = [frozenset()] * 50
  out = {}
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    nnx.update(model, sharding.replicate(nnx.state(model), mesh))
    out[n] = Predictor(method, mesh).predict(model, cohort, idx, hidden, BatchSpec(16),
                                             jax.random.key(0))["risk"]
  np.testing.assert_allclose(out[1], out[8], rtol=1e-5, atol=1e-6)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_pair(worker, workdir, timeout):
  """Runs both processes of a two-process run; fails with their output if they hang."""
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, worker, str(workdir), str(i), "2", port],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    # Both read at once: a process blocked on a full pipe would stall the other's collective.
    with ThreadPoolExecutor(2) as pool:
      outs = list(pool.map(lambda p: p.communicate(timeout=timeout), procs))
  except subprocess.TimeoutExpired:
    tails = []
    for p in procs:
      p.kill()   # a process waiting in a collective does not run Python's SIGTERM handler
      out, err = p.communicate()
      tails.append((out + err)[-1500:])
    pytest.fail(f"the two-process run hung for {timeout} s; its output:\n" + "\n---\n".join(tails))
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-2000:]
    assert "of 2 done on 2 devices" in o


def test_programs_do_not_depend_on_the_call_stack():
  """After `same_program_on_every_process`, a function jitted from two different lines
  compiles to the same program text (source locations included); with JAX's default it
  does not. Processes of one run reach the training step through different lines, and
  programs that differ only in their metadata hung the Gloo collectives (jax 0.12.1)."""
  def f(x):
    return jax.numpy.sin(x) * 2

  def compiled_here(x):
    jax.clear_caches()
    return jax.jit(f).lower(x).compile().as_text()

  def compiled_there(x):
    jax.clear_caches()
    return jax.jit(f).lower(x).compile().as_text()

  x = np.ones(3, np.float32)
  before = jax.config.jax_include_full_tracebacks_in_locations
  try:
    jax.config.update("jax_include_full_tracebacks_in_locations", True)
    assert compiled_here(x) != compiled_there(x)
    sharding.same_program_on_every_process()
    assert compiled_here(x) == compiled_there(x)
  finally:
    jax.config.update("jax_include_full_tracebacks_in_locations", before)


@pytest.mark.slow
def test_two_processes_reach_the_single_process_result(tmp_path):
  """Two processes (one CPU device each, Gloo collectives) give the single process's
  results. Process 0 enters the training step from inside the run directory's lock and
  process 1 does not, so this also holds the processes' programs to the same text."""
  worker = str(HERE / "multihost_worker.py")
  single = subprocess.run([sys.executable, worker, str(tmp_path / "one"), "0", "1", "0"],
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-2000:]
  run_dir = tmp_path / "two"
  _run_pair(worker, run_dir, timeout=300)
  a = json.loads((tmp_path / "one" / "run" / "results.json").read_text())
  b = json.loads((run_dir / "run" / "results.json").read_text())
  for name, s in a["scenarios"].items():
    np.testing.assert_allclose(s["per_fold"], b["scenarios"][name]["per_fold"], atol=2e-3)
  for k in range(2):
    ra = np.genfromtxt(tmp_path / "one" / "run" / f"fold_{k}" / "risks.csv", delimiter=",",
                       skip_header=1)[:, 3:]
    rb = np.genfromtxt(run_dir / "run" / f"fold_{k}" / "risks.csv", delimiter=",",
                       skip_header=1)[:, 3:]
    np.testing.assert_allclose(ra, rb, rtol=1e-4, atol=1e-5)
