"""`pijepa <command>`: a thin entry point. Every command is a module of pijepa.commands with a
`register(commands)` function; this file only lists them and reports their errors."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pijepa.runtime.errors import NonFiniteError, UserError

# Modules of pijepa.commands, in the order `pijepa --help` lists their commands
# (evaluate registers `features` and `eval`).
COMMANDS = ("train", "export", "shards", "evaluate", "viz", "bench", "plan", "reproduce")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pijepa", description="Probabilistic I-JEPA pretraining and evaluation")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pijepa.commands.{name}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except (UserError, NonFiniteError) as e:
        # Bad input (exit 2) or a diverged run (exit 4): one clear line, no traceback
        # (PIJEPA_DEBUG=1 shows it). Any other exception is a bug and keeps its traceback.
        if os.environ.get("PIJEPA_DEBUG"):
            raise
        print(f"pijepa {args.command_name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
