"""A streaming (webdataset, finite) DeepSpeed run resumed at another world size, through the CLI under
torchrun (gloo, CPU): 2 ranks -> 1 rank -> 2 ranks, for ZeRO-2 and ZeRO-3. The engine state is
re-partitioned through DeepSpeed's universal checkpoint (pijepa/parallel/deepspeed_reshard.py); the
readers restart as under FSDP (tests/distributed/test_wds_resume_world.py).

Each checkpoint that a run at the other world size resumes from is also loaded, before that run, by
this file's worker (the file run under torchrun) at that world size, which writes what the engine
then holds: every trained parameter's fp32 master weight and AdamW moments (gathered whole), the
AdamW step of every partition, the EMA target and each rank's RNG states. They must equal what the
checkpoint holds, read independently of DeepSpeed's conversion: the weights by `pijepa export`'s
reader, the moments by concatenating the saved ranks' partitions.

40 real CIFAR-10 images in 4 shards of 10; ViT-Tiny with 2 blocks at 32 px, patch 8; 4 images per
micro-batch and a global batch of 8 (accumulation 2 on one rank), 5 steps per epoch. The runs stop at
steps 2, 4 and 6. A launch costs 10-15 s on 2 cores: about 75 s per ZeRO stage.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_OVERRIDES, cifar_shards, free_port, launch_env

PORTS = range(29950, 29970)  # this file's rendezvous ports
CONFIG = str(REPO / "configs/cpu_default.yaml")
SETS = [*TINY_OVERRIDES, "dist.strategy=deepspeed", "meta.use_bfloat16=false", "meta.encoder_depth=2",
        "data.dataset=webdataset", "data.wds_mode=finite", "data.batch_size=4", "data.global_batch_size=8",
        "data.shuffle_buffer=10", "optimization.epochs=2", "logging.log_freq=1", "logging.checkpoint_freq=100",
        "logging.tensorboard=false"]
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/pijepa-torch-extensions"))
MOMENTS = ("exp_avg", "exp_avg_sq")


def env(nproc: int) -> dict:
    return launch_env(2 // nproc, TORCH_EXTENSIONS_DIR=EXTENSIONS, PYTHONPATH=str(REPO))


def torchrun_cmd(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port(PORTS))]


def train(run_dir: Path, nproc: int, *sets: str) -> subprocess.CompletedProcess:
    args = ["train", "--config", CONFIG]
    for s in [*SETS, f"logging.folder={run_dir}", *sets]:
        args += ["--set", s]
    r = subprocess.run([*torchrun_cmd(nproc), "-m", "pijepa", *args], cwd=REPO, env=env(nproc),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"torchrun on {nproc} rank(s) failed:\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}"
    return r


# ---------------------------------------------------------------- the worker


def worker(args: argparse.Namespace) -> None:
    """Sets the strategy up as the trainer does, loads `args.folder`, writes what the engine holds."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pijepa.config import load_config
    from pijepa.parallel.parallelize import canonical_name
    from pijepa.train.build import accumulation_steps, build_models, build_strategy_for

    cfg = load_config(CONFIG, [*SETS, *args.set])
    strategy = build_strategy_for(cfg)
    o = cfg.optimization
    strategy.setup(build_models(cfg), accumulation_steps(cfg, strategy.world_size), o.clip_grad,
                   {"lr": o.start_lr, "weight_decay": o.weight_decay})
    extra = strategy.load(Path(args.folder))
    engine = strategy.engine  # type: ignore[attr-defined]
    record: dict = {"rng": extra["rng"]["torch"], "fp32": {}, "frozen": {}, **{key: {} for key in MOMENTS}}
    for name, p in engine.module.named_parameters():  # collectives under ZeRO-3: every rank, same order
        name = canonical_name(name)
        if not p.requires_grad:
            with deepspeed.zero.GatheredParameters([p]):
                record["frozen"][name] = p.detach().float().cpu().clone()
            continue
        record["fp32"][name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        for key in MOMENTS:
            record[key][name] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    states = list(engine.optimizer.optimizer.state.values())  # AdamW's, one per flat partition
    record["steps"] = [float(s["step"]) for s in states]
    record["step_tensors"] = len({id(s["step"]) for s in states})  # each its own (incremented in place)
    record["groups"] = [(g["wd_exclude"], g["weight_decay"]) for g in engine.optimizer.param_groups]
    record["target"] = strategy._full_target_state()  # type: ignore[attr-defined]
    torch.save(record, Path(args.out) / f"rank{strategy.rank}.pt")
    strategy.close()


def load_in_worker(folder: Path, nproc: int, out: Path, *sets: str) -> list[dict]:
    out.mkdir(parents=True)
    cmd = [*torchrun_cmd(nproc), str(Path(__file__)), "--folder", str(folder), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=REPO, env=env(nproc), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the worker on {nproc} rank(s) failed:\n{r.stderr[-5000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(nproc)]


# ---------------------------------------------------------------- the checkpoint, read independently


def saved_optimizer(folder: Path, stage: int) -> tuple[dict[str, dict[str, torch.Tensor]], set[float]]:
    """The AdamW moments of every trained parameter, whole, and the AdamW steps, from the saved
    ranks' ZeRO partitions (the tests' own reading of DeepSpeed's layout)."""
    ds = folder / "ds"
    files = sorted(ds.glob("*zero_pp_rank_*_optim_states.pt"),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in MOMENTS}
    if stage == 3:  # each parameter split evenly (padded) over the ranks, in param_shapes order
        shapes = torch.load(ds / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["param_shapes"]
        states = [p["optimizer_state_dict"]["state"] for p in parts]
        for group, group_shapes in enumerate(shapes):
            offset = 0
            for name, shape in group_shapes.items():
                numel = math.prod(shape)
                size = math.ceil(numel / len(parts))
                for key in MOMENTS:
                    whole = torch.cat([s[group][key][offset:offset + size] for s in states])
                    moments[key][name] = whole[:numel].view(shape)
                offset += size
    else:  # every rank's flat partition holds a fragment (start, numel) of some parameters, in rank order
        shapes = torch.load(ds / "mp_rank_00_model_states.pt", weights_only=False)["param_shapes"]
        named = {name: shape for group in shapes for name, shape in group.items()}
        states = [p["base_optimizer_state"]["state"] for p in parts]
        for key in MOMENTS:
            fragments: dict[str, list[torch.Tensor]] = {}
            for part, state in zip(parts, states):
                for group, mapping in enumerate(part["param_slice_mappings"]):
                    for name, f in mapping.items():
                        fragments.setdefault(name, []).append(state[group][key].narrow(0, f.start, f.numel))
            moments[key] = {name: torch.cat(v).view(named[name]) for name, v in fragments.items()}
    steps = {float(group["step"]) for state in states for group in state.values()}
    return moments, steps


def check_loaded(records: list[dict], folder: Path, stage: int, saved_world: int, step: int) -> None:
    """What the engine holds after loading `folder` at len(records) ranks is the checkpoint's state."""
    from pijepa.parallel.deepspeed_checkpoint import read_full_state

    record, full = records[0], read_full_state(folder)
    trained = {f"{part}.{n}": v for part in ("encoder", "predictor") for n, v in full[part].items()}
    assert record["fp32"].keys() | record["frozen"].keys() == trained.keys()
    for name, value in {**record["fp32"], **record["frozen"]}.items():
        assert torch.equal(value, trained[name]), f"{name}: not the checkpoint's fp32 weight"
    moments, steps = saved_optimizer(folder, stage)
    for key in MOMENTS:
        assert moments[key].keys() == record[key].keys(), key
        for name, value in moments[key].items():
            assert torch.equal(record[key][name], value), f"{name}: {key} not carried"
    assert moments["exp_avg_sq"]["encoder.norm.weight"].abs().sum() > 0  # the moments are not fresh zeros
    assert steps == {float(step)} and set(record["steps"]) == steps  # one AdamW step per optimizer step
    assert record["step_tensors"] == len(record["steps"])
    # The param groups keep their own settings (the trainer sets lr and the decayed group's weight
    # decay before every step; the other group is excluded from it).
    assert [wd_exclude for wd_exclude, _ in record["groups"]] == [False, True] and record["groups"][1][1] == 0.0
    assert record["target"].keys() == full["target_encoder"].keys()
    assert all(torch.equal(v, full["target_encoder"][n]) for n, v in record["target"].items())
    for rank, r in enumerate(records):  # ranks beyond the saved world reuse a saved stream (as FSDP)
        saved = torch.load(folder / f"rng_rank{rank % saved_world}.pt", weights_only=True)
        assert torch.equal(r["rng"], saved["torch"]), rank


# ---------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return cifar_shards(tmp_path_factory, "ds_world", 4, 10) / "shards.json"


def latest(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def assert_stage_change_refused(folder: Path, stage: int) -> None:
    """Another ZeRO stage stays refused, in one line, before any engine is touched."""
    from pijepa.parallel.deepspeed import DeepSpeedStrategy
    from pijepa.runtime.errors import CheckpointError

    other = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    other.stage, other.world_size = 5 - stage, 1  # 2 <-> 3
    with pytest.raises(CheckpointError, match=f"written with ZeRO stage {stage}, this run has {5 - stage}") as e:
        other.load(folder)
    assert "\n" not in str(e.value)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_run_resumes_on_fewer_then_more_ranks(tmp_path, shards, stage):
    run = tmp_path / "run"
    sets = [f"data.shards={shards}", f"dist.deepspeed_config=ds_configs/zero{stage}_fp32.json"]

    train(run, 2, *sets, "optimization.max_steps=2")
    first = latest(run)
    assert first.name == "step_00000002"
    assert_stage_change_refused(first, stage)
    check_loaded(load_in_worker(first, 1, tmp_path / "w1", *sets), first, stage, saved_world=2, step=2)

    fewer = train(run, 1, *sets, "optimization.max_steps=4")
    assert "resumed from" in fewer.stderr and "at step 2" in fewer.stderr
    assert (f"{first}: written by 2 rank(s), resumed on 1: the fp32 master weights and the AdamW moments and "
            f"step were re-partitioned through DeepSpeed's universal checkpoint") in fewer.stderr
    assert "resuming the webdataset loader at step 2 on 1 rank(s)" in fewer.stderr
    second = latest(run)
    assert second.name == "step_00000004"
    check_loaded(load_in_worker(second, 2, tmp_path / "w2", *sets), second, stage, saved_world=1, step=4)

    more = train(run, 2, *sets, "optimization.max_steps=6")
    assert "at step 4" in more.stderr and "written by 1 rank(s), resumed on 2" in more.stderr
    assert latest(run).name == "step_00000006"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows] == list(range(1, 7))  # every step once, in order
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    assert not list((run / "checkpoints").glob("*.universal"))  # the conversions were removed
    assert "Traceback" not in fewer.stderr + more.stderr


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[])
    worker(parser.parse_args())
