"""FSDP2 strategy: real torchrun runs (gloo, CPU, 1-2 ranks) of the tiny config.

The step-addressed sampler gives one process with accumulation 2 exactly the data and masks of two
ranks without accumulation, so in fp32 an FSDP run must follow the single-process run step by step.
A torchrun run costs ~10-25 s on 2 idle cores, so the cases are combined: the main 2-rank run
(full shard, AC on every block, async checkpoints) is resumed from its mid-run checkpoint on 2
ranks in another mode (grad_op, selective AC) and on 1 rank (full shard, no AC, accumulation 2).
"""

import csv
import itertools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import pijepa
from pijepa.parallel.formats import export_encoder
from tests.conftest import REPO, TINY_OVERRIDES, launch_env, run_cli

STEPS, MID = 6, 3  # the main run checkpoints at MID and STEPS
# Every run gets its own rendezvous port (29610-29649 belong to these tests).
_PORTS = itertools.count(29610)

TINY = [*TINY_OVERRIDES, "logging.log_freq=1", f"logging.checkpoint_freq={MID}", "logging.tensorboard=true"]
PARTS = ("encoder", "predictor", "target_encoder")


def _args(run_dir, sets):
    args = ["train", "--config", str(REPO / "configs/cpu_default.yaml")]
    for s in [*TINY, f"logging.folder={run_dir}", *sets]:
        args += ["--set", s]
    return args


