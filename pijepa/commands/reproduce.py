"""`pijepa reproduce`: I-JEPA (L2) vs Probabilistic I-JEPA (L2_PKT) vs a random encoder, end to end.

Stages, each skipped when its output already exists (a rerun after an interruption continues):

1. ``shards``: ``pijepa shards write`` of the CIFAR-10 train tars -> ``OUT/shards/shards.json``
2. ``train``: ``pijepa train`` per seed and loss (identical config apart from the loss), in a
   subprocess with its log in ``OUT/runs/<name>/train.log``; the trainer resumes by itself
3. ``export``: ``pijepa export`` of each run -> ``OUT/encoders/<name>.pt``; the random encoder
   ``random_s<seed>.pt`` is the same architecture built with the same seed (``build_models``,
   as the trainer builds it at step 0) and saved in the same format, never trained
4. ``features``: ``pijepa features`` (EMA target, mean pooling) per encoder, dataset and split
5. ``eval``: ``pijepa eval knn`` and ``pijepa eval linear`` per encoder and dataset
6. ``report``: ``results.json``, ``results.md`` and PNG plots in ``--docs``

Stages 4-5 call the same functions as the CLI commands, in this process (no interpreter start-up
per call); ``OUT/commands.sh`` lists the equivalent CLI commands. Wall times of the stages that ran
are kept in ``OUT/timings.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "cifar10_reproduce.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data"
LOSSES = ("L2", "L2_PKT")
ENCODER_LABELS = {"random": "random init", "L2": "I-JEPA (L2)", "L2_PKT": "Prob. I-JEPA (L2_PKT)"}
DATASETS = ("cifar10", "intel-scenes")
LONGER_RUNS = "results_longer_runs.md"  # hand-written notes on longer runs, linked from the report when present
METRICS = (("knn20", "k-NN k=20 (cos, weighted)"), ("knn5", "k-NN k=5 (paper: eucl., vote)"),
           ("linear", "linear top-1"))


# ----------------------------------------------------------------------------- arguments


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return values


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "reproduce",
        help="pretrain L2 and L2_PKT on CIFAR-10, evaluate them and a random encoder, write docs/results.md")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="pretraining config (default %(default)s)")
    p.add_argument("--seeds", type=_int_list, default=[0, 1], help="comma-separated seeds (default 0,1)")
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"),
                   help="folder for shards, runs, encoders, features, evaluations (default runs/reproduce)")
    p.add_argument("--docs", type=Path, default=None,
                   help="where results.md and the plots go (default docs/; OUT/docs with --smoke)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="folder holding cifar10/ and intel-scenes/ (default ../shared/data)")
    p.add_argument("--max-steps", type=int, default=None, help="pretraining steps (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="pretraining batch (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for every pretraining run; repeatable")
    p.add_argument("--train-limit", type=int, default=10000,
                   help="CIFAR-10 train images for the k-NN bank / linear probe (default 10000; 0 = all)")
    p.add_argument("--test-limit", type=int, default=0,
                   help="CIFAR-10 test images (default 0 = all 10000)")
    p.add_argument("--intel-train-limit", type=int, default=0,
                   help="intel-scenes train images (default 0 = all 8741)")
    p.add_argument("--linear-epochs", type=int, default=100, help="linear probe epochs (default 100)")
    p.add_argument("--feature-batch", type=int, default=256, help="images per feature batch (default 256)")
    p.add_argument("--workers", type=int, default=1, help="data workers for shards/features (default 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="pretraining runs at a time, each with cores/jobs torch threads (default 1); "
                        "2 on a 2-core machine gives ~15%% more throughput than 1 run with 2 threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where pretraining and feature extraction run (default cpu: the training runs are then "
                        "kept off any GPU with CUDA_VISIBLE_DEVICES='')")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps on a few hundred images: checks the pipeline, numbers mean nothing")
    p.set_defaults(run=run_reproduce, command_name="reproduce")


# ----------------------------------------------------------------------------- bookkeeping


class Book:
    """Timings (OUT/timings.json) and the equivalent CLI commands (OUT/commands.sh)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.timings_path = out / "timings.json"
        self.timings: dict[str, float] = (json.loads(self.timings_path.read_text())
                                          if self.timings_path.is_file() else {})
        self.commands: list[str] = []
        self.lock = threading.Lock()

    def command(self, *argv: Any) -> None:
        self.commands.append(" ".join(shlex.quote(str(a)) for a in argv))

    def timed(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        log(f"[{name}] ...")
        result = fn(*args, **kwargs)
        with self.lock:  # parallel pretraining runs (--jobs) finish in threads of this process
            self.timings[name] = round(time.perf_counter() - t0, 1)
            log(f"[{name}] done in {self.timings[name]:.1f} s")
            self.save()
        return result

    def save(self) -> None:
        from pijepa.commands.evaluate import write_json

        write_json(self.timings_path, self.timings)
        (self.out / "commands.sh").write_text(
            "#!/bin/sh\n# The CLI commands equivalent to this `pijepa reproduce` run, in order.\nset -e\n"
            + "\n".join(self.commands) + "\n")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} pijepa reproduce: {msg}", file=sys.stderr, flush=True)


