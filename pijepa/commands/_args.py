"""Arguments shared by several commands, declared once."""

from __future__ import annotations

import argparse

from pijepa.runtime.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True, what: str = "") -> None:
    """`--config FILE_OR_NAME` and repeatable `--set section.key=value`."""
    help_text = "YAML config: a file, or a packaged name such as cpu_default or in22k_vith14_ep66"
    parser.add_argument("--config", required=required, default=None, help=help_text + (f"; {what}" if what else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable (values parsed as YAML)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check(condition: bool, message: str) -> None:
    """A command-line value that cannot work: one line, exit code 2."""
    if not condition:
        raise ConfigError(message)
