"""The webdataset training loader (pijepa/data/wds/) on small shards of real CIFAR-10 images.

Shards are written into tmp dirs with `write_shards` from copies of the first members of the real
per-class tars (300 images, 12 shards of 25), so every test reads real JPEGs.
"""

from __future__ import annotations

import csv
import io
import itertools
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pijepa.cli import main as cli_main
from pijepa.config import ConfigError, load_config
from pijepa.data.shards import read_index
from pijepa.data.transforms import normalize_batch
from pijepa.data.wds import ReaderPlan, balanced_split, check_readers, decode_rgb, resolve_shards, split_spec
from pijepa.data.wds.restart import finite_restart
from pijepa.runtime.errors import DataError
from pijepa.train.build import build_collator, build_dataset, build_train_loader
from tests.conftest import REPO, TINY_OVERRIDES, cifar_shards, run_cli

PER_CLASS, PER_SHARD = 30, 25  # 10 classes -> 300 images in 12 shards
TINY_DATA = ["data.dataset=webdataset", "data.shards=set-below", "data.crop_size=32", "mask.patch_size=8",
             "mask.min_keep=2"]


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
    return cifar_shards(tmp_path_factory, "wds", PER_CLASS, PER_SHARD)


def all_keys(shards: Path, pattern: str = "*.tar") -> set[str]:
    return {s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList([str(p) for p in sorted(shards.glob(pattern))]),
                                                   wds.tarfile_to_samples())}


def make_cfg(spec: str, *sets: str):
    cfg = load_config(None, [*TINY_DATA, *sets])
    cfg.data.shards = spec  # set directly: the tests pass paths, not YAML
    return cfg


def make_loader(spec: str, *sets: str, world: int = 1, rank: int = 0, start_step: int = 0, accum: int = 1):
    cfg = make_cfg(spec, *sets)
    shards = build_dataset(cfg, world)
    return build_train_loader(cfg, shards, accum=accum, world_size=world, rank=rank, start_step=start_step,
                              total_steps=10**6, pin_memory=False)


def take(loader, n: int) -> list[tuple[tuple, dict]]:
    return list(itertools.islice(loader.iter_with_info(), n))


def keys_of(batches) -> list[str]:
    return [k for _, info in batches for k in info["keys"]]


FINITE = ("data.wds_mode=finite", "data.batch_size=10", "data.shuffle_buffer=50")


# ----------------------------------------------------------------------------- batches


def test_batches_are_uint8_crops_with_labels_and_masks(shards_dir):
    index = read_index(shards_dir)
    batches = take(make_loader(str(shards_dir), *FINITE, "data.num_workers=0"), 3)
    collator = build_collator(make_cfg(str(shards_dir), *FINITE))
    for (images, labels, masks_enc, masks_pred), info in batches:
        # uint8 crops: the trainer normalises them on its device
        assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
        normed = normalize_batch(images)
        assert normed.min() < -0.5 and normed.max() > 0.5 and abs(float(normed.mean())) < 1.5  # ImageNet-normalised
        # labels are the cls of each sample: the class named in its key (CIFAR files are <class>_<id>.jpg)
        assert labels.tolist() == [index["class_to_idx"][k.rsplit("_", 1)[0]] for k in info["keys"]]
        assert masks_enc.shape[:2] == (1, 10) and masks_pred.shape[:2] == (4, 10)
        enc, pred = collator.sample_masks(10, info["u"])  # masks are a function of (seed, u) alone
        assert torch.equal(enc, masks_enc) and torch.equal(pred, masks_pred)
    assert [info["u"] for _, info in batches] == [0, 1, 2]
    # crops are seeded: a second loader gives the same images
    again = take(make_loader(str(shards_dir), *FINITE, "data.num_workers=0"), 3)
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(batches, again))


def test_finite_one_rank_two_workers_sees_each_sample_once_per_epoch(shards_dir):
    expected = all_keys(shards_dir)
    batches = take(make_loader(str(shards_dir), *FINITE, "data.num_workers=2"), 60)
    first, second = keys_of(batches[:30]), keys_of(batches[30:])
    assert Counter(first) == Counter(expected) and len(first) == 300
    assert Counter(second) == Counter(expected)
    assert first != second  # a new shard order and shuffle every reader epoch
    assert [info["worker"] for _, info in batches[:4]] == [0, 1, 0, 1]
    assert {info["epoch"] for _, info in batches[:30]} == {0} and {info["epoch"] for _, info in batches[30:]} == {1}


