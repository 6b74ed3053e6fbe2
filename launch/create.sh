#!/usr/bin/env bash
# Create the TPU (a queued resource, or a plain TPU VM) and wait until it is ready.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: launch/create.sh --accelerator TYPE [flags]

Create the TPU and wait until it is ready (ACTIVE queued resource / READY VM).

  --accelerator TYPE    TPU type, e.g. v4-64 [QSTAR_ACCELERATOR], required
  --runtime-version V   TPU VM image [QSTAR_RUNTIME_VERSION], default tpu-ubuntu2204-base
  --mode MODE           queued (queued resource) or vm (plain TPU VM) [QSTAR_MODE], default queued
  --capacity KIND       on-demand, spot or reserved [QSTAR_CAPACITY], default on-demand
  --timeout SECONDS     give up waiting after this long [QSTAR_TIMEOUT], default 7200
                        (seconds between checks: QSTAR_POLL_SECONDS, default 30)
EOF_USAGE
  common_usage
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
require QSTAR_ACCELERATOR --accelerator "accelerator type"
one_of mode "$QSTAR_MODE" queued vm
one_of capacity "$QSTAR_CAPACITY" on-demand spot reserved
[[ $QSTAR_TIMEOUT =~ ^[0-9]+$ ]] || die "timeout must be a number of seconds (got '$QSTAR_TIMEOUT')"

capacity_flag=""  # on-demand needs no flag
[[ $QSTAR_CAPACITY == on-demand ]] || capacity_flag=--$QSTAR_CAPACITY

if [[ $QSTAR_MODE == queued ]]; then
  tpus queued-resources create "$QSTAR_NAME" --node-id="$QSTAR_NAME" \
    --accelerator-type="$QSTAR_ACCELERATOR" --runtime-version="$QSTAR_RUNTIME_VERSION" \
    ${capacity_flag:+"$capacity_flag"}
  describe=(queued-resources describe "$QSTAR_NAME" --format='value(state.state)')
else
  tpus tpu-vm create "$QSTAR_NAME" \
    --accelerator-type="$QSTAR_ACCELERATOR" --version="$QSTAR_RUNTIME_VERSION" \
    ${capacity_flag:+"$capacity_flag"}
  describe=(tpu-vm describe "$QSTAR_NAME" --format='value(state)')
fi

if [[ $DRY_RUN == 1 ]]; then
  tpus "${describe[@]}"
  exit 0
fi
deadline=$((SECONDS + QSTAR_TIMEOUT))
while true; do
  state=$(tpus "${describe[@]}")
  case $state in
    ACTIVE | READY) log "$QSTAR_NAME is $state"; exit 0 ;;
    FAILED | SUSPENDED | PREEMPTED | TERMINATED)
      die "$QSTAR_NAME is $state: see gcloud compute tpus ${describe[*]:0:2} $QSTAR_NAME" ;;
  esac
  ((SECONDS < deadline)) ||
    die "$QSTAR_NAME not ready after ${QSTAR_TIMEOUT}s (state ${state:-unknown})"
  log "$QSTAR_NAME is ${state:-not listed yet}; checking again in ${QSTAR_POLL_SECONDS}s"
  sleep "$QSTAR_POLL_SECONDS"
done
