"""Frozen-feature extraction (pijepa/eval/features.py, datasets.py) and the eval CLI end to end."""

from __future__ import annotations

import copy
import json
import tarfile
from pathlib import Path

import pytest
import torch

from pijepa.cli import main
from pijepa.data.shards import write_shards
from pijepa.data.transforms import build_eval_transform
from pijepa.eval import features as F
from pijepa.eval.datasets import EvalImages, Sample, limit_samples, list_images
from pijepa.eval.features_io import load_features, save_features
from pijepa.models import VisionTransformer, build_predictor

IMG, PATCH = 32, 8
CLASSES = ["airplane", "cat", "ship"]

# torchvision 0.29 warns on every decode that its codecs are deprecated; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


# ----------------------------------------------------------------------------- fixtures / helpers


def make_tar_subset(src_split: Path, dst: Path, per_class: int, skip: int = 0) -> Path:
    """dst/<class>.tar with members skip..skip+per_class of the real CIFAR-10 tars (order kept)."""
    dst.mkdir(parents=True)
    for name in CLASSES:
        with tarfile.open(src_split / f"{name}.tar") as src, tarfile.open(dst / f"{name}.tar", "w") as out:
            members = [m for m in src if m.isfile()][skip: skip + per_class]
            # Written in reverse so the reader's sorting, not the tar order, gives the order.
            for m in reversed(members):
                out.addfile(m, src.extractfile(m))
    return dst


def tiny_models(depth: int = 2):
    """Standard width (192 -> 3 heads inferable), shallow; target differs from the context encoder."""
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=192, depth=depth, num_heads=3)
    predictor = build_predictor(encoder, pred_depth=1, pred_emb_dim=96)
    target = copy.deepcopy(encoder)
    with torch.no_grad():
        for p in target.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return encoder.eval(), predictor, target.eval()


def write_official_checkpoint(path: Path, encoder, predictor, target) -> Path:
    """Laid out like I-JEPA's save_checkpoint: "module."-prefixed state dicts, optimizer, epoch."""
    def prefixed(module):
        return {f"module.{k}": v.clone() for k, v in module.state_dict().items()}

    scratch = copy.deepcopy(encoder)
    opt = torch.optim.AdamW(scratch.parameters(), lr=1e-3)
    scratch(torch.randn(1, 3, IMG, IMG)).sum().backward()
    opt.step()
    torch.save({"encoder": prefixed(encoder), "predictor": prefixed(predictor),
                "target_encoder": prefixed(target), "opt": opt.state_dict(), "scaler": None,
                "epoch": 7, "loss": 0.5, "batch_size": 16, "world_size": 1, "lr": 1e-3}, path)
    return path


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, models):
    return write_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "IN1K-tiny.pth.tar", *models)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"
    if not data.is_dir():
        pytest.skip(f"real image data not found at {data}")
    root = tmp_path_factory.mktemp("cifar")
    return {"train": make_tar_subset(data / "train", root / "train", 20),
            "test": make_tar_subset(data / "test", root / "test", 8)}