def _rel(path: Path) -> str:
    """A path as a user at the repo root would type it."""
    path = Path(os.path.abspath(path))
    try:
        return os.path.relpath(path, REPO) if not os.path.relpath(path, REPO).startswith("../..") else str(path)
    except ValueError:
        return str(path)


def _pijepa(*args: Any) -> list[str]:
    return [sys.executable, "-m", "pijepa", *map(str, args)]


def run_threads(jobs: int) -> int:
    """Torch threads per pretraining run: OMP_NUM_THREADS if set, else the cores shared by the parallel runs."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // max(jobs, 1)))


def _run(argv: list[str], log_file: Path, threads: int | None = None, device: str = "cpu") -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or run_threads(1))}
    if device == "cpu":  # the trainer takes a visible GPU by itself
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(shlex.quote(a) for a in argv)}\n")
        f.flush()
        rc = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log_file.read_text().splitlines()[-15:]
        raise RuntimeError(f"{argv[3:5]} failed with exit code {rc}; see {log_file}:\n" + "\n".join(tail))


# ----------------------------------------------------------------------------- stages


def make_smoke_source(src: Path, dst: Path, per_class: int) -> None:
    """The first `per_class` images of every class tar of `src` as a small per-class tar folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for tar_path in sorted(src.glob("*.tar")):
        out = dst / tar_path.name
        if out.is_file():
            continue
        tmp = out.with_name(out.name + ".tmp")
        with tarfile.open(tar_path) as tin, tarfile.open(tmp, "w") as tout:
            n = 0
            for member in tin:
                if not member.isfile():
                    continue
                tout.addfile(member, tin.extractfile(member))
                n += 1
                if n >= per_class:
                    break
        tmp.replace(out)


def stage_shards(src: Path, out: Path, workers: int, book: Book, samples_per_shard: int) -> Path:
    index = out / "shards.json"
    argv = ["shards", "write", "--src", src, "--out", out, "--samples-per-shard", samples_per_shard,
            "--workers", workers, "--seed", 0, "--no-progress"]
    book.command("pijepa", *[_rel(a) if isinstance(a, Path) else a for a in argv])
    if not index.is_file():
        book.timed("shards", _run, _pijepa(*argv), out.parent / "logs" / "shards.log")
    return index


def train_overrides(args: argparse.Namespace, shards: Path, run_dir: Path, seed: int, loss: str,
                    max_steps: int, batch: int) -> list[str]:
    sets = [f"data.shards={_rel(shards)}", f"data.batch_size={batch}", f"data.epoch_samples={max_steps * batch}",
            "optimization.epochs=1", f"optimization.max_steps={max_steps}", f"meta.seed={seed}",
            f"optimization.loss_function={loss}", f"logging.folder={_rel(run_dir)}"]
    if args.smoke:
        sets += ["logging.log_freq=1", "logging.checkpoint_freq=1000", "logging.tensorboard=false",
                 "data.num_workers=0", "data.shuffle_buffer=64"]
    return sets + list(args.overrides)


def run_complete(run_dir: Path, max_steps: int) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{max_steps:08d}"


def save_random_encoder(config: Path, overrides: list[str], out: Path) -> None:
    """The untrained encoder: built exactly as the trainer builds it (same seed, same init)."""
    import torch

    from pijepa.config import load_config
    from pijepa.parallel.formats import ENCODER_FORMAT, plain_state_dict
    from pijepa.train.build import build_models, model_entry

    cfg = load_config(config, overrides)
    models = build_models(cfg)
    result = {"format": ENCODER_FORMAT,
              "model": model_entry(cfg),
              "step": 0,
              "encoder": plain_state_dict(models.encoder.state_dict()),
              "target_encoder": plain_state_dict(models.target_encoder.state_dict()),
              "predictor": plain_state_dict(models.predictor.state_dict())}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(result, tmp)
    tmp.replace(out)


