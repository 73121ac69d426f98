"""`pijepa <command>`: a thin entry point; each command lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys

from pijepa.config import ConfigError


def _train(args: argparse.Namespace) -> None:
    from pijepa.config import load_config
    from pijepa.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


def _shards_write(args: argparse.Namespace) -> None:
    from pijepa.data.shards import run_shards_write

    code = run_shards_write(args)
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pijepa", description="Probabilistic I-JEPA pretraining and evaluation")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="pretrain an encoder from a YAML config")
    train.add_argument("--config", required=True, help="YAML config file (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value; repeatable")
    train.set_defaults(run=_train)

    shards = commands.add_parser("shards", help="WebDataset shards: write from ImageFolder trees or per-class tars")
    shards_commands = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    write = shards_commands.add_parser("write", help="convert images to shuffled WebDataset shards + shards.json")
    from pijepa.data.shards import add_shards_arguments
    add_shards_arguments(write)
    write.set_defaults(run=_shards_write)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # Bad input: one clear line, no traceback (PIJEPA_DEBUG=1 shows it).
        if os.environ.get("PIJEPA_DEBUG"):
            raise
        print(f"pijepa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
