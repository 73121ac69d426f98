"""`pijepa bench step | loss | masks | data | trainer | collectives | rehearsal`: benchmarks that report
ratios to a baseline measured in the same run, and the planner held to real collectives and to
traces of the recipes (the measuring code is pijepa.bench)."""

from __future__ import annotations

import argparse

from pijepa.bench.data import run_bench_data
from pijepa.bench.step import bench_loss, bench_masks, bench_step
from pijepa.bench.trainer import bench_trainer
from pijepa.commands._args import add_config_arguments, positive_int
from pijepa.runtime.atomic import atomic_write_json


def add_step_loss_masks(bench: argparse._SubParsersAction) -> None:
    """Adds `step`, `loss` and `masks` to the `pijepa bench` subcommands."""
    step = bench.add_parser("step", help="time the full training step for several variants")
    step.add_argument("--model", default="vit_small")
    step.add_argument("--patch", type=positive_int, default=16)
    step.add_argument("--img", type=positive_int, default=224)
    step.add_argument("--batch", type=positive_int, default=8)
    step.add_argument("--pred-depth", type=positive_int, default=6)
    step.add_argument("--pred-dim", type=positive_int, default=384)
    step.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    step.add_argument("--variants", default="baseline,sdpa,sdpa+fused",
                      help="comma list of: baseline, sdpa, sdpa+fused, sdpa+fused+compile, xformers+fused")
    step.add_argument("--repeats", type=positive_int, default=3)
    step.add_argument("--out", help="also write the results as JSON")
    step.set_defaults(run=_run_step, command_name="bench step")
    loss = bench.add_parser("loss", help="fused vs plain gather + loss, forward and backward")
    loss.add_argument("--batch", type=positive_int, default=128)
    loss.add_argument("--repeats", type=positive_int, default=3)
    loss.add_argument("--out")
    loss.set_defaults(run=_run_loss, command_name="bench loss")
    masks = bench.add_parser("masks", help="vectorised mask collator vs the per-image reference")
    masks.add_argument("--batch", type=positive_int, default=128)
    masks.add_argument("--img", type=positive_int, default=224)
    masks.add_argument("--patch", type=positive_int, default=16)
    masks.add_argument("--out")
    masks.set_defaults(run=_run_masks, command_name="bench masks")


def _emit(result: dict, out: str | None, table: str) -> None:
    print(table)
    if out:
        atomic_write_json(out, result)


def _run_step(args) -> None:
    r = bench_step(args.model, args.patch, args.img, args.batch, args.pred_depth, args.pred_dim, args.dtype,
                   variants=tuple(args.variants.split(",")), repeats=args.repeats)
    lines = [f"bench step: {r['model']} batch {r['batch']} {r['dtype']} on {r['device']}; "
             f"matmul peak {r['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s; tokens {r['tokens']}",
             f"{'variant':<22}{'step s':>9}{'img/s':>9}{'TFLOP':>8}{'MFU':>7}{'peak MB':>9}{'vs base':>9}"]
    for x in r["results"]:
        lines.append(f"{x['variant']:<22}{x['step_s']:>9.3f}{x['images_per_s']:>9.2f}{x['tflops_per_step']:>8.3f}"
                     f"{x['mfu']:>7.1%}{x['peak_memory_mb']:>9.0f}{x['speedup']:>8.2f}x")
    _emit(r, args.out, "\n".join(lines))


def _run_loss(args) -> None:
    r = bench_loss(batch=args.batch, repeats=args.repeats)
    lines = [f"bench loss: L2_PKT fwd+bwd {r['shape']} on {r['device']}",
             f"{'grouping':<10}{'plain s':>10}{'fused s':>10}{'speedup':>9}"]
    for g, x in r["results"].items():
        lines.append(f"{g:<10}{x['plain']:>10.3f}{x['fused']:>10.3f}{x['speedup']:>8.2f}x")
    _emit(r, args.out, "\n".join(lines))


def _run_masks(args) -> None:
    r = bench_masks(batch=args.batch, img=args.img, patch=args.patch)
    table = (f"bench masks: batch {r['batch']}, {r['grid']}x{r['grid']} grid: reference "
             f"{r['results']['reference'] * 1e3:.1f} ms, vectorised {r['results']['vectorised'] * 1e3:.2f} ms, "
             f"speedup {r['speedup']:.1f}x")
    _emit(r, args.out, table)


