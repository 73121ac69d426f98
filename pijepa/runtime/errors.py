"""What a user can fix: the UserError family, printed by the CLI as one line with exit code 2.

Every other exception is a bug (or an environment failure) and keeps its traceback. The family
subclasses ValueError so that library callers that caught ValueError for bad input keep working;
the CLI itself catches only UserError, never a bare ValueError.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input that cannot be used as given; the message names the file, key or shard and what is
    expected."""

    exit_code = 2


class ConfigError(UserError):
    """A config that cannot run: YAML, a key, a value, a combination of values or a --set."""


class DataError(UserError):
    """Data that cannot be read as given: a folder, a tar, a shard spec, an index file."""


class CheckpointError(UserError):
    """A checkpoint (or encoder file) that exists but does not fit: another architecture, strategy
    or format, or a path that holds no checkpoint."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or folder that does not exist (still a FileNotFoundError for callers that catch
    that)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint or encoder file that does not exist (still a FileNotFoundError)."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written: the disk is full, a quota is reached, the file system
    failed. Exit code 74 (EX_IOERR): a restart alone does not help; free space, then rerun."""

    exit_code = 74


# errno values of a failed write: no space, quota exceeded, an I/O error, a read-only file system.
WRITE_ERRNOS = frozenset({28, 122, 5, 30})  # ENOSPC, EDQUOT, EIO, EROFS (Linux)
# What torch's zip writer and DCP say when the disk fills under them (not an OSError).
WRITE_FAILURE_TEXT = ("No space left on device", "unexpected pos", "basic_ios::clear", "iostream error",
                      "failed writing file", "file write failed", "Disk quota exceeded")


def write_error(error: BaseException) -> BaseException | None:
    """The failed write behind `error` (itself, a cause or context, or one of the per-rank failures
    DCP gathers), or None when `error` is not one."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e
        if isinstance(e, RuntimeError) and any(text in str(e) for text in WRITE_FAILURE_TEXT):
            return e
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: exception}
        if isinstance(failures, dict):
            todo += [x for x in failures.values() if isinstance(x, BaseException)]
    return None


class LaunchError(UserError):
    """A launch that cannot work: a missing launcher environment, a missing optional package."""


class NonFiniteError(RuntimeError):
    """The run stopped because its loss, gradients or parameters are not finite (exit code 4:
    retrying from the same checkpoint with the same settings will not help)."""

    exit_code = 4


def without_worker_traceback(error: UserError) -> UserError:
    """`error`, or, when a DataLoader worker raised it, a new error of its class with the message
    alone. DataLoader raises a worker's error again with the worker's whole traceback as its
    message, and the CLI prints a UserError as one line. The old error's traceback is dropped: its
    frames hold the DataLoader iterator in a reference cycle, which would keep the workers alive
    until a garbage collection that may never come."""
    text = str(error).rstrip()
    if "\nOriginal Traceback" not in text:
        return error
    error.__traceback__ = None
    last = text.splitlines()[-1]  # "pijepa.runtime.errors.DataError: <message>"
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    return type(error)(last.removeprefix(prefix) if last.startswith(prefix) else last.split(": ", 1)[-1])
