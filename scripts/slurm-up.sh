#!/usr/bin/env bash
# Start (or reuse) a real single-node SLURM cluster on this machine, for the SLURM tests and for
# trying `snakemake --profile profiles/slurm` locally (`make slurm-up`; stop with `make slurm-down`).
#
# A thin wrapper around scripts/slurm/start-slurm.sh that fixes the project's defaults:
#   SLURM_LOCAL_DIR=/tmp/amorlip-slurm  state, logs and pid files (slurm-down.sh uses the same)
#   SLURM_FAKE_GPUS=2                   gres/gpu:2 backed by /dev/null, so GPU requests schedule
# Any other knob of start-slurm.sh (SLURM_WITH_DBD=1 for sacct, SLURM_PARTITION, ...) passes through.
# Idempotent: a running cluster from the same SLURM_LOCAL_DIR is reused.
#
# Needs root (it installs Debian's slurm packages and writes /etc/slurm, /etc/munge) and apt; it
# stops with a clear message otherwise, so callers (scripts/run-tests.sh) can skip SLURM tests.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export SLURM_LOCAL_DIR=${SLURM_LOCAL_DIR:-/tmp/amorlip-slurm}
export SLURM_FAKE_GPUS=${SLURM_FAKE_GPUS:-2}

if [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
  echo "slurm-up: this script installs Debian's slurm packages with apt; this machine is not Debian/apt." >&2
  echo "slurm-up: use your site's SLURM cluster instead (docs/slurm.md)." >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  # sudo only when it works without a password prompt (a test run must never block on one)
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n -E "$0" "$@"
  fi
  echo "slurm-up: must run as root (it installs packages, writes /etc/slurm and starts daemons)." >&2
  echo "slurm-up: run 'sudo make slurm-up', or skip: the SLURM tests skip when no cluster is up." >&2
  exit 1
fi

bash "$here/slurm/start-slurm.sh" "$@"
echo "slurm-up: cluster ready (SLURM_LOCAL_DIR=$SLURM_LOCAL_DIR). Try:"
echo "  .venv/bin/snakemake --profile profiles/slurm --configfile config/tiny.yaml"