def _run_trainer(args) -> None:
    r = bench_trainer(args.model, args.patch, args.img, args.batch, args.pred_depth, args.pred_dim, args.workers,
                      args.steps)
    lines = [f"bench trainer: {r['model']} batch {r['batch']} float32 on {r['device']}; tokens {r['tokens']}",
             f"{'':<40}{'step s':>9}{'img/s':>9}{'vs base':>9}"]
    lines += [f"{x['what']:<40}{x['step_s']:>9.3f}{x['images_per_s']:>9.2f}{x['vs_baseline']:>8.2f}x"
              for x in r["rows"]]
    lines.append(f"pijepa train / bench step: {r['trainer_vs_bench_step']:.2f}x (images/s)")
    _emit(r, args.out, "\n".join(lines))


def add_bench_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--shards", required=True,
                        help="data.shards: a brace pattern, a list, a shards.json (or its folder) or pipe: commands")
    add_config_arguments(parser, required=False, what="crop, augmentation, masks, batch size (default: built-in)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="loader worker counts (default 1 2; 0 = the loader in this process)")
    parser.add_argument("--batches", type=positive_int, default=40, help="timed batches per measurement (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per worker first (default 3)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed windows per measurement; the best counts (default 3: on a shared machine "
                             "other processes only ever slow a window down)")
    return parser


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks: step, loss, masks, data, trainer (ratios to a baseline), "
                                "collectives (beside the plan)")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    add_step_loss_masks(sub)
    trainer = sub.add_parser("trainer", help="the real trainer vs `bench step` vs the original design's step, "
                             "same shapes, one run")
    for flag, default in (("--model", "vit_small"), ("--patch", 16), ("--img", 224), ("--batch", 8),
                          ("--pred-depth", 6), ("--pred-dim", 384), ("--steps", 4)):
        trainer.add_argument(flag, type=str if flag == "--model" else positive_int, default=default)
    trainer.add_argument("--workers", type=int, choices=range(0, 65), default=1, metavar="N",
                         help="DataLoader workers of the trainer (default 1; 0 = in the main process)")
    trainer.add_argument("--out", help="also write the results as JSON")
    trainer.set_defaults(run=_run_trainer, command_name="bench trainer")
    data = sub.add_parser("data", help="images/s of the webdataset loader against a single-process "
                          "decode + augment floor, for 1 and 2 workers")
    add_bench_data_arguments(data)
    data.set_defaults(run=run_bench_data, command_name="bench data")
    collectives = sub.add_parser("collectives", help="collectives per optimizer step of the configured run on the "
                                 "ranks of this launch (torchrun, deepspeed), beside the planner's model")
    add_config_arguments(collectives)
    collectives.add_argument("--steps", type=positive_int, default=3, help="optimizer steps to count (default 3)")
    collectives.add_argument("--out", help="also write the results as JSON (rank 0)")
    collectives.set_defaults(run=_run_collectives, command_name="bench collectives")
    rehearsal = sub.add_parser("rehearsal", help="`pijepa plan --trace` for every packaged recipe at 16 ranks x "
                               "FSDP full/grad_op/hybrid x AC none/full/selective, at 32 and 64 ranks, and with "
                               "accumulation: traced vs planned memory and collectives")
    rehearsal.add_argument("--recipes", default=None, help="comma list of packaged recipes (default: all four)")
    rehearsal.add_argument("--as-written", action="store_true",
                           help="only each recipe as written at 16, 32 and 64 ranks (the README's table)")
    rehearsal.add_argument("--out", help="also write the rows as JSON, one case at a time")
    rehearsal.set_defaults(run=_run_rehearsal, command_name="bench rehearsal")


def _run_rehearsal(args) -> None:
    from pijepa.bench.rehearsal import RECIPES, cases, markdown, run_case

    rows = []
    recipes = tuple(args.recipes.split(",")) if args.recipes else RECIPES
    for case in cases(recipes, matrix=not args.as_written):
        rows.append(run_case(case))
        print(f"{case.label}: traced {rows[-1]['traced_gib']:.2f} GiB, planned {rows[-1]['planned_gib']:.2f} GiB "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
        if args.out:
            atomic_write_json(args.out, {"rows": rows})
    print(markdown(rows))


def _run_collectives(args) -> None:
    from pijepa.bench.collectives import bench_collectives, format_collectives
    from pijepa.config import load_config

    r = bench_collectives(load_config(args.config, args.overrides), args.steps)
    if r is not None:
        _emit(r, args.out, format_collectives(r))
