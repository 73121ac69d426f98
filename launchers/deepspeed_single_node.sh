#!/usr/bin/env bash
# One node, NUM_GPUS processes, under DeepSpeed's own launcher (dist.strategy deepspeed).
#
#   launchers/deepspeed_single_node.sh NUM_GPUS [pijepa train arguments...]
#   MASTER_PORT=29500 launchers/deepspeed_single_node.sh 8 --config configs/in1k_vith14_ep300.yaml \
#       --set dist.strategy=deepspeed --set dist.deepspeed_config=ds_configs/zero2_bf16.json
#
# --no_local_rank: the launcher would otherwise append --local_rank=N to pijepa's arguments (the
# rank comes from the LOCAL_RANK environment variable, which it sets too). Without a GPU, DeepSpeed
# detects the "cpu" accelerator by itself (with a warning; DS_ACCELERATOR=cpu says it up front),
# --num_gpus is then the number of processes, and they communicate over gloo.
# A failed run restarts from `latest`, MAX_RESTARTS times at most (default 3; a user error, a
# diverged run and a preemption are not restarted). Relative paths in the arguments (--config,
# logging.folder, ...) are relative to the repo root.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [ $# -lt 1 ]; then usage; fi
NUM_GPUS=$1; shift
cd "$REPO"
run_with_restarts "$(tool deepspeed)" --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module pijepa train "$@"
