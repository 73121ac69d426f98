"""What stops a run early, and how: preemption signals and non-finite steps.

- Preemption: SIGTERM (what schedulers and launchers send before killing) and SIGUSR1 (SLURM's
  `--signal` warning) only set a flag. The trainer checks it after every step (agreed over ranks,
  so all ranks stop after the same step), saves a checkpoint and exits with PREEMPTED_EXIT_CODE,
  which the SLURM scripts take as "requeue me"; auto-resume picks the run up.
- Non-finite loss or gradients: the step is skipped (no optimizer or EMA update) and counted;
  `optimization.max_nonfinite_steps` skips in a row stop the run with NonFiniteError.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeAlias

from pijepa.runtime.errors import NonFiniteError

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
# The run diverged: retrying from the same checkpoint with the same settings will not help.
NONFINITE_EXIT_CODE = NonFiniteError.exit_code

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# What signal.signal takes and returns: a function, SIG_DFL / SIG_IGN, or None (set outside Python).
SignalHandler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class PreemptionFlag:
    """Records SIGTERM / SIGUSR1 while installed; restores the previous handlers on `uninstall`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, SignalHandler] = {}

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Only a flag: the step in flight finishes, collectives stay in lock-step on every rank.
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def ignore_preemption_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: a scheduler may signal every process of the job, and a worker
    killed by SIGTERM/SIGUSR1 would crash the trainer before it saves. Workers ignore them; the
    trainer stops them when it exits (and they exit on their own when it dies)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_exit_hook_installed = False


def stop_workers_at_exit() -> None:
    """Called in the main process by the loaders that start workers with ignore_preemption_signals.

    At interpreter exit, multiprocessing terminates its daemonic children with SIGTERM and then
    joins them; workers that ignore SIGTERM would make that join wait forever whenever a loader
    iterator is still alive at exit (e.g. kept by the traceback of an uncaught exception). atexit
    runs the handlers registered last first, so this one (registered after multiprocessing's)
    kills them before multiprocessing joins them: the main process is exiting anyway."""
    global _exit_hook_installed
    if not _exit_hook_installed:
        atexit.register(_kill_daemonic_children)
        _exit_hook_installed = True


def _kill_daemonic_children() -> None:
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children and threading.current_thread() is threading.main_thread():
        # DataLoader's SIGCHLD handler would report each killed worker as a crash: a second
        # traceback after the run's own last line. The process is exiting: nothing to report.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
