"""The `pijepa reproduce` report: `templates/reproduce_report.md` filled from measured values only.

Model, steps, batch, losses and their weights come from each run's resolved `config.yaml` (written
by the trainer), dataset sizes from `shards.json`, the data folders and the feature files, protocol
settings from the evaluations' JSON files; the text holds nothing a config or the data could change.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from pijepa.commands.reproduce.arms import versus_baseline
from pijepa.commands.reproduce.plots import plot_accuracy, plot_losses
from pijepa.commands.reproduce.shares import collect_diagnostics, effective_weight, share_summary, share_table
from pijepa.commands.reproduce.spec import BASELINE, EVAL_SETS, METRICS, RANDOM, SPLITS, Arm, shown
from pijepa.commands.reproduce.stages import Plan, Settings, first_commands, train_sets
from pijepa.commands.reproduce.tables import (
    CLEAR_POINTS,
    Results,
    accuracy_table,
    collect,
    comparison,
    final_loss_table,
    final_losses,
    grouped_timings,
    linear_results,
    mean_std,
    per_seed_table,
    random_section,
)
from pijepa.runtime.atomic import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from pijepa.commands.reproduce.arms import Balance
    from pijepa.commands.reproduce.run import Book
    from pijepa.config import Config

TEMPLATE = "templates/reproduce_report.md"
LONGER_RUNS = "results_longer_runs.md"  # hand-written notes on longer runs, linked when beside the report
FEATURE_ENCODERS = {"target": "EMA target", "context": "context"}
POOL_TEXT = {"mean": "mean of the last layer's normalised tokens",
             "lastn": "concatenated mean tokens of the last blocks, each through the final norm"}


def run_config(s: Settings, a: Arm, seed: int) -> Config:
    """The run's resolved config as the trainer wrote it; before that, as the trainer will resolve it."""
    from pijepa.config import load_config

    path = s.layout.run_dir(a.name(seed)) / "config.yaml"
    return load_config(path) if path.is_file() else load_config(s.config_path, train_sets(s, a, seed))


def _uses_pkt(cfg: Config) -> bool:
    return "PKT" in cfg.optimization.loss_function


def arm_text(a: Arm, cfg: Config) -> str:
    o = cfg.optimization
    pkt = (f", l2_weight {o.l2_weight:g}, pkt_weight {o.pkt_weight:g}, {o.pkt_grouping} grouping of "
           f"{o.pkt_chunk_size}") if _uses_pkt(cfg) else ""
    return f"{a.label}: `{' '.join(a.sets)}` (loss {o.loss_function}{pkt})"


def data_sizes(s: Settings) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The evaluation sets' sentence: images used (feature files) of images in the folder, per split."""
    from pijepa.eval.datasets import list_images
    from pijepa.eval.features_io import load_features

    first = s.arms[0].name(s.seeds[0])
    parts, sizes = [], {}
    meta = load_features(s.layout.features(first, EVAL_SETS[0].name, SPLITS[0]))["meta"]
    for ev in EVAL_SETS:
        counts = []
        for split in SPLITS:
            feats = load_features(s.layout.features(first, ev.name, split))
            used, total = int(feats["labels"].numel()), len(list_images(s.eval_roots[ev.name] / split).samples)
            sizes[f"{ev.name}/{split}"] = {"used": used, "available": total, "dim": int(feats["features"].shape[1])}
            role = " (the k-NN bank / probe training set)" if split == "train" else ""
            counts.append(f"{used} of {total} {split} images{role}")
        parts.append(f"{ev.name}: " + ", ".join(counts))
    limited = any(v["used"] < v["available"] for v in sizes.values())
    note = " (subsets: `pijepa features --limit`, round-robin over classes)" if limited else ""
    return "; ".join(parts) + "." + note, sizes, meta


