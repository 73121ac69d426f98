"""`pijepa export`: one checkpoint of a run (any strategy's format) -> one encoder file."""

from __future__ import annotations

import argparse

from pijepa.parallel.formats import export_encoder


def run(args: argparse.Namespace) -> None:
    summary = export_encoder(args.run_dir, args.out, step=args.step)
    print(f"exported step {summary['step']} ({summary['source_format']} checkpoint {summary['checkpoint']}) "
          f"to {args.out}")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="consolidate a run's checkpoint into one encoder file")
    parser.add_argument("--run", dest="run_dir", required=True, metavar="DIR",
                        help="run folder (logging.folder) holding checkpoints/")
    parser.add_argument("--out", required=True, help="output file, loadable with pijepa.load_encoder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.set_defaults(run=run, command_name="export")
