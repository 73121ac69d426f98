"""Wrong input against a run folder that already holds checkpoints and logs: each case gets one
clear message and a non-zero exit (or a reported, counted skip), and nothing already written is
lost or changed."""

import csv
import io
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, TINY_OVERRIDES, run_cli
from tests.reliability import snapshot

BASE_SETS = [*TINY_OVERRIDES, "optimization.max_steps=4", "logging.checkpoint_freq=2", "logging.log_freq=1"]


def train(run_dir, *sets, config=None):
    args = ["train", "--config", str(config or REPO / "configs/cpu_default.yaml")]
    for s in [*BASE_SETS, f"logging.folder={run_dir}", *sets]:
        args += ["--set", s]
    return run_cli(*args)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "run"
    r = train(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]
    return run


@pytest.fixture
def run(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def assert_one_line(r, *words, code=2):
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize("text, words", [
    ("data: [batch_size: 8\n", ["does not parse", "bad.yaml"]),
    ("data:\n  batch_sise: 8\n", ["data.batch_sise", "bad.yaml"]),
    ("optimization:\n  lr: fast\n", ["optimization.lr", "bad.yaml"]),
])
def test_bad_yaml_leaves_the_run_untouched(run, tmp_path, text, words):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    before = snapshot(run)
    r = run_cli("train", "--config", str(bad), "--set", f"logging.folder={run}")
    assert_one_line(r, *words)
    assert snapshot(run) == before


def test_checkpoint_of_another_architecture_stops_and_leaves_the_run_untouched(run):
    before = snapshot(run)
    r = train(run, "meta.model_name=vit_small")
    assert_one_line(r, "step_00000004", "does not match this run's architecture")
    assert snapshot(run) == before


def test_missing_shards_stop_and_leave_the_run_untouched(run, tmp_path):
    before = snapshot(run)
    r = train(run, "data.dataset=webdataset", f"data.shards={tmp_path}/none-{{000000..000003}}.tar")
    assert_one_line(r, "none-000000.tar does not exist")
    assert snapshot(run) == before


def test_read_checkpoint_that_is_not_one_is_one_clear_line(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "state.pt").write_text("certainly not a checkpoint\n")
    r = train(tmp_path / "fresh", "meta.load_checkpoint=true", f"meta.read_checkpoint={fake}")
    assert_one_line(r, str(fake), "not a readable checkpoint")


class _RunsCode:
    """Unpickling this calls Path.touch: exactly what weights_only loading must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("damage", ["truncated", "not_a_checkpoint", "runs_code"])
def test_unreadable_newest_checkpoint_is_reported_kept_aside_and_the_previous_one_resumed(run, tmp_path, damage):
    state = run / "checkpoints" / "step_00000004" / "state.pt"
    good = torch.load(state, weights_only=True)
    marker = tmp_path / "code-ran"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "not_a_checkpoint":
        state.write_text("hello\n")
    else:
        with state.open("wb") as f:
            pickle.dump({"format": "pijepa-checkpoint-v1", "payload": _RunsCode(str(marker))}, f)
    damaged = state.read_bytes()
    older = snapshot(run / "checkpoints" / "step_00000002")

    r = train(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint" in r.stderr and "step_00000004 is unreadable" in r.stderr
    if damage == "runs_code":
        assert "refused: its pickle would run code" in r.stderr
    assert not marker.exists()
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    # The damaged files are kept for inspection; the older checkpoint was read, not changed.
    assert (run / "checkpoints" / "step_00000004.unreadable" / "state.pt").read_bytes() == damaged
    assert snapshot(run / "checkpoints" / "step_00000002") == older
    # Steps 3-4 were redone from step 2 and give the same weights as the first time.
    redone = torch.load(run / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    for part in ("encoder", "predictor", "target_encoder"):
        for name, value in good[part].items():
            assert torch.equal(value, redone[part][name]), f"{part}.{name}"


def test_features_refuse_a_checkpoint_that_runs_code(tmp_path):
    marker, evil = tmp_path / "code-ran", tmp_path / "evil.pt"
    torch.save({"encoder": {}, "target_encoder": _RunsCode(str(marker))}, evil)
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a" / "0.png")
    r = run_cli("features", "--encoder", str(evil), "--data", str(tmp_path / "images"), "--out", str(tmp_path / "f.pt"))
    assert_one_line(r, "evil.pt", "weights_only")
    assert not marker.exists()


def _encode(array, mode, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, fmt)
    return buf.getvalue()


def test_folder_of_odd_images_trains_with_corrupt_ones_skipped_and_counted(tmp_path):
    """CMYK, greyscale, alpha, palette and 16-bit images decode to RGB; a truncated JPEG and a
    text file named .jpg are skipped (substituted), named in a warning and counted."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(2):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(10):
            rgb = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            mode, fmt, ext = [("CMYK", "JPEG", "jpg"), ("L", "JPEG", "jpg"), ("RGBA", "PNG", "png"),
                              ("P", "PNG", "png"), ("LA", "PNG", "png"), ("RGB", "JPEG", "jpg")][i % 6]
            (folder / f"{i}.{ext}").write_bytes(_encode(rgb, mode, fmt))
        sixteen = (rng.integers(0, 65535, (40, 48))).astype(np.uint16)
        buf = io.BytesIO()
        Image.fromarray(sixteen).save(buf, "PNG")
        (folder / "sixteen.png").write_bytes(buf.getvalue())
    (root / "class0" / "truncated.jpg").write_bytes(_encode(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8),
                                                            "RGB", "JPEG")[:300])
    (root / "class1" / "notes.jpg").write_text("not an image\n")
    run = tmp_path / "run"
    r = train(run, "data.dataset=folder", f"data.root_path={tmp_path}", "data.image_folder=images",
              "optimization.max_steps=6", "optimization.epochs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "truncated.jpg" in r.stderr and "notes.jpg" in r.stderr and "skipping unreadable image" in r.stderr

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert int(rows[-1]["data_skipped"]) >= 2  # each of the two is drawn once per epoch