def summary_lines(results: Results, arms: tuple[Arm, ...], seeds: list[int], finals: dict[str, dict[str, float]],
                  verdicts: list[str]) -> list[str]:
    """Measured headline statements: gains over the random encoder (paired by seed), arm vs L2 verdicts."""
    cells = [(ev.name, m.key) for ev in EVAL_SETS for m in METRICS]
    lines: list[str] = []
    gains: dict[str, list[float]] = {}
    clear_counts = []
    for a in arms:
        diffs = [[y - x for x, y in zip(results[RANDOM.key][ds][m], results[a.key][ds][m])] for ds, m in cells]
        clear = sum(len(d) > 1 and mean_std(d)[0] > max(2 * mean_std(d)[1], CLEAR_POINTS) for d in diffs)
        gains[a.key] = [sum(d[i] for d in diffs) / len(cells) for i in range(len(seeds))]
        clear_counts.append(clear)
        lines.append(f"- {a.key} − {RANDOM.key}: mean gain {sum(gains[a.key]) / len(seeds):+.2f} points over the "
                     f"{len(cells)} dataset × metric cells (per seed: "
                     + ", ".join(f"seed {x} {g:+.2f}" for x, g in zip(seeds, gains[a.key]))
                     + f"); a clear gain (paired mean > 2 std and > {CLEAR_POINTS} pt) in {clear} of "
                     f"{len(cells)} cells.")
    if all(c < len(cells) / 2 for c in clear_counts):
        lines.append("- So at this scale the pretrained encoders do **not** beat the random encoder by a clear "
                     "margin over the seeds; the numbers below are a pipeline check, not a reproduction of "
                     "the paper's gains.")
    lines += [f"- {v}" for v in verdicts]
    return lines + weak_seed_lines(arms, seeds, gains, finals)


def weak_seed_lines(arms: tuple[Arm, ...], seeds: list[int], gains: dict[str, list[float]],
                    finals: dict[str, dict[str, float]]) -> list[str]:
    """Seeds whose pretrained encoders are no better than their random one, with their final losses."""
    def losses(seed: int) -> list[float]:
        return [finals[a.name(seed)]["loss"] for a in arms if a.name(seed) in finals]

    def text(seed: int) -> str:
        return ", ".join(f"{a.key} {finals[a.name(seed)]['loss']:.4f}" for a in arms if a.name(seed) in finals)

    weak = [x for i, x in enumerate(seeds) if all(gains[a.key][i] < CLEAR_POINTS for a in arms)]
    others = [y for y in seeds if y not in weak and losses(y)]
    lines = []
    for x in weak:
        line = (f"- Seed {x}'s pretrained encoders are no better than its random encoder (gain < {CLEAR_POINTS} pt "
                f"on average); their final pretraining losses: {text(x)}")
        if others and losses(x) and max(losses(x)) < min(v for y in others for v in losses(y)):
            line += (", lower than every other seed's (" + "; ".join(f"seed {y}: {text(y)}" for y in others)
                     + "), which together suggests the predictor/target pair drifted towards a low-information "
                     "(partly collapsed) solution rather than learning features")
        lines.append(line + ".")
    return lines


def linear_values(linear: list[dict[str, Any]]) -> dict[str, str]:
    grids = dict.fromkeys(tuple(lin["lrs"]) for lin in linear)
    top = sum(lin["best_lr"] == max(lin["lrs"]) for lin in linear)
    note = (f"The linear probe's held-out sweep picked the largest lr of its grid in {top} of {len(linear)} "
            "probes, so the linear numbers may be slightly below what a wider grid would give (for every "
            "encoder alike).\n\n") if top else ""
    return {"optimizer": "/".join(sorted({str(lin["optimizer"]) for lin in linear})).replace("adamw", "AdamW"),
            "linear_epochs": "/".join(sorted({str(lin["epochs"]) for lin in linear})),
            "lr_grid": "; ".join(", ".join(f"{lr:g}" for lr in grid) for grid in grids),
            "val_percent": "/".join(sorted({f"{100 * lin['val_fraction']:g}%" for lin in linear})),
            "lr_note": note}