def test_finite_two_ranks_two_workers_split_the_epoch(shards_dir):
    """Two ranks' loaders in one process (no collective needed to read): together each sample once."""
    sets = (*FINITE, "data.num_workers=2", "data.batch_size=5")
    seen = [keys_of(take(make_loader(str(shards_dir), *sets, world=2, rank=r), 30)) for r in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert Counter(seen[0] + seen[1]) == Counter(all_keys(shards_dir))


def test_balanced_split_by_counts():
    counts = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    parts = balanced_split(list(range(11)), counts, 2)
    assert sorted(k for p in parts for k in p) == list(range(11))
    assert [sum(counts[k] for k in p) for p in parts] == [100, 100]
    assert balanced_split([3, 1, 2, 0], [None] * 4, 2) == [[3, 2], [1, 0]]  # unknown counts: round-robin


@pytest.mark.parametrize("mode", ["finite", "resampled"])
def test_resume_mid_epoch_continues_exactly(shards_dir, mode):
    """Stopped after 13 micro-batches (odd: the worker round-robin is mid-cycle) and resumed from a
    checkpointed state, the loader gives exactly the uninterrupted run's batches."""
    sets = (f"data.wds_mode={mode}", "data.batch_size=10", "data.shuffle_buffer=50", "data.num_workers=2")
    full = take(make_loader(str(shards_dir), *sets), 40)  # crosses the reader epoch boundary at 30
    first = make_loader(str(shards_dir), *sets)
    head = take(first, 13)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # must load as the checkpoint does: weights_only
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed = make_loader(str(shards_dir), *sets, start_step=13)
    resumed.load_state_dict(state)
    tail = take(resumed, 27)
    assert keys_of(head + tail) == keys_of(full)
    for (a, info_a), (b, info_b) in zip(full, head + tail):
        assert info_a["u"] == info_b["u"]
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    if mode == "finite":
        assert Counter(keys_of(head + tail[:17])) == Counter(all_keys(shards_dir))


def test_resume_refuses_other_settings(shards_dir):
    """Other data (shards, mode, seed) is never resumed; at the same layout the exact resume needs
    the same batch size and step. (Another number of workers used to be refused too: it restarts.)"""
    loader = make_loader(str(shards_dir), *FINITE, "data.num_workers=2")
    take(loader, 4)
    state = loader.state_dict()
    fewer = make_loader(str(shards_dir / "train-{000000..000009}.tar"), *FINITE, "data.num_workers=2", start_step=4)
    with pytest.raises(ValueError, match="num_shards is 12, this run has 10"):
        fewer.load_state_dict(state)
    other_seed = make_loader(str(shards_dir), *FINITE, "data.num_workers=2", "meta.seed=1", start_step=4)
    with pytest.raises(ValueError, match="checkpointed seed is 0, this run has 1"):
        other_seed.load_state_dict(state)
    other_batch = make_loader(str(shards_dir), *FINITE, "data.num_workers=2", "data.batch_size=5", start_step=8)
    with pytest.raises(ValueError, match="batch_size is 10, this run has 5 .*keep data.batch_size"):
        other_batch.load_state_dict(state)
    wrong_step = make_loader(str(shards_dir), *FINITE, "data.num_workers=2", start_step=5)
    with pytest.raises(ValueError, match="micro-batch 4"):
        wrong_step.load_state_dict(state)
    one_rank_of_two = make_loader(str(shards_dir), *FINITE, "data.num_workers=0", world=2)
    take(one_rank_of_two, 2)
    with pytest.raises(DataError, match="positions of 1 of 2 ranks x 1 workers"):  # not gathered
        make_loader(str(shards_dir), *FINITE, "data.num_workers=0", start_step=4).load_state_dict(
            one_rank_of_two.state_dict())


# ----------------------------------------------------------------------------- another reader layout


def two_rank_state(spec: str, sets: tuple[str, ...], micro: int) -> tuple[dict, list[str]]:
    """The gathered state of two ranks' loaders after `micro` micro-batches each (one process: the
    ranks' positions are merged as all_gather would) and the keys they read."""
    states, read = [], []
    for rank in (0, 1):
        loader = make_loader(spec, *sets, world=2, rank=rank)
        read += keys_of(take(loader, micro))
        states.append(loader.state_dict())
    return {**states[0], "ranks": [s["ranks"][0] for s in states]}, read


def test_finite_resume_on_fewer_ranks_restarts_the_epoch(shards_dir, capsys):
    """2 ranks x 4 micro-batches of 10 (step 4 of global batch 20), resumed on 1 rank with
    accumulation 2: the one reader starts reader epoch 0 afresh, reads every sample once in it, and
    the micro-batch numbers (u, hence masks and crops) go on from the checkpoint's step."""
    sets = (*FINITE, "data.num_workers=0")
    state, before = two_rank_state(str(shards_dir), sets, 4)
    state["ranks"][1]["readers"][0]["skipped"] = 3  # as if rank 1 had met corrupt samples
    resumed = make_loader(str(shards_dir), *sets, start_step=4, accum=2)
    resumed.load_state_dict(state)
    assert resumed.counters() == {"data_skipped": 3}  # the logged total goes on
    err = capsys.readouterr().err
    assert ("at step 4 on 1 rank(s) x 1 worker(s) from a checkpoint of 2 x 1" in err
            and "restarts at the start of reader epoch 0 (finite): 80 sample(s) read before the checkpoint "
                "are read again and 0 of the earlier reader epochs are not read" in err)
    batches = take(resumed, 31)
    assert [info["u"] for _, info in batches[:3]] == [8, 9, 10]
    assert {info["epoch"] for _, info in batches[:30]} == {0} and batches[30][1]["epoch"] == 1
    epoch = keys_of(batches[:30])
    assert Counter(epoch) == Counter(all_keys(shards_dir))  # the restarted epoch: each sample once
    assert len(set(before) & set(epoch)) == 80  # what the old readers had read is read again
    again = make_loader(str(shards_dir), *sets, start_step=4, accum=2)
    again.load_state_dict(state)
    assert keys_of(take(again, 5)) == epoch[:50]  # deterministic: every rank derives the same start
    # the restarted loader's own state resumes exactly at its (new) layout
    assert resumed.state_dict()["ranks"][0]["micro_batches"] == 8 + 31


def test_finite_restart_epoch_counts_repeats_and_skips(shards_dir):
    """The restart epoch is the one the old readers' summed position falls in (12 shards of 25: each
    of 2 readers holds 150 samples per reader epoch); the counts say what is read twice or never."""
    plan = ReaderPlan(resolve_shards(str(shards_dir)), "finite", 0, 2, 1)
    assert finite_restart(plan, [(0, 40), (0, 40)]).epoch == 0
    near = finite_restart(plan, [(0, 140), (1, 5)])  # 295 of 300 read: still epoch 0, all read again
    assert (near.epoch, near.repeated, near.skipped, near.exact) == (0, 295, 0, True)
    past = finite_restart(plan, [(0, 145), (1, 20)])  # 315: epoch 1; reader 0's last 5 are skipped
    assert (past.epoch, past.repeated, past.skipped) == (1, 20, 5)
    later = finite_restart(plan, [(3, 150), (4, 0)])  # a reader done with its epoch is at the next one
    assert (later.epoch, later.repeated, later.skipped) == (4, 0, 0)


def test_finite_resume_on_more_workers_and_ranks(shards_dir, capsys):
    """1 rank to micro-batch 20 (200 samples), resumed on 2 ranks at step 10 of global batch 20 (the
    same 200 samples): the two ranks together read the restarted epoch once, disjointly."""
    sets = (*FINITE, "data.num_workers=0")
    one = make_loader(str(shards_dir), *sets)
    take(one, 20)
    state = one.state_dict()
    read = []
    for rank in (0, 1):
        resumed = make_loader(str(shards_dir), *sets, world=2, rank=rank, start_step=10)
        resumed.load_state_dict(state)
        batches = take(resumed, 15)
        assert batches[0][1]["u"] == 20 + rank and {info["epoch"] for _, info in batches} == {0}
        read.append(keys_of(batches))
    assert not set(read[0]) & set(read[1]) and Counter(read[0] + read[1]) == Counter(all_keys(shards_dir))
    assert "200 sample(s) read before the checkpoint are read again and 0" in capsys.readouterr().err


def test_resampled_resume_at_another_layout_reseeds_from_the_step(shards_dir, capsys):
    """Resampled readers start fresh streams seeded from (seed, step), the same on every run; the
    reseed is saved, so a later exact resume replays those streams."""
    sets = ("data.wds_mode=resampled", "data.batch_size=10", "data.shuffle_buffer=30", "data.num_workers=0")
    state, _ = two_rank_state(str(shards_dir), sets, 3)
    resumed = make_loader(str(shards_dir), *sets, start_step=3, accum=2)
    resumed.load_state_dict(state)
    assert "fresh resampled stream seeded from (data seed, step 3)" in capsys.readouterr().err
    head = take(resumed, 5)
    tail = take(resumed, 4)
    assert resumed.state_dict()["reseed"] == 3
    fresh = make_loader(str(shards_dir), *sets, start_step=3, accum=2)
    fresh.load_state_dict(state)
    assert keys_of(take(fresh, 9)) == keys_of(head + tail)  # deterministic
    exact = make_loader(str(shards_dir), *sets, start_step=5, accum=2)  # step 5 = micro-batch 10 ...
    mid = make_loader(str(shards_dir), *sets, start_step=3, accum=2)
    mid.load_state_dict(state)
    take(mid, 4)  # ... 6 + 4 micro-batches taken
    exact.load_state_dict(mid.state_dict())
    assert keys_of(take(exact, 5)) == keys_of(head[4:] + tail)
    unseeded = make_loader(str(shards_dir), *sets, start_step=6)
    assert keys_of(take(unseeded, 3)) != keys_of(head[:3])  # not the original streams


def test_resume_with_other_workers_restarts(shards_dir, capsys):
    """Another data.num_workers at the same world size is another reader layout: restarted, not refused."""
    loader = make_loader(str(shards_dir), *FINITE, "data.num_workers=2")
    take(loader, 4)
    other = make_loader(str(shards_dir), *FINITE, "data.num_workers=0", start_step=4)
    other.load_state_dict(loader.state_dict())
    assert "from a checkpoint of 1 x 2" in capsys.readouterr().err
    batches = take(other, 30)
    assert [info["u"] for _, info in batches[:2]] == [4, 5]
    assert Counter(keys_of(batches)) == Counter(all_keys(shards_dir))


def test_resampled_streams_are_seeded_per_rank(shards_dir):
    sets = ("data.wds_mode=resampled", "data.batch_size=10", "data.num_workers=0")
    a = keys_of(take(make_loader(str(shards_dir), *sets, world=2, rank=0), 5))
    assert a == keys_of(take(make_loader(str(shards_dir), *sets, world=2, rank=0), 5))
    assert a != keys_of(take(make_loader(str(shards_dir), *sets, world=2, rank=1), 5))
    assert a != keys_of(take(make_loader(str(shards_dir), *sets, "meta.seed=1", world=2, rank=0), 5))


# ----------------------------------------------------------------------------- corrupt data


def corrupt_copy(shards_dir: Path, dst: Path) -> tuple[Path, set[str]]:
    """A copy of the shards where train-000001.tar is cut inside its 11th sample and train-000002.tar
    holds a non-image under `jpg` and a sample without an image (same count, so shards.json holds)."""
    shutil.copytree(shards_dir, dst)
    bad_keys = set()
    cut = dst / "train-000001.tar"
    with tarfile.open(cut) as tf:
        members = [m for m in tf if m.isfile()]
    bad_keys |= {m.name.split(".")[0] for m in members[30:]}  # samples 10.. (3 members each) lost
    data = cut.read_bytes()
    cut.write_bytes(data[:members[30].offset_data + 300])
    edit = dst / "train-000002.tar"
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(edit)]), wds.tarfile_to_samples()))
    samples[3]["jpg"] = b"this is not an image"
    del samples[7]["jpg"]
    bad_keys |= {samples[3]["__key__"], samples[7]["__key__"]}
    with wds.TarWriter(str(edit)) as tw:
        for s in samples:
            tw.write({k: v for k, v in s.items() if k != "__url__"})
    return dst, bad_keys


