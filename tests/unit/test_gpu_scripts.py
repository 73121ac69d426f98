"""benchmarks/gpu/gpu_trainer_check.py without a GPU: its report helpers on made-up inputs, and its CPU
smoke mode end to end (the same steps, children and parsing as on the GPU, at toy sizes), so the
script, run as one prepared command on a machine with one CUDA GPU, is known to work before it
runs there.
No test needs a GPU, DeepSpeed or xformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))  # the scripts import their siblings by module name
import gpu_trainer_report as report  # noqa: E402


def test_steady_state_leaves_out_the_start_up_windows():
    windows = [{"step": 5, "step_time_s": 3.0, "peak_memory_mb": 100.0},
               {"step": 10, "step_time_s": 0.3, "peak_memory_mb": 120.0},
               {"step": 15, "step_time_s": 0.2, "peak_memory_mb": 110.0}]
    s = report.steady(windows, batch=128)
    assert s["step_time_s"] == pytest.approx(0.25) and s["images_per_s"] == pytest.approx(512)
    assert s["peak_memory_mb"] == 120.0 and s["steady_windows"] == 2
    assert report.steady([], 128) == {}


def test_bench_data_lines_are_parsed():
    text = ("pijepa bench data: 16 shards, batch 128, crop 224\n"
            "  floor (1 process, 1 thread: decode + augment + masks from memory):    380.5 img/s, 2.6 ms CPU/img\n"
            "  loader, 1 worker :    300.0 img/s = 0.79 x floor per worker\n"
            "  loader, 16 workers:   5200.0 img/s = 0.85 x floor per worker, 17.3 x the 1-worker loader\n")
    found = report.parse_bench_data(text)
    assert found["floor"] == 380.5 and found["loader"] == {1: 300.0, 16: 5200.0}


def test_the_planner_entry_follows_the_gpu():
    assert report.plan_gpu({"gpu": {"name": "NVIDIA H100 80GB HBM3"}}, False) == "h100-80gb"
    assert report.plan_gpu({"gpu": {"name": "NVIDIA H200"}}, False) == "h200-141gb"
    assert report.plan_gpu({"gpu": {"name": "NVIDIA A100-SXM4-40GB", "total_memory_mib": 40536}}, False) == "a100-40gb"


@pytest.mark.slow
@pytest.mark.dist
def test_cpu_smoke_runs_every_kind_of_step_and_writes_both_reports(tmp_path):
    out = tmp_path / "out"
    # One trainer run under torchrun, the planner, `bench step` and the webdataset pipeline: every
    # kind of step; the compiled and DeepSpeed runs add minutes here and are covered elsewhere.
    r = subprocess.run([sys.executable, "benchmarks/gpu/gpu_trainer_check.py", "--out", str(out), "--cpu-smoke",
                        "--only", "fsdp,trace,bench,wds", "--budget-s", "400"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    results = json.loads((out / "gpu_trainer_check.json").read_text())
    assert [results["steps"][s]["status"] for s in ("env", "plan", "fsdp", "trace", "bench", "wds")] == ["ok"] * 6
    trace = results["steps"]["trace"]
    assert trace["device"] == "cpu" and trace["traced_gib"] / trace["planned_gib"] == pytest.approx(1.0, abs=0.05)
    fsdp = results["steps"]["fsdp"]
    assert len(fsdp["windows"]) == 3 and fsdp["images_per_s"] > 0
    assert results["plan"]["fsdp"]["tensors_gib"] > 0 and results["plan"]["fsdp"]["model_tflops_per_step"] > 0
    assert set(results["steps"]["wds"]["loader"]) == {"0", "1"}  # JSON keys: worker counts
    row = next(x for x in report.trainer_rows(results) if x["name"] == "fsdp")
    assert row["mfu"] > 0 and row["vs_bench"] > 0 and row["plan_ratio"] > 0
    md = (out / "gpu_trainer_check.md").read_text()
    assert "| FSDP2, bf16 |" in md and "`bench step` sdpa+fused" in md and "Loader (webdataset" in md
    assert "Trace (`pijepa plan --trace`" in md
    assert (out / "gpu_trainer_logs.txt").stat().st_size > 0
