"""The measured results of `pijepa reproduce` and their Markdown tables: accuracies per arm, dataset
and metric (read from the evaluations' JSON files), paired comparisons, pretraining losses, timings."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pijepa.commands.reproduce.spec import EVAL_SETS, METRICS, RANDOM, Arm, Layout, Metric

# results[arm key][dataset][metric key] = per-seed accuracies (%), in seed order
Results = dict[str, dict[str, dict[str, list[float]]]]
CLEAR_POINTS = 0.5  # a difference is "clear" when its paired mean is > 2 std and > this many points


def read_metrics(csv_path: Path) -> dict[str, list[float]]:
    """A run's metrics.csv as columns of numbers (non-numeric cells left out)."""
    cols: dict[str, list[float]] = {}
    if not csv_path.is_file():
        return cols
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                try:
                    cols.setdefault(key, []).append(float(value))
                except (TypeError, ValueError):
                    pass
    return cols


def _accuracy(eval_dir: Path, metric: Metric) -> float:
    if metric.protocol == "linear":
        return float(json.loads((eval_dir / "linear.json").read_text())["top1"])
    top1 = json.loads((eval_dir / "knn.json").read_text())["protocols"][metric.protocol]["top1"]
    return float(top1[str(metric.k)])


def collect(layout: Layout, arms: tuple[Arm, ...], seeds: list[int]) -> Results:
    return {a.key: {ev.name: {m.key: [_accuracy(layout.eval_dir(a.name(seed), ev.name), m) for seed in seeds]
                              for m in METRICS} for ev in EVAL_SETS} for a in arms}


def linear_results(layout: Layout, arms: tuple[Arm, ...], seeds: list[int]) -> list[dict[str, Any]]:
    """Every linear probe's result file, as the evaluations wrote it (or kept it from an earlier run)."""
    return [json.loads((layout.eval_dir(a.name(seed), ev.name) / "linear.json").read_text())
            for a in arms for seed in seeds for ev in EVAL_SETS]


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def fmt_diff(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:+.2f} ± {s:.2f}"


def clear_gain(diffs: list[float]) -> bool:
    md, sd = mean_std(diffs)
    return len(diffs) > 1 and abs(md) > 2 * sd and abs(md) > CLEAR_POINTS


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def accuracy_table(results: Results, arms: tuple[Arm, ...]) -> str:
    return table(["encoder", "dataset", *(m.label for m in METRICS)],
                 [[a.label, ev.name, *(fmt(results[a.key][ev.name][m.key]) for m in METRICS)]
                  for a in arms for ev in EVAL_SETS])


def per_seed_table(results: Results, arms: tuple[Arm, ...], seeds: list[int]) -> str:
    return table(["encoder", "dataset", "metric", *(f"seed {x}" for x in seeds)],
                 [[a.key, ev.name, m.label, *(f"{v:.2f}" for v in results[a.key][ev.name][m.key])]
                  for a in arms for ev in EVAL_SETS for m in METRICS])


@dataclass(frozen=True)
class Cell:
    """One dataset x metric of a paired comparison: `cand − base` per seed."""

    dataset: str
    metric: Metric
    base: list[float]
    cand: list[float]

    @property
    def diffs(self) -> list[float]:
        return [y - x for x, y in zip(self.base, self.cand)]

    @property
    def sign(self) -> int:
        """+1 / -1 when the candidate is clearly higher / lower, 0 when there is no clear difference."""
        md = mean_std(self.diffs)[0]
        return (1 if md > 0 else -1) if clear_gain(self.diffs) else 0

    def verdict(self, base: str, cand: str) -> str:
        md = mean_std(self.diffs)[0]
        if self.sign:
            return f"**{cand if self.sign > 0 else base}** clearly higher"
        if len(self.diffs) < 2:
            return "no clear difference (one seed: no spread)"
        return ("no clear difference" if md == 0 else
                f"no clear difference ({cand if md > 0 else base} higher by < 2 std or < {CLEAR_POINTS} pt)")

    def as_dict(self) -> dict[str, Any]:
        md, sd = mean_std(self.diffs)
        return {"dataset": self.dataset, "metric": self.metric.key, "diffs": self.diffs, "mean": md, "std": sd,
                "clear": self.sign}


def paired(results: Results, base: str, cand: str) -> list[Cell]:
    return [Cell(ev.name, m, results[base][ev.name][m.key], results[cand][ev.name][m.key])
            for ev in EVAL_SETS for m in METRICS]


