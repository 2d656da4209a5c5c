"""One process of a multi-host cross-validation run (spawned by test_multihost.py).

usage: multihost_worker.py WORKDIR PROCESS_ID NUM_PROCESSES PORT
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

workdir, pid, nproc, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if nproc > 1:
  from survjax.train.sharding import initialize_distributed
  initialize_distributed(f"localhost:{port}", nproc, pid)
else:
  jax.config.update("jax_num_cpu_devices", 2)  # same 2-device mesh, one process

from configs.common import base_config  # noqa: E402
from survjax.data.synthetic import SyntheticSpec, make_synthetic_cohort  # noqa: E402
from survjax.evaluate.cv import run_cv  # noqa: E402
from toy_method import ToyMethod  # noqa: E402

c = base_config("toy")
# Checkpoints by the clock: process 1's clock runs a million times fast, so it alone would
# find a save due after every epoch; the processes must still save together.
c.train.checkpoint_every_s = 3600.0
if nproc > 1 and pid == 1:
  import time
  import types

  from survjax.train import trainer
  trainer.time = types.SimpleNamespace(monotonic=lambda: 1e6 * time.monotonic(),
                                       perf_counter=time.perf_counter)
c.cv.num_folds = 2
c.cv.splits_dir = os.path.join(workdir, "splits")
c.train.batch_size = 16
c.train.max_instances = 32
c.eval.batch_size = 16
c.eval.latency = False
c.progress = False
cohort = make_synthetic_cohort(SyntheticSpec(n_patients=60, bag_min=10, bag_max=60, patch_dim=8))
run_cv(ToyMethod(epochs=(3, 2), feature_epochs=1), cohort, c, os.path.join(workdir, "run"))
print(f"process {jax.process_index()} of {jax.process_count()} done on {jax.device_count()} devices")