def test_corrupt_samples_are_skipped_and_counted(shards_dir, tmp_path, capsys):
    bad_dir, bad_keys = corrupt_copy(shards_dir, tmp_path / "bad")
    assert len(bad_keys) == 15 + 2
    first4 = "train-00000[0-3].tar"  # the two bad shards and two good ones; counts from shards.json
    loader = make_loader(str(bad_dir / "train-{000000..000003}.tar"), "data.wds_mode=finite", "data.batch_size=1",
                         "data.shuffle_buffer=0", "data.num_workers=0")
    seen, skipped = [], 0
    for _, info in loader.iter_with_info():  # batch 1: every skip lands with the next good sample
        skipped += info["skipped"]
        if info["epoch"] == 1:
            break
        seen += info["keys"]
    assert Counter(seen) == Counter(all_keys(shards_dir, first4) - bad_keys)
    assert skipped == len(bad_keys) == loader.counters()["data_skipped"]
    err = capsys.readouterr().err
    assert "train-000001.tar unreadable or truncated" in err and "train-000002.tar" in err


# ----------------------------------------------------------------------------- shard specs and errors


def test_shard_specs(shards_dir):
    pattern = str(shards_dir / "train-{000000..000011}.tar")
    by_pattern = resolve_shards(pattern)
    assert len(by_pattern.urls) == 12 and len(by_pattern) == 300  # counts from shards.json beside them
    by_index = resolve_shards(str(shards_dir / "shards.json"))
    assert resolve_shards(str(shards_dir)).urls == by_index.urls == by_pattern.urls
    two = resolve_shards(f"{shards_dir}/train-{{000000..000001}}.tar, {shards_dir}/train-000005.tar")
    assert [Path(u).name for u in two.urls] == ["train-000000.tar", "train-000001.tar", "train-000005.tar"]
    assert len(two) == 75
    assert split_spec("a-{0,1}.tar,b.tar::c.tar") == ["a-{0,1}.tar", "b.tar", "c.tar"]
    piped = resolve_shards("pipe:cat /nowhere/x-{0..3}.tar", epoch_samples=100)  # commands: not checked
    assert piped.urls[0] == "pipe:cat /nowhere/x-0.tar" and len(piped) == 100
    cfg = load_config(None, [*TINY_DATA[:1], f"data.shards=['{pattern}', '{shards_dir}/train-000005.tar']"])
    assert len(resolve_shards(cfg.data.shards).urls) == 13  # a YAML list works too


