#!/usr/bin/env bash
# Several nodes under torchrun: run this once on EVERY node, with the same MASTER_HOST/PORT and
# NNODES and each node's own NODE_RANK (0 on the node at MASTER_HOST).
#
#   launchers/torchrun_multi_node.sh NNODES NODE_RANK NPROC_PER_NODE MASTER_HOST MASTER_PORT \
#       [pijepa train arguments...]
#   # 2 nodes x 8 GPUs, on node 0 (10.0.0.1) and node 1:
#   launchers/torchrun_multi_node.sh 2 0 8 10.0.0.1 29500 --config configs/in22k_vitg16_ep44.yaml --set ...
#   launchers/torchrun_multi_node.sh 2 1 8 10.0.0.1 29500 --config configs/in22k_vitg16_ep44.yaml --set ...
#
# Static rendezvous (node ranks fixed by NODE_RANK): MASTER_HOST:MASTER_PORT must be reachable from
# every node. The run folder (logging.folder) must be on a filesystem all nodes share: every rank
# writes its part of each checkpoint into it. Under SLURM see slurm_torchrun.sbatch.
# A failed rank restarts the job from `latest`, MAX_RESTARTS times at most (default 3; torchrun's
# --max-restarts). Relative paths in the arguments (--config, logging.folder, ...) are relative to
# the repo root.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [ $# -lt 5 ]; then usage; fi
NNODES=$1; NODE_RANK=$2; NPROC=$3; MASTER_HOST=$4; PORT=$5; shift 5
cd "$REPO"
exec "$(tool torchrun)" "${TORCHRUN_SIGNALS[@]}" "${TORCHRUN_RESTARTS[@]}" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_HOST" --master_port "$PORT" -m pijepa train "$@"
