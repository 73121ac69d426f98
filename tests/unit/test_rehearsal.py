"""`pijepa plan --trace`: the real FSDP strategy and train step at 4 and 16 ranks in this process, on
fake tensors, held to the planner (memory within 5%, FSDP's all-gather and reduce-scatter bytes
within 5%)."""

from __future__ import annotations

import json
import os

import pytest
import torch.distributed as dist

from pijepa.cli import main
from pijepa.config import load_config
from pijepa.plan.hardware import GPUS, GiB
from pijepa.rehearsal import rehearse
from pijepa.runtime.errors import ConfigError
from tests.conftest import REPO, TINY_OVERRIDES, run_cli

TINY_FSDP = [*TINY_OVERRIDES, "dist.strategy=fsdp", "logging.tensorboard=false"]
CASES = {
    "4 ranks, full, fp32": (4, []),
    "16 ranks, grad_op, bf16, AC full": (16, ["dist.fsdp_sharding=grad_op", "meta.use_bfloat16=true",
                                            "dist.activation_checkpointing=full"]),
    "16 ranks, hybrid, bf16, accumulation 2, selective AC": (
        16, ["dist.fsdp_sharding=hybrid", "dist.hybrid_shard_size=4", "meta.use_bfloat16=true",
             "data.batch_size=4", "data.global_batch_size=128", "dist.activation_checkpointing=selective"]),
}


@pytest.fixture(scope="module")
def comparisons():
    return {name: rehearse(load_config(REPO / "configs/cpu_default.yaml", [*TINY_FSDP, *sets]), GPUS["a100-80gb"],
                           gpus)
            for name, (gpus, sets) in CASES.items()}


@pytest.mark.parametrize("case", CASES)
def test_trace_agrees_with_the_plan(comparisons, case: str) -> None:
    c = comparisons[case]
    peak = next(r for r in c.memory() if r.name == "peak")
    assert peak.ratio == pytest.approx(1.0, abs=0.05), [(r.name, r.traced, r.planned) for r in c.phases()]
    moved = {kind: row for kind, _count, row in c.collectives()}
    for kind in ("all_gather", "reduce_scatter"):
        assert moved[kind].ratio == pytest.approx(1.0, abs=0.05), (kind, moved[kind])
    if "hybrid" in case:  # replicas all-reduce their gradient shards
        assert moved["all_reduce"].ratio == pytest.approx(1.0, abs=0.05)


def test_trace_runs_every_micro_step_of_the_real_step(comparisons) -> None:
    c = comparisons["16 ranks, hybrid, bf16, accumulation 2, selective AC"]
    assert (c.trace.gpus, c.trace.accumulation, c.trace.cfg.data.micro_batch, c.shards) == (16, 2, 4, 4)
    # the loss and both backward passes ran, then the optimizer and the EMA update
    assert {"loss", "loss backward", "predictor backward", "encoder backward", "optimizer step",
            "EMA update"} <= set(c.trace.phase_peaks)
    tallies = c.trace.collectives
    # one reduce-scatter per FSDP unit of the trained models per optimizer step (the encoder's 12
    # blocks and root, the predictor's 2 blocks and root), not per micro-step
    assert tallies["reduce_scatter"].count == 12 + 1 + 2 + 1
    assert c.trace.peak["optimizer"] > 0  # the second step runs with the AdamW state in place


def test_the_trace_leaves_no_process_group_or_launch_variables(comparisons) -> None:
    assert not dist.is_initialized()
    assert "WORLD_SIZE" not in os.environ or os.environ.get("WORLD_SIZE") != "16"


def test_deepspeed_is_refused_in_one_line() -> None:
    cfg = load_config(REPO / "configs/cpu_default.yaml", [*TINY_OVERRIDES, "dist.strategy=deepspeed"])
    with pytest.raises(ConfigError, match="dist.strategy deepspeed cannot be traced"):
        rehearse(cfg, GPUS["a100-80gb"], 16, source="cpu_default")


def test_a_run_that_does_not_fit_exits_2_with_one_line(capsys) -> None:
    # Fake tensors cost nothing: a tiny model at micro-batch 8192 and 224 px needs more than 40 GiB.
    big = ["meta.model_name=vit_tiny", "data.crop_size=224", "mask.patch_size=16", "data.batch_size=8192",
           "meta.pred_depth=2", "meta.pred_emb_dim=48", "dist.strategy=fsdp", "meta.use_bfloat16=true"]
    code = main(["plan", "--config", "cpu_default", *[a for s in big for a in ("--set", s)], "--gpus", "4",
                 "--gpu", "a100-40gb", "--trace"])
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not fit the 40.0 GiB of a A100-SXM4-40GB" in lines[0], err
    assert lines[0].startswith("pijepa plan: error: the traced peak per rank")
    assert "traced" in out and "does NOT fit" in out  # the report comes first


@pytest.mark.slow
def test_vith14_recipe_traced_on_16_ranks() -> None:
    r = run_cli("plan", "--config", "in22k_vith14_ep66", "--gpus", "16", "--gpu", "a100-80gb", "--trace", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["gpus"], out["micro_batch"], out["accumulation"], out["strategy"]) == (16, 128, 1, "fsdp_full")
    peak = out["memory_bytes"]["peak"]
    assert peak["ratio"] == pytest.approx(1.0, abs=0.05) and 20 < peak["traced"] / GiB < 30
    for kind in ("all_gather", "reduce_scatter"):
        assert out["collectives"][kind]["moved_bytes"]["ratio"] == pytest.approx(1.0, abs=0.05)
    assert out["fits"]


def test_auto_batch_and_loss_path_are_chosen_as_on_the_gpus() -> None:
    """`data.batch_size: auto` takes the GPU's whole memory as the budget, as `pijepa plan` does for
    the configured row; `fused_loss: auto` takes CUDA's choice whatever device traces."""
    from pijepa.plan.planner import build_context, configured_row
    from pijepa.rehearsal.trace import planned_for

    cfg = load_config("in22k_vith14_ep66", ["data.batch_size=auto"])
    chosen = planned_for(cfg, GPUS["a100-40gb"], 8)  # 256 images per GPU: not all at once in 40 GB
    planned = configured_row(build_context(cfg, "a100-40gb", 8, 0.4, None), cfg, "fsdp_full", 8)
    assert chosen.data.micro_batch == planned["micro_batch"] < 256
    tiny = load_config(REPO / "configs/cpu_default.yaml", TINY_FSDP)
    assert tiny.optimization.fused_loss == "auto" and planned_for(tiny, GPUS["a100-80gb"], 4).optimization.fused_loss
