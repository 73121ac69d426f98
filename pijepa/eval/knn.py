"""k-nearest-neighbour evaluation of frozen features.

Two protocols share one implementation:

* **Weighted cosine k-NN** (DINO's protocol): L2-normalise features, cosine similarity, keep the
  top-k training neighbours, weight each by ``exp(sim / T)``, sum the weights per class and rank
  classes by that sum. ``metric="cosine", weighting="exp"``.
* **Euclidean majority vote** (the Probabilistic I-JEPA paper's protocol, k=5): raw features,
  Euclidean distance, one vote per neighbour. ``metric="euclidean", weighting="uniform"``.
  Tied vote counts go to the tied class whose closest member is nearest to the query, which is
  "the nearest neighbour's class" whenever the 1-NN belongs to a tied class, and a well-defined
  generalisation when it does not (e.g. votes A,B,B,C,C: B and C tie, the nearest of them wins).

All requested ks come from ONE top-max(k) search (neighbours of a smaller k are a prefix of the
sorted top-max(k) list). Test rows are processed in batches and the training set in chunks with a
running top-k merge, so memory is O(batch_size * train_chunk_size), never N_test x N_train.

Remaining ties are broken deterministically by the lower class index. Ties between exactly
equidistant *training points* are resolved by ``torch.topk`` (only matters for duplicated points).
Functions here are pure on tensors; distributed evaluation is left to callers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pijepa.eval.features_io import load_train_test
from pijepa.runtime.errors import ConfigError, DataError

METRICS = ("cosine", "euclidean")
WEIGHTINGS = ("exp", "uniform")


def effective_ks(ks: Iterable[int], num_train: int) -> tuple[dict[int, int], list[str]]:
    """Map each requested k to the k actually used (clipped to the train size), plus notes."""
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ConfigError(f"ks must be a non-empty sequence of positive ints, got {ks}")
    if num_train < 1:
        raise DataError("k-NN needs at least one training sample")
    eff = {k: min(k, num_train) for k in ks}
    notes = [
        f"k={k} clipped to {num_train}: the training set has only {num_train} samples"
        for k in ks
        if k > num_train
    ]
    return eff, notes


def _as_float(x: torch.Tensor) -> torch.Tensor:
    # Half-precision sums over hundreds of dims lose too much for neighbour ranking.
    return x if x.dtype == torch.float64 else x.float()


def _prepare(
    train_feats: torch.Tensor, test_feats: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring features into the space where a larger dot-product-based score means closer."""
    train, test = _as_float(train_feats), _as_float(test_feats.to(train_feats.device))
    if metric == "cosine":
        return F.normalize(train, dim=1), F.normalize(test, dim=1)
    # Euclidean distances are translation invariant; centring on the train mean shrinks the norms
    # in |q|^2 + |x|^2 - 2 q.x and so the float cancellation of that expansion.
    mean = train.mean(dim=0, keepdim=True)
    return train - mean, test - mean


def _scores(queries: torch.Tensor, keys: torch.Tensor, key_sqnorms: torch.Tensor | None) -> torch.Tensor:
    """Similarity of each query to each key: cosine, or minus the squared Euclidean distance."""
    dots = queries @ keys.T
    if key_sqnorms is None:
        return dots
    q_sq = (queries * queries).sum(dim=1, keepdim=True)
    return -(q_sq + key_sqnorms[None, :] - 2.0 * dots).clamp_min_(0.0)


