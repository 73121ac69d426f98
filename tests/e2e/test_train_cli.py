"""Tiny full runs through the CLI: outputs, resume, bad input."""

import csv

import pytest
import torch

from tests.conftest import REPO, TINY_OVERRIDES, run_cli


def train(run_dir, *extra, env=None):
    sets = [*TINY_OVERRIDES, f"logging.folder={run_dir}", *extra]
    args = ["train", "--config", str(REPO / "configs/cpu_default.yaml")]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, env=env)


def final_state(run_dir):
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "state.pt", weights_only=True)


def assert_same_state(a, b):
    for part in ("encoder", "predictor", "target_encoder"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name} differs"
    for pid, s in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[key], b["optimizer"]["state"][pid][key]), f"optimizer {pid}.{key} differs"


@pytest.mark.slow
def test_train_writes_outputs_and_resume_is_exact(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    r = train(full, "optimization.max_steps=30")
    assert r.returncode == 0, r.stderr
    # Written: resolved config, TensorBoard events, CSV, checkpoints (latest + last K).
    assert (full / "config.yaml").is_file()
    assert list((full / "tb").glob("events.out.tfevents.*"))
    rows = list(csv.DictReader((full / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "loss_l2", "loss_pkt", "lr", "weight_decay", "ema_momentum", "grad_norm",
                "images_per_s", "step_time_s", "peak_memory_mb"):
        assert key in rows[0]
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["latest", "step_00000020", "step_00000030"]

    # Stop after 15 steps (mid-epoch, between checkpoints 10 and 20), then resume to 30.
    r = train(split, "optimization.max_steps=15", "logging.checkpoint_freq=5")
    assert r.returncode == 0, r.stderr
    r = train(split, "optimization.max_steps=30", "logging.checkpoint_freq=5", "data.num_workers=2")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at step 15" in r.stderr
    assert_same_state(final_state(full), final_state(split))


@pytest.mark.parametrize("override, words", [
    ("data.nope=1", ["unknown key 'data.nope'"]),
    ("data.batch_size=abc", ["data.batch_size", "expected int"]),
    ("mask.min_keep=100", ["mask.min_keep", "1..16"]),
])
def test_bad_config_gives_one_clear_line(tmp_path, override, words):
    r = train(tmp_path / "run", override)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    for word in words:
        assert word in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a config that cannot run


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout


@pytest.mark.slow
def test_log_steps_show_what_pkt_does_and_whether_the_target_collapses(tmp_path):
    """Every log step writes each loss term's gradient norm on the predictions, PKT's
    share of it, and the target's spread and effective rank, to the CSV and to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    r = train(run, "optimization.max_steps=10", "optimization.pkt_weight=1000")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows] == [5, 10]
    keys = ("grad_l2", "grad_pkt", "grad_share_pkt", "target_std", "target_rank")
    for row in rows:
        values = {k: float(row[k]) for k in keys}
        assert values["grad_l2"] > 0 and values["grad_pkt"] > 0 and 0 < values["grad_share_pkt"] < 1, values
        share = values["grad_pkt"] / (values["grad_l2"] + values["grad_pkt"])
        assert abs(values["grad_share_pkt"] - share) < 1e-6 * max(1.0, share)
        assert values["target_std"] > 0 and 1 <= values["target_rank"] <= 8, values  # batch 8
    events = EventAccumulator(str(next((run / "tb").glob("events.out.tfevents.*")))).Reload()
    assert set(keys) <= set(events.Tags()["scalars"])
    assert "pkt_share=" in r.stderr
