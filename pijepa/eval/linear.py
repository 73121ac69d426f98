"""Linear probe on frozen features.

Protocol: split the training features into train/val (stratified, deterministic by seed), train
one linear classifier per candidate learning rate on the train part, pick the lr with the best
val top-1 (ties: lower val loss, then earlier in ``lrs``), retrain on the FULL training split with
that lr, and report top-1/top-5 on the test split. The test split is never used for selection.

Every run starts from the same seed-derived init and batch order, so candidates differ only in
their lr. Features are used as given: no standardisation besides the optional
``BatchNorm1d(affine=False)`` in front of the linear layer (``batchnorm=True``, as in MAE's probe).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from pijepa.eval.features_io import load_train_test
from pijepa.runtime.errors import ConfigError, DataError

# AdamW's grid reaches 1: mean-pooled LayerNormed tokens vary little between images, and on them the
# sweep picked 3e-2, the old top of the grid, in 11 of 12 probes of docs/results.md; with this grid it
# picks 0.1, 0.3 or 1, and the held-out loss is higher at 1 than at 0.3 in 11 of those 12 probes.
DEFAULT_LRS = {"adamw": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0), "sgd": (0.01, 0.03, 0.1, 0.3)}
_EVAL_BATCH = 8192


class FitSettings(TypedDict):
    """Everything ``fit_probe`` takes besides the data and the lr (the same for every candidate)."""

    optimizer: str
    weight_decay: float
    epochs: int
    batch_size: int
    batchnorm: bool
    seed: int


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx), both sorted: about ``val_fraction`` of each class goes to val.

    Each class keeps at least one training sample. Deterministic in (labels, val_fraction, seed).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = labels.detach().cpu().long()
    n = labels.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    # Stable sort by label after a random permutation = grouped by class, random within class.
    order = torch.argsort(labels[perm], stable=True)
    idx, y = perm[order], labels[perm][order]
    counts = torch.bincount(y, minlength=int(y.max()) + 1 if n else 0)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[y]
    n_val = torch.round(counts.double() * val_fraction).long()
    n_val = torch.minimum(n_val, (counts - 1).clamp_min(0))
    is_val = rank < n_val[y]
    return idx[~is_val].sort().values, idx[is_val].sort().values


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from base_lr at step 0 towards 0 at total_steps (no warmup)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def _make_probe(dim: int, num_classes: int, batchnorm: bool, seed: int, device: torch.device) -> nn.Module:
    # Init from our own generator: determinism must not depend on the global RNG state.
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)
        linear.bias.zero_()
    layers = [nn.BatchNorm1d(dim, affine=False), linear] if batchnorm else [linear]
    return nn.Sequential(*layers).to(device)


def _make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


def fit_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    lr: float,
    optimizer: str,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    batchnorm: bool,
    seed: int,
) -> nn.Module:
    """Train one probe with a per-step cosine schedule; returns it in eval mode."""
    model = _make_probe(feats.shape[1], num_classes, batchnorm, seed, feats.device)
    opt = _make_optimizer(optimizer, model.parameters(), lr, weight_decay)
    g = torch.Generator().manual_seed(seed + 1)
    n = feats.shape[0]
    starts = list(range(0, n, batch_size))
    if batchnorm and n % batch_size == 1 and len(starts) > 1:
        # BatchNorm cannot normalise a batch of one; the sample is reshuffled next epoch anyway.
        starts.pop()
    total, step = epochs * len(starts), 0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(feats.device)
        for s in starts:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, step, total)
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(model(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


@torch.no_grad()
def evaluate_probe(
    model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """{"top1": %, "top5": % (top-min(5, C)), "loss": mean cross-entropy}."""
    model.eval()
    n_top = min(5, num_classes)
    hit1 = hit5 = 0
    loss_sum = 0.0
    for s in range(0, feats.shape[0], _EVAL_BATCH):
        logits = model(feats[s : s + _EVAL_BATCH]).float()
        y = labels[s : s + _EVAL_BATCH]
        ranked = logits.topk(n_top, dim=1).indices
        hit = ranked == y[:, None]
        hit1 += int(hit[:, 0].sum())
        hit5 += int(hit.any(dim=1).sum())
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    n = max(feats.shape[0], 1)
    return {"top1": 100.0 * hit1 / n, "top5": 100.0 * hit5 / n, "loss": loss_sum / n}


def _select(sweep: list[dict[str, float]]) -> dict[str, float]:
    """Best val top-1; ties -> lower val loss (NaN counts as worst) -> earlier candidate."""
    def key(r: dict[str, float]) -> tuple[float, float]:
        loss = r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf
        return (-r["val_top1"], loss)
    return min(sweep, key=key)  # min() keeps the first of equal keys


def _check_options(optimizer: str, lrs: Sequence[float] | None, epochs: int, batch_size: int) -> list[float]:
    """The lrs to sweep (``DEFAULT_LRS[optimizer]`` for None), after checking the options."""
    if optimizer not in DEFAULT_LRS:
        raise ConfigError(f"optimizer must be one of {tuple(DEFAULT_LRS)}, got {optimizer!r}")
    out = [float(x) for x in (DEFAULT_LRS[optimizer] if lrs is None else lrs)]
    if not out or any(not x > 0 for x in out):
        raise ConfigError(f"lrs must be a non-empty list of positive numbers, got {out}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    return out


def _sweep(
    x: torch.Tensor, y: torch.Tensor, tr_idx: torch.Tensor, val_idx: torch.Tensor, num_classes: int,
    lrs: list[float], fit: FitSettings,
) -> list[dict[str, float]]:
    """One probe per lr on the ``tr_idx`` rows, scored on the ``val_idx`` rows."""
    sweep = []
    for lr in lrs:
        model = fit_probe(x[tr_idx], y[tr_idx], num_classes, lr=lr, **fit)
        m = evaluate_probe(model, x[val_idx], y[val_idx], num_classes)
        sweep.append({"lr": lr, "val_top1": m["top1"], "val_top5": m["top5"], "val_loss": m["loss"]})
    return sweep


def train_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    optimizer: str = "adamw",
    lrs: Sequence[float] | None = None,
    weight_decay: float = 1e-4,
    epochs: int = 100,
    batch_size: int = 256,
    batchnorm: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Sweep lrs on a held-out val part of train, retrain on all of train, test once.

    Runs on ``train_feats``' device. ``lrs=None`` uses ``DEFAULT_LRS[optimizer]``. Returns a
    JSON-serialisable dict: settings, "num_train"/"num_val"/"num_test", "sweep" (one entry per lr
    with val_top1/val_top5/val_loss), "best_lr", and test "top1", "top5" (top-"top5_n"), "loss".
    """
    lrs = _check_options(optimizer, lrs, epochs, batch_size)
    _check_splits(train_feats, train_labels, test_feats, test_labels, num_classes)

    dev = train_feats.device
    x_tr, y_tr = train_feats.float(), train_labels.to(dev).long()
    x_te, y_te = test_feats.to(dev).float(), test_labels.to(dev).long()
    fit = FitSettings(optimizer=optimizer, weight_decay=weight_decay, epochs=epochs,
                      batch_size=batch_size, batchnorm=batchnorm, seed=seed)

    tr_idx, val_idx = stratified_split(y_tr, val_fraction, seed)
    if val_idx.numel() == 0:
        raise ConfigError(
            f"val_fraction={val_fraction} leaves no validation sample "
            f"({x_tr.shape[0]} training samples); cannot choose a learning rate"
        )
    sweep = _sweep(x_tr, y_tr, tr_idx.to(dev), val_idx.to(dev), num_classes, lrs, fit)
    best_lr = _select(sweep)["lr"]

    model = fit_probe(x_tr, y_tr, num_classes, lr=best_lr, **fit)
    test = evaluate_probe(model, x_te, y_te, num_classes)
    return {
        **fit,
        "lrs": lrs,
        "val_fraction": float(val_fraction),
        "num_train": int(x_tr.shape[0]),
        "num_val": int(val_idx.numel()),
        "num_test": int(x_te.shape[0]),
        "num_classes": int(num_classes),
        "top5_n": min(5, int(num_classes)),
        "sweep": sweep,
        "best_lr": best_lr,
        "top1": test["top1"],
        "top5": test["top5"],
        "loss": test["loss"],
    }


