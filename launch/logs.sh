#!/usr/bin/env bash
# Follow the training log of one worker (or all) over ssh; Ctrl-C stops following, not training.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: launch/logs.sh [--worker N|all] [flags]

Follow ~/train.log (tail -F) on a worker.

  --worker N|all        which worker's log [QSTAR_WORKER], default 0
EOF_USAGE
  common_usage
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

on_workers "$QSTAR_WORKER" "tail -n 100 -F $REMOTE_LOG"
