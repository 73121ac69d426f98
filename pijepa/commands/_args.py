"""Arguments shared by several commands, declared once."""

from __future__ import annotations

import argparse

from pijepa.runtime.errors import ConfigError


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True, what: str = "",
                         default: str | None = None, set_help: str = "override one config value; repeatable") -> None:
    """`--config FILE_OR_NAME` and repeatable `--set section.key=value`."""
    help_text = "YAML config: a file, or a packaged name such as cpu_default or in22k_vith14_ep66"
    if default is not None:
        help_text += f" (default {default})"
    parser.add_argument("--config", required=required and default is None, default=default,
                        help=help_text + (f"; {what}" if what else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=set_help + " (values parsed as YAML)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def device_name(text: str) -> str:
    """A device torch can use here: cpu, cuda, cuda:1, ... (returned as given)."""
    import torch  # imported here: parsing other arguments does not need it

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    return text


def check(condition: bool, message: str) -> None:
    """A command-line value that cannot work: one line, exit code 2."""
    if not condition:
        raise ConfigError(message)
