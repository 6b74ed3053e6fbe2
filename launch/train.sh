#!/usr/bin/env bash
# Start training on every worker at once, in the background, logging to ~/train.log.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: launch/train.sh --workdir gs://BUCKET/RUN [flags] [--config.KEY=VALUE ...]

Start on every worker at once, in the background, with output to ~/train.log there:
  python -m qstar_jax.train --config=CONFIG --workdir=WORKDIR --config.distributed=True [overrides]

  --workdir gs://B/R    checkpoints and metrics, shared by all workers [QSTAR_WORKDIR], required
  --config PATH         config file in this repository [QSTAR_CONFIG], default configs/tpu_v4.py
  --config.KEY=VALUE    override a config field (any number of them), passed on as given
EOF_USAGE
  common_usage
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
require QSTAR_WORKDIR --workdir "training workdir"
[[ $QSTAR_WORKDIR == gs://?* ]] ||
  die "workdir must be a gs:// path that every worker can reach (got '$QSTAR_WORKDIR')"

train=$(quote "../$REMOTE_VENV/bin/python" -m qstar_jax.train --config="$QSTAR_CONFIG" \
  --workdir="$QSTAR_WORKDIR" --config.distributed=True)$OVERRIDES
running="pgrep -f $(quote "$TRAIN_PATTERN") >/dev/null"
busy="echo \"error: training already runs on \$(hostname): launch/stop.sh stops it\" >&2"
on_workers all "cd $REMOTE_DIR || exit 1" \
  "if $running; then $busy; exit 1; fi" \
  "nohup $train > ../$REMOTE_LOG 2>&1 < /dev/null &"
