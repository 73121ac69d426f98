"""The one logger: stdlib `logging` under the name "pijepa", one line per message on stderr.

Lines keep the form the CLI always printed: the message itself ("resumed from ..."), or
"pijepa: warning: ..." for warnings. With several ranks only rank 0 prints (RankZeroFilter), unless a
message is logged with `extra={"all_ranks": True}` (e.g. a data reader's skipped samples, which
only the rank that saw them knows).
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

LOGGER_NAME = "pijepa"


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


class RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0 or bool(getattr(record, "all_ranks", False))


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"pijepa: warning: {message}"
        return message


def get_logger(name: str | None = None) -> logging.Logger:
    """The pijepa logger (or a child of it); the handler is set up once, on first use."""
    root = logging.getLogger(LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(_Stderr())
        handler.setFormatter(_LineFormatter())
        handler.addFilter(RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return root.getChild(name) if name else root


class _Stderr:
    """Writes to whatever sys.stderr is at the time (pytest's capture replaces it per test),
    through tqdm so that a progress bar on the terminal is cleared and redrawn around the line."""

    def write(self, text: str) -> int:
        tqdm.write(text, file=sys.stderr, end="")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def console(message: str) -> None:
    """An info line from rank 0."""
    get_logger().info(message)


def warn(message: str, all_ranks: bool = False) -> None:
    """A "warning: ..." line; from every rank that calls it when `all_ranks`."""
    get_logger().warning(message, extra={"all_ranks": all_ranks})
