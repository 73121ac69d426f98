"""`pijepa export`: one checkpoint of a run (any strategy's format) -> one encoder file."""

from __future__ import annotations

import argparse
from typing import get_args

from pijepa.parallel.exports import ExportFormat, Which
from pijepa.parallel.formats import export_encoder


def run(args: argparse.Namespace) -> None:
    summary = export_encoder(args.run_dir, args.out, step=args.step, fmt=args.format, which=args.which)
    held = "encoder, target encoder and predictor" if args.format == "pijepa" else f"{args.which} encoder"
    print(f"exported step {summary['step']} ({summary['source_format']} checkpoint {summary['checkpoint']}), "
          f"{held}, to {args.out} ({args.format})")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="consolidate a run's checkpoint into one encoder file")
    parser.add_argument("--run", dest="run_dir", required=True, metavar="DIR",
                        help="run folder (logging.folder) holding checkpoints/")
    parser.add_argument("--out", required=True,
                        help="output: a file (pijepa: loadable with pijepa.load_encoder; timm: safetensors, with "
                             "OUT.json beside it) or a folder (hf)")
    parser.add_argument("--format", choices=get_args(ExportFormat), default="pijepa",
                        help="pijepa (default: every part, for pijepa.load_encoder and features), timm (one encoder "
                             "for timm.create_model) or hf (a folder for transformers' IJepaModel.from_pretrained)")
    parser.add_argument("--which", choices=get_args(Which), default="target",
                        help="timm / hf: the EMA target encoder (default; what I-JEPA evaluates) or the "
                             "context encoder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.set_defaults(run=run, command_name="export")
