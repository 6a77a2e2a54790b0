#!/usr/bin/env bash
# Runs speechjax training on this machine: one process, or N processes that
# talk over 127.0.0.1 exactly as the hosts of a TPU pod or a GPU cluster do
# (jax.distributed with an explicit coordinator), each with its own fake CPU
# devices. The multi-process form exercises the multi-host code path
# (per-host data, global batches, process-0 logging, orbax multi-host
# checkpoints) without a cluster.
#
#   launch/local.sh --config=configs/demo.py:speech,quick --workdir=runs/x
#   launch/local.sh -n 2 -d 2 -- --config=configs/demo.py:speech,quick --workdir=runs/x
#
# Everything that is not an option of this script (or everything after `--`)
# goes to `python -m speechjax.train` (or --module). The script waits for all
# processes; when one fails it stops the others and exits with that status.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [--] TRAIN_ARGS...

Options:
  -n, --num_processes N        processes to start on this machine (default 1)
  -d, --devices_per_process K  fake CPU devices per process
                               (XLA_FLAGS=--xla_force_host_platform_device_count=K);
                               default: 1 when N > 1, untouched when N = 1
      --platform P             JAX_PLATFORMS for the processes (default: cpu when
                               N > 1 or -d is given, else whatever JAX picks)
      --port PORT              coordinator port on 127.0.0.1 (default: a free one)
      --log_dir DIR            per-process logs (default: a new folder under
                               ${TMPDIR:-/tmp}); process 0 also prints to the terminal
      --module M               Python module to run (default speechjax.train)
      --python PY              interpreter (default: $PYTHON, else python)
  -h, --help                   this message

Examples:
  launch/local.sh --config=configs/demo.py:speech,quick --workdir=runs/one
  launch/local.sh -n 2 -d 2 --config=configs/demo.py:speech,quick --workdir=runs/two
EOF
}

num_processes=1
devices_per_process=""
platform=""
port=""
log_dir=""
module="speechjax.train"
python_bin="${PYTHON:-python}"
train_args=()

need_value() {
  if [[ $# -lt 2 || -z "$2" ]]; then
    echo "local.sh: option $1 needs a value (see --help)" >&2
    exit 2
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n|--num_processes) need_value "$@"; num_processes="$2"; shift 2 ;;
    --num_processes=*) num_processes="${1#*=}"; shift ;;
    -d|--devices_per_process) need_value "$@"; devices_per_process="$2"; shift 2 ;;
    --devices_per_process=*) devices_per_process="${1#*=}"; shift ;;
    --platform) need_value "$@"; platform="$2"; shift 2 ;;
    --platform=*) platform="${1#*=}"; shift ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --log_dir) need_value "$@"; log_dir="$2"; shift 2 ;;
    --log_dir=*) log_dir="${1#*=}"; shift ;;
    --module) need_value "$@"; module="$2"; shift 2 ;;
    --module=*) module="${1#*=}"; shift ;;
    --python) need_value "$@"; python_bin="$2"; shift 2 ;;
    --python=*) python_bin="${1#*=}"; shift ;;
    --) shift; train_args+=("$@"); break ;;
    *) train_args+=("$1"); shift ;;
  esac
done

is_positive_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
if ! is_positive_int "$num_processes"; then
  echo "local.sh: --num_processes must be a positive integer, got '$num_processes'" >&2
  exit 2
fi
if [[ -n "$devices_per_process" ]] && ! is_positive_int "$devices_per_process"; then
  echo "local.sh: --devices_per_process must be a positive integer, got '$devices_per_process'" >&2
  exit 2
fi
if [[ ${#train_args[@]} -eq 0 ]]; then
  echo "local.sh: no arguments for $module (at least --config=... --workdir=...)" >&2
  usage >&2
  exit 2
fi

if [[ "$num_processes" -gt 1 && -z "$devices_per_process" ]]; then
  devices_per_process=1
fi
if [[ -z "$platform" && ( "$num_processes" -gt 1 || -n "$devices_per_process" ) ]]; then
  platform=cpu
fi

# One process: the plain command, nothing distributed.
if [[ "$num_processes" -eq 1 ]]; then
  if [[ -n "$devices_per_process" ]]; then
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process"
  fi
  if [[ -n "$platform" ]]; then
    export JAX_PLATFORMS="$platform"
  fi
  exec "$python_bin" -m "$module" "${train_args[@]}"
fi

if [[ -z "$port" ]]; then
  port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/speechjax_local.XXXXXX")"
fi
mkdir -p "$log_dir"

pids=()
stop_all() {
  # SIGTERM first: the trainer checkpoints on it when it can; then SIGKILL,
  # since a process blocked in a collective with a dead peer never returns.
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  sleep 5
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
on_signal() {
  echo "local.sh: interrupted; stopping ${#pids[@]} processes" >&2
  stop_all
  exit 130
}
trap on_signal INT TERM

echo "local.sh: $num_processes processes x $devices_per_process $platform devices," \
  "coordinator 127.0.0.1:$port, logs in $log_dir" >&2
for ((i = 0; i < num_processes; i++)); do
  log="$log_dir/process_$i.log"
  # XLA_FLAGS and JAX_PLATFORMS must be in the environment before JAX is imported.
  env XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process" \
    JAX_PLATFORMS="$platform" \
    "$python_bin" -m "$module" "${train_args[@]}" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$i" \
    >"$log" 2>&1 &
  pids+=("$!")
done

# Process 0 speaks for the run (it is the one that logs); follow its log.
tail -n +1 -F "$log_dir/process_0.log" 2>/dev/null &
tail_pid=$!

status=0
failed=""
remaining=("${!pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  still=()
  for i in "${remaining[@]}"; do
    pid="${pids[$i]}"
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    code=0
    wait "$pid" || code=$?
    if [[ "$code" -ne 0 && -z "$failed" ]]; then
      failed="$i"
      status="$code"
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if [[ -n "$failed" && ${#remaining[@]} -gt 0 ]]; then
    echo "local.sh: process $failed exited with status $status; stopping the others" >&2
    stop_all
    for i in "${remaining[@]}"; do
      wait "${pids[$i]}" 2>/dev/null || true
    done
    break
  fi
  if [[ ${#remaining[@]} -gt 0 ]]; then
    sleep 0.5
  fi
done

sleep 0.2  # let tail print process 0's last lines
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true
trap - INT TERM

if [[ -n "$failed" ]]; then
  echo "local.sh: process $failed failed (status $status); last lines of $log_dir/process_$failed.log:" >&2
  tail -n 30 "$log_dir/process_$failed.log" >&2 || true
  exit "$status"
fi
echo "local.sh: all $num_processes processes finished; logs in $log_dir" >&2
