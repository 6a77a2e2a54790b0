#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (one host or a multi-host pod slice) with
# gcloud: create the slice, copy this checkout to every worker, install it,
# run the same `python -m speechjax.train` on all workers, stream the log,
# and delete the slice when asked. Every worker runs the same command; JAX
# finds the slice's other hosts itself (speechjax.parallel.initialize_distributed).
#
#   launch/tpu_vm.sh --name=my-tpu --zone=us-central2-b --project=my-project \
#       --create --accelerator=v4-16 --version=tpu-ubuntu2204-base \
#       -- --config=configs/demo.py:speech --workdir=/mnt/shared/runs/x
#   launch/tpu_vm.sh --name=my-tpu --zone=us-central2-b --delete
#
# Nothing about your account is assumed: name, zone, project, accelerator
# type and runtime version come from the flags (or the TPU_* variables below).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name=NAME --zone=ZONE [options] [-- TRAIN_ARGS...]

Slice (flags, or the environment variable in brackets):
  --name NAME            TPU VM name                          [TPU_NAME]
  --zone ZONE            e.g. us-central2-b                   [TPU_ZONE]
  --project PROJECT      GCP project (default: gcloud's)      [TPU_PROJECT]
  --accelerator TYPE     e.g. v4-8, v4-32, v5litepod-16       [TPU_ACCELERATOR]
  --version VERSION      TPU runtime, e.g. tpu-ubuntu2204-base [TPU_RUNTIME_VERSION]

Steps (run in this order; with TRAIN_ARGS the default is copy, install, run):
  --create               create the slice first (needs --accelerator, --version)
  --spot                 create it as a Spot VM
  --no_copy              do not copy this checkout to the workers
  --no_install           do not (re)install it on the workers
  --detach               run under nohup on every worker (log: REMOTE_DIR/train.log)
                         and follow worker 0's log; Ctrl-C stops following only
  --logs                 follow worker 0's log of a detached run
  --delete               delete the slice at the end (alone: just delete it)

Other:
  --remote_dir DIR       where the code goes on the workers, relative to the home
                         folder or absolute (default speechjax)
  --install_cmd CMD      install command run in it on every worker (default:
                         python3 -m venv .venv && .venv/bin/pip install -e . 'jax[tpu]',
                         installing python3-venv with apt when it is missing)
  --env K=V              environment variable for the training command (repeatable)
  --dry_run              print the gcloud commands instead of running them
  -h, --help             this message

TRAIN_ARGS go to `python -m speechjax.train` on every worker. On a multi-host
slice --workdir must be a folder every worker sees (a gcsfuse mount of your
bucket, NFS/Filestore): all hosts write their checkpoint shards into it. The
data (config.data.data_dir) must be readable on every worker too.
EOF
}

name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
accelerator="${TPU_ACCELERATOR:-}"
version="${TPU_RUNTIME_VERSION:-}"
create=0; spot=0; copy=1; install=1; detach=0; logs=0; delete=0; dry_run=0
remote_dir="speechjax"  # relative to the home folder, where ssh starts
# Ubuntu images may lack python3-venv; install it when venv cannot start.
install_cmd="{ python3 -m venv .venv || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv .venv; }; } && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e . 'jax[tpu]'"
train_env=()
train_args=()

need_value() {
  if [[ $# -lt 2 || -z "$2" ]]; then
    echo "tpu_vm.sh: option $1 needs a value (see --help)" >&2
    exit 2
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --name=*) name="${1#*=}"; shift ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --zone=*) zone="${1#*=}"; shift ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --project=*) project="${1#*=}"; shift ;;
    --accelerator) need_value "$@"; accelerator="$2"; shift 2 ;;
    --accelerator=*) accelerator="${1#*=}"; shift ;;
    --version) need_value "$@"; version="$2"; shift 2 ;;
    --version=*) version="${1#*=}"; shift ;;
    --remote_dir) need_value "$@"; remote_dir="$2"; shift 2 ;;
    --remote_dir=*) remote_dir="${1#*=}"; shift ;;
    --install_cmd) need_value "$@"; install_cmd="$2"; shift 2 ;;
    --install_cmd=*) install_cmd="${1#*=}"; shift ;;
    --env) need_value "$@"; train_env+=("$2"); shift 2 ;;
    --env=*) train_env+=("${1#*=}"); shift ;;
    --create) create=1; shift ;;
    --spot) spot=1; shift ;;
    --no_copy) copy=0; shift ;;
    --no_install) install=0; shift ;;
    --detach) detach=1; shift ;;
    --logs) logs=1; shift ;;
    --delete) delete=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; train_args+=("$@"); break ;;
    --config=*|--config.*|--workdir=*) train_args+=("$1"); shift ;;
    *) echo "tpu_vm.sh: unknown option '$1' (train arguments go after --; see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "$name" || -z "$zone" ]]; then
  echo "tpu_vm.sh: --name and --zone are required (or TPU_NAME / TPU_ZONE)" >&2
  exit 2