def _check_splits(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    num_classes: int,
) -> None:
    _check_xy(train_feats, train_labels, num_classes, "train")
    _check_xy(test_feats, test_labels, num_classes, "test")
    if test_feats.shape[1] != train_feats.shape[1]:
        raise ValueError("train and test features have different dimensions")


def _check_xy(x: torch.Tensor, y: torch.Tensor, num_classes: int, name: str) -> None:
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"{name}: need features [N, F] and labels [N], got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"{name}: empty split")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"{name}: labels must lie in [0, num_classes={num_classes})")


def run_linear_probe(
    train_path: str | os.PathLike,
    test_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> dict[str, Any]:
    """Load two feature files and run ``train_linear_probe`` (kwargs are passed through)."""
    train, test = load_train_test(train_path, test_path)
    res = train_linear_probe(
        train["features"].to(device), train["labels"].to(device),
        test["features"].to(device), test["labels"].to(device),
        len(train["classes"]), **kwargs,
    )
    return {"train_file": str(train_path), "test_file": str(test_path), **res}


def format_table(results: dict[str, Any]) -> str:
    """Readable summary of ``train_linear_probe`` results: the sweep, then the test numbers."""
    n = results.get("top5_n", 5)
    bn = ", batchnorm" if results.get("batchnorm") else ""
    lines = [
        (f"linear probe ({results['optimizer']}, wd={results['weight_decay']:g}, "
         f"{results['epochs']} epochs, batch {results['batch_size']}{bn}, seed {results['seed']})"),
        f"lr sweep on {results['num_val']} held-out training samples:",
        f"  {'lr':>10}  {'val top-1':>9}  {f'val top-{n}':>9}  {'val loss':>9}",
    ]
    for r in results["sweep"]:
        mark = "  <- chosen" if r["lr"] == results["best_lr"] else ""
        lines.append(f"  {r['lr']:>10g}  {r['val_top1']:>9.2f}  {r['val_top5']:>9.2f}  "
                     f"{r['val_loss']:>9.4f}{mark}")
    lines.append(f"test ({results['num_test']} samples, retrained on all {results['num_train']}): "
                 f"top-1 {results['top1']:.2f}  top-{n} {results['top5']:.2f}")
    return "\n".join(lines)