def extract(encoder: Path, data: Path, out: Path, limit: int | None, args: argparse.Namespace, book: Book,
            name: str) -> None:
    from pijepa.eval.features import extract_features

    cmd = ["pijepa", "features", "--encoder", _rel(encoder), "--data", _rel(data), "--out", _rel(out),
           "--batch-size", args.feature_batch, "--workers", args.workers, "--device", args.device]
    book.command(*cmd, *(["--limit", limit] if limit else []))
    if out.is_file():
        return
    book.timed(name, extract_features, encoder, data, out, batch_size=args.feature_batch, workers=args.workers,
               limit=limit, device=args.device, progress=False)


def evaluate(train: Path, test: Path, out_dir: Path, args: argparse.Namespace, book: Book, name: str) -> None:
    from pijepa.commands.evaluate import write_json
    from pijepa.eval.knn import run_knn
    from pijepa.eval.linear import run_linear_probe

    knn_out, lin_out = out_dir / "knn.json", out_dir / "linear.json"
    book.command("pijepa", "eval", "knn", "--train", _rel(train), "--test", _rel(test), "--out", _rel(knn_out))
    book.command("pijepa", "eval", "linear", "--train", _rel(train), "--test", _rel(test), "--out", _rel(lin_out),
                 "--epochs", args.linear_epochs)
    if not knn_out.is_file():
        book.timed(f"{name}/knn", lambda: write_json(knn_out, run_knn(train, test, ks=(10, 20, 100, 200), paper_k=5)))
    if not lin_out.is_file():
        book.timed(f"{name}/linear", lambda: write_json(
            lin_out, run_linear_probe(train, test, epochs=args.linear_epochs, seed=0)))


# ----------------------------------------------------------------------------- results


def read_metrics(csv_path: Path) -> dict[str, list[float]]:
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


def collect(out: Path, seeds: list[int]) -> dict[str, Any]:
    """results[encoder][dataset][metric] = per-seed list of accuracies (in seed order)."""
    results: dict[str, Any] = {}
    for enc in ("random", *LOSSES):
        for seed in seeds:
            for ds in DATASETS:
                d = out / "eval" / f"{enc}_s{seed}" / ds
                knn = json.loads((d / "knn.json").read_text())
                lin = json.loads((d / "linear.json").read_text())
                r = results.setdefault(enc, {}).setdefault(ds, {})
                r.setdefault("knn20", []).append(_knn_top1(knn, "weighted_cosine", 20))
                r.setdefault("knn5", []).append(_knn_top1(knn, "euclidean_majority", 5))
                r.setdefault("linear", []).append(float(lin["top1"]))
    return results


