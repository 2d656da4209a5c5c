#!/usr/bin/env bash
# survjax on a Cloud TPU VM or pod slice: ships this checkout to every worker, installs
# it with the tpu extra, and runs one process per host with --distributed.
#
#   TPU=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh --config=configs/must.py
#   TPU=my-v4-8 ZONE=us-central2-b PROJECT=my-proj launch/tpu_pod.sh \
#       --config=configs/must.py:smoke --workdir=/mnt/shared/runs/must
#
# Arguments are passed to survjax.main (default: --config=configs/must.py).
# Environment: TPU (the TPU VM name, required), ZONE (required), PROJECT (default: the
# gcloud default), PYTHON (on the workers, default python3.12: survjax needs Python >=
# 3.12, which not every TPU VM image has: install it first, e.g. from the deadsnakes PPA or
# with uv, or point PYTHON at one), REMOTE_DIR (default survjax, under the workers' home),
# SKIP_INSTALL=1 (reuse the previous install), STEPS (default "copy install run").
#
# How it runs: `git archive HEAD` (committed files only) is copied to every worker
# (`gcloud compute tpus tpu-vm scp --worker=all`), unpacked into ~/$REMOTE_DIR, installed
# into a venv there with `pip install -e '.[tpu]'`, and started on all workers at once
# (`gcloud compute tpus tpu-vm ssh --worker=all --command=...`). `--distributed` makes each
# host's process call jax.distributed.initialize() without arguments: on Cloud TPU, JAX
# finds the coordinator, the number of hosts and its own index from the TPU metadata.
# Every host then drives its local chips; the data-parallel mesh spans all chips of the
# slice. The ssh command returns when every worker is done and fails if one fails.
#
# The workdir: process 0 writes results.json and the report; checkpoints and saved folds
# are read by every host, so for a multi-host slice give a --workdir on a filesystem all
# workers share (Filestore/NFS, or a gcsfuse-mounted bucket); the default runs/<method>
# is local to each worker (fine for a single-host TPU VM). Copy results back with
#   gcloud compute tpus tpu-vm scp --recurse "$TPU":~/survjax/runs ./tpu_runs --worker=0 --zone=$ZONE
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
PYTHON="${PYTHON:-python3.12}"
REMOTE_DIR="${REMOTE_DIR:-survjax}"
STEPS="${STEPS:-copy install run}"
[[ "${SKIP_INSTALL:-0}" == 1 ]] && STEPS="${STEPS//install/}"
gcloud_flags=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_flags+=(--project="$PROJECT")
args=("$@")
[[ ${#args[@]} -eq 0 ]] && args=(--config=configs/must.py)

cd "$(dirname "$0")/.."
quoted_args=$(printf ' %q' "${args[@]}")

if [[ " $STEPS " == *" copy "* ]]; then
  tarball=$(mktemp -t survjax-src.XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  git archive --format=tar.gz -o "$tarball" HEAD
  echo "tpu_pod.sh: copying $(git rev-parse --short HEAD) to all workers of $TPU" >&2
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU":survjax-src.tar.gz --worker=all \
    "${gcloud_flags[@]}"
  gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${gcloud_flags[@]}" --command="
    set -e; rm -rf ~/$REMOTE_DIR.new; mkdir -p ~/$REMOTE_DIR.new
    tar xzf ~/survjax-src.tar.gz -C ~/$REMOTE_DIR.new
    if [ -d ~/$REMOTE_DIR/.venv ]; then mv ~/$REMOTE_DIR/.venv ~/$REMOTE_DIR.new/; fi
    if [ -d ~/$REMOTE_DIR/runs ]; then mv ~/$REMOTE_DIR/runs ~/$REMOTE_DIR.new/; fi
    rm -rf ~/$REMOTE_DIR; mv ~/$REMOTE_DIR.new ~/$REMOTE_DIR"
fi

if [[ " $STEPS " == *" install "* ]]; then
  echo "tpu_pod.sh: installing survjax[tpu] with $PYTHON on all workers" >&2
  gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${gcloud_flags[@]}" --command="
    set -e; cd ~/$REMOTE_DIR
    command -v $PYTHON >/dev/null || { echo \"no $PYTHON on \$(hostname): survjax needs Python >= 3.12\" >&2; exit 2; }
    [ -x .venv/bin/python ] || $PYTHON -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[tpu]'
    .venv/bin/python -c 'import jax, socket, survjax; print(socket.gethostname(), \"jax\", jax.__version__)'"
fi

if [[ " $STEPS " == *" run "* ]]; then
  echo "tpu_pod.sh: running survjax.main --distributed${quoted_args} on all workers" >&2
  gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${gcloud_flags[@]}" --command="
    cd ~/$REMOTE_DIR && .venv/bin/python -m survjax.main --distributed${quoted_args}"
fi
