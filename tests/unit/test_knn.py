"""k-NN evaluation and feature-file IO."""

import json
import math
import os

import pytest
import torch

from pijepa.eval.features_io import FORMAT, load_features, save_features
from pijepa.eval.knn import format_table, knn_classify, knn_predict, run_knn
from pijepa.runtime.errors import ConfigError, DataError


def separable(n_per_class: int, num_classes: int, dim: int, seed: int, noise: float = 0.05):
    """Class means far apart in random directions, plus small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = means[labels] + noise * torch.randn(labels.shape[0], dim, generator=g)
    perm = torch.randperm(labels.shape[0], generator=g)
    return feats[perm], labels[perm]


def split(feats, labels, n_train):
    return feats[:n_train], labels[:n_train], feats[n_train:], labels[n_train:]


# --------------------------------------------------------------------------------------------
# Reference: explicit full distance matrix and Python loops, written independently.
# --------------------------------------------------------------------------------------------
def reference_rankings(train, train_y, test, num_classes, k, metric, weighting, T=0.07, topn=5):
    train, test = train.double(), test.double()
    if metric == "cosine":
        a = train / train.norm(dim=1, keepdim=True)
        b = test / test.norm(dim=1, keepdim=True)
        sim = b @ a.T  # full [N_test, N_train] matrix
    else:
        sim = torch.empty(test.shape[0], train.shape[0], dtype=torch.float64)
        for i in range(test.shape[0]):
            for j in range(train.shape[0]):
                sim[i, j] = -math.sqrt(float(((test[i] - train[j]) ** 2).sum()))
    out = []
    for i in range(test.shape[0]):
        order = sorted(range(train.shape[0]), key=lambda j: -float(sim[i, j]))[: min(k, len(train))]
        score = {c: 0.0 for c in range(num_classes)}
        first = {}
        for rank, j in enumerate(order):
            c = int(train_y[j])
            first.setdefault(c, rank)
            if weighting == "exp":
                score[c] += math.exp(float(sim[i, j]) / T)
            else:
                score[c] += 1
        # exp: weight sum, then lower index. uniform: votes, then the tied class with the
        # nearest member, then the lower index.
        keys = {c: (-score[c], first.get(c, k) if weighting == "uniform" else 0, c)
                for c in range(num_classes)}
        out.append(sorted(range(num_classes), key=keys.__getitem__)[: min(topn, num_classes)])
    return torch.tensor(out)


@pytest.mark.parametrize("metric,weighting", [("cosine", "exp"), ("euclidean", "uniform"),
                                              ("euclidean", "exp"), ("cosine", "uniform")])
def test_matches_reference(metric, weighting):
    g = torch.Generator().manual_seed(1)
    C = 7
    train, test = torch.randn(120, 6, generator=g), torch.randn(25, 6, generator=g)
    train_y = torch.randint(0, C, (120,), generator=g)
    ks = (1, 4, 5, 10, 30)
    T = 0.5 if metric == "euclidean" else 0.07  # keeps exp(-d/T) weights meaningful
    got = knn_predict(train, train_y, test, C, ks, temperature=T, metric=metric,
                      weighting=weighting, batch_size=8, train_chunk_size=50)
    for k in ks:
        ref = reference_rankings(train, train_y, test, C, k, metric, weighting, T=T)
        assert torch.equal(got[k], ref), (k, got[k], ref)


@pytest.mark.parametrize("metric,weighting", [("cosine", "exp"), ("euclidean", "uniform")])
def test_batching_and_chunking_do_not_change_results(metric, weighting):
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g)
    train_y = torch.randint(0, 9, (300,), generator=g)
    ks = (1, 5, 20, 200)
    base = knn_predict(train, train_y, test, 9, ks, metric=metric, weighting=weighting,
                       batch_size=10_000, train_chunk_size=None)
    for bs, chunk in [(1, None), (7, 13), (64, 299), (70, 1)]:
        got = knn_predict(train, train_y, test, 9, ks, metric=metric, weighting=weighting,
                          batch_size=bs, train_chunk_size=chunk)
        for k in ks:
            assert torch.equal(got[k], base[k]), (bs, chunk, k)


def test_memory_is_bounded_by_batch_and_chunk(monkeypatch):
    """No similarity block larger than batch_size x train_chunk_size is ever built."""
    from pijepa.eval import knn

    shapes = []
    real = knn._scores

    def spy(q, keys, sq):
        shapes.append((q.shape[0], keys.shape[0]))
        return real(q, keys, sq)

    monkeypatch.setattr(knn, "_scores", spy)
    g = torch.Generator().manual_seed(3)
    knn.knn_predict(torch.randn(100, 4, generator=g), torch.randint(0, 3, (100,), generator=g),
                    torch.randn(40, 4, generator=g), 3, (5, 50), batch_size=16, train_chunk_size=32)
    assert shapes and max(b for b, _ in shapes) <= 16 and max(c for _, c in shapes) <= 32
    assert sum(b * c for b, c in shapes) == 40 * 100  # every pair scored exactly once


def test_uniform_tie_goes_to_class_with_nearest_member():
    # 1-D: query at 0; neighbours at 1 (class 0), 2,3 (class 2), 4,5 (class 1). k=5: classes
    # 2 and 1 tie with 2 votes; class 2's member is nearer. (Lowest index would give 1, the
    # 1-NN's class would give 0.)
    train = torch.tensor([[5.0], [1.0], [3.0], [4.0], [2.0]])
    train_y = torch.tensor([1, 0, 2, 1, 2])
    test = torch.zeros(1, 1)
    r = knn_predict(train, train_y, test, 3, (5, 1), metric="euclidean", weighting="uniform")
    assert r[5][0].tolist() == [2, 1, 0]
    assert r[1][0, 0].item() == 0


def test_separable_features_reach_full_accuracy():
    feats, labels = separable(60, 8, 32, seed=0)
    tr, tr_y, te, te_y = split(feats, labels, 320)
    dino = knn_classify(tr, tr_y, te, te_y, 8, ks=(10, 20, 100, 200), batch_size=32)
    paper = knn_classify(tr, tr_y, te, te_y, 8, ks=(5,), metric="euclidean", weighting="uniform")
    for k in (10, 20, 100, 200):
        assert dino["top1"][k] >= 99.0 and dino["top5"][k] == 100.0
    assert paper["top1"][5] >= 99.0


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(4)
    C, n_test = 5, 2000
    train, test = torch.randn(1000, 8, generator=g), torch.randn(n_test, 8, generator=g)
    train_y, test_y = torch.randint(0, C, (1000,), generator=g), torch.randint(0, C, (n_test,), generator=g)
    # Test labels are independent of everything else, so accuracy ~ Binomial(2000, 0.2)/2000:
    # sd = 0.89 points; a 5-point band is > 5 sd.
    for kw in ({"ks": (20,)}, {"ks": (5,), "metric": "euclidean", "weighting": "uniform"}):
        r = knn_classify(train, train_y, test, test_y, C, **kw)
        (acc,) = r["top1"].values()
        assert abs(acc - 100 / C) < 5, (kw, acc)


def test_k_clipped_to_train_size_with_note():
    g = torch.Generator().manual_seed(5)
    train, test = torch.randn(6, 4, generator=g), torch.randn(10, 4, generator=g)
    r = knn_classify(train, torch.arange(6) % 3, test, torch.zeros(10, dtype=torch.long), 3,
                     ks=(3, 10))
    assert r["k_effective"] == {3: 3, 10: 6}
    assert len(r["notes"]) == 1 and "k=10" in r["notes"][0]
    assert r["top5_n"] == 3 and r["top5"][10] == 100.0  # top-min(5, C) covers every class


def test_invalid_arguments():
    x, y = torch.randn(10, 3), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError):
        knn_classify(x, y, x, y, 2, metric="manhattan")
    with pytest.raises(ValueError):
        knn_classify(x, y, x, y, 2, ks=(0,))
    with pytest.raises(ValueError):
        knn_classify(x, y, torch.randn(4, 5), y[:4], 2)


def test_run_knn_from_files_and_table(tmp_path):
    feats, labels = separable(30, 6, 16, seed=6)
    classes = [f"c{i}" for i in range(6)]
    save_features(tmp_path / "train.pt", feats[:120], labels[:120], classes, {"split": "train"})
    save_features(tmp_path / "test.pt", feats[120:], labels[120:], classes, {"split": "val"})
    res = run_knn(tmp_path / "train.pt", tmp_path / "test.pt", ks=(10, 200))
    assert set(res["protocols"]) == {"weighted_cosine", "euclidean_majority"}
    assert res["protocols"]["euclidean_majority"]["ks"] == [5]
    assert res["protocols"]["weighted_cosine"]["k_effective"][200] == 120
    assert res["protocols"]["weighted_cosine"]["top1"][10] == 100.0
    text = format_table(res)
    assert "100.00" in text and "200->120" in text and "clipped" in text
    # JSON-serialisable, and the table renders identically after a JSON round trip.
    assert format_table(json.loads(json.dumps(res))) == text

    save_features(tmp_path / "other.pt", feats[120:], labels[120:], classes[::-1], {})
    with pytest.raises(ValueError, match="class lists"):
        run_knn(tmp_path / "train.pt", tmp_path / "other.pt")


def test_mismatched_or_empty_feature_files_are_data_errors(tmp_path):
    feats, labels = separable(10, 2, 8, seed=7)
    save_features(tmp_path / "train.pt", feats, labels, ["a", "b"], {})
    save_features(tmp_path / "wide.pt", torch.cat([feats, feats], 1), labels, ["a", "b"], {})
    save_features(tmp_path / "empty.pt", feats[:0], labels[:0], ["a", "b"], {})
    with pytest.raises(DataError, match=r"train.pt has 8-dim features but .*wide.pt has 16-dim"):
        run_knn(tmp_path / "train.pt", tmp_path / "wide.pt")
    with pytest.raises(DataError, match="empty.pt: holds no samples"):
        run_knn(tmp_path / "train.pt", tmp_path / "empty.pt")
    with pytest.raises(DataError, match="class lists"):
        save_features(tmp_path / "other.pt", feats, labels, ["b", "a"], {})
        run_knn(tmp_path / "train.pt", tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="temperature"):
        run_knn(tmp_path / "train.pt", tmp_path / "train.pt", temperature=0.0)
    with pytest.raises(ConfigError, match="ks"):
        run_knn(tmp_path / "train.pt", tmp_path / "train.pt", ks=(0,))


# --------------------------------------------------------------------------------------------
# Feature files
# --------------------------------------------------------------------------------------------
def test_features_round_trip(tmp_path):
    big = torch.randn(50, 8, dtype=torch.float64)
    feats, labels = big[10:30], torch.arange(20, dtype=torch.int32) % 4
    meta = {"ckpt": "runs/x/ckpt.pt", "epoch": 3, "layers": [11, 12], "mean": torch.ones(2),
            "nested": {"ok": True, "none": None}}
    path = tmp_path / "sub" / "f.pt"
    save_features(path, feats, labels, ["a", "b", "c", "d"], meta)
    assert os.listdir(path.parent) == ["f.pt"]  # no temporary file left behind
    d = load_features(path)
    assert d["format"] == FORMAT
    assert d["features"].dtype == torch.float32 and d["labels"].dtype == torch.long
    assert torch.equal(d["features"], feats.float()) and torch.equal(d["labels"], labels.long())
    assert d["classes"] == ["a", "b", "c", "d"]
    assert d["meta"]["layers"] == [11, 12] and torch.equal(d["meta"]["mean"], torch.ones(2))
    # A view of a bigger buffer is stored on its own, not with the whole buffer.
    assert d["features"].untyped_storage().nbytes() == 20 * 8 * 4


def test_bad_feature_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("definitely not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_features(junk)

    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "something-else", "features": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="wrong.pt.*format"):
        load_features(wrong)

    inconsistent = tmp_path / "inconsistent.pt"
    torch.save({"format": FORMAT, "features": torch.zeros(3, 2), "labels": torch.zeros(2).long(),
                "classes": ["a"], "meta": {}}, inconsistent)
    with pytest.raises(ValueError, match="inconsistent.pt"):
        load_features(inconsistent)

    with pytest.raises(FileNotFoundError):
        load_features(tmp_path / "missing.pt")
    # The user's file is wrong, not our code: every one of these reaches the CLI as one line.
    for bad in (junk, wrong, inconsistent):
        with pytest.raises(DataError):
            load_features(bad)


def test_save_rejects_bad_inputs(tmp_path):
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="labels span"):
        save_features(tmp_path / "a.pt", x, y, ["only-one-class"], {})
    with pytest.raises(ValueError, match="rows"):
        save_features(tmp_path / "a.pt", x, y[:3], ["a", "b"], {})
    with pytest.raises(ValueError, match="meta"):
        save_features(tmp_path / "a.pt", x, y, ["a", "b"], {"obj": object()})
    assert not tmp_path.joinpath("a.pt").exists() and os.listdir(tmp_path) == []
