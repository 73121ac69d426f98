"""The two PNG plots of the `pijepa reproduce` report: pretraining curves (losses and PKT's share of the
gradient) and accuracy bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pijepa.commands.reproduce.shares import SHARE, read_rows
from pijepa.commands.reproduce.spec import EVAL_SETS, METRICS, Arm, Layout
from pijepa.commands.reproduce.tables import Results, mean_std, read_metrics
from pijepa.runtime.atomic import atomic_write

LINE_STYLES = ("-", "--", ":", "-.")  # one per seed


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def plot_losses(layout: Layout, arms: tuple[Arm, ...], seeds: list[int], pkt_arms: set[str], path: Path) -> None:
    """Total loss, L2 term, PKT term and PKT's gradient share (of the arms whose loss has PKT) over the steps."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for a in arms:
        for i, seed in enumerate(seeds):
            csv_path = layout.run_dir(a.name(seed)) / "metrics.csv"
            m = read_metrics(csv_path)
            if not m.get("step"):
                continue
            kw = dict(color=a.color, ls=LINE_STYLES[i % len(LINE_STYLES)], label=f"{a.key} seed {seed}")
            axes[0].plot(m["step"], m["loss"], **kw)
            if "loss_l2" in m:
                axes[1].plot(m["step"], m["loss_l2"], **kw)
            if a.key in pkt_arms and "loss_pkt" in m:
                axes[2].plot(m["step"], m["loss_pkt"], **kw)
            rows = [r for r in read_rows(csv_path) if SHARE in r]
            if a.key in pkt_arms and rows:
                axes[3].plot([r["step"] for r in rows], [100 * r[SHARE] for r in rows], **kw)
    titles = ("total loss (what each run minimises)", "L2 term (smooth L1)",
              "PKT term (unweighted) of the runs with one",
              "PKT's share of the gradient on the predictions (%)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in axes[2:]:
        if ax.lines:
            ax.set_yscale("log")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_accuracy(results: Results, arms: tuple[Arm, ...], path: Path) -> None:
    """Mean ± std accuracy per encoder (random first), one panel per evaluation set, one bar group per metric."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(EVAL_SETS), figsize=(6.5 * len(EVAL_SETS), 4.2), squeeze=False)
    width = 0.8 / len(arms)
    for ax, ev in zip(axes[0], EVAL_SETS):
        for j, a in enumerate(arms):
            stats = [mean_std(results[a.key][ev.name][m.key]) for m in METRICS]
            xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(METRICS))]
            ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3,
                   color=a.color, label=a.label)
        ax.set_xticks(range(len(METRICS)))
        ax.set_xticklabels([m.label for m in METRICS], fontsize=8)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{ev.name} test")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
