"""`pijepa reproduce`: I-JEPA (L2) vs Probabilistic I-JEPA (`--arms`: L2_PKT, the published
L2_PKT_chunks, L2_PKT at given or the published pkt_weight) vs a random encoder, end to end, as a
pipeline over the public commands.

Stages, each skipped when its output already exists (a rerun after an interruption continues):

1. ``pijepa shards write`` of the ``--pretrain`` set's train tars (CIFAR-10 or intel-scenes)
   -> ``OUT/shards/shards.json``
2. ``pijepa train`` per seed and arm (identical config apart from the arm's overrides: the loss and
   its weights), in a subprocess with its log in ``OUT/runs/<name>/train.log``, ``--jobs`` at a time;
   the trainer resumes by itself
3. ``pijepa export`` of each run -> ``OUT/encoders/<name>.pt``; the random encoder ``random_s<seed>.pt``
   is the same architecture built with the same seed (``build_models``, as the trainer builds it at
   step 0) and saved in the same format, never trained
4. ``pijepa features`` (EMA target, mean pooling) per encoder, dataset and split
5. ``pijepa eval knn`` and ``pijepa eval linear`` per encoder and dataset
6. the report: ``results.md`` and PNG plots in ``--docs`` (default: ``--out``), ``OUT/results.json``;
   besides the accuracies it reads each run's ``metrics.csv`` for PKT's share of the gradient on the
   predictions (``grad_share_pkt``) and the target's effective rank (``target_rank``)

Stages 3-5 run in this process through the commands' own parsers (no interpreter start-up per
call). Every stage's argv is built once (``stages``) and is both what runs and what
``OUT/commands.sh`` lists. Wall times of the stages that ran are kept in ``OUT/timings.json``.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from pijepa.commands._args import add_config_arguments, positive_int
from pijepa.commands.reproduce.arms import ARM_FORMS, ArmRequest, build_arms, parse_arms, published_balance
from pijepa.commands.reproduce.spec import (
    DEFAULT_ARMS,
    DEFAULT_PRETRAIN,
    EVAL_SETS,
    RANDOM,
    SAMPLES_PER_SHARD,
    SMOKE,
    SPLITS,
    Layout,
    shown,
)
from pijepa.commands.reproduce.stages import Settings, plan, train_sets
from pijepa.runtime.errors import DataError, LaunchError

DEFAULT_CONFIG = "cifar10_reproduce"
DEFAULT_DATA = Path("..") / "shared" / "data"
DEFAULT_OUT = Path("runs") / "reproduce"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return values


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, what="the pretraining config", default=DEFAULT_CONFIG,
                         set_help="extra config override for every pretraining run; repeatable")
    p.add_argument("--seeds", type=_int_list, default=[0, 1], help="comma-separated seeds (default 0,1)")
    p.add_argument("--pretrain", choices=[ev.name for ev in EVAL_SETS], default=DEFAULT_PRETRAIN,
                   help="the dataset whose train split is pretrained on (default %(default)s); every encoder is "
                        "evaluated on both datasets' test splits")
    p.add_argument("--arms", default=DEFAULT_ARMS,
                   help=f"comma-separated pretrained arms, each trained per seed: {ARM_FORMS} (the pkt_weight "
                        "equal to the published L2_PKT_chunks balance at this run's per-device shapes); default "
                        "%(default)s. The random-init encoder is always evaluated too")
    p.add_argument("--out", type=Path, default=None,
                   help=f"folder for shards, runs, encoders, features, evaluations and the report (default "
                        f"{DEFAULT_OUT}, or {DEFAULT_OUT}_<set> with another --pretrain set)")
    p.add_argument("--docs", type=Path, default=None,
                   help="write results.md and its plots here instead of --out (e.g. --docs docs to update "
                        "the repository's docs)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="folder holding cifar10/ and intel-scenes/ as per-class tars (default %(default)s, "
                        "relative to the working directory: where this workplace keeps both)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="pretraining steps (default: the config's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="pretraining batch (default: the config's)")


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-limit", type=int, default=10000,
                   help="CIFAR-10 train images for the k-NN bank / linear probe (default 10000; 0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="CIFAR-10 test images (default 0 = all)")
    p.add_argument("--intel-train-limit", type=int, default=0, help="intel-scenes train images (default 0 = all)")
    p.add_argument("--linear-epochs", type=positive_int, default=100, help="linear probe epochs (default 100)")
    p.add_argument("--feature-batch", type=positive_int, default=256, help="images per feature batch (default 256)")
    p.add_argument("--workers", type=int, default=1, help="data workers for shards/features (default 1)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="pretraining runs at a time, each with cores/jobs torch threads (default 1); "
                        "2 on a 2-core machine gives ~15%% more throughput than 1 run with 2 threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where pretraining and feature extraction run (default cpu: the training runs are then "
                        "kept off any GPU with CUDA_VISIBLE_DEVICES='')")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps on a few hundred images: checks the pipeline, numbers mean nothing")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_run_arguments(p)
    _add_eval_arguments(p)
    return p


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "reproduce",
        help="pretrain L2 and PKT variants on CIFAR-10 or intel-scenes, evaluate them and a random encoder on "
             "both, write a results report",
        description="A pipeline over the public commands (shards write, train, export, features, eval). Everything "
                    "goes under --out: the stages' outputs, OUT/commands.sh (every stage's command as it runs), "
                    "timings.json, results.json, and the report results.md with its PNG plots (--docs DIR puts "
                    "the report elsewhere). A stage whose output exists is skipped, so a rerun continues.")
    add_arguments(p)
    p.set_defaults(run=run_reproduce, command_name="reproduce")


def rerun_command(args: argparse.Namespace) -> str:
    """This run as a command line: `pijepa reproduce` with every option that differs from its default."""
    parser = add_arguments(argparse.ArgumentParser(prog="pijepa reproduce"))
    argv, values = ["pijepa", "reproduce"], vars(args)
    for action in parser._actions:
        if action.dest not in values or not action.option_strings or values[action.dest] == action.default:
            continue
        value, flag = values[action.dest], action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            argv += [x for v in value for x in (flag, str(v))]
        elif isinstance(value, list):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, shown(value) if isinstance(value, Path) else str(value)]
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(argv)


def out_folder(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return DEFAULT_OUT if args.pretrain == DEFAULT_PRETRAIN else Path(f"{DEFAULT_OUT}_{args.pretrain}")


def check_shards(out: Path, pretrain: str) -> None:
    """An --out whose shards come from another --pretrain set would be silently reused: refuse it."""
    import json

    index = out / "shards" / "shards.json"
    if not index.is_file():
        return
    sources = json.loads(index.read_text()).get("sources", [])
    names = {Path(src["path"]).parent.name for src in sources if "path" in src}
    if names and names != {pretrain}:
        raise DataError(f"{index}: written from {', '.join(sorted(names))} train, not --pretrain {pretrain}; "
                        "give this run another --out")


def check_inputs(args: argparse.Namespace) -> tuple[Path, list[ArmRequest]]:
    """Everything a user can get wrong, before any work; returns the resolved config file and the arms."""
    from pijepa.runtime.resources import resolve_packaged

    requests = parse_arms(args.arms)
    config = resolve_packaged(args.config)
    where = f"--data names the folder holding {' and '.join(ev.name + '/' for ev in EVAL_SETS)}; default {DEFAULT_DATA}"
    if not args.data.is_dir():
        raise DataError(f"{args.data}: no such folder ({where})")
    for ds in (ev.name for ev in EVAL_SETS):
        for split in SPLITS:
            if not (args.data / ds / split).is_dir():
                raise DataError(f"{args.data / ds / split}: no such folder ({where})")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LaunchError("--device cuda: torch sees no CUDA device on this machine")
    check_shards(out_folder(args), args.pretrain)
    return config, requests


def settings(args: argparse.Namespace, config: Path, requests: list[ArmRequest]) -> Settings:
    """The effective settings; the arms' pkt_weights come from the runs' resolved shapes."""
    from pijepa.commands.reproduce.run import run_threads
    from pijepa.config import load_config

    base = load_config(config, list(args.overrides))
    layout = Layout(out_folder(args).resolve())
    smoke = args.smoke
    limits = {(ev.name, split): (getattr(args, opt) or None) if opt and not smoke else None
              for ev in EVAL_SETS for split, opt in ev.limit_options.items()}
    eval_roots = {ev.name: (layout.smoke_src if smoke else args.data.resolve()) / ev.name for ev in EVAL_SETS}
    s = Settings(
        layout=layout, config=shown(config) if Path(args.config).is_file() else args.config,
        config_path=config, data=args.data.resolve(), eval_roots=eval_roots,
        seeds=list(dict.fromkeys(args.seeds)),
        max_steps=args.max_steps or (SMOKE.max_steps if smoke else base.optimization.max_steps),
        batch=args.batch_size or (SMOKE.batch_size if smoke else base.data.micro_batch),
        overrides=list(args.overrides), smoke=smoke, device=args.device, jobs=args.jobs,
        threads=run_threads(args.jobs), workers=0 if smoke else args.workers, feature_batch=args.feature_batch,
        linear_epochs=min(args.linear_epochs, SMOKE.linear_epochs) if smoke else args.linear_epochs,
        samples_per_shard=SMOKE.samples_per_shard if smoke else SAMPLES_PER_SHARD, limits=limits,
        pretrain=args.pretrain)
    # Every arm resolves to the same shapes (the arms differ only in the loss and its weights).
    s.balance = published_balance(load_config(config, train_sets(s, RANDOM, s.seeds[0])))
    s.arms = build_arms(requests, s.balance)
    return s


def run_reproduce(args: argparse.Namespace) -> None:
    from pijepa.commands.reproduce.report import write_report
    from pijepa.commands.reproduce.run import Book, log, make_smoke_source, run_parallel, run_stage, write_commands

    config, requests = check_inputs(args)
    s = settings(args, config, requests)
    out = s.layout.out
    out.mkdir(parents=True, exist_ok=True)
    if s.smoke:  # small per-class tar copies under OUT, so that listing and reading them is quick
        for ev in EVAL_SETS:
            for split, n in ev.smoke_per_class.items():
                make_smoke_source(s.data / ev.name / split, s.eval_roots[ev.name] / split, per_class=n)
    stages = plan(s)
    write_commands(out / "commands.sh", stages.all())
    book = Book(out)
    run_stage(stages.shards, book, s.threads, s.device)
    run_parallel(stages.train, book, s.jobs, s.threads, s.device)
    for stage in stages.after:
        run_stage(stage, book, s.threads, s.device)

    docs = (args.docs or out).resolve()
    report = lambda: write_report(s, stages, book, docs, rerun_command(args))
    path = book.timed("report", report)
    report()  # again, so that the wall-time table holds the report's own time
    log(f"wrote {path}, {docs / 'results_loss_curves.png'}, {docs / 'results_accuracy.png'}")
