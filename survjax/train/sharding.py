"""Data parallelism: one `jax.jit` over a device `Mesh` with `NamedSharding`.

This is where sharding is defined, and the only place. Parameters and optimiser state
are replicated; every batch array is split along its leading (patient) axis over the
mesh axis ``"data"``. XLA inserts the gradient all-reduce. This is what ``pmap`` became
(since JAX 0.10 ``pmap`` is a wrapper over ``jit`` + ``shard_map``).

Multi-host: call `initialize_distributed` first; each process then builds the global
batch (cheap host work, identical on every process) and contributes its own rows through
`jax.make_array_from_process_local_data`, so each host only copies its slice to its
devices. Every process must lower the same program, down to its debug metadata
(`same_program_on_every_process`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """``jax.distributed.initialize``; with no arguments it auto-detects TPU pods / SLURM."""
  kwargs = {}
  if coordinator:
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)
  same_program_on_every_process()


def same_program_on_every_process() -> None:
  """Keeps the Python call stack out of the lowered programs' source locations.

  By default JAX records the whole traceback of every traced operation in the HLO
  metadata, and that metadata enters the program's fingerprint. Processes that reach the
  same jitted step through different lines (process 0 inside the run directory's lock,
  the others not) then lower programs that differ only there, and since jax 0.12.1 the
  CPU (Gloo) collectives of such programs wait on each other forever. Each operation keeps
  its own location, which is the same model code on every process. Idempotent; called by
  `initialize_distributed` and by `run_cv` when several processes run.
  """
  jax.config.update("jax_include_full_tracebacks_in_locations", False)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D data-parallel mesh over the first ``num_devices`` devices (all by default)."""
  devices = jax.devices()
  if num_devices is not None and num_devices > 0:
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


def round_up_batch(batch_size: int, mesh: Mesh) -> int:
  """Smallest multiple of the device count that is >= batch_size."""
  n = mesh.size
  return -(-batch_size // n) * n


def shard_batch(batch, mesh: Mesh):
  """Places a host batch (global rows) on the mesh, split along the patient axis."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  n_proc, pid = jax.process_count(), jax.process_index()

  def local(x):
    rows = x.shape[0] // n_proc
    return jax.make_array_from_process_local_data(
        sharding, np.asarray(x[pid * rows:(pid + 1) * rows]), x.shape)

  return jax.tree.map(local, batch)


def to_host(x):
  """Gathers a (possibly multi-host) array to a numpy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
