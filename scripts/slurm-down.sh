#!/usr/bin/env bash
# Stop the local SLURM cluster that scripts/slurm-up.sh started (`make slurm-down`): cancels its
# jobs, then stops the daemons by PID file only (never by name, so other services are untouched).
# Pass --purge to also delete SLURM_LOCAL_DIR (state, logs). Harmless when nothing runs.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export SLURM_LOCAL_DIR=${SLURM_LOCAL_DIR:-/tmp/amorlip-slurm}
if [ ! -d "$SLURM_LOCAL_DIR/run" ]; then
  echo "slurm-down: no cluster state in $SLURM_LOCAL_DIR; nothing to stop."
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n -E "$0" "$@"
  fi
  echo "slurm-down: must run as root (the daemons run as root)." >&2
  exit 1
fi
exec bash "$here/slurm/stop-slurm.sh" "$@"
