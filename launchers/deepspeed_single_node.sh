#!/usr/bin/env bash
# One node, NUM_GPUS processes, under DeepSpeed's own launcher (dist.strategy deepspeed).
#
#   launchers/deepspeed_single_node.sh NUM_GPUS [pijepa train arguments...]
#   MASTER_PORT=29500 launchers/deepspeed_single_node.sh 8 --config configs/in1k_vith14_ep300.yaml \
#       --set dist.strategy=deepspeed --set dist.deepspeed_config=ds_configs/zero2_bf16.json
#
# --no_local_rank: the launcher would otherwise append --local_rank=N to pijepa's arguments (the
# rank comes from the LOCAL_RANK environment variable, which it sets too). Without a GPU (CPU,
# gloo) --num_gpus is the number of processes; DS_ACCELERATOR=cpu is then set for quiet detection.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [ $# -lt 1 ]; then sed -n '2,10p' "$0" >&2; exit 2; fi
NUM_GPUS=$1; shift
cd "$REPO"
if ! "$(tool python)" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
exec "$(tool deepspeed)" --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module pijepa train "$@"