def _knn_top1(knn: dict[str, Any], protocol: str, k: int) -> float:
    top1 = knn["protocols"][protocol]["top1"]
    return float(top1[str(k)] if str(k) in top1 else top1[k])


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def plot_losses(out: Path, seeds: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"L2": "tab:blue", "L2_PKT": "tab:red"}
    styles = ["-", "--", ":", "-."]
    for loss in LOSSES:
        for i, seed in enumerate(seeds):
            m = read_metrics(out / "runs" / f"{loss}_s{seed}" / "metrics.csv")
            if not m.get("step"):
                continue
            kw = dict(color=colors[loss], ls=styles[i % len(styles)], label=f"{loss} seed {seed}")
            axes[0].plot(m["step"], m["loss"], **kw)
            axes[1].plot(m["step"], m["loss_l2"], **kw)
            if loss == "L2_PKT" and "loss_pkt" in m:
                axes[2].plot(m["step"], m["loss_pkt"], **kw)
    for ax, title in zip(axes, ("total loss (what each run minimises)", "L2 term (smooth L1) of both runs",
                                "PKT term of the L2_PKT runs")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = ["random", *LOSSES]
    colors = {"random": "tab:gray", "L2": "tab:blue", "L2_PKT": "tab:red"}
    fig, axes = plt.subplots(1, len(DATASETS), figsize=(13, 4.2), sharey=False)
    width = 0.8 / len(encoders)
    for ax, ds in zip(axes, DATASETS):
        for j, enc in enumerate(encoders):
            stats = [mean_std(results[enc][ds][m]) for m, _ in METRICS]
            xs = [i + (j - (len(encoders) - 1) / 2) * width for i in range(len(METRICS))]
            ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3,
                   color=colors[enc], label=ENCODER_LABELS[enc])
        ax.set_xticks(range(len(METRICS)))
        ax.set_xticklabels([label for _, label in METRICS], fontsize=8)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{ds} test")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def comparison_lines(results: dict[str, Any], seeds: list[int]) -> list[str]:
    """Measured statements: L2_PKT - L2 and pretrained - random, per dataset and metric."""
    lines = []
    wins = {"L2": 0, "L2_PKT": 0, "tie": 0}
    for ds in DATASETS:
        for m, label in METRICS:
            a, b = results["L2"][ds][m], results["L2_PKT"][ds][m]
            (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
            diffs = [y - x for x, y in zip(a, b)]
            md, sd = mean_std(diffs)
            clear = len(diffs) > 1 and abs(md) > 2 * sd and abs(md) > 0.5
            winner = "L2_PKT" if md > 0 else "L2" if md < 0 else "tie"
            wins["tie" if not clear else winner] += 1
            if winner == "tie":
                verdict = "equal"
            elif clear:
                verdict = f"**{winner}** higher"
            else:
                verdict = f"{winner} higher, within the seed spread or < 0.5 pt: no clear winner"
            lines.append(f"| {ds} | {label} | {ma:.2f} ± {sa:.2f} | {mb:.2f} ± {sb:.2f} | "
                         f"{md:+.2f} ± {sd:.2f} | {verdict} |")
    return lines, wins


def margin_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for ds in DATASETS:
        for m, label in METRICS:
            r = mean_std(results["random"][ds][m])[0]
            parts = []
            for loss in LOSSES:
                d = mean_std(results[loss][ds][m])[0] - r
                parts.append(f"{d:+.2f}")
            lines.append(f"| {ds} | {label} | {r:.2f} | " + " | ".join(parts) + " |")
    return lines


def final_losses(out: Path, seeds: list[int]) -> dict[str, dict[str, float]]:
    res = {}
    for loss in LOSSES:
        for seed in seeds:
            m = read_metrics(out / "runs" / f"{loss}_s{seed}" / "metrics.csv")
            if m.get("step"):
                res[f"{loss}_s{seed}"] = {k: m[k][-1] for k in ("step", "loss", "loss_l2", "loss_pkt") if k in m}
    return res


def summary_lines(results: dict[str, Any], seeds: list[int], finals: dict[str, dict[str, float]],
                  wins: dict[str, int]) -> list[str]:
    """Measured headline statements: gains over the random encoder (paired by seed) and L2 vs L2_PKT."""
    cells = [(ds, m) for ds in DATASETS for m, _ in METRICS]
    lines, per_seed_gain, clear_counts = [], {}, []
    for loss in LOSSES:
        clear = 0
        for ds, m in cells:
            diffs = [b - a for a, b in zip(results["random"][ds][m], results[loss][ds][m])]
            md, sd = mean_std(diffs)
            clear += len(diffs) > 1 and md > 2 * sd and md > 0.5
        gains = [sum(results[loss][ds][m][i] - results["random"][ds][m][i] for ds, m in cells) / len(cells)
                 for i in range(len(seeds))]
        per_seed_gain[loss] = gains
        clear_counts.append(clear)
        lines.append(f"- {loss} − random: mean gain {sum(gains) / len(gains):+.2f} points over the "
                     f"{len(cells)} dataset × metric cells (per seed: "
                     + ", ".join(f"seed {x} {g:+.2f}" for x, g in zip(seeds, gains))
                     + f"); a clear gain (paired mean > 2 std and > 0.5 pt) in {clear} of {len(cells)} cells.")
    if all(c < len(cells) / 2 for c in clear_counts):
        lines.append("- So at this scale the pretrained encoders do **not** beat the random encoder by a clear "
                     "margin over the seeds; the numbers below are a pipeline check at CPU scale, not a "
                     "reproduction of the paper's gains.")
    total = sum(wins.values())
    lines.append(f"- L2_PKT vs L2: a clear winner in {wins['L2_PKT'] + wins['L2']} of {total} cells "
                 f"(L2_PKT {wins['L2_PKT']}, L2 {wins['L2']}); the paired differences are listed below.")
    weak = [x for i, x in enumerate(seeds) if all(per_seed_gain[loss][i] < 0.5 for loss in LOSSES)]
    for x in weak:
        losses = ", ".join(f"{loss} {finals[f'{loss}_s{x}']['loss']:.4f}" for loss in LOSSES
                           if f"{loss}_s{x}" in finals)
        others = ", ".join(f"seed {y}: " + ", ".join(f"{finals[f'{loss}_s{y}']['loss']:.4f}" for loss in LOSSES
                                                     if f"{loss}_s{y}" in finals) for y in seeds if y not in weak)
        lines.append(f"- Seed {x}'s pretrained encoders are no better than its random encoder (gain < 0.5 pt on "
                     f"average); their final pretraining loss ({losses}) is "
                     + (f"lower than the other seeds' ({others}), " if others else "")
                     + "which together suggests the predictor/target pair drifted towards a low-information "
                     "(partly collapsed) solution rather than learning features.")
    return lines


def linear_sweeps(out: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """Every linear probe's result file, as written by `evaluate` (or kept from an earlier run)."""
    return [json.loads((out / "eval" / f"{enc}_s{seed}" / ds / "linear.json").read_text())
            for enc in ("random", *LOSSES) for seed in seeds for ds in DATASETS]


def lr_grids_text(out: Path, seeds: list[int]) -> str:
    """The lr grid(s) the probes really swept, read from their results rather than from the defaults."""
    grids = dict.fromkeys(tuple(lin["lrs"]) for lin in linear_sweeps(out, seeds))
    return "; ".join(", ".join(f"{lr:g}" for lr in grid) for grid in grids)


def lr_note(out: Path, seeds: list[int]) -> list[str]:
    """How often the linear probe's lr sweep picked the largest lr of its grid."""
    sweeps = linear_sweeps(out, seeds)
    picks, top = len(sweeps), sum(lin["best_lr"] == max(lin["lrs"]) for lin in sweeps)
    return [f"The linear probe's held-out sweep picked the largest lr of its grid in {top} of {picks} probes, "
            "so the linear numbers may be slightly below what a wider grid would give (for every encoder alike).",
            ""] if top else []


def grouped_timings(timings: dict[str, float]) -> dict[str, float]:
    """Per-encoder sums: `features/L2_s0/cifar10_train` -> `features/L2_s0 (4 files)`-style groups."""
    groups: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, sec in timings.items():
        parts = name.split("/")
        key = "/".join(parts[:2]) if parts[0] in ("features", "eval") else name
        groups[key] = groups.get(key, 0.0) + sec
        counts[key] = counts.get(key, 0) + 1
    labels = {"features": "feature files", "eval": "k-NN + linear evaluations"}
    return {(f"{k} ({counts[k]} {labels[k.split('/')[0]]})" if k.split("/")[0] in labels else k): v
            for k, v in groups.items()}


def write_report(args: argparse.Namespace, out: Path, docs: Path, seeds: list[int], settings: dict[str, Any],
                 book: Book) -> Path:
    results = collect(out, seeds)
    docs.mkdir(parents=True, exist_ok=True)
    plot_losses(out, seeds, docs / "results_loss_curves.png")
    plot_accuracy(results, docs / "results_accuracy.png")
    finals = final_losses(out, seeds)
    (out / "results.json").write_text(json.dumps(
        {"settings": settings, "seeds": seeds, "results": results, "final_losses": finals,
         "timings_s": book.timings}, indent=2) + "\n")

    cmp_lines, wins = comparison_lines(results, seeds)
    s = settings
    md = [
        "# Results: I-JEPA vs Probabilistic I-JEPA on CIFAR-10 (CPU scale)" + (" — SMOKE RUN, numbers mean nothing"
                                                                                  if args.smoke else ""),
        "",
        "Generated by `pijepa reproduce` (`pijepa/commands/reproduce.py`); every number below is measured by it.",
        "",
        "## Summary (measured)",
        "",
        *summary_lines(results, seeds, finals, wins),
        *([f"- Longer and tuned runs (12 blocks for 150-1950 steps, other lr/EMA/init, 4 and 6 blocks), "
           f"measured by hand: "
           f"[{LONGER_RUNS}]({LONGER_RUNS})."] if (docs / LONGER_RUNS).is_file() else []),
        "",
        "## Rerun",
        "",
        "```bash",
        s["command"],
        "```",
        "",
        f"It writes everything to `{s['out']}/` (git-ignored) and skips every stage whose output exists, so "
        "rerunning it after an interruption continues. The equivalent single commands "
        f"(`pijepa shards write`, `pijepa train`, `pijepa export`, `pijepa features`, `pijepa eval knn|linear`) "
        f"are written to `{s['out']}/commands.sh`; the first of each kind:",
        "",
        "```bash",
        *s["example_commands"],
        "```",
        "",
        "## Setup",
        "",
        f"- Pretraining data: the real CIFAR-10 train split ({s['train_images']} images, "
        f"`{s['data']}/cifar10/train`), converted with `pijepa shards write` and streamed with the "
        f"`webdataset` loader (`resampled`).",
        f"- Config `{s['config']}`: {s['model']}, crop {s['crop']} px, patch {s['patch']} "
        f"({(s['crop'] // s['patch']) ** 2} tokens), batch {s['batch']}, {s['max_steps']} steps "
        f"(= {s['max_steps'] * s['batch']} images, {s['max_steps'] * s['batch'] / s['train_images']:.2f} epochs of "
        f"CIFAR-10; the lr/wd/EMA schedules span exactly these steps), AdamW lr {s['lr']} (warm-up "
        f"{s['warmup']} of the run), fp32 on {s['device'].upper()} ({s['cpus']} CPU cores; "
        f"{s['jobs']} run(s) at a time, "
        f"{s['threads']} torch thread(s) each). The two pretrained encoders per seed differ only in "
        "`optimization.loss_function` "
        "(`L2` = I-JEPA, `L2_PKT` = Probabilistic I-JEPA with "
        f"l2_weight {s['l2_weight']}, pkt_weight {s['pkt_weight']}, chunk grouping {s['pkt_chunk']}).",
        "- Random encoder: the same architecture built with the same seed as the trainer builds it at step 0 "
        "(identical to the pretrained runs' initial weights), never trained.",
        f"- Seeds: {', '.join(map(str, seeds))} (model init, data order, crops and masks). "
        "Table entries are mean ± sample standard deviation over the seeds.",
        "- Features: `pijepa features` from the EMA target encoder, mean of the last layer's normalised "
        f"tokens (dim 192), evaluation transform at {s['crop']} px (intel-scenes' 64 px images are "
        "resized to it). "
        f"CIFAR-10: {s['cifar_train_used']} of 50000 train images as the k-NN bank / probe training set, "
        f"{s['cifar_test_used']} of 10000 test images; intel-scenes: {s['intel_train_used']} of 8741 train, "
        f"{s['intel_test_used']} of 2156 test images (subsets: `pijepa features --limit`, round-robin over "
        "classes, to keep the evaluation within the CPU time budget).",
        "- k-NN (`pijepa eval knn`): weighted cosine k-NN (temperature 0.07) at k=20, and the "
        "Probabilistic I-JEPA paper's protocol (k=5, Euclidean, majority vote).",
        f"- Linear probe (`pijepa eval linear`): AdamW, {s['linear_epochs']} epochs, lr chosen from "
        f"{lr_grids_text(out, seeds)} on a held-out 10% of the training set, then retrained on all of it; "
        "top-1 on test.",
        "",
        "## Accuracy (top-1 %, test split)",
        "",
        "| encoder | dataset | " + " | ".join(label for _, label in METRICS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |",
    ]
    for enc in ("random", *LOSSES):
        for ds in DATASETS:
            md.append(f"| {ENCODER_LABELS[enc]} | {ds} | "
                      + " | ".join(_fmt(results[enc][ds][m]) for m, _ in METRICS) + " |")
    md += ["", "![accuracy](results_accuracy.png)", "", "Per seed:", "",
           "| encoder | dataset | metric | " + " | ".join(f"seed {x}" for x in seeds) + " |",
           "| --- | --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
    for enc in ("random", *LOSSES):
        for ds in DATASETS:
            for m, label in METRICS:
                md.append(f"| {enc} | {ds} | {label} | "
                          + " | ".join(f"{v:.2f}" for v in results[enc][ds][m]) + " |")
    md += [
        "",
        "## L2 (I-JEPA) vs L2_PKT (Probabilistic I-JEPA), as measured",
        "",
        "Difference L2_PKT − L2 paired by seed (mean ± std); \"clear\" means |mean| > 2 std and > 0.5 points.",
        "",
        "| dataset | metric | L2 | L2_PKT | L2_PKT − L2 | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
        *cmp_lines,
        "",
        f"Clear wins: L2_PKT {wins['L2_PKT']}, L2 {wins['L2']}; no clear winner in {wins['tie']} of "
        f"{sum(wins.values())} comparisons.",
        "",
        "## Pretrained vs random encoder",
        "",
        "Mean accuracy of the random encoder and the gain of each pretrained encoder over it (points):",
        "",
        "| dataset | metric | random | " + " | ".join(f"{x} − random" for x in LOSSES) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in LOSSES) + " |",
        *margin_lines(results),
        "",
        *lr_note(out, seeds),
        "## Pretraining losses",
        "",
        "![loss curves](results_loss_curves.png)",
        "",
        "Last logged values (from each run's `metrics.csv`):",
        "",
        "| run | step | loss | L2 term | PKT term |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, f in finals.items():
        md.append(f"| {name} | {int(f.get('step', 0))} | {f.get('loss', float('nan')):.4f} | "
                  f"{f.get('loss_l2', float('nan')):.4f} | {f.get('loss_pkt', float('nan')):.3g} |")
    pkt = [f["loss_pkt"] / f["loss_l2"] for n, f in finals.items() if n.startswith("L2_PKT") and f.get("loss_l2")]
    if pkt:
        md += ["", f"In the L2_PKT runs the PKT term is {min(pkt):.2g}–{max(pkt):.2g} times the L2 term at the last "
               "logged step (with `pkt_weight` 1): the PKT part of the total loss is tiny at these settings "
               "(a KL averaged over all entries of 256x256 similarity distributions). A larger "
               "`optimization.pkt_weight` would change the balance; it was not tuned here."]
    md += ["", "## Wall time", "", "Of the stages as last run (seconds; stages skipped on a rerun keep their "
           "earlier time):", "", "| stage | s |", "| --- | --- |"]
    for name, sec in grouped_timings(book.timings).items():
        md.append(f"| {name} | {sec:.1f} |")
    if book.timings:
        md.append(f"| **sum of the stages** | {sum(book.timings.values()):.1f} |")
        if args.jobs > 1:
            md += ["", f"With `--jobs {args.jobs}` that many training runs overlap, so the wall time is shorter "
                   "than this sum."]
    md.append("")
    path = docs / "results.md"
    path.write_text("\n".join(md))
    return path


# ----------------------------------------------------------------------------- main


def run_reproduce(args: argparse.Namespace) -> None:
    from pijepa.config import load_config

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs = (args.docs or (out / "docs" if args.smoke else REPO / "docs")).resolve()
    data = args.data.resolve()
    for sub in ("cifar10/train", "cifar10/test", "intel-scenes/train", "intel-scenes/test"):
        if not (data / sub).is_dir():
            raise FileNotFoundError(f"{data / sub}: not found "
                                    "(--data names the folder with cifar10/ and intel-scenes/)")
    if not args.config.is_file():
        raise FileNotFoundError(f"{args.config}: no such config")
    book = Book(out)
    seeds = list(dict.fromkeys(args.seeds))

    base = load_config(args.config, list(args.overrides))
    max_steps = args.max_steps or (3 if args.smoke else base.optimization.max_steps)
    batch = args.batch_size or (8 if args.smoke else base.data.batch_size)
    if max_steps < 1 or batch < 1 or args.jobs < 1:
        raise ValueError(f"--max-steps, --batch-size and --jobs must be >= 1, got {max_steps}, {batch}, {args.jobs}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device on this machine")
    eval_data = {ds: data / ds for ds in DATASETS}
    if args.smoke:
        # Small per-class tar copies (outside the repo, under OUT) so that listing and reading are quick.
        limits = {(ds, split): None for ds in DATASETS for split in ("train", "test")}
        per_class = {("cifar10", "train"): 16, ("cifar10", "test"): 8,
                     ("intel-scenes", "train"): 10, ("intel-scenes", "test"): 5}
        for (ds, split), n in per_class.items():
            make_smoke_source(data / ds / split, out / "smoke_src" / ds / split, per_class=n)
        eval_data = {ds: out / "smoke_src" / ds for ds in DATASETS}
        args.linear_epochs = min(args.linear_epochs, 3)
        args.workers = 0
    else:
        limits = {("cifar10", "train"): args.train_limit or None, ("cifar10", "test"): args.test_limit or None,
                  ("intel-scenes", "train"): args.intel_train_limit or None, ("intel-scenes", "test"): None}

    # 1. shards
    src = eval_data["cifar10"] / "train"
    shards = stage_shards(src, out / "shards", max(args.workers, 1), book,
                          samples_per_shard=64 if args.smoke else 5000)
    train_images = json.loads(shards.read_text())["num_samples"]

    # 2-3. pretraining, export, random encoders
    encoders: dict[str, Path] = {}
    example_train = None
    pending = []
    for seed in seeds:
        for loss in LOSSES:
            name = f"{loss}_s{seed}"
            run_dir = out / "runs" / name
            sets = train_overrides(args, shards, run_dir, seed, loss, max_steps, batch)
            argv = ["train", "--config", args.config]
            for x in sets:
                argv += ["--set", x]
            book.command("pijepa", *[_rel(a) if isinstance(a, Path) else a for a in argv])
            example_train = example_train or book.commands[-1]
            encoders[name] = out / "encoders" / f"{name}.pt"
            if not encoders[name].is_file() and not run_complete(run_dir, max_steps):
                pending.append((name, argv, run_dir))
    threads = run_threads(args.jobs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(book.timed, f"train/{name}", _run, _pijepa(*argv), run_dir / "train.log", threads,
                              args.device)
                  for name, argv, run_dir in pending]:
            f.result()
    from pijepa.parallel.formats import export_encoder
    for name, enc_path in encoders.items():
        book.command("pijepa", "export", "--run", _rel(out / "runs" / name), "--out", _rel(enc_path))
        if not enc_path.is_file():
            book.timed(f"export/{name}", export_encoder, out / "runs" / name, enc_path)
    for seed in seeds:
        rnd = out / "encoders" / f"random_s{seed}.pt"
        if not rnd.is_file():
            book.timed(f"random/s{seed}", save_random_encoder, args.config,
                       [*list(args.overrides), f"meta.seed={seed}", f"data.batch_size={batch}"], rnd)
        encoders[f"random_s{seed}"] = rnd

    # 4-5. features and evaluations
    used: dict[tuple[str, str], int] = {}
    for name, enc_path in encoders.items():
        for ds in DATASETS:
            files = {}
            for split in ("train", "test"):
                f = out / "features" / name / f"{ds}_{split}.pt"
                extract(enc_path, eval_data[ds] / split, f, limits[(ds, split)], args, book,
                        f"features/{name}/{ds}_{split}")
                files[split] = f
                if (ds, split) not in used:
                    from pijepa.eval.features_io import load_features
                    used[(ds, split)] = int(load_features(f)["labels"].numel())
            evaluate(files["train"], files["test"], out / "eval" / name / ds, args, book, f"eval/{name}/{ds}")
    book.save()

    # 6. report
    cmd = ["pijepa", "reproduce", "--seeds", ",".join(map(str, seeds)), "--out", _rel(out)]
    if args.config.resolve() != DEFAULT_CONFIG:
        cmd += ["--config", _rel(args.config)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if not args.smoke and args.train_limit != 10000:
        cmd += ["--train-limit", str(args.train_limit)]
    if not args.smoke and args.test_limit:
        cmd += ["--test-limit", str(args.test_limit)]
    if not args.smoke and args.intel_train_limit:
        cmd += ["--intel-train-limit", str(args.intel_train_limit)]
    for x in args.overrides:
        cmd += ["--set", x]
    if args.jobs != 1:
        cmd += ["--jobs", str(args.jobs)]
    if args.device != "cpu":
        cmd += ["--device", args.device]
    if args.smoke:
        cmd += ["--smoke"]
    if args.docs:
        cmd += ["--docs", _rel(args.docs)]
    o = base.optimization
    settings = {
        "command": ((f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS")
                     else "") + ("" if args.smoke else "nice -n 10 ") + " ".join(shlex.quote(c) for c in cmd)),
        "out": _rel(out), "config": _rel(args.config), "data": _rel(data),
        "example_commands": [c for c in (book.commands[0], example_train) if c]
        + [next(c for c in book.commands if c.startswith(p)) for p in
           ("pijepa export", "pijepa features", "pijepa eval knn", "pijepa eval linear")],
        "train_images": int(train_images), "model": base.meta.model_name + (
            f" with {base.meta.encoder_depth} blocks" if base.meta.encoder_depth else ""),
        "crop": base.data.crop_size,
        "patch": base.mask.patch_size, "batch": batch, "max_steps": max_steps, "lr": o.lr, "warmup": o.warmup,
        "l2_weight": o.l2_weight, "pkt_weight": o.pkt_weight, "pkt_chunk": o.pkt_chunk_size,
        "device": args.device, "cpus": os.cpu_count(), "threads": threads, "jobs": args.jobs,
        "linear_epochs": args.linear_epochs,
        "cifar_train_used": used[("cifar10", "train")], "cifar_test_used": used[("cifar10", "test")],
        "intel_train_used": used[("intel-scenes", "train")], "intel_test_used": used[("intel-scenes", "test")],
    }
    path = book.timed("report", write_report, args, out, docs, seeds, settings, book)
    write_report(args, out, docs, seeds, settings, book)  # again, so the table holds the report's own time
    log(f"wrote {path}, {docs / 'results_loss_curves.png'}, {docs / 'results_accuracy.png'}")
