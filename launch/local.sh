#!/usr/bin/env bash
# N survjax processes on this machine, joined over localhost (CPU collectives): the
# multi-process code path of a pod or a SLURM job, testable on a laptop.
#
#   launch/local.sh [-n N] [-p PORT] [--] [survjax.main flags...]
#   launch/local.sh -n 2 -- --config=configs/snn.py:smoke --workdir=runs/local2
#
# Process i runs
#   $PYTHON -m survjax.main --distributed --coordinator=localhost:PORT \
#       --num_processes=N --process_id=i <flags>
# from the repository root. Process 0 prints to this terminal; process i > 0 writes to
# $LOG_DIR/process_<i>.log (default: a fresh temporary directory, printed first). The
# script waits for all of them and exits with the first non-zero status, after stopping
# the processes still running (they would otherwise wait for the dead one forever), or
# 0 when all succeed.
#
# Environment: PYTHON (default .venv/bin/python if it exists, else python3),
# JAX_PLATFORMS (default cpu: each process contributes one CPU device, so the data mesh
# has N devices), LOG_DIR.
# Options: -n / --num-processes N (default 2), -p / --port PORT (default: a free port).
# Works with bash >= 3.2 (macOS's).
set -euo pipefail

cd "$(dirname "$0")/.."
num=2
port=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) num="$2"; shift 2 ;;
    -p|--port) port="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if ! [[ "$num" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: -n expects a positive integer, got '$num'" >&2
  exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "$port" ]]; then
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t survjax-local.XXXXXX)}"
mkdir -p "$LOG_DIR"
echo "local.sh: $num processes, coordinator localhost:$port, logs of processes 1..$((num - 1)) in $LOG_DIR" >&2

pids=()
stop_all() {
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  cmd=("$PYTHON" -m survjax.main --distributed "--coordinator=localhost:$port"
       "--num_processes=$num" "--process_id=$i" "$@")
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Poll instead of `wait -n` (bash >= 4.3): bash reaps exited children and keeps their
# status for `wait PID`, so `kill -0` fails as soon as a process has ended.
status=0

while :; do
  alive=0
  for ((i = 0; i < num; i++)); do
    pid="${pids[$i]}"
    [[ -z "$pid" ]] && continue
    if kill -0 "$pid" 2>/dev/null; then
      alive=1
      continue
    fi
    set +e
    wait "$pid"
    rc=$?
    set -e
    pids[$i]=""
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      failed=$i
      echo "local.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  [[ $alive -eq 0 ]] && break
  sleep 1
done

if [[ $status -ne 0 ]]; then
  for ((i = 1; i < num; i++)); do
    echo "---- last lines of $LOG_DIR/process_$i.log" >&2
    tail -n 15 "$LOG_DIR/process_$i.log" >&2 || true
  done
fi
exit "$status"
