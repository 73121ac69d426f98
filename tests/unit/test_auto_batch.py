"""`data.batch_size: auto` against the planner, with a made-up memory budget (data.memory_budget_gib)."""

import csv
import math

import pytest
import yaml

from pijepa.config import load_config
from pijepa.plan.costs import configured_strategy
from pijepa.plan.hardware import GPUS, GiB
from pijepa.plan.planner import build_context
from pijepa.runtime.errors import ConfigError
from pijepa.train.auto_batch import resolve_batch_size
from tests.conftest import REPO, run_cli

SETS = ["data.batch_size=auto", "data.global_batch_size=64"]


def planned_peaks(cfg, world):
    """The planner's peak for each divisor of the per-rank batch (the budget does not enter it)."""
    ctx = build_context(cfg, GPUS["a100-80gb"], world, utilization=1.0, global_batch=None)
    strategy, shards = configured_strategy(cfg.dist, world)
    per_rank = ctx.per_gpu_batch
    return {b: ctx.memory(strategy, cfg.dist.activation_checkpointing, b, shards).total
            for b in range(1, per_rank + 1) if per_rank % b == 0}


@pytest.mark.parametrize("world", [1, 2])
def test_auto_picks_the_largest_micro_batch_the_planner_fits(world):
    cfg = load_config(REPO / "configs/cpu_default.yaml", SETS)
    peaks = planned_peaks(cfg, world)
    divisors = sorted(peaks)
    assert len(divisors) >= 4
    for i, micro in enumerate(divisors):
        # a budget between this micro-batch's peak and the next one's (a given budget is not rounded)
        budget = math.ceil((peaks[micro] + peaks[divisors[i + 1]]) / 2 if i + 1 < len(divisors) else peaks[micro])
        expected = max(b for b in divisors if peaks[b] <= budget)  # equal peaks: the larger micro-batch
        chosen = load_config(REPO / "configs/cpu_default.yaml", [*SETS, f"data.memory_budget_gib={budget / GiB}"])
        resolved, note = resolve_batch_size(chosen, world)
        assert resolved.data.batch_size == expected
        accum = 64 // world // resolved.data.batch_size
        assert f"micro-batch {resolved.data.batch_size} x {accum} accumulation x {world} ranks = 64" in note
        assert resolved.data.global_batch_size == 64


def test_auto_refuses_when_nothing_fits_and_needs_a_global_batch():
    cfg = load_config(REPO / "configs/cpu_default.yaml", [*SETS, "data.memory_budget_gib=0.5"])
    with pytest.raises(ConfigError, match=r"data.batch_size auto: not even micro-batch 1 fits in 0.5 GiB"):
        resolve_batch_size(cfg, 1)
    with pytest.raises(ConfigError, match="data.global_batch_size = 0 is not allowed; expected a positive "
                                          "global batch when data.batch_size is auto"):
        load_config(REPO / "configs/cpu_default.yaml", ["data.batch_size=auto"])
    fixed = load_config(REPO / "configs/cpu_default.yaml")
    assert resolve_batch_size(fixed, 1) == (fixed, None)
    with pytest.raises(ConfigError, match="data.batch_size is auto"):
        _ = load_config(REPO / "configs/cpu_default.yaml", SETS).data.micro_batch


def test_train_with_auto_batch_logs_and_runs_the_choice(tmp_path):
    """The real trainer (cpu_default's ViT-Tiny at 64 px): a budget that fits micro-batch 4 of the
    per-rank 16 and not 8, so 4 x 4 accumulation."""
    sets = ["data.batch_size=auto", "data.global_batch_size=16", "data.synthetic_images=64",
            "data.num_workers=0", "optimization.max_steps=2", "logging.log_freq=1", f"logging.folder={tmp_path}"]
    peaks = planned_peaks(load_config(REPO / "configs/cpu_default.yaml", sets), 1)
    assert peaks[4] < peaks[8]
    args = ["train", "--config", "cpu_default"]
    for s in [*sets, f"data.memory_budget_gib={math.ceil((peaks[4] + peaks[8]) / 2) / GiB}"]:
        args += ["--set", s]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "data.batch_size auto: micro-batch 4 x 4 accumulation x 1 ranks = 16" in r.stderr
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["batch_size"] == 4
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]


def test_plan_as_configured_shows_the_auto_pick():
    from pijepa.plan.planner import make_plan, plan_row

    cfg = load_config("in22k_vith14_ep66", ["data.batch_size=auto"])
    plan = make_plan(cfg, gpu="a100-80gb", gpus=16)
    cf = plan["configured"]
    row = plan_row(plan["context"], cf["strategy"], cf["ac"], cf["shards"])
    assert cf["auto"] and cf["micro_batch"] == row.micro_batch == 128 and cf["accumulation"] == 1
