# Sourced by the launchers: finds the repo and its tools. Not a launcher itself.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The repo's .venv when there is one, else whatever is on PATH.
tool() { if [ -x "$REPO/.venv/bin/$1" ]; then echo "$REPO/.venv/bin/$1"; else command -v "$1"; fi; }
# DeepSpeed JIT-compiles a small op on first start; keep it across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/pijepa-torch-extensions}"
# Prints the calling script's header comment (its usage) and exits with code 2.
usage() { sed -n '2,/^set /{/^#/p}' "$0" >&2; exit 2; }