def knn_values(s: Settings) -> dict[str, str]:
    knn = json.loads((s.layout.eval_dir(s.arms[0].name(s.seeds[0]), EVAL_SETS[0].name) / "knn.json").read_text())
    cos, paper = knn["protocols"]["weighted_cosine"], knn["protocols"]["euclidean_majority"]
    return {"temperature": f"{cos['temperature']:g}", "knn_ks": "k=" + ", ".join(map(str, cos["ks"])),
            "paper_knn": f"k={', '.join(map(str, paper['ks']))}, {paper['metric']}, majority vote"}


def pkt_note(finals: dict[str, dict[str, float]], configs: dict[str, Config], balance: Balance) -> str:
    lines = []
    for key, cfg in configs.items():
        ratios = [f["loss_pkt"] / f["loss_l2"] for name, f in finals.items()
                  if name.rsplit("_s", 1)[0] == key and f.get("loss_l2") and "loss_pkt" in f]
        weight = effective_weight(cfg, balance)
        if weight is not None and ratios:
            o = cfg.optimization
            spread = f"{min(ratios):.2g}" + (f"–{max(ratios):.2g}" if len(ratios) > 1 else "")
            weighted = f"{weight * min(ratios):.2g}" + (f"–{weight * max(ratios):.2g}" if len(ratios) > 1 else "")
            lines.append(f"\nIn the {key} runs the PKT term (a KL averaged over all entries of "
                         f"{o.pkt_chunk_size}x{o.pkt_chunk_size} similarity distributions with {o.pkt_grouping} "
                         f"grouping) is {spread} times the L2 term at the last logged step; weighted as in the "
                         f"loss (pkt_weight {weight:.4g} as `L2_PKT`) {weighted} times.\n")
    return "".join(lines)