def test_missing_shard_and_empty_list_are_clear_errors(tmp_path, shards_dir):
    with pytest.raises(FileNotFoundError, match=r"shard .*missing-000000\.tar does not exist \(and 2 more of 3\)"):
        resolve_shards(str(tmp_path / "missing-{000000..000002}.tar"))
    with pytest.raises(FileNotFoundError, match="train-000099.tar does not exist"):
        resolve_shards(f"{shards_dir}/train-000000.tar,{shards_dir}/train-000099.tar")
    for empty in ("", " , ", "::"):
        with pytest.raises(ValueError, match="names no shard"):
            resolve_shards(empty)
    with pytest.raises(ValueError, match="set data.epoch_samples"):
        resolve_shards("pipe:cat x.tar")
    with pytest.raises(FileNotFoundError, match="no shards index"):
        resolve_shards(str(tmp_path / "shards.json"))


def test_bad_shard_settings_are_user_errors(tmp_path, shards_dir):
    """The CLI prints a UserError as one line: every bad data setting must raise one (DataError)."""
    for spec in ("", "pipe:cat x.tar", str(tmp_path / "missing.tar"), str(tmp_path / "broken-{000..001.tar")):
        with pytest.raises(DataError, match="data.shards"):
            resolve_shards(spec)
    with pytest.raises(DataError, match="16 readers"):
        check_readers(resolve_shards(str(shards_dir)), "finite", 4, 4)
    loader = make_loader(str(shards_dir), *FINITE, "data.num_workers=0")
    with pytest.raises(DataError, match="micro-batch 0"):
        make_loader(str(shards_dir), *FINITE, "data.num_workers=0", start_step=3).load_state_dict(loader.state_dict())


