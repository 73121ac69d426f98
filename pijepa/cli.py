"""`pijepa <command>`: a thin entry point; each command lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys

from pijepa.config import ConfigError
from pijepa.train.guards import NonFiniteError


def _train(args: argparse.Namespace) -> None:
    from pijepa.config import load_config
    from pijepa.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    try:
        code = trainer.train()
    finally:
        trainer.close()
    if code:
        raise SystemExit(code)  # preempted: saved, rerun to resume


def _shards_write(args: argparse.Namespace) -> None:
    from pijepa.data.shards import run_shards_write

    code = run_shards_write(args)
    if code:
        raise SystemExit(code)


def _features(args: argparse.Namespace) -> None:
    from pijepa.eval.cli import run_features

    run_features(args)


def _eval_knn(args: argparse.Namespace) -> None:
    from pijepa.eval.cli import run_knn_cli

    run_knn_cli(args)


def _eval_linear(args: argparse.Namespace) -> None:
    from pijepa.eval.cli import run_linear_cli

    run_linear_cli(args)


def _viz_masks(args: argparse.Namespace) -> None:
    from pijepa.tools.viz import run_viz_masks

    run_viz_masks(args)


def _export(args: argparse.Namespace) -> None:
    from pijepa.tools.export import export_encoder

    summary = export_encoder(args.run_dir, args.out, step=args.step)
    print(f"exported step {summary['step']} ({summary['source_format']} checkpoint {summary['checkpoint']}) "
          f"to {args.out}")


def _bench_data(args: argparse.Namespace) -> None:
    from pijepa.tools.bench_data import run_bench_data

    run_bench_data(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pijepa", description="Probabilistic I-JEPA pretraining and evaluation")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="pretrain an encoder from a YAML config")
    train.add_argument("--config", required=True, help="YAML config file (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value; repeatable")
    train.set_defaults(run=_train)

    export = commands.add_parser("export", help="consolidate a run's checkpoint into one encoder file")
    export.add_argument("--run", dest="run_dir", required=True, metavar="DIR",
                        help="run folder (logging.folder) holding checkpoints/")
    export.add_argument("--out", required=True, help="output file, loadable with pijepa.load_encoder")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    export.set_defaults(run=_export)

    shards = commands.add_parser("shards", help="WebDataset shards: write from ImageFolder trees or per-class tars")
    shards_commands = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    write = shards_commands.add_parser("write", help="convert images to shuffled WebDataset shards + shards.json")
    from pijepa.data.shards import add_shards_arguments
    add_shards_arguments(write)
    write.set_defaults(run=_shards_write)

    bench = commands.add_parser("bench", help="benchmarks: step, loss, masks, data (ratios to a baseline)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    bench_data = bench_commands.add_parser("data", help="images/s of the webdataset loader against a "
                                           "single-process decode + augment floor, for 1 and 2 workers")
    from pijepa.tools.bench_data import add_bench_data_arguments
    add_bench_data_arguments(bench_data)
    bench_data.set_defaults(run=_bench_data)
    from pijepa.tools.bench_step import add_arguments as add_bench_step_arguments
    add_bench_step_arguments(bench_commands)

    from pijepa.tools.plan import add_arguments as add_plan_arguments
    add_plan_arguments(commands)
    from pijepa.tools.reproduce import add_arguments as add_reproduce_arguments
    add_reproduce_arguments(commands)

    from pijepa.eval.cli import add_features_arguments, add_knn_arguments, add_linear_arguments
    features = commands.add_parser("features", help="extract frozen features of a labelled image set")
    add_features_arguments(features)
    features.set_defaults(run=_features)

    evaluate = commands.add_parser("eval", help="evaluate frozen features: k-NN or a linear probe")
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True, metavar="SUBCOMMAND")
    knn = eval_commands.add_parser("knn", help="weighted cosine k-NN and the paper's Euclidean 5-NN")
    add_knn_arguments(knn)
    knn.set_defaults(run=_eval_knn)
    linear = eval_commands.add_parser("linear", help="linear probe with an lr sweep on held-out train data")
    add_linear_arguments(linear)
    linear.set_defaults(run=_eval_linear)

    viz = commands.add_parser("viz", help="pictures: the masks a config draws")
    viz_commands = viz.add_subparsers(dest="viz_command", required=True, metavar="SUBCOMMAND")
    masks = viz_commands.add_parser("masks", help="a PNG grid of images with their context and target blocks")
    from pijepa.tools.viz import add_viz_masks_arguments
    add_viz_masks_arguments(masks)
    masks.set_defaults(run=_viz_masks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteError) as e:
        # Bad input (exit 2) or a diverged run (NonFiniteError.exit_code): one clear line, no
        # traceback (PIJEPA_DEBUG=1 shows it).
        if os.environ.get("PIJEPA_DEBUG"):
            raise
        print(f"pijepa {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
