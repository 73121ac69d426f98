#!/usr/bin/env bash
# Several nodes under DeepSpeed's launcher, from a hostfile (see hostfile.example).
#
#   launchers/deepspeed_multi_node.sh HOSTFILE MASTER_HOST MASTER_PORT [pijepa train arguments...]
#
# Two ways to start it:
#   - from ONE node, with passwordless ssh to all hosts (pdsh, DeepSpeed's default): DeepSpeed
#     starts every node's processes itself.
#       launchers/deepspeed_multi_node.sh launchers/hostfile 10.0.0.1 29500 --config ... --set ...
#   - on EVERY node, without ssh (SLURM, containers): set NODE_RANK to the node's line in the
#     hostfile (0-based); each node starts only its own processes (--no_ssh --node_rank).
#       NODE_RANK=1 launchers/deepspeed_multi_node.sh launchers/hostfile 10.0.0.1 29500 --config ...
#
# Every node needs the repo at the same path and the run folder (logging.folder) on a shared
# filesystem. Variables to export to remote nodes go into ~/.deepspeed_env (ssh mode).
# A failed run restarts from `latest`, MAX_RESTARTS times at most (default 3; a user error, a
# diverged run and a preemption are not restarted). Relative paths in the arguments (--config,
# logging.folder, ...) are relative to the repo root.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [ $# -lt 3 ]; then usage; fi
HOSTFILE=$(realpath "$1"); MASTER_HOST=$2; PORT=$3; shift 3
cd "$REPO"
MODE=()
if [ -n "${NODE_RANK:-}" ]; then MODE=(--no_ssh --node_rank "$NODE_RANK"); fi
run_with_restarts "$(tool deepspeed)" --hostfile "$HOSTFILE" "${MODE[@]}" --master_addr "$MASTER_HOST" \
  --master_port "$PORT" --no_local_rank --module pijepa train "$@"
