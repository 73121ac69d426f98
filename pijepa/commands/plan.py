"""`pijepa plan`: memory per GPU, micro-batch, accumulation, step time and communication per
strategy (the model is pijepa.plan); with `--trace`, the configured run's real step rehearsed on
fake tensors at that many ranks, beside the plan (pijepa.rehearsal)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from pijepa.commands._args import add_config_arguments, positive_int
from pijepa.config import Config, load_config
from pijepa.plan.hardware import GPUS
from pijepa.plan.planner import make_plan
from pijepa.plan.report import format_plan, plan_to_json
from pijepa.runtime.errors import ConfigError


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "plan", help="memory per GPU, micro-batch, accumulation, step time and communication per strategy")
    add_config_arguments(p)
    p.add_argument("--gpus", type=int, default=16, help="number of GPUs (default 16)")
    p.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS), help="GPU model (default a100-80gb)")
    p.add_argument("--utilization", type=float, default=0.4,
                   help="fraction of the datasheet bf16 dense peak reached, for the step time (default 0.4; "
                        "docs/perf.md's single-H200 ViT-H/14 steps reach 0.28-0.30 eager, 0.36 compiled)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="effective batch (default: data.global_batch_size, else batch_size x GPUs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--trace", action="store_true",
                   help="rehearse the configured run: its real FSDP step on --gpus ranks, in this process on fake "
                        "tensors, with memory and collectives per rank beside the plan; exits 2 when it does not "
                        "fit the GPU")
    p.add_argument("--trace-steps", type=positive_int, default=2, metavar="N",
                   help="optimizer steps to trace (default 2: the optimizer state exists from the second)")
    p.set_defaults(run=run_plan, command_name="plan")


def run_plan(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.trace:
        return run_trace(args, cfg)
    plan = make_plan(cfg, args.gpu, args.gpus, args.utilization, args.global_batch)
    if args.json:
        print(json.dumps(plan_to_json(plan, args.config), indent=2))
    else:
        print(format_plan(plan, args.config))


def run_trace(args: argparse.Namespace, cfg: Config) -> None:
    from pijepa.rehearsal import comparison_to_json, format_comparison, not_fitting, rehearse

    if args.global_batch:
        cfg = replace(cfg, data=replace(cfg.data, global_batch_size=args.global_batch))
    comparison = rehearse(cfg, GPUS[args.gpu], args.gpus, args.trace_steps, source=args.config)
    if args.json:
        print(json.dumps(comparison_to_json(comparison, args.config), indent=2))
    else:
        print(format_comparison(comparison, args.config))
    if not comparison.fits:
        raise ConfigError(not_fitting(comparison))
