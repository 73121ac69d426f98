#!/usr/bin/env bash
# One node, NPROC processes (one per GPU), any strategy (ddp, fsdp, deepspeed) under torchrun.
#
#   launchers/torchrun_single_node.sh NPROC [pijepa train arguments...]
#   MASTER_PORT=29500 launchers/torchrun_single_node.sh 8 --config configs/in1k_vith14_ep300.yaml \
#       --set dist.strategy=fsdp --set logging.folder=runs/vith14
#
# MASTER_PORT (default 29500) must be free; give concurrent jobs on one machine distinct ports.
# A failed rank restarts the job from `latest`, MAX_RESTARTS times at most (default 3; torchrun's
# --max-restarts). Relative paths in the arguments (--config, logging.folder, ...) are relative to
# the repo root.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [ $# -lt 1 ]; then usage; fi
NPROC=$1; shift
cd "$REPO"
exec "$(tool torchrun)" "${TORCHRUN_SIGNALS[@]}" "${TORCHRUN_RESTARTS[@]}" --nnodes 1 --nproc_per_node "$NPROC" --master_addr 127.0.0.1 \
  --master_port "${MASTER_PORT:-29500}" -m pijepa train "$@"