def topk_neighbours(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    euclidean: bool,
    train_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys per query, best first: (scores [B, k], indices [B, k]).

    Scores are cosine similarities, or minus squared distances when ``euclidean``. The keys are
    scanned in chunks, merging a running top-k, so at most B x chunk scores exist at once.
    """
    n = keys.shape[0]
    chunk = n if not train_chunk_size else max(int(train_chunk_size), 1)
    best: tuple[torch.Tensor, torch.Tensor] | None = None
    for start in range(0, n, chunk):
        block = keys[start : start + chunk]
        sq = (block * block).sum(dim=1) if euclidean else None
        s = _scores(queries, block, sq)
        s, i = s.topk(min(k, block.shape[0]), dim=1)
        i = i + start
        if best is not None:
            s, i = torch.cat([best[0], s], dim=1), torch.cat([best[1], i], dim=1)
            s, j = s.topk(min(k, s.shape[1]), dim=1)
            i = i.gather(1, j)
        best = (s, i)
    if best is None:
        raise ValueError("topk_neighbours needs at least one key")
    return best


def _rank_classes(scores: torch.Tensor, topn: int) -> torch.Tensor:
    # Stable descending sort: equal scores keep class-index order, so ties go to the lower index.
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :topn]


def _vote_weighted(nbr_labels: torch.Tensor, nbr_weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    out = torch.zeros(nbr_labels.shape[0], num_classes, dtype=nbr_weights.dtype,
                      device=nbr_labels.device)
    return out.scatter_add_(1, nbr_labels, nbr_weights)


def _vote_uniform(nbr_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer score per class: votes first, then how near the class's closest neighbour is.

    score = votes * (k + 1) + (k - rank of the class's first neighbour); rank in [0, k), so the
    second term is in [1, k] for present classes and never outweighs one vote. Absent classes
    score 0. Present classes have distinct first ranks, hence no ties among them.
    """
    b, k = nbr_labels.shape
    dev = nbr_labels.device
    votes = torch.zeros(b, num_classes, dtype=torch.long, device=dev)
    votes.scatter_add_(1, nbr_labels, torch.ones_like(nbr_labels))
    ranks = torch.arange(k, device=dev).expand(b, k)
    first = torch.full((b, num_classes), k, dtype=torch.long, device=dev)
    first.scatter_reduce_(1, nbr_labels, ranks, reduce="amin", include_self=True)
    return votes * (k + 1) + (k - first)


def _check_knn_inputs(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    *,
    metric: str,
    weighting: str,
    temperature: float,
) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "exp" and not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be [N, F] with equal F; got train {tuple(train_feats.shape)}, "
            f"test {tuple(test_feats.shape)}"
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"train_labels must be [{train_feats.shape[0]}], got {tuple(train_labels.shape)}")
    if num_classes < 1 or (train_labels.numel() and not
                           0 <= int(train_labels.min()) <= int(train_labels.max()) < num_classes):
        raise ValueError(f"train labels must lie in [0, num_classes={num_classes})")


def _neighbour_weights(scores: torch.Tensor, euclid: bool, temperature: float) -> torch.Tensor:
    """``exp(sim / T)`` of the neighbours' scores (best first), for the weighted vote."""
    if euclid:
        # Similarity is minus the (unsquared) distance. Distances are unbounded, so shift by the
        # nearest one (a per-row constant factor on the weights, which cannot change the ranking)
        # to keep exp() from underflowing to all-zero weights.
        sim = -(-scores).clamp_min(0).sqrt()
        sim = sim - sim[:, :1]
    else:
        sim = scores  # cosine in [-1, 1]: exp(sim / T) is safe in float32, as in DINO
    return (sim / temperature).exp()


def _rank_per_k(
    nbr: torch.Tensor, weights: torch.Tensor | None, eff: dict[int, int], num_classes: int, topn: int
) -> dict[int, torch.Tensor]:
    """Class rankings of one test batch for every k, from its neighbours' labels (nearest first);
    a weighted vote when ``weights`` are given, else the uniform vote."""
    out = {}
    for k, ke in eff.items():
        if weights is not None:
            cls = _vote_weighted(nbr[:, :ke], weights[:, :ke], num_classes)
        else:
            cls = _vote_uniform(nbr[:, :ke], num_classes)
        out[k] = _rank_classes(cls, topn)
    return out


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    *,
    temperature: float = 0.07,
    metric: str = "cosine",
    weighting: str = "exp",
    batch_size: int = 512,
    train_chunk_size: int | None = 65536,
    topn: int = 5,
) -> dict[int, torch.Tensor]:
    """Class rankings per requested k: {k: LongTensor [N_test, min(topn, C)]}, best class first.

    ks larger than the training set are clipped to it (see ``effective_ks``). Computation runs on
    ``train_feats``' device.
    """
    _check_knn_inputs(train_feats, train_labels, test_feats, num_classes,
                      metric=metric, weighting=weighting, temperature=temperature)
    eff, _ = effective_ks(ks, train_feats.shape[0])
    kmax = max(eff.values())
    topn = min(topn, num_classes)
    euclid = metric == "euclidean"

    train, test = _prepare(train_feats, test_feats, metric)
    labels = train_labels.to(train.device, torch.long)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in eff}
    bs = max(int(batch_size), 1)
    for start in range(0, test.shape[0], bs):
        q = test[start : start + bs]
        s, idx = topk_neighbours(q, train, kmax, euclidean=euclid, train_chunk_size=train_chunk_size)
        nbr = labels[idx]  # [B, kmax], nearest first
        w = _neighbour_weights(s, euclid, temperature) if weighting == "exp" else None
        for k, ranked in _rank_per_k(nbr, w, eff, num_classes, topn).items():
            preds[k].append(ranked)
    empty = torch.empty(0, topn, dtype=torch.long, device=train.device)
    return {k: torch.cat(v) if v else empty for k, v in preds.items()}