def test_unreadable_shards_stop_with_one_line_from_a_worker(tmp_path):
    """A reader that reads nothing stops the run; the error raised in the DataLoader worker comes
    back as a DataError with its own one-line message, not the worker's traceback."""
    for i in range(2):
        (tmp_path / f"bad-{i:06d}.tar").write_bytes(b"not a tar file\n" * 100)
    loader = make_loader(str(tmp_path / "bad-{000000..000001}.tar"), "data.wds_mode=finite", "data.batch_size=2",
                         "data.epoch_samples=20", "data.num_workers=1")
    with pytest.raises(DataError, match=r"worker 0\) read no sample in 20 reader epochs") as err:
        take(loader, 1)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_fewer_shards_than_readers_is_a_clear_error(shards_dir):
    shards = resolve_shards(str(shards_dir))
    with pytest.raises(ValueError, match=r"12 shards cannot be split over 4 rank\(s\) x 4 worker\(s\) = 16 readers"):
        check_readers(shards, "finite", 4, 4)
    check_readers(shards, "resampled", 4, 4)  # resampled readers draw shards: any number works
    with pytest.raises(ValueError, match="16 readers"):
        build_dataset(make_cfg(str(shards_dir), "data.wds_mode=finite", "data.num_workers=4"), world_size=4)


