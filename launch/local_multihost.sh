#!/usr/bin/env bash
# Runs N local CPU processes of rt2_jax.train as one multi-host JAX job: the same code path as a
# multi-host TPU slice (jax.distributed with an explicit coordinator, gloo collectives on CPU,
# one data shard per process).
#
#   launch/local_multihost.sh N [--devices_per_process=K] --config=configs/tiny.py --workdir=DIR \
#       [--config.KEY=VALUE ...]
#
# Output lines are prefixed with [process i]. SIGINT/SIGTERM are passed on to every process (the
# trainer saves a checkpoint and exits 0). Exits non-zero, stopping the others, if any fails.
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N [--devices_per_process=K] --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
num_processes=$1
shift
devices=1
if [[ "${1:-}" == --devices_per_process=* ]]; then
  devices=${1#*=}
  shift
fi
python=${PYTHON:-python3}
port=${RT2_COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [ -z "$port" ]; then
  # Without a port every process would wait forever for a coordinator at '127.0.0.1:'.
  echo "local_multihost.sh: could not pick a free coordinator port with $python" >&2
  exit 2
fi
cd "$(dirname "$0")/.."

pids=()
interrupted=0
stop_all() {
  for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done
}
trap 'interrupted=1; stop_all TERM' TERM INT

for ((i = 0; i < num_processes; i++)); do
  "$python" -m rt2_jax.train "$@" \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$num_processes" \
    --config.distributed.process_id="$i" \
    --config.distributed.local_device_count="$devices" \
    > >(sed -u "s/^/[process $i] /") 2>&1 &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=''
  wait -n -p finished "${running[@]}"
  rc=$?
  if [[ -z "${finished:-}" ]]; then
    interrupted=0
    continue  # our trap interrupted the wait; the processes are finishing their last save
  fi
  running=($(for pid in "${running[@]}"; do [[ "$pid" != "$finished" ]] && echo "$pid"; done))
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "[local_multihost] process $finished exited with status $rc; stopping the others" >&2
    stop_all TERM
  fi
done
wait  # the output filters
exit "$status"
