#!/usr/bin/env bash
# Vendored from the project's shared CI scripts (stop-slurm.sh; see
# scripts/slurm/start-slurm.sh for why). Call it through scripts/slurm-down.sh (`make slurm-down`).
# Local changes: none beyond this header.
# stop-slurm.sh -- stop what start-slurm.sh started, by PID file only.
# Usage: stop-slurm.sh [--purge]   (--purge also deletes $SLURM_LOCAL_DIR)
set -uo pipefail

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo -E "$0" "$@"; fi
  echo "stop-slurm.sh: must run as root" >&2; exit 1
fi
BASE=${SLURM_LOCAL_DIR:-/tmp/slurm-local}

alive() {
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || return 1
  local st; st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$st" ] && [ "$st" != Z ]
}

# cancel remaining jobs first so that no slurmstepd is left behind
if [ -s "$BASE/run/slurmctld.pid" ] && alive "$(cat "$BASE/run/slurmctld.pid")"; then
  jobs=$(squeue -h -o '%i' 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 20); do [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

# name of pid file == expected /proc/PID/comm; order matters
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  pf="$BASE/run/$name.pid"
  [ -s "$pf" ] || continue
  pid=$(cat "$pf")
  if alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    echo "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do alive "$pid" || break; sleep 0.5; done
    if alive "$pid"; then echo "  $name still alive, SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$pf"
done

if [ "${1:-}" = "--purge" ]; then
  rm -rf "$BASE"
  echo "removed $BASE"
fi
