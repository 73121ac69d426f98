"""`python -m tests.faults ARGS` is `pijepa ARGS` on a disk that fills up: every write into the folder
of the checkpoint of step PIJEPA_FAULT_SAVE_STEP fails with ENOSPC, whichever way it is written
(torch.save to a path, which torch writes from C++; Python's open, which DCP and DeepSpeed's files
use). Fault injection for the tests of failed saves on several ranks (test_disk_full.py)."""

import builtins
import errno
import io
import os
import sys

import torch

MARK = f"step_{int(os.environ['PIJEPA_FAULT_SAVE_STEP']):08d}.tmp"


def _full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


_open, _save = builtins.open, torch.save


def failing_open(file, mode="r", *args, **kwargs):
    if MARK in str(file) and any(c in mode for c in "wax+"):
        raise _full(file)
    return _open(file, mode, *args, **kwargs)


def failing_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and MARK in str(f):
        raise _full(f)
    return _save(obj, f, *args, **kwargs)


builtins.open = io.open = failing_open
torch.save = failing_save

if __name__ == "__main__":
    from pijepa.cli import main

    sys.exit(main(sys.argv[1:]))
