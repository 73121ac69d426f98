"""`pijepa shards write`: ImageFolder trees or per-class tars -> shuffled WebDataset shards."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pijepa.data.shards import LAYOUTS, write_shards


def parse_size(text: str | int) -> int:
    """'1GB' -> 10**9, '512MiB' -> 512 * 2**20, '1e9' -> 10**9 (decimal units, as disk vendors use)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (examples: 1GB, 500MB, 2GiB, 1e9)")
    try:
        number, unit, binary = float(match[1]), match[2].upper(), bool(match[3])
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (examples: 1GB, 500MB, 2GiB, 1e9)") from None
    power = " KMGT".index(unit) if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def run_write(args: argparse.Namespace) -> None:
    write_shards(args.src, args.out, samples_per_shard=args.samples_per_shard,
                 max_shard_bytes=args.max_shard_size, seed=args.seed, workers=args.workers,
                 reencode=args.reencode, prefix=args.prefix, progress=not args.no_progress)


def add_write_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--src", type=Path, action="append", required=True,
                        help=f"source folder: {LAYOUTS}; repeat for several splits (classes are the union)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the shards and shards.json")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="fixed samples per shard (default: fill shards up to --max-shard-size)")
    parser.add_argument("--max-shard-size", type=parse_size, default=1_000_000_000, dest="max_shard_size",
                        help="shard size limit, e.g. 1GB, 500MB, 2GiB (default 1GB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards (default 1)")
    parser.add_argument("--reencode", action="store_true", help="re-encode every image as RGB JPEG q95")
    parser.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar (default train)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def register(commands: argparse._SubParsersAction) -> None:
    shards = commands.add_parser("shards", help="WebDataset shards: write from ImageFolder trees or per-class tars")
    sub = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    write = sub.add_parser("write", help="convert images to shuffled WebDataset shards + shards.json")
    add_write_arguments(write)
    write.set_defaults(run=run_write, command_name="shards write")
