"""What stops a run early, and how: preemption signals and non-finite steps.

- Preemption: SIGTERM (what schedulers and launchers send before killing) and SIGUSR1 (SLURM's
  `--signal` warning) only set a flag. The trainer checks it after every step (agreed over ranks,
  so all ranks stop after the same step), saves a checkpoint and exits with PREEMPTED_EXIT_CODE,
  which the SLURM scripts take as "requeue me"; auto-resume picks the run up.
- Non-finite loss or gradients: the step is skipped (no optimizer or EMA update) and counted;
  `optimization.max_nonfinite_steps` skips in a row stop the run with NonFiniteError.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from pijepa.runtime.errors import NonFiniteError

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
# The run diverged: retrying from the same checkpoint with the same settings will not help.
NONFINITE_EXIT_CODE = NonFiniteError.exit_code

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Records SIGTERM / SIGUSR1 while installed; restores the previous handlers on `uninstall`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

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
