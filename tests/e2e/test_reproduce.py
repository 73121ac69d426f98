"""`pijepa reproduce --smoke`: the whole pipeline (shards, train, export, features, eval, report) end to end."""

import json

import pytest
import torch

from tests.conftest import run_cli

ENCODERS = ("random init", "I-JEPA (L2)", "Prob. I-JEPA (L2_PKT)")
DATASETS = ("cifar10", "intel-scenes")


@pytest.mark.slow
def test_reproduce_smoke_writes_table_and_plots(tmp_path, data_dir):
    out, docs = tmp_path / "out", tmp_path / "docs"
    args = ["reproduce", "--smoke", "--seeds", "0", "--jobs", "2", "--out", str(out), "--docs", str(docs),
            "--data", str(data_dir)]
    r = run_cli(*args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # --jobs 2: both pretraining runs start before either finishes.
    lines = r.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if "[train/" in line and line.endswith("] ...")]
    ends = [i for i, line in enumerate(lines) if "[train/" in line and "] done in" in line]
    assert len(starts) == 2 and len(ends) == 2 and max(starts) < min(ends), r.stderr[-3000:]

    md = (docs / "results.md").read_text()
    for png in ("results_loss_curves.png", "results_accuracy.png"):
        assert (docs / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    assert "pijepa reproduce" in md and "2 run(s) at a time" in md and "--jobs 2" in md and "fp32 on CPU" in md
    # The accuracy table: one row per encoder x dataset, three metrics each, "mean ± spread".
    rows = [line for line in md.splitlines()
            if line.startswith("| ") and any(line.startswith(f"| {e} | {d} |") for e in ENCODERS for d in DATASETS)]
    assert len(rows) == len(ENCODERS) * len(DATASETS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5 and all(" ± " in c for c in cells[2:]), row
    assert "L2_PKT − L2" in md

    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"random", "L2", "L2_PKT"}
    for enc in results.values():
        for ds in DATASETS:
            assert set(enc[ds]) == {"knn20", "knn5", "linear"}
            assert all(len(v) == 1 and 0.0 <= v[0] <= 100.0 for v in enc[ds].values())

    # A rerun skips every stage (all outputs exist) and only rewrites the report.
    timings = json.loads((out / "timings.json").read_text())
    r = run_cli(*args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[train/" not in r.stderr and "[features/" not in r.stderr
    assert json.loads((out / "timings.json").read_text())["train/L2_s0"] == timings["train/L2_s0"]

    # commands.sh lists exactly the argv each stage ran: every training log starts with its line.
    script = (out / "commands.sh").read_text().splitlines()
    assert any(line.startswith("pijepa train --config cifar10_reproduce ") for line in script)
    for run in ("L2_s0", "L2_PKT_s0"):
        ran = (out / "runs" / run / "train.log").read_text().splitlines()[0].removeprefix("$ ")
        assert ran in script, ran
    for kind in ("pijepa shards write ", "pijepa export ", "pijepa features ", "pijepa eval knn ",
                 "pijepa eval linear "):
        assert any(line.startswith(kind) for line in script), kind

    # Without --docs the report goes to --out (never into the repository's docs/).
    r = run_cli(*args[:-4], "--data", str(data_dir), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "results.md").is_file() and (out / "results_accuracy.png").is_file()
    assert "[train/" not in r.stderr


def test_reproduce_missing_data_is_one_line(tmp_path):
    missing = tmp_path / "nothing"
    r = run_cli("reproduce", "--smoke", "--out", str(tmp_path / "out"), "--data", str(missing), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"pijepa reproduce: error: {missing}: no such folder (--data names the folder "
                                "holding cifar10/ and intel-scenes/; default ../shared/data)"), r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_reproduce_device_cuda_without_cuda_fails_before_any_work(tmp_path, data_dir):
    out = tmp_path / "out"
    r = run_cli("reproduce", "--smoke", "--device", "cuda", "--out", str(out), "--data", str(data_dir), timeout=120)
    assert r.returncode != 0
    assert "--device cuda" in r.stderr and "no CUDA device" in r.stderr, r.stderr[-2000:]
    assert not (out / "shards").exists() and not (out / "runs").exists()
