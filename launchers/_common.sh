# Sourced by the launchers: finds the repo and its tools. Not a launcher itself.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The repo's .venv when there is one, else whatever is on PATH.
tool() { if [ -x "$REPO/.venv/bin/$1" ]; then echo "$REPO/.venv/bin/$1"; else command -v "$1"; fi; }
# DeepSpeed JIT-compiles a small op on first start; keep it across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/pijepa-torch-extensions}"
# The context and target lengths change every step, so the CUDA caching allocator would fragment;
# expandable segments avoid that (no effect on CPU). Multi-node: with several network interfaces,
# set NCCL_SOCKET_IFNAME (NCCL) and GLOO_SOCKET_IFNAME (gloo: the asynchronous checkpoint saves and
# CPU runs) to the interface the nodes reach each other on, e.g. `export NCCL_SOCKET_IFNAME=ib0`.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# Preemption: the trainers save and exit with code 75 on SIGTERM or SIGUSR1. torchrun forwards
# both to its workers (and waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT s for the save instead of
# 30 s); DeepSpeed's launcher would die of SIGUSR1, so the launchers ignore it (the trainers
# install their own handler) and the workers receive it directly (SLURM signals the whole step).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}"
TORCHRUN_SIGNALS=(--signals_to_handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
trap '' USR1
# A rank that dies (a GPU or node failure, an OOM, a watchdog exit) restarts the job from `latest`
# without a person, up to MAX_RESTARTS times (default 3; 0 disables): torchrun's own
# --max-restarts, and run_with_restarts below for DeepSpeed's launcher, which has none.
MAX_RESTARTS="${MAX_RESTARTS:-3}"
TORCHRUN_RESTARTS=(--max-restarts "$MAX_RESTARTS")
# Exit codes a restart cannot help: a user error (2), a diverged run (4), a failed checkpoint write
# (74: a full disk stays full), a preemption (75: the
# scheduler requeues the job).
NO_RESTART_CODES=" 2 4 74 75 "
# Runs "$@" again after a failure, MAX_RESTARTS times at most, forwarding SIGTERM, SIGINT and
# SIGHUP to it (the trainers save on SIGTERM and exit 75); returns its last exit code.
run_with_restarts() {
  local attempt=0 code child
  trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
  while true; do
    "$@" & child=$!
    while true; do  # wait returns early when a trapped signal arrives
      code=0; wait "$child" || code=$?
      kill -0 "$child" 2>/dev/null || break
    done
    if [ "$code" -eq 0 ] || [[ "$NO_RESTART_CODES" == *" $code "* ]] || [ "$attempt" -ge "$MAX_RESTARTS" ]; then
      return "$code"
    fi
    attempt=$((attempt + 1))
    echo "pijepa: the job exited with code $code; restart $attempt of $MAX_RESTARTS from the latest checkpoint" >&2
  done
}
# Prints the calling script's header comment (its usage) and exits with code 2.
usage() { sed -n '2,/^set /{/^#/p}' "$0" >&2; exit 2; }
