"""What the PKT term did in each pretraining run, read from its metrics.csv: PKT's share of the
gradient on the predictions (`grad_share_pkt` = grad_pkt / (grad_l2 + grad_pkt), logged at log
steps), averaged over the last part of training, and the target's spread and effective rank
(`target_std`, `target_rank`) at the last log step. So a reader sees whether PKT carried a real
share of the gradient before reading anything into an accuracy difference."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

from pijepa.commands.reproduce.arms import Balance
from pijepa.commands.reproduce.spec import EVAL_SETS, METRICS, RANDOM, Arm, Layout
from pijepa.commands.reproduce.tables import Results, mean_std, table

if TYPE_CHECKING:
    from pijepa.config import Config

TAIL = 0.25  # "the last part of training": log steps in the last quarter of the run's logged steps
SHARE = "grad_share_pkt"
FINAL = ("target_rank", "target_std")
# diagnostics[arm key][column] = per-seed values (seeds whose metrics.csv has the column)
Diagnostics = dict[str, dict[str, list[float]]]


def read_rows(csv_path: Path) -> list[dict[str, float]]:
    """metrics.csv as rows of finite numbers, each with its step (other cells left out)."""
    rows: list[dict[str, float]] = []
    if not csv_path.is_file():
        return rows
    with open(csv_path) as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(number):
                    row[key] = number
            if "step" in row:
                rows.append(row)
    return rows


def run_diagnostics(csv_path: Path) -> dict[str, float]:
    """The mean grad_share_pkt over the last TAIL of the logged steps, and the last target_rank/std."""
    rows = read_rows(csv_path)
    if not rows:
        return {}
    last = max(r["step"] for r in rows)
    tail = [r[SHARE] for r in rows if SHARE in r and r["step"] >= (1 - TAIL) * last]
    res = {SHARE: sum(tail) / len(tail)} if tail else {}
    for key in FINAL:
        values = [r[key] for r in rows if key in r]
        if values:
            res[key] = values[-1]
    return res


def collect_diagnostics(layout: Layout, arms: tuple[Arm, ...], seeds: list[int]) -> Diagnostics:
    res: Diagnostics = {}
    for a in arms:
        per_run = [run_diagnostics(layout.run_dir(a.name(seed)) / "metrics.csv") for seed in seeds]
        res[a.key] = {key: [d[key] for d in per_run if key in d] for key in (SHARE, *FINAL)}
    return res


def effective_weight(cfg: Config, balance: Balance) -> float | None:
    """The run's PKT weight relative to its L2 weight, as an `L2_PKT` pkt_weight (None: no PKT term).
    `L2_PKT_chunks` weighs the summed chunk PKTs like the mean chunk PKT times n_chunks = the balance."""
    o = cfg.optimization
    if "PKT" not in o.loss_function or o.loss_function == "PKT":
        return None
    chunks = balance.weight if o.loss_function == "L2_PKT_chunks" else 1.0
    return o.pkt_weight * chunks / o.l2_weight if o.l2_weight else math.inf


def _weight_cell(cfg: Config, balance: Balance) -> str:
    weight = effective_weight(cfg, balance)
    if weight is None:
        return "—"
    if cfg.optimization.loss_function == "L2_PKT_chunks":
        return f"≈ {weight:.4g} (n_chunks)"
    return f"{weight:.4g}"


def _percent(values: list[float], expected: bool) -> str:
    if not values:
        return "not logged" if expected else "— (no PKT term)"
    m, s = mean_std([100 * v for v in values])
    return f"{m:.2f}%" + (f" ± {s:.2f}" if len(values) > 1 else "")


def _number(values: list[float]) -> str:
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.1f}" + (f" ± {s:.1f}" if len(values) > 1 else "")


def share_table(arms: tuple[Arm, ...], configs: dict[str, Config], balance: Balance, diags: Diagnostics,
                results: Results) -> str:
    """Per arm: its loss, PKT weight, PKT's gradient share, final target rank and the headline k-NN."""
    head = METRICS[0]
    rows = []
    for a in arms:
        cfg = configs[a.key]
        rows.append([a.key, cfg.optimization.loss_function, _weight_cell(cfg, balance),
                     _percent(diags[a.key][SHARE], effective_weight(cfg, balance) is not None),
                     _number(diags[a.key]["target_rank"]),
                     *(_number(results[a.key][ev.name][head.key]) for ev in EVAL_SETS)])
    rows.append([RANDOM.key, "—", "—", "—", "—", *(_number(results[RANDOM.key][ev.name][head.key])
                                                   for ev in EVAL_SETS)])
    return table(["arm", "loss", "pkt_weight (as L2_PKT)", f"PKT share of the gradient (last {TAIL:.0%} of steps)",
                  "final target_rank", *(f"{head.label}, {ev.name} test" for ev in EVAL_SETS)], rows)


def share_summary(arms: tuple[Arm, ...], diags: Diagnostics) -> list[str]:
    """One summary line: how much of the push on the predictions came from PKT, per arm with a PKT term."""
    shares = [(a.key, mean_std(diags[a.key][SHARE])[0]) for a in arms if diags[a.key][SHARE]]
    if not shares:
        return []
    line = (f"- PKT's share of the gradient on the predictions over the last {TAIL:.0%} of steps: "
            + ", ".join(f"{key} {100 * v:.2f}%" for key, v in shares) + ".")
    if max(v for _, v in shares) < 0.01:
        line += " Below 1% in every arm: PKT hardly moved the predictions, so these runs train essentially like L2."
    return [line]