def reference_features(encoder, listing_samples, pool="mean", last_n=4):
    """One image at a time, straight through the model: what the batched path must reproduce."""
    dataset = EvalImages(listing_samples, build_eval_transform(IMG))
    with torch.no_grad():
        return torch.cat([F.encode_batch(encoder, dataset[i][0][None], pool, last_n) for i in range(len(dataset))])


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("n, batch, world", [(21, 4, 2), (8, 4, 2), (3, 4, 2), (17, 5, 3), (10, 3, 1)])
def test_rank_split_covers_everything_once_and_reassembles(n, batch, world):
    parts = [F.rank_indices(n, batch, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    for r, part in enumerate(parts):  # whole global batches only: b % world == r
        assert all((i // batch) % world == r for i in part)
    values = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([[1.0, -1.0]])
    rebuilt = F.assemble([values[torch.tensor(p, dtype=torch.long)] for p in parts], n, batch)
    assert torch.equal(rebuilt, values)


def test_limit_is_round_robin_over_classes_and_keeps_order():
    samples = [Sample("f", i, 1, label, f"{label}_{i}") for i, label in enumerate([0] * 5 + [1] * 2 + [2] * 4)]
    kept = limit_samples(samples, 7)
    assert [s.label for s in kept] == [0, 0, 0, 1, 1, 2, 2]
    assert kept == sorted(kept, key=lambda s: s.offset)
    assert limit_samples(samples, 100) == samples
    with pytest.raises(ValueError):
        limit_samples(samples, 0)


def test_lastn_pooling_shape_and_values():
    encoder = tiny_models(depth=3)[2]
    images = torch.randn(5, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = F.encode_batch(encoder, images, "mean")
        last2 = F.encode_batch(encoder, images, "lastn", 2)
        last3 = F.encode_batch(encoder, images, "lastn", 3)
        # The same thing by hand: block outputs, each through the final norm, mean over tokens.
        x, grid = encoder.patch_embed(images)
        x = x + encoder.pos_embed
        by_hand = []
        for block in encoder.blocks:
            x = block(x)
            by_hand.append(encoder.norm(x).mean(1))
    assert mean.shape == (5, 192) and last2.shape == (5, 384) and last3.shape == (5, 576)
    torch.testing.assert_close(last3, torch.cat(by_hand, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last2[:, 192:], mean, rtol=1e-5, atol=1e-5)  # last block normed = output
    torch.testing.assert_close(last2[:, :192], by_hand[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(last2[:, :192], mean)
    assert not encoder.blocks[-1]._forward_hooks  # hooks removed afterwards
    with pytest.raises(ValueError, match="last-n"):
        F.encode_batch(encoder, images, "lastn", 4)


# ----------------------------------------------------------------------------- layouts


def test_three_layouts_give_the_same_samples_and_features(cifar, tmp_path, models):
    tars = cifar["test"]
    folder = tmp_path / "folder"
    for name in CLASSES:  # ImageFolder copy of the same images
        (folder / name).mkdir(parents=True)
        with tarfile.open(tars / f"{name}.tar") as tf:
            tf.extractall(folder / name, filter="data")
    (folder / "ship" / "notes.txt").write_text("not an image")
    shards = tmp_path / "shards"
    write_shards(tars, shards, samples_per_shard=7, seed=3, progress=False)  # shuffled across shards

    listings = {name: list_images(path) for name, path in
                [("tars", tars), ("folder", folder), ("shards", shards), ("index", shards / "shards.json")]}
    expected_names = [f"{c}_{i:04d}.jpg" for c in CLASSES for i in range(8)]
    for name, listing in listings.items():
        assert listing.classes == CLASSES, name
        assert [s.name for s in listing.samples] == expected_names, name
        assert listing.labels.tolist() == [i for i in range(3) for _ in range(8)], name
    assert listings["folder"].skipped == 1
    assert (listings["tars"].layout, listings["folder"].layout, listings["shards"].layout) == \
        ("tars", "imagefolder", "shards")

    target = models[2]
    feats = {}
    for name in ("tars", "folder", "shards"):
        dataset = EvalImages(listings[name].samples, build_eval_transform(IMG))
        with torch.no_grad():
            feats[name] = F.extract(target, dataset, list(range(len(dataset))), batch_size=5, progress=False)
    assert feats["tars"].shape == (24, 192)
    assert torch.equal(feats["tars"], feats["folder"]) and torch.equal(feats["tars"], feats["shards"])
    torch.testing.assert_close(feats["tars"], reference_features(target, listings["tars"].samples),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the CLI end to end


def test_official_checkpoint_features_knn_linear_through_cli(cifar, checkpoint, models, tmp_path, capsys):
    encoder, _, target = models
    out = {split: tmp_path / f"{split}.pt" for split in ("train", "test")}
    for split in ("train", "test"):
        code = main(["features", "--encoder", str(checkpoint), "--data", str(cifar[split]),
                     "--out", str(out[split]), "--batch-size", "16", "--workers", "0", "--no-progress"])
        assert code == 0
    train = load_features(out["train"])
    assert train["features"].shape == (60, 192) and train["classes"] == CLASSES
    assert train["labels"].tolist() == [i for i in range(3) for _ in range(20)]
    assert train["meta"]["which"] == "target" and train["meta"]["pool"] == "mean"
    assert train["meta"]["img_size"] == IMG and train["meta"]["layout"] == "tars"
    test = load_features(out["test"])
    samples = list_images(cifar["test"]).samples
    # The target encoder's features (not the context encoder's), batched as one image at a time.
    torch.testing.assert_close(test["features"], reference_features(target, samples), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(test["features"], reference_features(encoder, samples), atol=1e-3)

    context = tmp_path / "ctx.pt"
    assert main(["features", "--encoder", str(checkpoint), "--data", str(cifar["test"]), "--out", str(context),
                 "--which", "context", "--pool", "lastn", "--last-n", "2", "--limit", "7", "--workers", "0",
                 "--no-progress"]) == 0
    ctx = load_features(context)
    assert ctx["features"].shape == (7, 384) and ctx["labels"].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert ctx["meta"]["which"] == "context" and ctx["meta"]["last_n"] == 2

    capsys.readouterr()
    knn_json = tmp_path / "knn.json"
    assert main(["eval", "knn", "--train", str(out["train"]), "--test", str(out["test"]),
                 "--ks", "1,5,20", "--out", str(knn_json)]) == 0
    printed = capsys.readouterr().out
    assert "weighted_cosine" in printed and "euclidean_majority" in printed
    knn = json.loads(knn_json.read_text())
    top1 = knn["protocols"]["weighted_cosine"]["top1"]
    assert set(top1) == {"1", "5", "20"} and all(0 <= v <= 100 for v in top1.values())
    assert knn["protocols"]["euclidean_majority"]["ks"] == [5]
    assert knn["num_classes"] == 3 and knn["protocols"]["weighted_cosine"]["num_test"] == 24

    linear_json = tmp_path / "linear.json"
    assert main(["eval", "linear", "--train", str(out["train"]), "--test", str(out["test"]),
                 "--optimizer", "sgd", "--batchnorm", "--epochs", "3", "--lrs", "0.01,0.1",
                 "--out", str(linear_json)]) == 0
    assert "linear probe (sgd" in capsys.readouterr().out
    linear = json.loads(linear_json.read_text())
    assert linear["optimizer"] == "sgd" and linear["batchnorm"] is True and linear["epochs"] == 3
    assert [r["lr"] for r in linear["sweep"]] == [0.01, 0.1] and linear["num_test"] == 24
    assert 0 <= linear["top1"] <= 100


def test_bad_inputs_give_one_line(checkpoint, tmp_path, capsys):
    assert main(["features", "--encoder", str(checkpoint), "--data", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["features", "--encoder", str(checkpoint), "--data", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "neither per-class .tar files nor class folders" in capsys.readouterr().err
    assert main(["eval", "knn", "--train", str(tmp_path / "a.pt"), "--test", str(tmp_path / "b.pt")]) == 2
    assert "feature file not found" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_bad_files_and_values_give_one_line(checkpoint, tmp_path, capsys):
    def one_line(argv: list[str], *expected: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        command = " ".join(argv[:2]) if argv[0] == "eval" else argv[0]
        assert err.count("\n") == 1 and err.startswith(f"pijepa {command}: error: "), err
        assert all(text in err for text in expected), err

    out = str(tmp_path / "x.pt")
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    one_line(["features", "--encoder", str(notes), "--data", str(data), "--out", out],
             "notes.txt", "not a PyTorch checkpoint")
    one_line(["features", "--encoder", str(tmp_path / "absent.pt"), "--data", str(data), "--out", out],
             "checkpoint file not found", "absent.pt")
    one_line(["features", "--encoder", str(checkpoint), "--data", str(data), "--out", out, "--img-size", "30"],
             "--img-size 30")
    # Decoded in a DataLoader worker, which re-raises with its traceback in the message: cut to one line.
    one_line(["features", "--encoder", str(checkpoint), "--data", str(data), "--out", out,
              "--workers", "1", "--no-progress"], "broken.jpg", "cannot decode")
    assert not (tmp_path / "x.pt").exists()

    labels = torch.tensor([0, 1, 0, 1])
    save_features(tmp_path / "a.pt", torch.randn(4, 8), labels, ["x", "y"], {})
    save_features(tmp_path / "b.pt", torch.randn(4, 16), labels, ["x", "y"], {})
    for command in ("knn", "linear"):
        one_line(["eval", command, "--train", str(tmp_path / "a.pt"), "--test", str(tmp_path / "b.pt")],
                 "a.pt has 8-dim features", "b.pt has 16-dim")
        one_line(["eval", command, "--train", str(tmp_path / "a.pt"), "--test", str(notes)], "notes.txt")
    one_line(["eval", "knn", "--train", str(tmp_path / "a.pt"), "--test", str(tmp_path / "a.pt"),
              "--temperature", "0"], "temperature must be > 0")
    one_line(["eval", "linear", "--train", str(tmp_path / "a.pt"), "--test", str(tmp_path / "a.pt"),
              "--val-fraction", "1.5"], "val_fraction must be in (0, 1)")
    with pytest.raises(SystemExit) as info:  # argparse's own error (usage, then one line)
        main(["eval", "knn", "--train", "a.pt", "--test", "b.pt", "--device", "gpu7"])
    assert info.value.code == 2 and "expected a device such as cpu" in capsys.readouterr().err