def topn_accuracy(ranked: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1 %, top-n %) for rankings [N, n] (best first) against labels [N]."""
    labels = labels.to(ranked.device).long()[:, None]
    hit = ranked == labels
    n = max(labels.shape[0], 1)
    return 100.0 * hit[:, 0].sum().item() / n, 100.0 * hit.any(dim=1).sum().item() / n


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    *,
    temperature: float = 0.07,
    metric: str = "cosine",
    weighting: str = "exp",
    batch_size: int = 512,
    train_chunk_size: int | None = 65536,
) -> dict[str, Any]:
    """k-NN accuracies for every k from one neighbour search. JSON-serialisable result::

        {"metric", "weighting", "temperature" (None when uniform), "num_train", "num_test",
         "num_classes", "top5_n" (= min(5, C): what "top5" measures), "ks",
         "top1": {k: %}, "top5": {k: %}, "k_effective": {k: k used}, "notes": [str]}
    """
    if test_labels.shape != (test_feats.shape[0],):
        raise ValueError(f"test_labels must be [{test_feats.shape[0]}], got {tuple(test_labels.shape)}")
    if test_feats.shape[0] == 0:
        raise DataError("empty test set: accuracy is undefined")
    ks = list(dict.fromkeys(ks))  # drop duplicates, keep order
    eff, notes = effective_ks(ks, train_feats.shape[0])
    ranked = knn_predict(
        train_feats, train_labels, test_feats, num_classes, ks,
        temperature=temperature, metric=metric, weighting=weighting,
        batch_size=batch_size, train_chunk_size=train_chunk_size,
    )
    top1, top5 = {}, {}
    for k in ks:
        top1[k], top5[k] = topn_accuracy(ranked[k], test_labels)
    return {
        "metric": metric,
        "weighting": weighting,
        "temperature": float(temperature) if weighting == "exp" else None,
        "num_train": int(train_feats.shape[0]),
        "num_test": int(test_feats.shape[0]),
        "num_classes": int(num_classes),
        "top5_n": min(5, int(num_classes)),
        "ks": ks,
        "top1": top1,
        "top5": top5,
        "k_effective": eff,
        "notes": notes,
    }


def run_knn(
    train_path: str | os.PathLike,
    test_path: str | os.PathLike,
    *,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    paper_k: int = 5,
    batch_size: int = 512,
    train_chunk_size: int | None = 65536,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load two feature files and run both protocols (weighted cosine, paper's Euclidean 5-NN)."""
    train, test = load_train_test(train_path, test_path)
    num_classes = len(train["classes"])
    args = (
        train["features"].to(device), train["labels"].to(device),
        test["features"].to(device), test["labels"].to(device), num_classes,
    )
    common: dict[str, Any] = {"batch_size": batch_size, "train_chunk_size": train_chunk_size}
    return {
        "train_file": str(train_path),
        "test_file": str(test_path),
        "num_classes": num_classes,
        "meta": {"train": train["meta"], "test": test["meta"]},
        "protocols": {
            "weighted_cosine": knn_classify(
                *args, ks, temperature=temperature, metric="cosine", weighting="exp", **common
            ),
            "euclidean_majority": knn_classify(
                *args, (paper_k,), metric="euclidean", weighting="uniform", **common
            ),
        },
    }


def format_table(results: dict[str, Any]) -> str:
    """Readable table of ``run_knn`` or ``knn_classify`` results (also after a JSON round trip)."""
    protocols = results.get("protocols", {"knn": results})
    rows = [("protocol", "k", "top-1", f"top-{_top_n(protocols)}")]
    for name, r in protocols.items():
        desc = f"{name} ({r['metric']}, {r['weighting']}"
        desc += f", T={r['temperature']:g})" if r.get("temperature") is not None else ")"
        for k, acc in r["top1"].items():
            eff = _lookup(r.get("k_effective", {}), k, k)
            k_str = f"{k}" if int(eff) == int(k) else f"{k}->{eff}"
            rows.append((desc, k_str, f"{acc:.2f}", f"{_lookup(r['top5'], k, float('nan')):.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for name, r in protocols.items():
        lines += [f"note ({name}): {n}" for n in r.get("notes", [])]
    return "\n".join(lines)


def _lookup(d: dict, k: Any, default: Any) -> Any:
    # JSON turns int keys into str; accept both so saved results print the same.
    return d.get(k, d.get(str(k), d.get(int(k) if str(k).isdigit() else k, default)))


def _top_n(protocols: dict[str, Any]) -> int:
    ns = {r.get("top5_n", 5) for r in protocols.values()}
    return ns.pop() if len(ns) == 1 else 5
