"""A rank that waits too long ends itself, with evidence.

On 16+ GPUs one rank that hangs (a stuck file system, a dead NIC, a stopped process) holds every
other rank in its next collective. `StepWatchdog` watches the phases the trainer names (`data`,
`step`, `save`, ...): when one lasts longer than `dist.step_timeout_s`, a thread of the rank writes
the Python stacks of all its threads (faulthandler) to `RUN/hang/rank<r>.txt`, prints one line that
names the rank, the step and the phase, and ends the process with HUNG_EXIT_CODE, so that the
launcher (torchrun --max-restarts, the SLURM scripts) can restart the job from `latest`. Every rank
runs its own watchdog: the ranks that wait in a collective for the stuck one end themselves; the
stuck one, if it still runs Python threads, too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HUNG_EXIT_CODE = 124  # as timeout(1): the command ran out of time
HANG_DIR = "hang"


def stack_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HANG_DIR / f"rank{rank}.txt"


class StepWatchdog:
    """`with watchdog.phase("step", step=12): ...` arms it for that phase; 0 s disables it."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int, poll_s: float = 1.0) -> None:
        self.timeout_s, self.run_dir, self.rank, self.poll_s = timeout_s, Path(run_dir), rank, poll_s
        self._lock = threading.Lock()
        self._current: tuple[str, int, float] | None = None  # (phase, step, started)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="pijepa-watchdog", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def phase(self, name: str, step: int) -> Iterator[None]:
        with self._lock:
            self._current = (name, step, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._current = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                current = self._current
            if current is not None and time.monotonic() - current[2] > self.timeout_s:
                self._fire(*current)

    def _fire(self, name: str, step: int, started: float) -> None:
        path = stack_file(self.run_dir, self.rank)
        waited = time.monotonic() - started
        line = (f"pijepa: error: rank {self.rank}: step {step} stalled in phase '{name}' for {waited:.0f} s "
                f"(dist.step_timeout_s {self.timeout_s:g}); Python stacks of its threads in {path}; exiting "
                f"with code {HUNG_EXIT_CODE} so that the launcher can restart the job from the latest checkpoint")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w") as f:
                f.write(line + "\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:  # a full or stuck disk must not keep the rank alive
            line += f" (the stacks could not be written: {e})"
        # On a line of its own (a progress bar may hold the current one); not through tqdm, whose
        # lock the stalled thread may hold.
        print("\n" + line, file=sys.stderr, flush=True)
        os._exit(HUNG_EXIT_CODE)  # other threads may hold locks a normal exit would wait for
