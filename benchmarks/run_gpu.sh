#!/usr/bin/env bash
# Every GPU figure of the README's speed section (issue 19's GPU goals), JAX against
# PyTorch eager on the same GPU, in one go within 9.5 minutes on one H100/H200. Needs a
# CUDA jax and torch in the same Python (the `bench` extra with jax[cuda]). Writes:
#
#   sampling_latency_gpu.json          DDIM, XLA scan, float32: batch 1 (+ unrolled) and
#                                      throughput to batch 4096, torch beside it
#   sampling_latency_pallas_gpu.json   DDIM, the fused Pallas loop (goal: <= 1 ms at batch 1);
#                                      if it does not lower, the JSON records the error
#   sampling_latency_bf16_gpu.json     DDIM, bfloat16 matmuls (goal: >= 60k patients/s at
#                                      batch 4096, >= 50% of the measured bf16 matmul rate)
#   train_throughput_gpu.json          TransMIL / ABMIL forwards 1k-200k patches against
#                                      torch with peak device memory (chunk threshold from
#                                      the device's memory), MUST's training step
#   mae_pretrain_gpu.json,             impuTMAE's pretraining step at the default size and
#   mae_pretrain_paper_dims_gpu.json   at Table 1's small variant (issue 18)
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]      # default benchmarks/results
#
# Each step has its own time limit (the sum is 540 s plus start-up), so the script always
# ends within 9.5 minutes and a step that overruns leaves the others' JSON intact; a failed
# step is reported at the end and the exit status is 1.
set -uo pipefail
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

failed=()
step() {  # step NAME SECONDS CMD...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit} s)" >&2
  if ! timeout --kill-after=10 "$limit" "$@" > /dev/null; then
    failed+=("$name")
  fi
  echo "== $name: $((SECONDS - t0)) s" >&2
}

step sampling_latency 110 "$py" -m benchmarks.sampling_latency \
  --out "$out/sampling_latency_gpu.json" --unroll-variants 5 --max-seconds 40 \
  --torch-repeats 5
step sampling_latency_pallas 60 "$py" -m benchmarks.sampling_latency \
  --out "$out/sampling_latency_pallas_gpu.json" --kernel pallas --no-torch \
  --batch-sizes 1,16,256,4096 --max-seconds 30
step sampling_latency_bf16 60 "$py" -m benchmarks.sampling_latency \
  --out "$out/sampling_latency_bf16_gpu.json" --precision bfloat16 --no-torch \
  --batch-sizes 64,1024,4096,16384 --max-seconds 40 --repeats 10
step train_throughput 230 "$py" -m benchmarks.train_throughput \
  --out "$out/train_throughput_gpu.json" --torch-python "$(command -v "$py")" \
  --must-sizes 1024,4096 --must-budget 50 --mil-budget 130 \
  --mil-sizes 1024,4096,16384,65536,200000 --paired-rounds 1
step mae_pretrain 40 "$py" -m benchmarks.mae_pretrain --torch-python "$(command -v "$py")" \
  --repeats 10 --out "$out/mae_pretrain_gpu.json"
step mae_pretrain_paper_dims 40 "$py" -m benchmarks.mae_pretrain \
  --torch-python "$(command -v "$py")" --repeats 10 --dim 256 --depth 6 --pathology-depth 4 \
  --out "$out/mae_pretrain_paper_dims_gpu.json"

if ((${#failed[@]})); then
  echo "failed or over their time limit: ${failed[*]}" >&2
  exit 1
fi
