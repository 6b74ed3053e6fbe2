# shellcheck shell=bash disable=SC2034  # the settings here are used by the scripts sourcing this
# Settings and gcloud helpers shared by the launch/ scripts; sourced by them, never run.
# Every setting comes from an environment variable and a flag overrides it.

QSTAR_PROJECT=${QSTAR_PROJECT:-}
QSTAR_ZONE=${QSTAR_ZONE:-}
QSTAR_NAME=${QSTAR_NAME:-qstar}
QSTAR_ACCELERATOR=${QSTAR_ACCELERATOR:-}
QSTAR_RUNTIME_VERSION=${QSTAR_RUNTIME_VERSION:-tpu-ubuntu2204-base}
QSTAR_MODE=${QSTAR_MODE:-queued}
QSTAR_CAPACITY=${QSTAR_CAPACITY:-on-demand}
QSTAR_CONFIG=${QSTAR_CONFIG:-configs/tpu_v4.py}
QSTAR_WORKDIR=${QSTAR_WORKDIR:-}
QSTAR_WORKER=${QSTAR_WORKER:-0}
QSTAR_TIMEOUT=${QSTAR_TIMEOUT:-7200}
QSTAR_POLL_SECONDS=${QSTAR_POLL_SECONDS:-30}
DRY_RUN=${DRY_RUN:-0}
OVERRIDES=""  # --config.KEY=VALUE flags for the training job, already shell-quoted

# On every worker, relative to the home directory: the project, its virtualenv, the training log.
REMOTE_DIR=qstar_jax
REMOTE_VENV=qstar_venv
REMOTE_LOG=train.log
# Matches the training process's command line (python first), not the shell that starts it.
TRAIN_PATTERN='^[^ ]*python[^ ]* -m qstar_jax[.]train( |$)'
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

common_usage() {
  cat <<'EOF'
Common flags (environment variable in brackets):
  --project ID          GCP project [QSTAR_PROJECT], required
  --zone ZONE           TPU zone, e.g. us-central2-b [QSTAR_ZONE], required
  --name NAME           TPU (and queued resource) name [QSTAR_NAME], default qstar
  --dry-run             print the gcloud commands instead of running them [DRY_RUN=1]
  -h, --help            show this help
EOF
}

die() {
  echo "error: $*" >&2
  exit 1
}

log() {
  echo "$*" >&2
}

require() {  # require VAR FLAG WHAT: fail unless the setting VAR is non-empty
  [[ -n ${!1} ]] || die "$3 not set: pass $2 or set $1"
}

one_of() {  # one_of WHAT VALUE ALLOWED...: fail unless VALUE is one of ALLOWED
  local what=$1 value=$2 allowed
  shift 2
  for allowed in "$@"; do
    [[ $value == "$allowed" ]] && return 0
  done
  die "$what must be one of: $* (got '$value')"
}

parse_flags() {  # parse_flags "$@": set the settings from flags, then check the common ones
  local flag value
  while (($#)); do
    flag=$1
    shift
    case $flag in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --config.*) OVERRIDES+=" $(quote "$flag")"; continue ;;
      --*=*) value=${flag#*=}; flag=${flag%%=*} ;;
      --*) (($#)) || die "$flag needs a value"; value=$1; shift ;;
      *) die "unknown argument: $flag (see --help)" ;;
    esac
    case $flag in
      --project) QSTAR_PROJECT=$value ;;
      --zone) QSTAR_ZONE=$value ;;
      --name) QSTAR_NAME=$value ;;
      --accelerator) QSTAR_ACCELERATOR=$value ;;
      --runtime-version) QSTAR_RUNTIME_VERSION=$value ;;
      --mode) QSTAR_MODE=$value ;;
      --capacity) QSTAR_CAPACITY=$value ;;
      --config) QSTAR_CONFIG=$value ;;
      --workdir) QSTAR_WORKDIR=$value ;;
      --worker) QSTAR_WORKER=$value ;;
      --timeout) QSTAR_TIMEOUT=$value ;;
      *) die "unknown argument: $flag (see --help)" ;;
    esac
  done
  require QSTAR_PROJECT --project "GCP project"
  require QSTAR_ZONE --zone "TPU zone"
  require QSTAR_NAME --name "TPU name"
}

quote() {  # print the arguments as one line of shell words, quoted only where needed
  local word line=""
  for word in "$@"; do
    if [[ ! $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    line+="${line:+ }$word"
  done
  printf '%s\n' "$line"
}

# tpus GROUP VERB ARGS...: run `gcloud compute tpus ...` in the project and zone, or with
# DRY_RUN=1 print it (one line, shell-quoted) instead.
tpus() {
  local cmd=(gcloud compute tpus "$@" --project="$QSTAR_PROJECT" --zone="$QSTAR_ZONE")
  if [[ $DRY_RUN == 1 ]]; then
    quote "${cmd[@]}"
  else
    "${cmd[@]}"
  fi
}

on_workers() {  # on_workers WORKER STEP...: run the steps, joined by "; ", on one worker or all
  local worker=$1 command
  shift
  command=$(printf '%s; ' "$@")
  tpus tpu-vm ssh "$QSTAR_NAME" --worker="$worker" --command="${command%; }"
}
