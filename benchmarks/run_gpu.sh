#!/usr/bin/env bash
# The GPU figures quoted in the README: DDIM sampling latency/throughput and the training /
# MIL-forward benchmarks, JAX against PyTorch eager on the same GPU, in one go (about 6
# minutes on one H200). Needs a CUDA jax and torch in the same Python (the `bench` extra
# with jax[cuda]).
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]      # default benchmarks/results
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
py="${PYTHON:-python3}"
mkdir -p "$out"
# Each MIL measurement is its own process, so XLA must not grab 75% of the card up front
# (the default); the allocator's peak is what the JSON reports.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$py" -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch",
  torch.__version__, torch.cuda.is_available())'

"$py" -m benchmarks.sampling_latency --out "$out/sampling_latency_gpu.json" \
  --unroll-variants 5,10,50 --max-seconds 120 > /dev/null
"$py" -m benchmarks.train_throughput --out "$out/train_throughput_gpu.json" \
  --torch-python "$(command -v "$py")" --must-budget 120 --mil-budget 180 \
  --mil-sizes 1024,10000,65536,200000 --paired-rounds 1 > /dev/null
