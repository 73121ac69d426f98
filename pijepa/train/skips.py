"""Non-finite steps counted on the device, so that the hot path never waits for the host: the
strategy decides a skip on the device (pijepa.parallel.base.step_if_finite), this counts it there,
and the trainer reads the counts only at its check points (every logging.check_freq steps, log and
checkpoint steps), where it warns or stops."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SkipCounts:
    in_a_row: int  # skipped steps in a row, ending at the last step
    worst_in_a_row: int  # the longest run since the previous read
    total: int  # skipped steps in this process


class SkipCounter:
    def __init__(self, device: torch.device) -> None:
        # [in a row now, longest run since the last read, total]
        self._counts = torch.zeros(3, dtype=torch.int64, device=device)

    def add(self, applied: torch.Tensor) -> None:
        """In place on the device: no host sync, no new tensor kept per step."""
        skipped = (~applied.to(self._counts.device, non_blocking=True)).long()
        in_a_row, worst, total = self._counts  # views
        in_a_row.add_(skipped).mul_(skipped)
        torch.maximum(worst, in_a_row, out=worst)
        total.add_(skipped)

    def read(self) -> SkipCounts:
        """The counts (one host sync); the longest run restarts from the current one."""
        in_a_row, worst, total = self._counts.tolist()
        self._counts[1] = self._counts[0]
        return SkipCounts(in_a_row, worst, total)