def setup_values(s: Settings, cfg: Config, meta: dict[str, Any], train_images: int) -> dict[str, Any]:
    """The Setup section's values: the first pretrained run's resolved config and its encoder's features."""
    d, o, model = cfg.data, cfg.optimization, meta["model"]
    steps, batch = o.max_steps, d.micro_batch
    return {
        "pretrain_set": s.pretrain, "train_images": train_images,
        "pretrain_src": shown(s.eval_roots[s.pretrain] / "train"), "wds_mode": d.wds_mode,
        "config": s.config, "crop": d.crop_size, "patch": cfg.mask.patch_size,
        "model": f"{cfg.meta.model_name} ({model['depth']} blocks of width {model['embed_dim']})",
        "tokens": (d.crop_size // cfg.mask.patch_size) ** 2, "batch": batch, "max_steps": steps,
        "images": steps * batch, "epochs": f"{steps * batch / train_images:.2f}", "lr": f"{o.lr:g}",
        "warmup": f"{o.warmup / o.epochs:g}", "precision": "bf16 autocast" if cfg.meta.use_bfloat16 else "fp32",
        "device": s.device.upper(), "cpus": os.cpu_count(), "jobs": s.jobs, "threads": s.threads,
        "seeds": ", ".join(map(str, s.seeds)),
        "feature_encoder": FEATURE_ENCODERS.get(meta["which"], meta["which"]),
        "pool_text": POOL_TEXT.get(meta["pool"], meta["pool"]), "eval_size": meta["img_size"],
    }


def _template() -> Template:
    return Template(importlib.resources.files("pijepa.commands.reproduce").joinpath(TEMPLATE).read_text())


def pkt_values(s: Settings, configs: dict[str, Config], results: Results) -> tuple[dict[str, Any], dict[str, Any]]:
    """The comparisons against L2 and the random encoder, PKT's gradient shares and the published balance."""
    assert s.balance is not None
    by_key = {a.key: a for a in s.arms}
    sections, records = [], []
    for base, cand in versus_baseline(s.arms):
        text, record = comparison(results, by_key[base], by_key[cand])
        sections.append(text)
        records.append(record)
    random_text, random_records = random_section(results, s.arms)
    diags = collect_diagnostics(s.layout, s.arms, s.seeds)
    published = [a.key for a in s.arms if a.key.endswith("@published")]
    values = {"comparisons": "\n".join(sections) or f"(No {BASELINE} arm among `--arms`: no comparison against "
                                                      "I-JEPA; each arm against the random encoder is below.)\n",
              "random_section": random_text, "share_table": share_table(s.arms, configs, s.balance, diags, results),
              "balance": s.balance.text(),
              "balance_use": (f"`{published[0]}` trains `L2_PKT` with this pkt_weight; " if published else "")}
    record = {"comparisons": records + random_records, "diagnostics": diags,
              "published_pkt_weight": s.balance.as_dict(),
              "arms": {a.key: {"label": a.label, "sets": list(a.sets),
                               "loss": configs[a.key].optimization.loss_function,
                               "l2_weight": configs[a.key].optimization.l2_weight,
                               "pkt_weight": configs[a.key].optimization.pkt_weight,
                               "pkt_weight_as_L2_PKT": effective_weight(configs[a.key], s.balance)}
                       for a in s.arms}}
    return values, record


def write_report(s: Settings, plan: Plan, book: Book, docs: Path, rerun: str) -> Path:
    """results.md and its two PNG plots in `docs`, OUT/results.json; returns the path of results.md."""
    lay, arms, balance = s.layout, s.arms, s.balance
    assert balance is not None  # settings() resolves it with the arms
    results = collect(lay, s.all_arms(), s.seeds)
    finals = final_losses(lay, arms, s.seeds)
    configs = {a.key: run_config(s, a, s.seeds[0]) for a in arms}
    eval_sizes, sizes, meta = data_sizes(s)
    train_images = int(json.loads(lay.shard_index.read_text())["num_samples"])
    pkt, record = pkt_values(s, configs, results)
    verdicts = [c["verdict"] for c in record["comparisons"] if c["base"] != RANDOM.key]
    values: dict[str, Any] = {
        **setup_values(s, configs[arms[0].key], meta, train_images),
        **linear_values(linear_results(lay, s.all_arms(), s.seeds)), **knn_values(s), **pkt,
        "title": " vs ".join([*(a.label for a in arms), "a random encoder"])
        + f", pretrained on {s.pretrain} ({s.device.upper()} scale)",
        "smoke_title": " — SMOKE RUN, numbers mean nothing" if s.smoke else "",
        "summary": "\n".join(summary_lines(results, arms, s.seeds, finals, verdicts)
                             + share_summary(arms, record["diagnostics"])),
        "longer_runs": (f"- Longer and tuned runs, measured by hand: [{LONGER_RUNS}]({LONGER_RUNS}).\n"
                        if (docs / LONGER_RUNS).is_file() else ""),
        "rerun": rerun, "out": shown(lay.out), "report_dir": shown(docs),
        "example_commands": "\n".join(first_commands(plan)),
        "arm_list": "; ".join(arm_text(a, configs[a.key]) for a in arms),
        "feature_dim": sizes[f"{EVAL_SETS[0].name}/train"]["dim"], "eval_sizes": eval_sizes,
        "accuracy_table": accuracy_table(results, s.all_arms()),
        "per_seed_table": per_seed_table(results, s.all_arms(), s.seeds),
        "final_losses": final_loss_table(finals), "pkt_note": pkt_note(finals, configs, balance),
        "timings": grouped_timings(book.timings),
        "jobs_note": (f"\nWith `--jobs {s.jobs}` that many training runs overlap, so the wall time is shorter "
                      "than this sum.\n") if s.jobs > 1 and book.timings else "",
    }
    pkt_arms = {a.key for a in arms if _uses_pkt(configs[a.key])}
    plot_losses(lay, arms, s.seeds, pkt_arms, docs / "results_loss_curves.png")
    plot_accuracy(results, s.all_arms(), docs / "results_accuracy.png")
    atomic_write_json(lay.out / "results.json", {
        "settings": {k: v for k, v in values.items() if not isinstance(v, str) or "\n" not in v},
        "data": sizes, "seeds": s.seeds, "pretrain": s.pretrain, "results": results, **record,
        "final_losses": finals, "timings_s": book.timings})
    return atomic_write_text(docs / "results.md", _template().substitute(values))
