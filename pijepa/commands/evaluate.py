"""`pijepa features`, `pijepa eval knn` and `pijepa eval linear`: frozen-feature evaluation.

Bad input raises a UserError, which `pijepa.cli.main` turns into one line and exit code 2.
"""

from __future__ import annotations

import argparse

from pijepa.commands._args import device_name, positive_int
from pijepa.eval.features import POOLS
from pijepa.models.attention import ATTN_BACKENDS
from pijepa.runtime.atomic import atomic_write_json
from pijepa.runtime.log import console


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# ----------------------------------------------------------------------------- features


def add_features_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--encoder", required=True,
                        help="checkpoint: official I-JEPA .pth.tar, a pijepa state.pt or an exported encoder")
    parser.add_argument("--data", required=True,
                        help="images: an ImageFolder tree, a folder of per-class <class>.tar files, "
                             "or a WebDataset shards folder (with shards.json)")
    parser.add_argument("--out", required=True, help="feature file to write (pijepa-features-v1)")
    parser.add_argument("--which", choices=("target", "context"), default="target",
                        help="encoder to use: the EMA target (default, as I-JEPA evaluates) or the context encoder")
    parser.add_argument("--pool", choices=POOLS, default="mean",
                        help="mean: mean of the last layer's normed tokens (default); lastn: concatenation "
                             "of the last --last-n blocks' mean tokens, each through the final norm")
    parser.add_argument("--last-n", type=positive_int, default=4, help="blocks for --pool lastn (default 4)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="eval crop size (default: the encoder's training size)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per process (default 2)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use at most N images, taken round-robin over classes")
    parser.add_argument("--device", type=device_name, default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--attn-backend", choices=ATTN_BACKENDS, default="sdpa")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_features(args: argparse.Namespace) -> None:
    from pijepa.eval.features import extract_features

    summary = extract_features(
        args.encoder, args.data, args.out, which=args.which, pool=args.pool, last_n=args.last_n,
        batch_size=args.batch_size, img_size=args.img_size, workers=args.workers, limit=args.limit,
        device=args.device, attn_backend=args.attn_backend, progress=not args.no_progress)
    if summary is not None:  # rank 0
        skipped = f"; skipped {summary['skipped']} non-image files" if summary["skipped"] else ""
        console(f"pijepa features: wrote {summary['num_samples']} x {summary['dim']} features of "
                f"{summary['num_classes']} classes to {summary['out']}{skipped}")


# ----------------------------------------------------------------------------- eval


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="feature file of the training split")
    parser.add_argument("--test", required=True, help="feature file of the test split")
    parser.add_argument("--out", default=None, help="results JSON to write (default: print only)")
    parser.add_argument("--device", type=device_name, default="cpu", help="device for the evaluation (default cpu)")


def add_knn_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common(parser)
    parser.add_argument("--ks", type=_int_list, default=[10, 20, 100, 200],
                        help="ks of the weighted cosine k-NN, comma-separated (default 10,20,100,200)")
    parser.add_argument("--temperature", type=float, default=0.07, help="weighted k-NN temperature (default 0.07)")
    parser.add_argument("--paper-k", type=positive_int, default=5,
                        help="k of the paper's Euclidean majority vote (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="test rows per batch (default 512)")
    return parser


def run_knn_cli(args: argparse.Namespace) -> None:
    from pijepa.eval.knn import format_table, run_knn

    results = run_knn(args.train, args.test, ks=args.ks, temperature=args.temperature,
                      paper_k=args.paper_k, batch_size=args.batch_size, device=args.device)
    print(format_table(results))
    if args.out:
        atomic_write_json(args.out, results)


def add_linear_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common(parser)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--lrs", type=_float_list, default=None,
                        help="learning rates to sweep, comma-separated (default depends on --optimizer)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--epochs", type=positive_int, default=100)
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--batchnorm", action="store_true",
                        help="BatchNorm1d (no affine) in front of the linear layer, as MAE's probe")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="part of the training split held out to choose the lr (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run_linear_cli(args: argparse.Namespace) -> None:
    from pijepa.eval.linear import format_table, run_linear_probe

    results = run_linear_probe(
        args.train, args.test, device=args.device, optimizer=args.optimizer, lrs=args.lrs,
        weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size,
        batchnorm=args.batchnorm, val_fraction=args.val_fraction, seed=args.seed)
    print(format_table(results))
    if args.out:
        atomic_write_json(args.out, results)


def register(commands: argparse._SubParsersAction) -> None:
    features = commands.add_parser("features", help="extract frozen features of a labelled image set")
    add_features_arguments(features)
    features.set_defaults(run=run_features, command_name="features")
    evaluate = commands.add_parser("eval", help="evaluate frozen features: k-NN or a linear probe")
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True, metavar="SUBCOMMAND")
    knn = eval_commands.add_parser("knn", help="weighted cosine k-NN and the paper's Euclidean 5-NN")
    add_knn_arguments(knn)
    knn.set_defaults(run=run_knn_cli, command_name="eval knn")
    linear = eval_commands.add_parser("linear", help="linear probe with an lr sweep on held-out train data")
    add_linear_arguments(linear)
    linear.set_defaults(run=run_linear_cli, command_name="eval linear")