def torchrun(run_dir, *sets, nproc=2, timeout=600):
    port = next(_PORTS)
    assert port < 29650, "out of this file's port range"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "pijepa",
           *_args(run_dir, ["dist.strategy=fsdp", *sets])]
    r = subprocess.run(cmd, cwd=REPO, env=launch_env(2 // nproc), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def single(run_dir, *sets):
    r = subprocess.run([sys.executable, "-m", "pijepa", *_args(run_dir, sets)], cwd=REPO, env=launch_env(2),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-6000:]
    return r


def metrics(run_dir):
    return {int(row["step"]): row for row in csv.DictReader((run_dir / "metrics.csv").open())}


def column(rows, key, steps):
    return torch.tensor([float(rows[s][key]) for s in steps], dtype=torch.float64)


def exported(run_dir, tmp_path, step=None):
    """The consolidated weights of a checkpoint (export in this process; the CLI is tested below)."""
    out = tmp_path / f"{run_dir.name}-{step or 'latest'}.pt"
    export_encoder(run_dir, out, step=step)
    return torch.load(out, weights_only=True)


def assert_same_weights(a, b, rtol=1e-5, atol=1e-6):
    for part in PARTS:
        assert a[part].keys() == b[part].keys(), part
        for name in a[part]:
            torch.testing.assert_close(a[part][name], b[part][name], rtol=rtol, atol=atol,
                                       msg=lambda m, p=part, n=name: f"{p}.{n}: {m}")


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def assert_same_trajectory(got, want, steps, rtol=1e-5):
    torch.testing.assert_close(column(got, "loss", steps), column(want, "loss", steps), rtol=rtol, atol=0)
    torch.testing.assert_close(column(got, "grad_norm", steps), column(want, "grad_norm", steps),
                               rtol=max(rtol, 1e-4), atol=0)


# ---------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """Single process, accumulation 2 (global batch 16 = 2 x 8): the reference trajectory."""
    run = tmp_path_factory.mktemp("ref")
    single(run, f"optimization.max_steps={STEPS}", "data.global_batch_size=16")
    return run


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 ranks, full shard, AC on every block, asynchronous DCP checkpoints at MID and STEPS."""
    run = tmp_path_factory.mktemp("fsdp")
    r = torchrun(run, f"optimization.max_steps={STEPS}", "dist.fsdp_sharding=full",
                 "dist.activation_checkpointing=full", "dist.async_checkpoint=true")
    return run, r


def resume_from_mid(full_run, run_dir):
    """A new run folder holding only the 2-rank run's checkpoint of step MID."""
    (run_dir / "checkpoints").mkdir(parents=True)
    name = f"step_{MID:08d}"
    shutil.copytree(full_run / "checkpoints" / name, run_dir / "checkpoints" / name)
    return run_dir


# ---------------------------------------------------------------- 1. equal to one process


@pytest.mark.dist
@pytest.mark.slow
def test_full_shard_with_ac_matches_single_process(fsdp_run, ref_run, tmp_path):
    run, r = fsdp_run
    got, want = metrics(run), metrics(ref_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same_trajectory(got, want, range(1, STEPS + 1))
    a, b = exported(run, tmp_path), exported(ref_run, tmp_path)
    assert a["step"] == b["step"] == STEPS
    assert_same_weights(a, b)
    # The tolerance means something: over the run the EMA target moved far more than it differs.
    earlier = exported(ref_run, tmp_path, step=MID)
    assert max_diff(a["target_encoder"], b["target_encoder"]) * 100 < \
        max_diff(b["target_encoder"], earlier["target_encoder"])

    # Rank 0 alone logs: one console line per log step, one TensorBoard file, one CSV row per step.
    for step in range(1, STEPS + 1):
        assert len(re.findall(rf"step {step}/{STEPS} loss=", r.stdout + r.stderr)) == 1, step
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    # Async saves were completed and renamed: no .tmp folder left, both kept checkpoints complete.
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", f"step_{MID:08d}", f"step_{STEPS:08d}"], names
    for step in (MID, STEPS):
        files = {p.name for p in (run / "checkpoints" / f"step_{step:08d}").iterdir()}
        assert {".metadata", "extra.pt", "rng_rank0.pt", "rng_rank1.pt"} <= files, files


# ---------------------------------------------------------------- 3. resume at another world size


@pytest.mark.dist
@pytest.mark.slow
def test_resume_on_two_ranks_as_grad_op_with_selective_ac(fsdp_run, ref_run, tmp_path):
    """Resumed from the 2-rank full-shard checkpoint into grad_op + selective AC: continues like
    the uninterrupted run and the single process (1. for grad_op and selective AC)."""
    full, _ = fsdp_run
    run = resume_from_mid(full, tmp_path / "resumed")
    r = torchrun(run, f"optimization.max_steps={STEPS}", "dist.fsdp_sharding=grad_op",
                 "dist.activation_checkpointing=selective", "dist.ac_every=2")
    assert f"resumed from {run / 'checkpoints' / f'step_{MID:08d}'} at step {MID}" in r.stderr
    got = metrics(run)
    assert sorted(got) == list(range(MID + 1, STEPS + 1))
    assert_same_trajectory(got, metrics(full), range(MID + 1, STEPS + 1))
    assert_same_trajectory(got, metrics(ref_run), range(MID + 1, STEPS + 1))
    a = exported(run, tmp_path)
    assert a["step"] == STEPS
    assert_same_weights(a, exported(full, tmp_path))
    assert_same_weights(a, exported(ref_run, tmp_path))


@pytest.mark.dist
@pytest.mark.slow
def test_resume_on_one_rank_keeps_the_effective_batch(fsdp_run, tmp_path):
    """2-rank checkpoint, 1 rank with accumulation 2 (global batch 16), full shard without AC."""
    full, _ = fsdp_run
    run = resume_from_mid(full, tmp_path / "resumed")
    r = torchrun(run, f"optimization.max_steps={STEPS}", "data.global_batch_size=16",
                 "dist.activation_checkpointing=none", nproc=1)
    assert f"at step {MID}" in r.stderr
    got = metrics(run)
    assert sorted(got) == list(range(MID + 1, STEPS + 1))
    assert_same_trajectory(got, metrics(full), range(MID + 1, STEPS + 1))
    assert_same_weights(exported(run, tmp_path), exported(full, tmp_path))


# ---------------------------------------------------------------- 2. bf16, HSDP


@pytest.mark.dist
@pytest.mark.slow
def test_bf16_hsdp_trains_and_stays_finite(ref_run, tmp_path):
    run = tmp_path / "run"
    # hybrid_shard_size 1: a (2, 1) mesh, replicas reduced over the replicate dimension.
    torchrun(run, f"optimization.max_steps={MID}", "meta.use_bfloat16=true", "dist.fsdp_sharding=hybrid",
             "dist.hybrid_shard_size=1")
    got, steps = metrics(run), range(1, MID + 1)
    loss, ref = column(got, "loss", steps), column(metrics(ref_run), "loss", steps)
    assert torch.isfinite(loss).all() and torch.isfinite(column(got, "grad_norm", steps)).all()
    # bf16 compute: close to the fp32 trajectory, and not equal to it (bf16 really was used).
    torch.testing.assert_close(loss, ref, rtol=0.05, atol=0)
    assert not torch.equal(loss, ref)
    weights = exported(run, tmp_path)
    for part in PARTS:
        for name, t in weights[part].items():
            assert t.dtype == torch.float32 and torch.isfinite(t).all(), f"{part}.{name}"
    # The replicas stayed in sync: the EMA target differs from the start and from the encoder.
    assert max_diff(weights["target_encoder"], weights["encoder"]) > 0


# ---------------------------------------------------------------- 4. export


@pytest.mark.dist
@pytest.mark.slow
def test_export_single_and_fsdp_load_as_encoders(ref_run, fsdp_run, tmp_path):
    images = torch.randn(2, 3, 32, 32)
    for run in (ref_run, fsdp_run[0]):
        out = tmp_path / f"{run.name}.pt"
        r = run_cli("export", "--run", str(run), "--out", str(out), "--step", str(STEPS))
        assert r.returncode == 0, r.stderr
        assert f"exported step {STEPS}" in r.stdout
        weights = torch.load(out, weights_only=True)
        assert weights["format"] == "pijepa-encoder-v1" and weights["step"] == STEPS
        assert weights["model"]["model_name"] == "vit_tiny" and weights["model"]["img_size"] == 32
        assert any(k.startswith("predictor_blocks.") for k in weights["predictor"])
        for part in PARTS:
            for name, t in weights[part].items():
                assert "_checkpoint_wrapped_module" not in name and not name.startswith(("module.", "_orig_mod."))
                assert t.dtype == torch.float32 and t.is_contiguous()
        for which, part in (("target", "target_encoder"), ("context", "encoder")):
            encoder = pijepa.load_encoder(out, which=which)
            state = encoder.state_dict()
            assert state.keys() == weights[part].keys()
            for name, t in state.items():
                assert torch.equal(t, weights[part][name]), f"{which}: {name}"
            assert encoder(images).shape == (2, 16, 192)
        # After training, the context encoder and the EMA target are different weights.
        assert max_diff(weights["target_encoder"], weights["encoder"]) > 0


def test_export_errors(tmp_path):
    r = run_cli("export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "no checkpoints/ folder" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    folder = tmp_path / "run" / "checkpoints" / "step_00000003"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"")
    (tmp_path / "run" / "checkpoints" / "step_00000004.tmp").mkdir()  # unfinished: not a checkpoint
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 \(steps found: 3\)"):
        export_encoder(tmp_path / "run", tmp_path / "x.pt", step=4)
    with pytest.raises(ValueError, match="unknown checkpoint format.*weights.bin.*known formats: single"):
        export_encoder(tmp_path / "run", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------- 5. no torchrun


def test_fsdp_without_torchrun_is_one_clear_line(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "pijepa", *_args(run, ["dist.strategy=fsdp"])], cwd=REPO,
                       env=launch_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("pijepa train: error: dist.strategy fsdp needs a distributed launch")
    assert "torchrun" in r.stderr
    assert not run.exists()


# ---------------------------------------------------------------- parallelize (in process)


def test_apply_ac_and_compile_wrap_blocks_under_canonical_names():
    from pijepa.models import build_encoder, build_predictor
    from pijepa.parallel.parallelize import apply_ac, apply_compile, canonical_name, transformer_blocks

    enc = build_encoder("vit_tiny", patch_size=8, img_size=32)
    pred = build_predictor(enc, pred_depth=4, pred_emb_dim=48)
    names = [n for n, _ in enc.named_parameters()]
    assert apply_ac(enc, "selective", every=2) == 6
    wrapped = [i for i, b in enumerate(transformer_blocks(enc)) if "Checkpoint" in type(b).__name__]
    assert wrapped == [1, 3, 5, 7, 9, 11]
    assert apply_ac(pred, "full") == 4 and apply_ac(pred, "none") == 0
    apply_compile(enc)  # wraps only; nothing is compiled before a forward
    wrapped_names = [n for n, _ in enc.named_parameters()]
    assert any("._orig_mod._checkpoint_wrapped_module." in n for n in wrapped_names)
    assert [canonical_name(n) for n in wrapped_names] == names
    with pytest.raises(ValueError, match="none, full or selective"):
        apply_ac(enc, "some")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PIJEPA_TEST_COMPILE"),
                    reason="torch.compile on CPU takes minutes with a cold cache; set PIJEPA_TEST_COMPILE=1")
def test_compiled_blocks_match_single_process(ref_run, tmp_path):
    run = tmp_path / "run"
    torchrun(run, "optimization.max_steps=2", "dist.compile=true", "dist.activation_checkpointing=selective")
    assert_same_trajectory(metrics(run), metrics(ref_run), range(1, 3))
