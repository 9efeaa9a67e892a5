#!/usr/bin/env bash
# The full test suite. Starts the local SLURM cluster when this machine can (root on Debian), so
# the SLURM tests run rather than skip, and stops it afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."

# The suite writes shards, checkpoints and MLflow stores under $TMPDIR (peak about 1.5 GiB, measured on a
# full run). On a nearly full disk every test that makes a folder errors at once, which reads like a
# broken suite: say so up front instead.
tmp="${TMPDIR:-/tmp}"
free_kib=$(df -Pk "$tmp" | awk 'NR==2 {print $4}')
echo "run-tests: $((free_kib / 1024)) MiB free in $tmp"
if [ "${free_kib:-0}" -lt $((3 * 1024 * 1024)) ]; then
  echo "run-tests: only $((free_kib / 1024)) MiB free in $tmp; the suite needs about 3 GiB there." \
       "Free some space or point TMPDIR at a larger disk." >&2
  exit 1
fi

started=0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "${AMORLIP_NO_SLURM:-0}" != 1 ]; then
  if bash scripts/slurm-up.sh; then started=1; else echo "run-tests: SLURM cluster did not start; SLURM tests will skip" >&2; fi
fi
.venv/bin/pytest "$@"
rc=$?
[ $started = 1 ] && bash scripts/slurm-down.sh >/dev/null 2>&1
exit $rc
