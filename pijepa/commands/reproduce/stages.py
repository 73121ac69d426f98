"""The stages of `pijepa reproduce`, each the `pijepa ...` command a user would type.

Every stage's argv is built once, here; the same list is executed (in a subprocess or in this
process) and written to OUT/commands.sh, so the script can never disagree with what ran.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pijepa.commands.reproduce.arms import Balance
from pijepa.commands.reproduce.run import save_random_encoder
from pijepa.commands.reproduce.spec import (
    DEFAULT_PRETRAIN,
    EVAL_SETS,
    KNN_KS,
    KNN_TEMPERATURE,
    LINEAR_SEED,
    PAPER_K,
    RANDOM,
    SHARD_SEED,
    SMOKE,
    SPLITS,
    Arm,
    Layout,
    shown,
)


@dataclass
class Settings:
    """The effective settings of one reproduce run (after --smoke and the config's defaults)."""

    layout: Layout
    config: str  # as passed to `pijepa train --config`: a packaged name or a path
    config_path: Path  # the file it resolves to
    data: Path  # --data
    eval_roots: dict[str, Path]  # dataset -> folder holding train/ and test/ (smoke: small copies)
    seeds: list[int]
    max_steps: int
    batch: int
    overrides: list[str]
    smoke: bool
    device: str
    jobs: int
    threads: int  # torch threads per pretraining run
    workers: int
    feature_batch: int
    linear_epochs: int
    samples_per_shard: int
    limits: dict[tuple[str, str], int | None] = field(default_factory=dict)
    pretrain: str = DEFAULT_PRETRAIN  # --pretrain: whose train split is written to shards
    arms: tuple[Arm, ...] = ()  # the pretrained arms (--arms), in report order
    balance: Balance | None = None  # the published L2_PKT_chunks balance at this run's shapes

    def all_arms(self) -> tuple[Arm, ...]:
        """The random encoder first, then the pretrained arms, in report order."""
        return (RANDOM, *self.arms)


@dataclass
class Stage:
    """One step: `pijepa <argv>` (or, for `call`, Python with no CLI command), skipped when `done()`."""

    name: str  # key in OUT/timings.json
    argv: list[str] | None
    log: Path
    done: Callable[[], bool]
    process: bool = False  # a subprocess `python -m pijepa <argv>` with its own log (else in this process)
    call: Callable[[], object] | None = None
    note: str = ""  # what commands.sh says for a stage without argv

    def script_line(self) -> str:
        if self.argv is None:
            return f"# {self.name}: {self.note}"
        return shlex.join(["pijepa", *self.argv])


@dataclass
class Plan:
    shards: Stage
    train: list[Stage]  # run --jobs at a time
    after: list[Stage]  # export, random encoders, features, evaluations, in order

    def all(self) -> list[Stage]:
        return [self.shards, *self.train, *self.after]


def _file(path: Path) -> Callable[[], bool]:
    return path.is_file


def shards_stage(s: Settings) -> Stage:
    lay = s.layout
    argv = ["shards", "write", "--src", shown(s.eval_roots[s.pretrain] / "train"), "--out", shown(lay.shards),
            "--samples-per-shard", str(s.samples_per_shard), "--workers", str(max(s.workers, 1)),
            "--seed", str(SHARD_SEED), "--no-progress"]
    return Stage("shards", argv, lay.log("shards"), _file(lay.shard_index), process=True)


def train_sets(s: Settings, arm: Arm, seed: int) -> list[str]:
    """The --set list of one pretraining run: one "epoch" of the schedules is the whole run."""
    lay = s.layout
    sets = [f"data.shards={shown(lay.shard_index)}", f"data.batch_size={s.batch}",
            f"data.epoch_samples={s.max_steps * s.batch}", "optimization.epochs=1",
            f"optimization.max_steps={s.max_steps}", f"meta.seed={seed}",
            f"logging.folder={shown(lay.run_dir(arm.name(seed)))}", *arm.sets]
    return sets + (list(SMOKE.sets) if s.smoke else []) + list(s.overrides)


def run_complete(run_dir: Path, max_steps: int) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{max_steps:08d}"


def train_stage(s: Settings, arm: Arm, seed: int) -> Stage:
    name = arm.name(seed)
    argv = ["train", "--config", s.config]
    for x in train_sets(s, arm, seed):
        argv += ["--set", x]
    run_dir, encoder = s.layout.run_dir(name), s.layout.encoder(name)
    # The trainer resumes by itself, so an interrupted run is simply started again.
    done = lambda: encoder.is_file() or run_complete(run_dir, s.max_steps)
    return Stage(f"train/{name}", argv, run_dir / "train.log", done, process=True)


def export_stage(s: Settings, name: str) -> Stage:
    out = s.layout.encoder(name)
    argv = ["export", "--run", shown(s.layout.run_dir(name)), "--out", shown(out)]
    return Stage(f"export/{name}", argv, s.layout.log(f"export/{name}"), _file(out))


def random_sets(s: Settings, seed: int) -> list[str]:
    return [*s.overrides, f"meta.seed={seed}", f"data.batch_size={s.batch}"]


def random_stage(s: Settings, seed: int) -> Stage:
    out = s.layout.encoder(RANDOM.name(seed))
    sets = random_sets(s, seed)
    note = (f"{shown(out)} has no CLI command: `pijepa reproduce` builds the models as the trainer does at "
            f"step 0 (build_models of {s.config} with {' '.join(sets)}) and saves them untrained "
            "in the export format")
    return Stage(f"random/s{seed}", None, s.layout.log(f"random/s{seed}"), _file(out),
                 call=lambda: save_random_encoder(s.config_path, sets, out), note=note)


def features_stage(s: Settings, name: str, ds: str, split: str) -> Stage:
    out = s.layout.features(name, ds, split)
    argv = ["features", "--encoder", shown(s.layout.encoder(name)), "--data", shown(s.eval_roots[ds] / split),
            "--out", shown(out), "--batch-size", str(s.feature_batch), "--workers", str(s.workers),
            "--device", s.device, "--no-progress"]
    limit = s.limits.get((ds, split))
    if limit:
        argv += ["--limit", str(limit)]
    stage = f"features/{name}/{ds}_{split}"
    return Stage(stage, argv, s.layout.log(stage), _file(out))


def eval_stages(s: Settings, name: str, ds: str) -> list[Stage]:
    lay = s.layout
    files = ["--train", shown(lay.features(name, ds, "train")), "--test", shown(lay.features(name, ds, "test"))]
    knn, linear = lay.eval_dir(name, ds) / "knn.json", lay.eval_dir(name, ds) / "linear.json"
    knn_argv = ["eval", "knn", *files, "--out", shown(knn), "--ks", ",".join(map(str, KNN_KS)),
                "--temperature", str(KNN_TEMPERATURE), "--paper-k", str(PAPER_K)]
    linear_argv = ["eval", "linear", *files, "--out", shown(linear), "--epochs", str(s.linear_epochs),
                   "--seed", str(LINEAR_SEED)]
    stage = f"eval/{name}/{ds}"
    return [Stage(f"{stage}/knn", knn_argv, lay.log(f"{stage}/knn"), _file(knn)),
            Stage(f"{stage}/linear", linear_argv, lay.log(f"{stage}/linear"), _file(linear))]


def plan(s: Settings) -> Plan:
    """Every stage in order; the encoders are evaluated pretrained runs first (seed by seed), then random."""
    trained = [a.name(seed) for seed in s.seeds for a in s.arms]
    after = [export_stage(s, name) for name in trained] + [random_stage(s, seed) for seed in s.seeds]
    for name in trained + [RANDOM.name(seed) for seed in s.seeds]:
        for ev in EVAL_SETS:
            after += [features_stage(s, name, ev.name, split) for split in SPLITS]
            after += eval_stages(s, name, ev.name)
    return Plan(shards_stage(s), [train_stage(s, a, seed) for seed in s.seeds for a in s.arms], after)


def first_commands(p: Plan) -> list[str]:
    """The first command of each kind, for the report."""
    seen: dict[str, str] = {}
    for stage in p.all():
        if stage.argv is not None:
            kind = " ".join(stage.argv[:2]) if stage.argv[0] in ("shards", "eval") else stage.argv[0]
            seen.setdefault(kind, stage.script_line())
    return list(seen.values())
