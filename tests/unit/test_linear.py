"""Linear probe on frozen features."""

import json
import math

import pytest
import torch

from pijepa.eval.features_io import save_features
from pijepa.eval.linear import (
    cosine_lr,
    format_table,
    run_linear_probe,
    stratified_split,
    train_linear_probe,
)

FAST = {"epochs": 15, "batch_size": 64}


def separable(n_per_class, num_classes, dim, seed, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = means[labels] + noise * torch.randn(labels.shape[0], dim, generator=g)
    perm = torch.randperm(labels.shape[0], generator=g)
    return feats[perm], labels[perm]


@pytest.mark.parametrize("optimizer,batchnorm", [("adamw", False), ("sgd", True)])
def test_separable_features_reach_full_accuracy(optimizer, batchnorm):
    feats, labels = separable(50, 8, 32, seed=0)
    r = train_linear_probe(feats[:300], labels[:300], feats[300:], labels[300:], 8,
                           optimizer=optimizer, batchnorm=batchnorm, **FAST)
    assert r["top1"] >= 99.0 and r["top5"] == 100.0
    assert r["best_lr"] in r["lrs"]
    json.dumps(r)


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(1)
    C, n_test = 5, 2000
    train, test = torch.randn(500, 16, generator=g), torch.randn(n_test, 16, generator=g)
    train_y, test_y = torch.randint(0, C, (500,), generator=g), torch.randint(0, C, (n_test,), generator=g)
    r = train_linear_probe(train, train_y, test, test_y, C, lrs=(1e-2, 1e-1), **FAST)
    # Test labels are independent of the probe: Binomial(2000, 0.2); sd 0.89 points, band > 5 sd.
    assert abs(r["top1"] - 100 / C) < 5, r["top1"]


def test_deterministic_for_a_seed_and_seed_matters():
    feats, labels = separable(40, 5, 16, seed=2, noise=1.0)  # overlapping: results are not all 100
    args = (feats[:150], labels[:150], feats[150:], labels[150:], 5)
    kw = {"lrs": (3e-3, 3e-2), **FAST}
    a = train_linear_probe(*args, seed=3, **kw)
    b = train_linear_probe(*args, seed=3, **kw)
    c = train_linear_probe(*args, seed=4, **kw)
    assert a == b
    assert [s["val_loss"] for s in a["sweep"]] != [s["val_loss"] for s in c["sweep"]]


def test_lr_chosen_from_sweep_on_validation(monkeypatch):
    from pijepa.eval import linear

    calls = []
    real_fit = linear.fit_probe

    def spy(feats, labels, num_classes, **kw):
        calls.append((feats.shape[0], kw["lr"]))
        return real_fit(feats, labels, num_classes, **kw)

    monkeypatch.setattr(linear, "fit_probe", spy)
    feats, labels = separable(40, 6, 16, seed=3)
    # 1e-7 barely moves the random init (chance level on val); 0.1 separates the classes.
    r = train_linear_probe(feats[:200], labels[:200], feats[200:], labels[200:], 6,
                           optimizer="sgd", lrs=(1e-7, 0.1), **FAST)
    assert [s["lr"] for s in r["sweep"]] == [1e-7, 0.1]
    assert r["best_lr"] == 0.1 and r["sweep"][1]["val_top1"] > r["sweep"][0]["val_top1"]
    assert r["num_val"] == 20 and r["num_train"] == 200
    # Sweep runs see only the 180 non-val samples; the final run uses the full training split.
    assert calls == [(180, 1e-7), (180, 0.1), (200, 0.1)]


def test_top5_is_top_c_for_few_classes():
    feats, labels = separable(30, 3, 8, seed=4, noise=2.0)
    r = train_linear_probe(feats[:60], labels[:60], feats[60:], labels[60:], 3, lrs=(1e-2,),
                           **FAST)
    assert r["top5_n"] == 3 and r["top5"] == 100.0 and r["top1"] < 100.0


def test_stratified_split():
    labels = torch.arange(4).repeat_interleave(torch.tensor([50, 20, 10, 1]))
    tr, val = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(torch.sort(torch.cat([tr, val])).values, torch.arange(81))
    assert torch.bincount(labels[val], minlength=4).tolist() == [5, 2, 1, 0]  # singleton kept
    tr2, val2 = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(val, val2) and torch.equal(tr, tr2)
    assert not torch.equal(val, stratified_split(labels, 0.1, seed=1)[1])


def test_cosine_lr():
    assert cosine_lr(0.1, 0, 100) == 0.1
    assert math.isclose(cosine_lr(0.1, 50, 100), 0.05)
    assert cosine_lr(0.1, 99, 100) < 1e-4


def test_invalid_arguments():
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    with pytest.raises(ValueError):
        train_linear_probe(x, y, x, y, 2, optimizer="lbfgs")
    with pytest.raises(ValueError):
        train_linear_probe(x, y, x, y, 1)  # label 1 out of range
    with pytest.raises(ValueError, match="no validation"):
        train_linear_probe(x, y, x, y, 2, val_fraction=0.01)


def test_run_from_files_and_table(tmp_path):
    feats, labels = separable(20, 4, 8, seed=5)
    classes = ["a", "b", "c", "d"]
    save_features(tmp_path / "tr.pt", feats[:60], labels[:60], classes, {})
    save_features(tmp_path / "te.pt", feats[60:], labels[60:], classes, {})
    r = run_linear_probe(tmp_path / "tr.pt", tmp_path / "te.pt", lrs=(1e-2, 3e-2), **FAST)
    assert r["top1"] == 100.0
    text = format_table(json.loads(json.dumps(r)))
    assert "<- chosen" in text and "top-4 100.00" in text and str(r["best_lr"]) in text
