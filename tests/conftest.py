"""Test set-up: 8 fake CPU devices (sharding tests) before any JAX computation."""

import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# CLI runs of the suite leave the real ~/.cache alone (tests/test_cache.py sets its own).
os.environ.setdefault("SURVJAX_COMPILATION_CACHE_DIR", "none")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
warnings.filterwarnings("ignore", category=DeprecationWarning, module="jaxopt")
