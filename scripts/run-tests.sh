#!/usr/bin/env bash
# The full test suite. Starts the local SLURM cluster when this machine can (root on Debian), so
# the SLURM tests run rather than skip, and stops it afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
started=0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "${AMORLIP_NO_SLURM:-0}" != 1 ]; then
  if bash scripts/slurm-up.sh; then started=1; else echo "run-tests: SLURM cluster did not start; SLURM tests will skip" >&2; fi
fi
.venv/bin/pytest "$@"
rc=$?
[ $started = 1 ] && bash scripts/slurm-down.sh >/dev/null 2>&1
exit $rc
