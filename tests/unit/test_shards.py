"""Tests of `pijepa shards write` (pijepa/data/shards/) on the real images in <repo>/../shared/data.

Fast tests work on small per-class-tar / ImageFolder copies built in tmp dirs from the first members
of the real tars; the full CIFAR-10 train conversion is marked slow.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pijepa.cli import main as cli_main
from pijepa.commands.shards import parse_size
from pijepa.data.shards import Entry, ShardsError, read_index, shard_paths, write_shards
from pijepa.data.shards import plan as shard_plan
from pijepa.data.shards import writer as shard_writer

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "cifar10").is_dir() or not (DATA / "intel-scenes").is_dir(),
    reason=f"real image data not found at {DATA} (expected <repo>/../shared/data with cifar10/ and intel-scenes/)",
)


# ----------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def first_members(tar_path: Path, n: int | None) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tf:
        out = []
        for m in tf:
            if m.isfile():
                out.append((m.name, tf.extractfile(m).read()))
                if n is not None and len(out) == n:
                    break
    return out


def make_tar_subset(split: Path, dst: Path, n: int, classes: list[str] | None = None) -> Path:
    """dst/<class>.tar holding the first n members of each real per-class tar."""
    dst.mkdir(parents=True)
    for tar_path in sorted(split.glob("*.tar")):
        if classes is not None and tar_path.stem not in classes:
            continue
        with tarfile.open(dst / tar_path.name, "w") as out:
            for name, data in first_members(tar_path, n):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return dst


def make_folder_subset(split: Path, dst: Path, n: int) -> Path:
    """dst/<class>/<file> from the first n members of each real per-class tar."""
    for tar_path in sorted(split.glob("*.tar")):
        (dst / tar_path.stem).mkdir(parents=True)
        for name, data in first_members(tar_path, n):
            (dst / tar_path.stem / name).write_bytes(data)
    return dst


def source_multiset(src: Path) -> Counter:
    """(file, class, sha256) of every image in a per-class-tar or ImageFolder source, read independently."""
    found: Counter = Counter()
    for tar_path in src.glob("*.tar"):
        found.update((name, tar_path.stem, sha(data)) for name, data in first_members(tar_path, None))
    for f in src.glob("*/**/*"):
        if f.is_file():
            cls = f.relative_to(src).parts[0]
            found[(f.relative_to(src / cls).as_posix(), cls, sha(f.read_bytes()))] += 1
    return found


def read_back(out: Path) -> list[dict]:
    urls = [str(p) for p in shard_paths(out)]
    return list(wds.WebDataset(urls, shardshuffle=False))


def shard_multiset(out: Path) -> Counter:
    index = read_index(out)
    found: Counter = Counter()
    keys = set()
    for s in read_back(out):
        meta = json.loads(s["json"])
        assert int(s["cls"].decode("ascii")) == meta["class_id"] == index["class_to_idx"][meta["class_name"]]
        assert s["__key__"] not in keys
        keys.add(s["__key__"])
        found[(meta["file"], meta["class_name"], sha(s["jpg"]))] += 1
    return found


def file_hashes(out: Path, pattern: str = "*.tar") -> dict[str, str]:
    return {p.name: sha(p.read_bytes()) for p in sorted(out.glob(pattern))}


@pytest.fixture(scope="module")
def cifar_small(tmp_path_factory) -> Path:
    if not (DATA / "cifar10").is_dir():
        pytest.skip(f"real image data not found at {DATA}")
    return make_tar_subset(DATA / "cifar10" / "test", tmp_path_factory.mktemp("cifar") / "test", 30)


@pytest.fixture(scope="module")
def intel_folder(tmp_path_factory) -> Path:
    if not (DATA / "intel-scenes").is_dir():
        pytest.skip(f"real image data not found at {DATA}")
    return make_folder_subset(DATA / "intel-scenes" / "train", tmp_path_factory.mktemp("intel") / "train", 15)


def real_jpeg() -> bytes:
    return first_members(DATA / "cifar10" / "test" / "cat.tar", 1)[0][1]


# ----------------------------------------------------------------------------- pure helpers


def test_parse_size():
    assert parse_size("1GB") == 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1e9") == 10**9
    assert parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_shard_counts_by_count_and_bytes():
    assert shard_plan.shard_counts([1] * 10, 4, 10**9) == [4, 4, 2]
    # byte budget: limit minus end-of-archive blocks and record padding; an oversized sample stands alone
    budget = 50_000 - 1024 - 10240
    sizes = [budget // 3] * 7 + [10**6, 10]
    assert shard_plan.shard_counts(sizes, None, 50_000) == [3, 3, 1, 1, 1]


def test_unique_keys_disambiguate_collisions():
    e = lambda file, cls, src: Entry("/x", 0, 1, 0, cls, file, src)  # noqa: E731
    entries = [e("cat_0001.jpg", "cat", "train/cat.tar"), e("cat_0001.jpg", "cat", "test/cat.tar"),
               e("img 1.jpg", "dog", "train/dog"), e("img 1.jpg", "cat", "train/cat"), e("x.y.jpg", "dog", "t/dog")]
    keys = shard_plan.unique_keys(entries)
    assert keys == ["train_cat_cat_0001", "test_cat_cat_0001", "dog_img_1", "cat_img_1", "x_y"]
    assert len(set(shard_plan.unique_keys([e("a.jpg", "c", "s/c")] * 3))) == 3  # identical entries still unique


# ----------------------------------------------------------------------------- conversions


@needs_data
def test_per_class_tars_roundtrip(cifar_small, tmp_path):
    out = tmp_path / "out"
    index = write_shards(cifar_small, out, samples_per_shard=64, seed=3, progress=False)
    assert index == read_index(out)
    assert index["format"] == "pijepa-shards-v1"
    assert index["classes"] == sorted(p.stem for p in cifar_small.glob("*.tar"))
    assert index["class_to_idx"] == {c: i for i, c in enumerate(index["classes"])}
    assert (index["num_samples"], index["num_classes"], index["skipped"]) == (300, 10, 0)
    assert [s["num_samples"] for s in index["shards"]] == [64, 64, 64, 64, 44]
    assert [s["name"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert index["sources"] == [{"path": str(cifar_small.resolve()), "layout": "tars"}]
    for s in index["shards"]:
        data = (out / s["name"]).read_bytes()
        assert (len(data), sha(data)) == (s["bytes"], s["sha256"])
    assert shard_multiset(out) == source_multiset(cifar_small)
    # one global permutation of the sorted listing, from numpy's default_rng(seed)
    listing = [(c, name) for c in index["classes"] for name, _ in first_members(cifar_small / f"{c}.tar", None)]
    expected = [listing[i][1] for i in np.random.default_rng(3).permutation(len(listing))]
    assert [json.loads(s["json"])["file"] for s in read_back(out)] == expected
    assert json.loads((out / "skipped.json").read_text()) == []


@needs_data
def test_imagefolder_roundtrip_with_byte_limit(intel_folder, tmp_path):
    out = tmp_path / "out"
    limit = 80_000
    index = write_shards(intel_folder, out, max_shard_bytes=limit, progress=False)
    assert index["sources"][0]["layout"] == "imagefolder"
    assert index["classes"] == ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    assert index["num_samples"] == 90 and len(index["shards"]) > 3
    assert all(s["bytes"] <= limit for s in index["shards"])
    assert shard_multiset(out) == source_multiset(intel_folder)


@needs_data
def test_several_sources_union_of_classes(tmp_path):
    train = make_tar_subset(DATA / "cifar10" / "train", tmp_path / "train", 5, ["cat", "dog", "ship"])
    test = make_tar_subset(DATA / "cifar10" / "test", tmp_path / "test", 5, ["airplane", "cat"])
    index = write_shards([train, test], tmp_path / "out", samples_per_shard=10, progress=False)
    assert index["classes"] == ["airplane", "cat", "dog", "ship"]
    assert index["num_samples"] == 25
    assert shard_multiset(tmp_path / "out") == source_multiset(train) + source_multiset(test)
    # --src order does not matter; same classes -> same ids when converted again
    again = write_shards([test, train], tmp_path / "out2", samples_per_shard=10, progress=False)
    assert again["class_to_idx"] == index["class_to_idx"]
    assert file_hashes(tmp_path / "out2") == file_hashes(tmp_path / "out")


@needs_data
def test_reruns_and_worker_counts_byte_identical(cifar_small, tmp_path):
    runs = {}
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        write_shards(cifar_small, tmp_path / name, samples_per_shard=50, workers=workers, progress=False)
        runs[name] = file_hashes(tmp_path / name, "*.json") | file_hashes(tmp_path / name)
    assert len(runs["a"]) == 6 + 4  # 6 shards + shards/plan/skipped/transcoded json
    assert runs["a"] == runs["b"] == runs["c"]
    write_shards(cifar_small, tmp_path / "d", samples_per_shard=50, seed=1, progress=False)
    assert file_hashes(tmp_path / "d") != file_hashes(tmp_path / "a")
    # the tar metadata that makes this possible
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tf:
        members = tf.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o444)}
    assert [m.name.split(".", 1)[1] for m in members[:3]] == ["cls", "jpg", "json"]


@needs_data
def test_corrupt_and_non_image_files_are_skipped_and_reported(tmp_path, capsys):
    src = tmp_path / "src"
    good = first_members(DATA / "intel-scenes" / "test" / "sea.tar", 4)
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for name, data in good:
            (src / cls / name).write_bytes(data)
    (src / "a" / "truncated.jpg").write_bytes(good[0][1][: len(good[0][1]) // 2])
    (src / "b" / "text.jpg").write_text("this is not an image\n")
    (src / "b" / "notes.txt").write_text("not an image either\n")
    (src / "b" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # tool metadata: ignored
    index = write_shards(src, tmp_path / "out", progress=False)
    assert (index["num_samples"], index["skipped"]) == (8, 3)
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    reasons = {(r["class_name"], r["file"]): r["reason"] for r in report}
    assert set(reasons) == {("a", "truncated.jpg"), ("b", "text.jpg"), ("b", "notes.txt")}
    assert reasons[("a", "truncated.jpg")].startswith("cannot decode")
    assert reasons[("b", "text.jpg")].startswith("cannot decode")
    assert reasons[("b", "notes.txt")] == "not an image file extension"
    assert "skipped 3" in capsys.readouterr().out
    files = {json.loads(s["json"])["file"] for s in read_back(tmp_path / "out")}
    assert files == {name for name, _ in good}


@needs_data
def test_non_jpeg_and_colour_modes(tmp_path):
    rgb = Image.open(io.BytesIO(real_jpeg())).convert("RGB")
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    rgb.convert("L").save(src / "grey.jpg", quality=90)
    rgb.convert("CMYK").save(src / "cmyk.jpg", quality=90)
    rgb.convert("RGBA").save(src / "alpha_png.JPEG", format="PNG")  # PNG disguised as JPEG, as in ImageNet
    rgb.convert("P").save(src / "palette.png")

    def stored(out: Path) -> dict[str, bytes]:
        return {json.loads(s["json"])["file"]: s["jpg"] for s in read_back(out)}

    index = write_shards(src.parent, tmp_path / "keep", progress=False)
    kept = stored(tmp_path / "keep")
    for name in ("grey.jpg", "cmyk.jpg"):  # JPEGs keep their bytes, whatever the colour mode
        assert kept[name] == (src / name).read_bytes()
    for name in ("alpha_png.JPEG", "palette.png"):  # other formats become RGB JPEGs, and are reported
        assert Image.open(io.BytesIO(kept[name])).format == "JPEG"
    assert index["transcoded"] == 2 and index["skipped"] == 0
    report = json.loads((tmp_path / "keep" / "transcoded.json").read_text())
    assert sorted(r["file"] for r in report) == ["alpha_png.JPEG", "palette.png"]

    write_shards(src.parent, tmp_path / "re", reencode=True, progress=False)
    for data in stored(tmp_path / "re").values():
        im = Image.open(io.BytesIO(data))
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", rgb.size)


# ----------------------------------------------------------------------------- resume


@needs_data
def test_resume_rewrites_only_missing_shards(cifar_small, tmp_path, capsys):
    out = tmp_path / "out"
    index = write_shards(cifar_small, out, samples_per_shard=64, progress=False)
    clean = file_hashes(out)
    for p in out.glob("*.tar"):  # an old, exact mtime: a rewrite cannot go unnoticed within clock granularity
        os.utime(p, ns=(1_000_000_000 * 10**9, 1_000_000_000 * 10**9))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000002.tar").unlink()
    (out / "shards.json").unlink()
    (out / "train-000003.tar.tmp").write_bytes(b"half-written leftover")
    capsys.readouterr()
    assert write_shards(cifar_small, out, samples_per_shard=64, progress=False) == index
    assert "4 of 5 shards already written" in capsys.readouterr().out
    assert file_hashes(out) == clean
    changed = {p.name for p in out.glob("*.tar") if p.stat().st_mtime_ns != mtimes[p.name]}
    assert changed == {"train-000002.tar"}


@needs_data
def test_interrupted_conversion_resumes(cifar_small, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    write_shards(cifar_small, clean, samples_per_shard=64, progress=False)
    real_write, calls = shard_writer.write_shard, []

    class Killed(Exception):
        pass

    def dies_on_third_shard(task):
        calls.append(task.name)
        if calls == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]:
            raise Killed  # as if killed mid-way, once
        return real_write(task)

    out = tmp_path / "out"
    monkeypatch.setattr(shard_writer, "write_shard", dies_on_third_shard)
    with pytest.raises(Killed):
        write_shards(cifar_small, out, samples_per_shard=64, progress=False)
    assert not (out / "shards.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished conversion"):
        read_index(out)
    calls.clear()
    write_shards(cifar_small, out, samples_per_shard=64, progress=False)
    assert calls == ["train-000002.tar", "train-000003.tar", "train-000004.tar"]
    assert file_hashes(out) == file_hashes(clean)
    assert (out / "shards.json").read_bytes() == (clean / "shards.json").read_bytes()


@needs_data
def test_resume_refuses_other_settings(cifar_small, tmp_path):
    out = tmp_path / "out"
    write_shards(cifar_small, out, samples_per_shard=64, progress=False)
    with pytest.raises(ShardsError, match=r"seed: 0 -> 1.*refusing to resume"):
        write_shards(cifar_small, out, samples_per_shard=64, seed=1, progress=False)
    with pytest.raises(ShardsError, match="samples_per_shard"):
        write_shards(cifar_small, out, progress=False)


# ----------------------------------------------------------------------------- errors and CLI


def test_bad_sources_give_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ShardsError, match="does not exist") as err:
        write_shards(missing, tmp_path / "out", progress=False)
    assert str(missing) in str(err.value) and "per-class tars" in str(err.value) and "ImageFolder" in str(err.value)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ShardsError, match="not a folder"):
        write_shards(tmp_path / "file.txt", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardsError, match="neither per-class .tar files nor class folders"):
        write_shards(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "splits" / "train").mkdir(parents=True)
    (tmp_path / "splits" / "train" / "cat.tar").write_bytes(b"")
    with pytest.raises(ShardsError, match="folder of splits"):
        write_shards(tmp_path / "splits", tmp_path / "out", progress=False)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    with pytest.raises(ShardsError, match="no images found"):
        write_shards(tmp_path / "noimg", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_read_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "shards.json")):
        read_index(tmp_path)
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ShardsError, match=r"other.json is not a pijepa shards index"):
        read_index(bad)
    bad.write_text("{not json")
    with pytest.raises(ShardsError, match="not a valid JSON"):
        read_index(bad)


@needs_data
def test_cli_arguments(cifar_small, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["shards", "write", "--src", str(cifar_small), "--out", str(out), "--max-shard-size", "300KB",
            "--seed", "2", "--workers", "2", "--prefix", "val", "--no-progress"]
    assert cli_main(args) == 0
    index = read_index(out / "shards.json")
    assert index["shards"][0]["name"] == "val-000000.tar" and index["seed"] == 2
    assert all(s["bytes"] <= 300_000 for s in index["shards"])
    args = ["shards", "write", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]
    assert cli_main(args) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- full data set


@pytest.mark.slow
@needs_data
def test_full_cifar10_train(tmp_path):
    src = DATA / "cifar10" / "train"
    index = write_shards(src, tmp_path / "out", max_shard_bytes=32_000_000, workers=min(2, os.cpu_count() or 1),
                         progress=False)
    assert (index["num_samples"], index["num_classes"], index["skipped"]) == (50_000, 10, 0)
    assert shard_multiset(tmp_path / "out") == source_multiset(src)
