"""Models built on the meta device and materialised shard by shard (pijepa.models.init,
pijepa.parallel.materialize), as real torchrun runs (2 gloo ranks, CPU):

- the weights a 2-rank FSDP setup draws into its shards are, gathered, bit for bit the single-process
  `build_models` weights (and the CPU generator ends where the full build leaves it);
- the host memory a rank peaks at while building and sharding a ViT-L/16 is about its shards, not
  the whole encoder, predictor and target.

Run as a module (`python -m tests.distributed.test_meta_init OUT [--full] [--weights] [--set k=v ...]`
under torchrun), this file is one rank: it builds the models for the configured strategy, sets the
strategy up and writes what it measured to OUT (rank 0) and OUT.rank{r}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pijepa.parallel.base import param_groups
from tests.conftest import REPO, free_port, launch_env

PORTS = range(29900, 29930)  # this file's rendezvous ports
TINY = ["meta.model_name=vit_tiny", "meta.encoder_depth=3", "meta.pred_depth=2", "meta.pred_emb_dim=48",
        "data.crop_size=32", "mask.patch_size=8", "mask.min_keep=2", "meta.seed=11"]
# ViT-L/16 at 224 px with I-JEPA's predictor: 2.4 GB of fp32 encoder + target + predictor per rank.
LARGE = ["meta.model_name=vit_large", "data.crop_size=224", "mask.patch_size=16", "meta.pred_depth=12",
         "meta.pred_emb_dim=384"]
PARTS = ("encoder", "predictor", "target_encoder")


def torchrun(out: Path, sets: list[str], *flags: str, timeout: float = 300) -> list[dict]:
    """Runs this file on 2 ranks; returns each rank's report."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port(PORTS)),
           "-m", "tests.distributed.test_meta_init", str(out), *flags, *[a for s in sets for a in ("--set", s)]]
    env = launch_env(1, TORCH_EXTENSIONS_DIR=os.environ.get(  # DeepSpeed's comm op, built once
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/pijepa-torch-extensions")))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(2)]


def full_build(sets: list[str]):
    from pijepa.config import load_config
    from pijepa.train.build import build_models

    models = build_models(load_config("cpu_default", sets))
    return models, torch.get_rng_state()


def zero3(precision: str) -> list[str]:
    return ["dist.strategy=deepspeed", f"dist.deepspeed_config=ds_configs/zero3_{precision}.json",
            f"meta.use_bfloat16={'true' if precision == 'bf16' else 'false'}"]


@pytest.mark.dist
@pytest.mark.parametrize("case", [
    # FSDP with wrapped blocks (names are matched canonically)
    ["dist.strategy=fsdp", "dist.activation_checkpointing=full"],
    # FSDP's 2-D mesh (replicate, shard), with the depth-scaled init
    ["dist.strategy=fsdp", "meta.weight_init=depth_scaled", "dist.fsdp_sharding=hybrid", "dist.hybrid_shard_size=1"],
    # ZeRO-3 fp32, and bf16: the engine's parameters are the bf16 roundings, the target stays fp32
    zero3("fp32"), [*zero3("bf16"), "dist.activation_checkpointing=full"],
], ids=["fsdp-full-ac", "fsdp-hsdp-depth-scaled", "zero3-fp32", "zero3-bf16-ac"])
def test_meta_build_equals_the_single_process_build(tmp_path, case):
    sets = [*TINY, *case]
    reports = torchrun(tmp_path / "weights.pt", sets, "--weights")
    assert all(r["built_on_meta"] for r in reports)
    got = torch.load(tmp_path / "weights.pt", weights_only=True)
    want, rng = full_build(sets)
    # The optimizer's weight-decay groups see the parameters' own shapes (ZeRO-3's are partitioned).
    groups = [len(g["params"]) for g in param_groups(want)]
    assert all(r["param_groups"] == groups for r in reports), (reports, groups)
    bf16 = "meta.use_bfloat16=true" in case
    for part in PARTS:
        state = getattr(want, part).state_dict()
        assert got[part].keys() == state.keys(), part
        for name, t in state.items():
            t = t.to(torch.bfloat16) if bf16 and part != "target_encoder" else t
            assert got[part][name].dtype == t.dtype and torch.equal(got[part][name], t), f"{part}.{name}"
    for rank in range(2):  # every rank's generator ends where the full build leaves it
        assert torch.equal(torch.load(tmp_path / f"weights.pt.rng{rank}", weights_only=True), rng)


@pytest.mark.parametrize("sets", [
    [],
    ["meta.weight_init=depth_scaled", "data.crop_size=40"],  # a 5 x 5 grid
])
def test_piecewise_draws_equal_the_full_build_in_one_process(sets):
    """pijepa.models.init alone, and `materialize` into plain (unsharded) parameters."""
    from pijepa.config import load_config
    from pijepa.models.init import draw_weights
    from pijepa.parallel.materialize import blueprint, materialize, on_meta
    from pijepa.train.build import build_models

    cfg = load_config("cpu_default", [*TINY, *sets])
    want, rng = full_build([*TINY, *sets])
    meta = build_models(cfg, "meta")
    assert on_meta(meta) and not on_meta(want) and want.init_rng is None
    torch.set_rng_state(meta.init_rng)
    seen = []
    for index, name, value in draw_weights([meta.encoder, meta.predictor]):
        assert torch.equal(value, [want.encoder, want.predictor][index].get_parameter(name)), name
        seen.append(name)
    assert len(seen) == len(set(seen)) == len([*want.encoder.parameters(), *want.predictor.parameters()])
    assert torch.equal(torch.get_rng_state(), rng)  # the generator ends where the full build leaves it

    torch.manual_seed(123)  # materialize sets the generator itself
    materialize(meta, blueprint(meta), torch.device("cpu"))
    for part in PARTS:
        for name, t in getattr(want, part).state_dict().items():
            assert torch.equal(getattr(meta, part).state_dict()[name], t), f"{part}.{name}"
    assert torch.equal(torch.get_rng_state(), rng)


def test_only_sharding_strategies_build_on_meta():
    from pijepa.parallel.ddp import DDPStrategy
    from pijepa.parallel.fsdp import FSDPStrategy
    from pijepa.parallel.single import SingleStrategy

    assert FSDPStrategy.builds_on_meta and not SingleStrategy.builds_on_meta and not DDPStrategy.builds_on_meta


def encoder_predictor_target_mb(sets: list[str]) -> float:
    """fp32 size of the whole encoder, predictor and target, from their parameter counts."""
    from pijepa.config import load_config
    from pijepa.train.build import build_models

    models = build_models(load_config("cpu_default", sets), "meta")
    numel = sum(p.numel() for m in (models.encoder, models.predictor, models.target_encoder)
                for p in m.parameters())
    return numel * 4 / 2**20


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_meta_build_peaks_near_the_shards_not_the_whole_model(tmp_path):
    sets = [*LARGE, "dist.strategy=fsdp"]
    full_mb = encoder_predictor_target_mb(sets)
    assert full_mb > 2000  # big enough to tell a sharded build from a full one
    for r in torchrun(tmp_path / "rss", sets, timeout=240):
        grown = r["peak_mb"] - r["before_mb"]  # the process's peak RSS (VmHWM) over its RSS before building
        # Sharded over 2 ranks: half of the models, plus one block drawn in full and torch's buffers.
        # A full build holds all of it (and more, while it shards) before it can drop anything.
        assert r["built_on_meta"] and grown < 0.75 * full_mb, (r, full_mb)
        assert r["local_mb"] == pytest.approx(full_mb / 2, rel=0.01)


# ---------------------------------------------------------------- one rank, under torchrun


def _rss_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _rank_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--full", action="store_true", help="build in full on the CPU first, as before meta builds")
    parser.add_argument("--weights", action="store_true", help="save the gathered weights (rank 0)")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    from pijepa.config import load_config
    from pijepa.train.build import accumulation_steps, build_models, build_models_for, build_strategy_for

    cfg = load_config("cpu_default", args.set)
    strategy = build_strategy_for(cfg)
    before = _rss_mb("VmRSS")
    models = build_models(cfg, "cpu") if args.full else build_models_for(cfg, strategy)
    built_on_meta = next(models.encoder.parameters()).is_meta
    models = strategy.setup(models, accumulation_steps(cfg, strategy.world_size), 0.0, {"lr": 1e-3})
    report = {"rank": strategy.rank, "built_on_meta": built_on_meta, "before_mb": before,
              "peak_mb": _rss_mb("VmHWM"), "local_mb": sum(t.numel() for t in strategy.local_tensors()) * 4 / 2**20,
              "param_groups": [len(g["params"]) for g in param_groups(models)]}
    if args.weights:
        _save_weights(strategy, Path(args.out))
    Path(f"{args.out}.rank{strategy.rank}.json").write_text(json.dumps(report))
    strategy.close()


def _save_weights(strategy, out: Path) -> None:
    """The full weights (rank 0) and every rank's CPU generator state."""
    torch.save(torch.get_rng_state(), f"{out}.rng{strategy.rank}")
    if hasattr(strategy, "engine"):  # DeepSpeed ZeRO-3: gathered one parameter at a time
        import deepspeed

        from pijepa.parallel.parallelize import canonical_name

        state = {}
        for part, module in zip(PARTS, (*strategy.engine.module.children(), strategy.target_module)):
            state[part] = {}
            for name, p in module.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    state[part][canonical_name(name)] = p.data.detach().cpu().clone()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {part: get_model_state_dict(getattr(strategy.models, part), options=options) for part in PARTS}
    if strategy.rank == 0:
        torch.save(state, out)


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
