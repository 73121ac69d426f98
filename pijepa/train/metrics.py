"""Rank-0 logging: TensorBoard scalars, a CSV file and one console line per log step."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


class MetricsLogger:
    """Writes scalars to `run_dir/tb/` and `run_dir/metrics.csv` (appending across resumes)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.csv_path = Path(run_dir) / "metrics.csv"
        self._columns: list[str] | None = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        self._write_csv(step, scalars)

    def _write_csv(self, step: int, scalars: dict[str, float]) -> None:
        if self._columns is None:
            if self.csv_path.exists() and self.csv_path.stat().st_size:
                with self.csv_path.open() as f:
                    self._columns = next(csv.reader(f))
            else:
                self._columns = ["step", *scalars]
                with self.csv_path.open("w", newline="") as f:
                    csv.writer(f).writerow(self._columns)
        row = [step] + [scalars.get(c, "") for c in self._columns[1:]]
        with self.csv_path.open("a", newline="") as f:
            csv.writer(f).writerow(row)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
