"""`pijepa train`: pretrain an encoder from a config."""

from __future__ import annotations

import argparse

from pijepa.commands._args import add_config_arguments


def run(args: argparse.Namespace) -> int:
    from pijepa.config import load_config
    from pijepa.train.trainer import Trainer

    trainer = Trainer(load_config(args.config, args.overrides))
    try:
        return trainer.train()  # 0, or PREEMPTED_EXIT_CODE: saved, rerun to resume
    finally:
        trainer.close()


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="pretrain an encoder from a YAML config")
    add_config_arguments(parser)
    parser.set_defaults(run=run, command_name="train")
