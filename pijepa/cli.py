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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pijepa", description="Probabilistic I-JEPA pretraining and evaluation")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="pretrain an encoder from a YAML config")
    train.add_argument("--config", required=True, help="YAML config file (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value; repeatable")
    train.set_defaults(run=_train)
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
