#!/usr/bin/env bash
# Stop training on every worker: SIGTERM, up to 30 s to exit, then SIGKILL.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: launch/stop.sh [flags]

Stop the training job on every worker (pkill; SIGKILL if it is still running 30 s later).
Saved checkpoints stay in the workdir; the TPU stays up (launch/delete.sh removes it).
EOF_USAGE
  common_usage
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

pattern=$(quote "$TRAIN_PATTERN")
on_workers all "pkill -f $pattern || exit 0" \
  "for _ in \$(seq 30); do pgrep -f $pattern >/dev/null || exit 0; sleep 1; done" \
  "pkill -KILL -f $pattern || true"
