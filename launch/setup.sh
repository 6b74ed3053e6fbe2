#!/usr/bin/env bash
# Copy this checkout to every worker and install it there with the tpu extra.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
usage: launch/setup.sh [flags]

Copy the working tree (tracked and untracked files, minus what .gitignore ignores) to every
worker, then install it there into a Python 3.11 virtualenv made with uv (the TPU image's
python3 is too old for current jax): pip install -c constraints.txt -e '.[tpu]'.
Re-run it after changing code.
EOF_USAGE
  common_usage
}

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tarball=$tmp/$REMOTE_DIR.tar.gz
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
  tar -czf "$tarball" --null -T -)
tpus tpu-vm scp "$tarball" "$QSTAR_NAME:$REMOTE_DIR.tar.gz" --worker=all

uv=.local/bin/uv  # where uv's installer puts it
python=$REMOTE_VENV/bin/python
on_workers all "set -e" \
  "rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR" \
  "[ -x $uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh" \
  "[ -x $python ] || $uv venv --python 3.11 $REMOTE_VENV" \
  "$uv pip install --python $python -c $REMOTE_DIR/constraints.txt -e './${REMOTE_DIR}[tpu]'"
