"""dist.activation_checkpointing and dist.compile under DeepSpeed (ZeRO-2, ZeRO-3) and DDP, in real
2-rank gloo processes on CPU; and, with the same worker, the bf16 ZeRO-2 EMA target against the
fp32 master weights (ds_configs/README.md, "Precision").

The worker (this file run under torchrun) builds the tiny models, sets a strategy up exactly as the
trainer does (`setup`), records how the blocks are wrapped, and runs two optimizer steps on fixed
data (images and masks seeded by step and rank), recording the loss, the full gradient of every
trained parameter after the first step's backward, the gradient norms, and this rank's parameter
tensors (its partitions under ZeRO) after the steps. With AC the recomputed forward is the same
computation, so all of it must be equal to the run without AC.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pijepa.parallel.deepspeed_checkpoint import read_full_state
from pijepa.parallel.parallelize import canonical_name
from pijepa.runtime.errors import CheckpointError
from pijepa.train.build import build_models
from tests.conftest import REPO, TINY_OVERRIDES, run_cli
from tests.conftest import free_port as conftest_free_port

PORTS = range(29850, 29875)  # this file's rendezvous ports
CONFIG = str(REPO / "configs/cpu_default.yaml")
SETS = [*TINY_OVERRIDES, "optimization.clip_grad=0.25", "meta.seed=3"]
ENV = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                              str(Path.home() / ".cache/pijepa-torch-extensions")),
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
MOMENTUM = 0.5  # a fast EMA, so that what the target follows shows after a few steps


# ---------------------------------------------------------------- the worker


def _config(bf16: bool):
    from pijepa.config import load_config

    return load_config(CONFIG, [*SETS, f"meta.use_bfloat16={'true' if bf16 else 'false'}"])


def _strategy(args: argparse.Namespace):
    from pijepa.parallel.options import DistConfig, RunShape

    dist_cfg = DistConfig(strategy=args.strategy, deepspeed_config=args.ds_config or DistConfig.deepspeed_config,
                          activation_checkpointing=args.ac, ac_every=2, compile=args.compile)
    if args.strategy == "ddp":
        from pijepa.parallel.ddp import DDPStrategy

        return DDPStrategy(dist_cfg)
    from pijepa.parallel.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(dist_cfg, RunShape(bf16=args.bf16, micro_batch=8, clip_grad=0.25))


def _structure(models) -> dict[str, list[str]]:
    """Per model, each block's class name, with `+compiled` when its call is compiled in place."""
    from pijepa.parallel.parallelize import transformer_blocks

    out = {}
    for part in ("encoder", "predictor", "target_encoder"):
        model = getattr(models, part)
        model = getattr(model, "module", model)  # DDP's and DeepSpeed's (ZeRO-3 target) wrappers
        out[part] = [type(b).__name__ + ("+compiled" if b._compiled_call_impl is not None else "")
                     for b in transformer_blocks(model)]
    return out


def _full_grads(strategy, modules) -> dict[str, torch.Tensor]:
    """Every trained parameter's full gradient after backward, before the step (collective)."""
    from pijepa.parallel.parallelize import canonical_name

    grads = {}
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if hasattr(strategy, "engine"):
                from deepspeed.utils import safe_get_full_grad

                g = safe_get_full_grad(p)
            else:
                g = p.grad
            grads[f"{i}.{canonical_name(name)}"] = g.detach().float().cpu().clone()
    return grads