def test_config_keys_are_validated():
    for bad, words in [("data.wds_mode=sometimes", "one of resampled, finite"),
                       ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
                       ("data.epoch_samples=-5", "data.epoch_samples"),
                       ("data.shards=[1, 2]", "expected shard specs")]:
        with pytest.raises(ConfigError, match=words):
            load_config(None, [bad])


def test_decode_converts_cmyk_greyscale_and_png_to_rgb():
    for mode, fmt in [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG")]:
        buf = io.BytesIO()
        Image.new(mode, (12, 7), color=(200, 100, 50, 255)[:len(mode)] if mode != "L" else 90).save(buf, fmt)
        expected = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1)
        out = decode_rgb(buf.getvalue())
        assert out.shape == (3, 7, 12) and out.dtype == torch.uint8
        assert (out.int() - expected.int()).abs().max() <= 2, mode  # libjpeg vs PIL colour conversion


def test_bench_data_cli_runs(shards_dir, capsys):
    code = cli_main(["bench", "data", "--shards", str(shards_dir), "--workers", "1", "--batches", "2",
                     "--repeats", "1", "--warmup", "1", "--set", "data.batch_size=8", "--set", "data.crop_size=32",
                     "--set", "mask.patch_size=8", "--set", "mask.min_keep=2"])
    out = capsys.readouterr().out
    assert code == 0 and "floor" in out and "x floor per worker" in out


# ----------------------------------------------------------------------------- training through the CLI


def final_state(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "state.pt", weights_only=True)


@pytest.mark.slow
def test_train_cli_on_shards_resumes_exactly_and_logs_skips(shards_dir, tmp_path):
    """The tiny model trains from shards (finite, 2 workers) through the CLI; the corrupt samples of
    a bad shard are skipped and counted in the metrics; a run stopped at step 7 (mid reader epoch)
    and resumed ends bit-identical to the uninterrupted one."""
    bad = tmp_path / "bad-000000.tar"
    good = list(wds.DataPipeline(wds.SimpleShardList([str(shards_dir / "train-000000.tar")]), wds.tarfile_to_samples()))
    with wds.TarWriter(str(bad)) as tw:
        for i, s in enumerate(good[:4]):
            sample = {"__key__": f"bad{i}", "cls": s["cls"], "jpg": s["jpg"]}
            if i == 1:
                sample["jpg"] = b"\xff\xd8 truncated jpeg"
            if i == 2:
                del sample["jpg"]
            tw.write(sample)

    def train(run_dir: Path, *sets: str):
        args = ["train", "--config", str(REPO / "configs/cpu_default.yaml")]
        spec = f"{shards_dir}/train-{{000000..000003}}.tar,{bad}"  # 100 good samples + the bad shard
        for s in [*TINY_OVERRIDES, "data.dataset=webdataset", f"data.shards='{spec}'",
                  "data.epoch_samples=100", "data.wds_mode=finite", "data.num_workers=2", "data.batch_size=10",
                  "data.shuffle_buffer=40", "optimization.max_steps=14", "logging.log_freq=7",
                  f"logging.folder={run_dir}", *sets]:
            args += ["--set", s]
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    full, split = tmp_path / "full", tmp_path / "split"
    train(full, "logging.checkpoint_freq=14")
    train(split, "logging.checkpoint_freq=7", "optimization.max_steps=7")
    r = train(split, "logging.checkpoint_freq=7")
    assert "at step 7" in r.stderr
    a, b = final_state(full), final_state(split)
    for part in ("encoder", "predictor", "target_encoder"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name} differs after resume"
    rows = list(csv.DictReader((full / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [7, 14]
    # 14 steps x 10 samples: each worker (70 samples) has finished its first reader epoch (~52)
    assert int(rows[-1]["data_skipped"]) == 2
    split_rows = list(csv.DictReader((split / "metrics.csv").open()))
    assert split_rows[-1]["data_skipped"] == rows[-1]["data_skipped"]
