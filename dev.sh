#!/usr/bin/env bash
# Set-up and the two everyday jobs. Creates .venv/ at the repo root on first use (and refreshes it
# when setup.py changes), then runs:
#   ./dev.sh pretrain [--set key=value ...]   the default pretraining job on CPU
#   ./dev.sh test [pytest args ...]           the whole test suite (slow tests included)
set -euo pipefail
cd "$(dirname "$0")"

ensure_venv() {
  local stamp=.venv/.pijepa-setup-stamp want
  want=$(sha256sum setup.py | cut -d' ' -f1)
  if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "dev.sh: installing pijepa and its dependencies into .venv/ (first run takes a few minutes)" >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch/torchvision are pinned in setup.py; this machine's pip finds them on local disk.
    .venv/bin/python -m pip install --quiet -e ".[dev,deepspeed,interop]"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  pretrain)
    ensure_venv
    exec .venv/bin/pijepa train --config configs/cpu_default.yaml "$@" ;;
  test)
    ensure_venv
    exec .venv/bin/python -m pytest "$@" ;;
  *)
    echo "usage: ./dev.sh pretrain [--set key=value ...] | ./dev.sh test [pytest args]" >&2
    exit 2 ;;
esac
