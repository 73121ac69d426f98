"""A rehearsal of a run at its real world size before any GPU is spent: the real strategy and train
step run in one process on fake tensors with a fake process group (trace.py), set beside the
planner's prediction (compare.py), printed as a table or JSON (report.py). Every private torch API
it needs is in pijepa.runtime.torch_private."""

from __future__ import annotations

from pijepa.rehearsal.compare import Comparison, rehearse
from pijepa.rehearsal.report import comparison_to_json, format_comparison, not_fitting

__all__ = ["Comparison", "comparison_to_json", "format_comparison", "not_fitting", "rehearse"]
