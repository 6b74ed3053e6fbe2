#!/usr/bin/env bash
# Delete the TPU: the queued resource with its VMs, or the plain TPU VM.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: launch/delete.sh [flags]

Delete the TPU without asking (the workdir in gs:// is kept).

  --mode MODE           queued or vm, as it was created [QSTAR_MODE], default queued
EOF_USAGE
  common_usage
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
one_of mode "$QSTAR_MODE" queued vm

if [[ $QSTAR_MODE == queued ]]; then
  tpus queued-resources delete "$QSTAR_NAME" --force --quiet
else
  tpus tpu-vm delete "$QSTAR_NAME" --quiet
fi