def verdict_line(base: str, cand: str, cells: list[Cell]) -> str:
    """The comparison's verdict from its cells: "clear" only where |paired mean| > 2 std and > CLEAR_POINTS."""
    n, seeds = len(cells), len(cells[0].diffs) if cells else 0
    avg = sum(mean_std(c.diffs)[0] for c in cells) / max(n, 1)
    head = f"{cand} vs {base}"
    if seeds < 2:
        return (f"Verdict {head}: **no clear difference can be stated from one seed** (the seed spread is "
                f"unknown); mean paired difference {avg:+.2f} points over the {n} dataset × metric cells.")
    up = [f"{c.dataset} {c.metric.key}" for c in cells if c.sign > 0]
    down = [f"{c.dataset} {c.metric.key}" for c in cells if c.sign < 0]
    if not up and not down:
        return (f"Verdict {head}: **no clear difference** in any of the {n} dataset × metric cells (none has "
                f"|paired mean| > 2 × seed std and > {CLEAR_POINTS} points; mean difference {avg:+.2f}).")
    parts = [f"{cand} **clearly higher** in {len(up)} of {n} cells ({', '.join(up)})" if up else "",
             f"**clearly lower** in {len(down)} ({', '.join(down)})" if down else "",
             f"no clear difference in {n - len(up) - len(down)}"]
    return f"Verdict {head}: " + "; ".join(x for x in parts if x) + f" (mean difference {avg:+.2f} points)."


def comparison(results: Results, base: Arm, cand: Arm) -> tuple[str, dict[str, Any]]:
    """The `cand − base` section: paired differences per dataset and metric, and its verdict line."""
    cells = paired(results, base.key, cand.key)
    rows = [[c.dataset, c.metric.label, fmt(c.base), fmt(c.cand), fmt_diff(c.diffs), c.verdict(base.key, cand.key)]
            for c in cells]
    verdict = verdict_line(base.key, cand.key, cells)
    text = "\n".join([
        f"## {base.label} vs {cand.label}, as measured", "",
        f"Difference {cand.key} − {base.key} paired by seed (mean ± std); \"clear\" means |mean| > 2 std and "
        f"> {CLEAR_POINTS} points.", "",
        table(["dataset", "metric", base.key, cand.key, f"{cand.key} − {base.key}", "verdict"], rows), "",
        f"{verdict}", ""])
    return text, {"base": base.key, "candidate": cand.key, "verdict": verdict.replace("**", ""),
                  "cells": [c.as_dict() for c in cells]}


def random_section(results: Results, arms: tuple[Arm, ...]) -> tuple[str, list[dict[str, Any]]]:
    """Every pretrained arm against the random encoder of its seed: one table, one verdict line per arm."""
    rows, verdicts, records = [], [], []
    for a in arms:
        cells = paired(results, RANDOM.key, a.key)
        rows += [[a.key, c.dataset, c.metric.label, fmt(c.base), fmt(c.cand), fmt_diff(c.diffs),
                  c.verdict(RANDOM.key, a.key)] for c in cells]
        verdicts.append("- " + verdict_line(RANDOM.key, a.key, cells))
        records.append({"base": RANDOM.key, "candidate": a.key, "verdict": verdicts[-1][2:].replace("**", ""),
                        "cells": [c.as_dict() for c in cells]})
    text = "\n".join([table(["encoder", "dataset", "metric", RANDOM.key, "encoder's", f"encoder − {RANDOM.key}",
                             "verdict"], rows), "", *verdicts])
    return text, records


def final_losses(layout: Layout, arms: tuple[Arm, ...], seeds: list[int]) -> dict[str, dict[str, float]]:
    """The last logged values of every pretraining run's metrics.csv."""
    res: dict[str, dict[str, float]] = {}
    for a in arms:
        for seed in seeds:
            m = read_metrics(layout.run_dir(a.name(seed)) / "metrics.csv")
            if m.get("step"):
                res[a.name(seed)] = {k: m[k][-1] for k in ("step", "loss", "loss_l2", "loss_pkt") if k in m}
    return res


def final_loss_table(finals: dict[str, dict[str, float]]) -> str:
    nan = float("nan")
    return table(["run", "step", "loss", "L2 term", "PKT term"],
                 [[name, str(int(f.get("step", 0))), f"{f.get('loss', nan):.4f}", f"{f.get('loss_l2', nan):.4f}",
                   f"{f.get('loss_pkt', nan):.3g}"] for name, f in finals.items()])


def grouped_timings(timings: dict[str, float]) -> str:
    """Per-encoder sums: `features/L2_s0/cifar10_train` -> `features/L2_s0 (4 feature files)`."""
    groups: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, sec in timings.items():
        parts = name.split("/")
        key = "/".join(parts[:2]) if parts[0] in ("features", "eval") else name
        groups[key] = groups.get(key, 0.0) + sec
        counts[key] = counts.get(key, 0) + 1
    labels = {"features": "feature files", "eval": "evaluations"}
    rows = [[f"{k} ({counts[k]} {labels[k.split('/')[0]]})" if k.split("/")[0] in labels else k, f"{v:.1f}"]
            for k, v in groups.items()]
    if timings:
        rows.append(["**sum of the stages**", f"{sum(timings.values()):.1f}"])
    return table(["stage", "s"], rows)