def worker(args: argparse.Namespace) -> None:
    from pijepa.train.build import build_collator, build_loss_fn, build_models

    cfg = _config(args.bf16)
    strategy = _strategy(args)
    models = strategy.setup(build_models(cfg), 1, 0.25, {"lr": 1e-3, "weight_decay": 0.05})
    record: dict = {"structure": _structure(models), "loss": [], "grad_norm": []}
    if hasattr(strategy, "engine"):
        record["communication_data_type"] = str(strategy.engine.communication_data_type)
        record["optimizer"] = type(strategy.engine.optimizer.optimizer).__name__ \
            if hasattr(strategy.engine.optimizer, "optimizer") else type(strategy.engine.optimizer).__name__
    collator, loss_fn = build_collator(cfg), build_loss_fn(cfg)
    for step in range(args.steps):
        u = step * strategy.world_size + strategy.rank
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1000 + u))
        masks_enc, masks_pred = collator.sample_masks(8, u)
        with strategy.micro_step(is_last=True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                with torch.no_grad():
                    h = models.target_encoder(images)
                loss, _ = loss_fn(models.predict(images, masks_enc, masks_pred), h, masks_pred)
            strategy.backward(loss)
        if step == 0:
            engine = getattr(strategy, "engine", None)
            record["grads"] = _full_grads(strategy, [engine.module] if engine else models.trainable())
        norm, applied = strategy.optimizer_step(1e-3, 0.05)
        assert applied
        strategy.ema_update(MOMENTUM)
        record["loss"].append(float(strategy.reduce_mean(loss.detach().float())))
        record["grad_norm"].append(float(norm))
        if args.save:  # a checkpoint per step: its consolidated fp32 master weights are the reference
            strategy.save(_mkdir(Path(args.out) / f"step_{step + 1}"), {"rng": {}, "model": {}})
    record["local"] = [t.detach().float().cpu().clone() for t in strategy.local_tensors()]
    torch.save(record, Path(args.out) / f"rank{strategy.rank}.pt")
    strategy.close()


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---------------------------------------------------------------- the tests' side


def launch(out: Path, *options: str, nproc: int = 2) -> list[dict]:
    """Runs the worker on `nproc` gloo ranks; returns every rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(conftest_free_port(PORTS)),
           str(Path(__file__)), "--out", str(out), *options]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-5000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(nproc)]


def assert_same_step(plain: list[dict], ac: list[dict]) -> None:
    """The AC run computed what the plain run computed: loss, gradients, updated parameters."""
    for a, b in zip(plain, ac):
        assert b["loss"] == a["loss"] and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
        assert a["grads"].keys() == b["grads"].keys()
        for name, g in a["grads"].items():
            assert torch.allclose(b["grads"][name], g, rtol=1e-5, atol=1e-8), name
        assert len(a["local"]) == len(b["local"])
        for x, y in zip(a["local"], b["local"]):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-7)


def expect_blocks(record: dict, ac: str, compiled: bool) -> None:
    """full: every trained block wrapped by checkpoint_wrapper; selective (ac_every 2): every 2nd;
    the target's blocks never; with compile every block's call (the target's too) is compiled."""
    suffix = "+compiled" if compiled else ""
    for part, blocks in record["structure"].items():
        for i, name in enumerate(blocks):
            wrapped = part != "target_encoder" and (ac == "full" or (ac == "selective" and i % 2 == 1))
            assert name == ("CheckpointWrapper" if wrapped else "Block") + suffix, (part, i, name)


def offload_json(folder: Path, stage: int) -> Path:
    raw = json.loads((REPO / f"ds_configs/zero{stage}_fp32.json").read_text())
    raw["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    path = folder / f"zero{stage}_offload.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Worker runs by name, each run once for the module: `zero{S}_{P}[_{variant}]`."""
    root = tmp_path_factory.mktemp("ds_ac")
    variants = {"": [], "ac": ["--ac", "full"], "sel": ["--ac", "selective", "--steps", "1"],
                "selcompiled": ["--ac", "selective", "--steps", "1", "--compile"],
                "ema": ["--steps", "3", "--save"], "export": ["--ac", "selective", "--steps", "1", "--save"]}
    cache: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in cache:
            stage, precision, *variant = name.split("_")
            config = f"ds_configs/{stage}_{precision}.json"
            if variant == ["offload"]:
                config, variant = str(offload_json(root, int(stage[-1]))), []
            bf16 = ["--bf16"] if precision == "bf16" else []
            cache[name] = launch(root / name, "--strategy", "deepspeed", "--ds-config", config, *bf16,
                                 *variants["_".join(variant)])
        return cache[name]

    get.root = root  # type: ignore[attr-defined]
    return get


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_activation_checkpointing_wraps_blocks_and_changes_nothing_else(runs, stage):
    plain, ac = runs(f"zero{stage}_fp32"), runs(f"zero{stage}_fp32_ac")
    expect_blocks(plain[0], "none", compiled=False)
    expect_blocks(ac[0], "full", compiled=False)
    assert_same_step(plain, ac)


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_compile_is_applied_per_block(runs):
    """Compiled in place (names unchanged), after AC, before deepspeed.initialize; the step runs
    and gives the eager step's loss, gradients and parameters (to compiled-kernel rounding)."""
    eager, compiled = runs("zero2_fp32_sel"), runs("zero2_fp32_selcompiled")
    expect_blocks(eager[0], "selective", compiled=False)
    expect_blocks(compiled[0], "selective", compiled=True)
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert max((b["grads"][n] - g).abs().max().item() for n, g in a["grads"].items()) < 1e-6
        assert max((x - y).abs().max().item() for x, y in zip(a["local"], b["local"])) < 1e-5


@pytest.mark.slow
def test_deepspeed_compile_with_zero3_is_refused_in_one_line(tmp_path):
    sets = [*SETS, f"logging.folder={tmp_path / 'run'}", "dist.strategy=deepspeed", "dist.compile=true",
            "dist.deepspeed_config=ds_configs/zero3_bf16.json"]
    r = run_cli("train", "--config", CONFIG, *[a for s in sets for a in ("--set", s)], env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and "zero3_bf16.json" in line and "dist.compile" in line and "ZeRO-3" in line


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_ema_target_follows_the_fp32_master_weights(runs, stage):
    """ZeRO-1/2 bf16: after 3 steps the target is the EMA of the consolidated fp32 master weights
    of each step (DeepSpeed's zero_to_fp32 of a checkpoint per step), to fp32 rounding; the EMA of
    their bf16 roundings, which the engine's module holds, is far off (the test tells them apart)."""
    records = runs(f"zero{stage}_bf16_ema")
    assert records[0]["communication_data_type"] == "torch.float32"  # gradients reduced in fp32
    folder = runs.root / f"zero{stage}_bf16_ema"
    init = build_models(_config(True)).target_encoder.state_dict()
    exact, rounded = dict(init), dict(init)
    for step in (1, 2, 3):
        master = read_full_state(folder / f"step_{step}")["encoder"]
        for name in init:
            exact[name] = torch.lerp(exact[name], master[name], 1 - MOMENTUM)
            rounded[name] = torch.lerp(rounded[name], master[name].bfloat16().float(), 1 - MOMENTUM)
    target = read_full_state(folder / "step_3")["target_encoder"]
    assert max((target[n] - exact[n]).abs().max().item() for n in init) <= 1e-6
    assert max((target[n] - rounded[n]).abs().max().item() for n in init) > 1e-4


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_optimizer_offload_steps_with_deepspeeds_cpu_adam(runs, stage):
    """offload_optimizer: DeepSpeed's CPU Adam (AdamW mode) instead of torch's AdamW, which
    DeepSpeed refuses there; the same trajectory as the run without offload."""
    plain, offload = runs(f"zero{stage}_fp32"), runs(f"zero{stage}_fp32_offload")
    assert (plain[0]["optimizer"], offload[0]["optimizer"]) == ("AdamW", "DeepSpeedCPUAdam")
    for a, b in zip(plain, offload):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert max((x - y).abs().max().item() for x, y in zip(a["local"], b["local"])) < 1e-6


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_export_reads_deepspeed_files_weights_only_and_names_parameters_canonically(runs, stage):
    """The consolidated state equals DeepSpeed's own zero_to_fp32 (what export returned before it
    read DeepSpeed's files with weights_only=True), and under AC it has the plain model's names
    (the engine's carry `_checkpoint_wrapped_module`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    runs(f"zero{stage}_bf16_export")
    folder = runs.root / f"zero{stage}_bf16_export" / "step_1"
    state = read_full_state(folder)
    models = build_models(_config(True))
    assert state["encoder"].keys() == models.encoder.state_dict().keys()
    assert state["predictor"].keys() == models.predictor.state_dict().keys()
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="ds")
    assert any("_checkpoint_wrapped_module" in n for n in theirs)
    frozen = {f"{part}.{n}" for part in ("encoder", "predictor")
              for n, p in getattr(models, part).named_parameters() if not p.requires_grad}
    trained = {canonical_name(n): v for n, v in theirs.items() if canonical_name(n) not in frozen}
    assert len(trained) == sum(p.requires_grad for m in models.trainable() for p in m.parameters())
    for name, value in trained.items():
        part, _, rest = name.partition(".")
        assert torch.equal(state[part][rest], value), name


class _Planted:
    """Pickles as a call that would write a file: a weights-only load must never make it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickled code ran"))


@pytest.mark.dist
@pytest.mark.slow
def test_export_never_runs_code_pickled_into_a_deepspeed_file(runs, tmp_path):
    runs("zero2_bf16_export")
    folder = tmp_path / "step_1"
    shutil.copytree(runs.root / "zero2_bf16_export" / "step_1", folder)
    optim = folder / "ds" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = torch.load(optim, map_location="cpu", weights_only=False)
    state["optimizer_state_dict"]["planted"] = _Planted(tmp_path / "ran.txt")
    torch.save(state, optim)
    with pytest.raises(CheckpointError) as e:
        read_full_state(folder)
    assert not (tmp_path / "ran.txt").exists()
    assert str(folder) in str(e.value) and "\n" not in str(e.value) and "weights-only" in str(e.value)
    assert "Unsupported global" in str(e.value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="deepspeed")
    parser.add_argument("--ds-config", default="")
    parser.add_argument("--ac", default="none")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    worker(parser.parse_args())


if __name__ == "__main__":
    main()