fi
if [[ "$create" -eq 1 && ( -z "$accelerator" || -z "$version" ) ]]; then
  echo "tpu_vm.sh: --create needs --accelerator and --version (e.g. v4-8, tpu-ubuntu2204-base)" >&2
  exit 2
fi
if [[ ${#train_args[@]} -eq 0 && "$create" -eq 0 && "$delete" -eq 0 && "$logs" -eq 0 ]]; then
  echo "tpu_vm.sh: nothing to do: give train arguments after --, or --create / --logs / --delete" >&2
  usage >&2
  exit 2
fi
for kv in "${train_env[@]+"${train_env[@]}"}"; do
  if [[ ! "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    echo "tpu_vm.sh: --env wants NAME=VALUE, got '$kv'" >&2
    exit 2
  fi
done
if [[ "$detach" -eq 1 && "$delete" -eq 1 ]]; then
  echo "tpu_vm.sh: --delete with --detach would delete the slice under the run; delete it later" >&2
  exit 2
fi
if [[ "$dry_run" -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  echo "tpu_vm.sh: gcloud not found; install the Google Cloud CLI and run 'gcloud auth login'" >&2
  exit 127
fi

common=(--zone="$zone")
if [[ -n "$project" ]]; then
  common+=(--project="$project")
fi

# Runs (or with --dry_run prints) one command, quoted so it can be pasted.
step() {
  if [[ "$dry_run" -eq 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_workers() {  # on_workers WORKER COMMAND: one shell command on the slice's workers
  step gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$1" --command="$2"
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "$create" -eq 1 ]]; then
  create_args=(--accelerator-type="$accelerator" --version="$version")
  if [[ "$spot" -eq 1 ]]; then
    create_args+=(--spot)
  fi
  step gcloud compute tpus tpu-vm create "$name" "${common[@]}" "${create_args[@]}"
fi

if [[ ${#train_args[@]} -gt 0 ]]; then
  if [[ "$copy" -eq 1 ]]; then
    archive="$(mktemp "${TMPDIR:-/tmp}/speechjax_code.XXXXXX")"
    trap 'rm -f "$archive"' EXIT
    # The checkout as it is (uncommitted edits included), without the venv,
    # runs or anything git ignores.
    if git -C "$repo_root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git -C "$repo_root" ls-files -z --cached --others --exclude-standard \
        | tar -C "$repo_root" --null -T - -czf "$archive"
    else
      tar -C "$repo_root" --exclude=.venv --exclude=runs --exclude=.git -czf "$archive" .
    fi
    step gcloud compute tpus tpu-vm scp "$archive" "$name:speechjax_code.tar.gz" "${common[@]}" --worker=all
    on_workers all "mkdir -p $remote_dir && tar -xzf ~/speechjax_code.tar.gz -C $remote_dir && rm ~/speechjax_code.tar.gz"
  fi
  if [[ "$install" -eq 1 ]]; then
    on_workers all "cd $remote_dir && $install_cmd"
  fi
  quoted_args="$(printf '%q ' "${train_args[@]}")"
  quoted_env=""
  if [[ ${#train_env[@]} -gt 0 ]]; then
    quoted_env="$(printf '%q ' "${train_env[@]}")"
  fi
  train="env $quoted_env.venv/bin/python -m speechjax.train $quoted_args"
  if [[ "$detach" -eq 1 ]]; then
    on_workers all "cd $remote_dir && nohup $train> train.log 2>&1 < /dev/null & echo started on \$(hostname)"
    logs=1
  else
    # Attached: every worker's output comes back through ssh (only process 0
    # logs at INFO); the run ends when the slowest worker ends.
    on_workers all "cd $remote_dir && $train"
  fi
fi

if [[ "$logs" -eq 1 ]]; then
  echo "tpu_vm.sh: following worker 0's log (Ctrl-C stops following, not training)" >&2
  on_workers 0 "tail -n +1 -F $remote_dir/train.log" || true
fi

if [[ "$delete" -eq 1 ]]; then
  step gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
fi
