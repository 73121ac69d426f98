"""The measured results of `pijepa reproduce` and their Markdown tables: accuracies per arm, dataset
and metric (read from the evaluations' JSON files), paired comparisons, pretraining losses, timings."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from pijepa.commands.reproduce.spec import ARMS, COMPARISONS, EVAL_SETS, METRICS, RANDOM, Layout, Metric, all_arms, arm

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


def collect(layout: Layout, seeds: list[int]) -> Results:
    return {a.key: {ev.name: {m.key: [_accuracy(layout.eval_dir(a.name(seed), ev.name), m) for seed in seeds]
                              for m in METRICS} for ev in EVAL_SETS} for a in all_arms()}


def linear_results(layout: Layout, seeds: list[int]) -> list[dict[str, Any]]:
    """Every linear probe's result file, as the evaluations wrote it (or kept it from an earlier run)."""
    return [json.loads((layout.eval_dir(a.name(seed), ev.name) / "linear.json").read_text())
            for a in all_arms() for seed in seeds for ev in EVAL_SETS]


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def clear_gain(diffs: list[float]) -> bool:
    md, sd = mean_std(diffs)
    return len(diffs) > 1 and abs(md) > 2 * sd and abs(md) > CLEAR_POINTS


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def accuracy_table(results: Results) -> str:
    return table(["encoder", "dataset", *(m.label for m in METRICS)],
                 [[a.label, ev.name, *(fmt(results[a.key][ev.name][m.key]) for m in METRICS)]
                  for a in all_arms() for ev in EVAL_SETS])


def per_seed_table(results: Results, seeds: list[int]) -> str:
    return table(["encoder", "dataset", "metric", *(f"seed {x}" for x in seeds)],
                 [[a.key, ev.name, m.label, *(f"{v:.2f}" for v in results[a.key][ev.name][m.key])]
                  for a in all_arms() for ev in EVAL_SETS for m in METRICS])


def _verdict(base: str, cand: str, diffs: list[float]) -> tuple[str, str]:
    """(winner or "tie" when not clear, table verdict)."""
    md = mean_std(diffs)[0]
    winner = cand if md > 0 else base if md < 0 else "tie"
    if winner == "tie":
        return "tie", "equal"
    if clear_gain(diffs):
        return winner, f"**{winner}** higher"
    return "tie", f"{winner} higher, within the seed spread or < {CLEAR_POINTS} pt: no clear winner"


def comparison(results: Results, base: str, cand: str) -> tuple[str, dict[str, int]]:
    """The `cand − base` section: paired differences per dataset and metric, and the clear wins."""
    rows, wins = [], {base: 0, cand: 0, "tie": 0}
    for ev in EVAL_SETS:
        for m in METRICS:
            a, b = results[base][ev.name][m.key], results[cand][ev.name][m.key]
            diffs = [y - x for x, y in zip(a, b)]
            winner, verdict = _verdict(base, cand, diffs)
            wins[winner] += 1
            md, sd = mean_std(diffs)
            rows.append([ev.name, m.label, fmt(a), fmt(b), f"{md:+.2f} ± {sd:.2f}", verdict])
    text = "\n".join([
        f"## {arm(base).label} vs {arm(cand).label}, as measured", "",
        f"Difference {cand} − {base} paired by seed (mean ± std); \"clear\" means |mean| > 2 std and "
        f"> {CLEAR_POINTS} points.", "",
        table(["dataset", "metric", base, cand, f"{cand} − {base}", "verdict"], rows), "",
        f"Clear wins: {cand} {wins[cand]}, {base} {wins[base]}; no clear winner in {wins['tie']} of "
        f"{sum(wins.values())} comparisons.", ""])
    return text, wins


def comparisons(results: Results) -> tuple[str, list[tuple[str, str, dict[str, int]]]]:
    sections, all_wins = [], []
    for base, cand in COMPARISONS:
        text, wins = comparison(results, base, cand)
        sections.append(text)
        all_wins.append((base, cand, wins))
    return "\n".join(sections), all_wins


def margin_table(results: Results) -> str:
    rows = []
    for ev in EVAL_SETS:
        for m in METRICS:
            r = mean_std(results[RANDOM.key][ev.name][m.key])[0]
            rows.append([ev.name, m.label, f"{r:.2f}",
                         *(f"{mean_std(results[a.key][ev.name][m.key])[0] - r:+.2f}" for a in ARMS)])
    return table(["dataset", "metric", RANDOM.key, *(f"{a.key} − {RANDOM.key}" for a in ARMS)], rows)


def final_losses(layout: Layout, seeds: list[int]) -> dict[str, dict[str, float]]:
    """The last logged values of every pretraining run's metrics.csv."""
    res: dict[str, dict[str, float]] = {}
    for a in ARMS:
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
