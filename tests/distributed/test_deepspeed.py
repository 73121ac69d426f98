"""DeepSpeed ZeRO-1/2/3 in real processes (gloo, CPU): equivalence with one process, EMA target,
resume, launchers, bad DeepSpeed JSON.

Runs are tiny (ViT-Tiny, 32 px, patch 8, 4 steps) and shared between the tests of this module.
The comparison relies on the step-addressed data (README): one process with accumulation 2 sees
exactly the images, crops and masks that two ranks without accumulation see.
"""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pijepa.config import ConfigError, load_config
from pijepa.parallel.deepspeed_checkpoint import read_full_state
from pijepa.parallel.deepspeed_config import build_ds_config, offloads_optimizer, read_ds_json
from pijepa.train.build import build_models
from tests.conftest import REPO, TINY_OVERRIDES, run_cli
from tests.conftest import free_port as conftest_free_port

BIN = Path(sys.executable).parent
STEPS = 4
CONFIG = str(REPO / "configs/cpu_default.yaml")
# log every step; checkpoints at 2 and 4; clipping below the tiny model's gradient norms (~0.3) so
# that it acts on every step; a fast EMA (m = 0.5) so that a lost target update shows; a weight
# decay rising steeply (0.04, 0.14, 0.43, 0.91 at steps 0-3) so that a schedule value that does not
# reach the optimizer DeepSpeed steps moves the weights far beyond the tolerance.
COMMON = [*TINY_OVERRIDES, "logging.log_freq=1", "logging.checkpoint_freq=2", f"optimization.max_steps={STEPS}",
          "logging.tensorboard=false", "optimization.clip_grad=0.25", "optimization.ema=[0.5,0.5]",
          "optimization.final_weight_decay=40"]
FP32_ATOL = 5e-6  # weights after 4 steps: fp32 runs differ by ~6e-7 (reduction order)
ENV = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                              str(Path.home() / ".cache/pijepa-torch-extensions")),
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
_ports = iter(range(29655, 29700))  # this file's share of the machine's ports


def free_port() -> int:
    return conftest_free_port(_ports)  # an iterator: never the same port twice in this file


def train_args(run_dir: Path, *sets: str) -> list[str]:
    args = ["--config", CONFIG]
    for s in [*COMMON, f"logging.folder={run_dir}", *sets]:
        args += ["--set", s]
    return args


def ds_sets(stage: int, precision: str = "fp32") -> list[str]:
    return ["dist.strategy=deepspeed", f"dist.deepspeed_config=ds_configs/zero{stage}_{precision}.json",
            f"meta.use_bfloat16={'true' if precision == 'bf16' else 'false'}"]


def run(cmd: list[str], timeout: float = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV, **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    return r


def torchrun(run_dir: Path, *sets: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           "-m", "pijepa", "train", *train_args(run_dir, *sets)]
    return run(cmd)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-4000:]}"
    return r


def metrics(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def last_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def assert_close_states(a: dict, b: dict, atol: float, parts=("encoder", "predictor", "target_encoder")):
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for name, value in a[part].items():
            other = b[part][name].float()
            diff = (value.float() - other).abs().max().item()
            assert diff <= atol, f"{part}.{name} differs by {diff} (> {atol})"


# ---------------------------------------------------------------- shared runs


# Accumulation inside DeepSpeed: 2 ranks x 2 micro-steps of 4 images see micro-batches
# u = (step*2 + micro)*2 + rank, the same four as one process with 4 micro-steps of 4 (u = step*4 + micro).
ACCUM = ["data.batch_size=4", "data.global_batch_size=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders by name, each trained once for the whole module:
    single             one process, accumulation 2 (the reference for the 2-rank runs)
    zero{S}_{P}        2 ranks under torchrun, no accumulation, ZeRO stage S, precision P
                       (zero3_fp32 through launchers/torchrun_multi_node.sh, 2 simulated nodes)
    single_accum4      one process, micro-batches of 4, accumulation 4
    zero{S}_fp32_accum2  2 ranks, micro-batches of 4, accumulation 2 inside DeepSpeed
    """
    root = tmp_path_factory.mktemp("ds")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in cache:
            return cache[name]
        run_dir = root / name
        accum = ACCUM if name.endswith("accum2") or name.endswith("accum4") else []
        if name.startswith("single"):
            sets = accum or ["data.global_batch_size=16"]
            r = ok(run_cli("train", *train_args(run_dir, *sets), env=ENV))
        elif name == "zero3_fp32":
            r = two_node_torchrun(run_dir, *ds_sets(3))
        else:
            stage, precision = int(name[4]), name.split("_")[1]
            tb = ["logging.tensorboard=true"] if name == "zero2_fp32" else []
            r = ok(torchrun(run_dir, *ds_sets(stage, precision), *tb, *accum))
        (run_dir / "stdout.txt").write_text(r.stdout)
        (run_dir / "stderr.txt").write_text(r.stderr)
        cache[name] = run_dir
        return run_dir

    return get


def initial_target(run_dir: Path) -> dict[str, torch.Tensor]:
    """The target encoder at step 0 (built from the same config and seed as the runs)."""
    return build_models(load_config(CONFIG, train_args(run_dir)[3::2])).target_encoder.state_dict()


def movement(state: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> torch.Tensor:
    """All elements of `state - init`, flattened (the frozen positional embedding moves by 0)."""
    return torch.cat([(state[n].float() - v).flatten() for n, v in init.items()])


def single_state(run_dir: Path) -> dict:
    return torch.load(last_checkpoint(run_dir) / "state.pt", map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- 1. equivalence with one process


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_fp32_matches_single_process(runs, stage):
    ref_dir, ds_dir = runs("single"), runs(f"zero{stage}_fp32")
    ref, got = metrics(ref_dir), metrics(ds_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        # lr and weight decay change every step (warm-up, cosine wd): equal losses after step 1
        # mean they reached the optimizer DeepSpeed steps.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {a['step']}"
        assert (b["lr"], b["weight_decay"]) == (a["lr"], a["weight_decay"])

    # Weights, incl. the EMA target, against the single-process (full-precision) reference. The
    # target moves by half the distance to the encoder on every step, so a lost update is far
    # outside the tolerance; it must also have moved away from its initial value.
    want, have = single_state(ref_dir), read_full_state(last_checkpoint(ds_dir))
    assert_close_states(have, want, atol=FP32_ATOL)
    moved = movement(want["target_encoder"], initial_target(ds_dir)).abs().max().item()
    assert moved > 100 * FP32_ATOL, "the reference target hardly moved: the EMA check would prove nothing"

    # Rank 0 alone logs: one console line per log step, one metrics row per step. The console is
    # pijepa's logger, on stderr (since the commit "One console style"; it was tqdm.write on stdout).
    lines = [line for line in (ds_dir / "stderr.txt").read_text().splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{i}/{STEPS}" for i in range(1, STEPS + 1)]
    assert "Traceback" not in (ds_dir / "stderr.txt").read_text()
    if stage == 2:  # the run with TensorBoard on: one event file, rank 0's
        assert len(list((ds_dir / "tb").glob("events.out.tfevents.*"))) == 1


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1_bf16", "zero3_fp32"])
def test_export_consolidates_a_deepspeed_checkpoint(runs, tmp_path, name):
    """`pijepa export` recognises the DeepSpeed layout (ZeRO-1 + bf16 is DeepSpeed's BF16_Optimizer
    layout, which zero_to_fp32 cannot read; ZeRO-3 partitions everything) and writes the fp32 weights."""
    from pijepa import load_encoder

    run_dir, out = runs(name), tmp_path / "encoder.pt"
    r = run_cli("export", "--run", str(run_dir), "--out", str(out), env=ENV)
    assert r.returncode == 0, r.stderr
    assert "deepspeed" in r.stdout
    exported = torch.load(out, weights_only=True)
    state = read_full_state(last_checkpoint(run_dir))
    for part in ("encoder", "predictor", "target_encoder"):
        assert exported[part].keys() == state[part].keys()
        assert all(torch.equal(exported[part][n], v.float()) for n, v in state[part].items()), part
    assert exported["step"] == STEPS and exported["model"]["model_name"] == "vit_tiny"
    encoder = load_encoder(str(out), which="target")
    assert torch.equal(encoder.state_dict()["norm.weight"], state["target_encoder"]["norm.weight"])
    # The consolidated encoder is the one that trained: its fp32 master weights, not bf16 copies.
    want = single_state(runs("single"))["encoder"]
    atol = FP32_ATOL if name.endswith("fp32") else 5e-2
    assert_close_states({"encoder": state["encoder"]}, {"encoder": want}, atol=atol, parts=("encoder",))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_accumulation_matches_single_process(runs, stage):
    """DeepSpeed's own accumulation (1/GAS scaling, step() on every micro-step, the update on the
    boundary; ZeRO-2/3 reduce-scatter every micro-step) against one process's."""
    ref, got = metrics(runs("single_accum4")), metrics(runs(f"zero{stage}_fp32_accum2"))
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {a['step']}"
    want = single_state(runs("single_accum4"))
    assert_close_states(read_full_state(last_checkpoint(runs(f"zero{stage}_fp32_accum2"))), want, atol=FP32_ATOL)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_bf16_trains_and_stays_finite(runs, stage):
    ref, got = metrics(runs("single")), metrics(runs(f"zero{stage}_bf16"))
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert torch.isfinite(torch.tensor([b["loss"], b["grad_norm"]])).all()
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)  # bf16 noise, same trajectory
    state = read_full_state(last_checkpoint(runs(f"zero{stage}_bf16")))
    for part in ("encoder", "predictor", "target_encoder"):
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state[part].values()), part
    # The EMA target moved like the fp32 reference's: same direction, same distance (bf16 training
    # takes a slightly different path, so elementwise closeness would prove little at 6 steps).
    init = initial_target(runs("single"))
    ours = movement(state["target_encoder"], init)
    ref = movement(single_state(runs("single"))["target_encoder"], init)
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=0).item()
    assert cosine > 0.9 and 0.8 < ours.norm().item() / ref.norm().item() < 1.25, (cosine, ours.norm(), ref.norm())


@pytest.mark.dist
@pytest.mark.slow
def test_activation_checkpointing_from_the_config_trains_the_same_run(runs, tmp_path):
    """dist.activation_checkpointing reaches the engine through the trainer (the blocks are wrapped
    before deepspeed.initialize: tests/distributed/test_ds_ac_compile.py checks the structure):
    the same losses, and a checkpoint that consolidates to the single-process weights under the
    plain model's names."""
    run_dir = tmp_path / "ac"
    ok(torchrun(run_dir, *ds_sets(3), "dist.activation_checkpointing=selective", "dist.ac_every=2"))
    assert [row["loss"] for row in metrics(run_dir)] == [row["loss"] for row in metrics(runs("zero3_fp32"))]
    assert_close_states(read_full_state(last_checkpoint(run_dir)), single_state(runs("single")), atol=FP32_ATOL)


# ---------------------------------------------------------------- 3. resume


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_continues_identically(runs, tmp_path, stage):
    """Resume from the step-2 checkpoint, copied to another run folder (so no path written into
    it may be absolute), and train to step 4: the same losses and the same final state."""
    full = runs(f"zero{stage}_fp32")
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    r = ok(torchrun(resumed, *ds_sets(stage)))
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    assert [row["loss"] for row in metrics(resumed)] == [row["loss"] for row in metrics(full)][2:]
    a, b = read_full_state(last_checkpoint(full)), read_full_state(last_checkpoint(resumed))
    assert_close_states(a, b, atol=0.0)


# ---------------------------------------------------------------- 2. launchers


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_launcher_single_node(runs, tmp_path):
    run_dir = tmp_path / "launcher"
    ok(run([str(REPO / "launchers/deepspeed_single_node.sh"), "2", *train_args(run_dir, *ds_sets(2))],
           env={"MASTER_PORT": str(free_port())}))
    assert [row["loss"] for row in metrics(run_dir)] == [row["loss"] for row in metrics(runs("zero2_fp32"))]


def two_node_launch(script_args: list[list[str]], envs: list[dict]) -> list[subprocess.CompletedProcess]:
    """Starts one launcher per simulated node on this machine and waits for both."""
    procs = [subprocess.Popen(args, cwd=REPO, env={**os.environ, **ENV, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, env in zip(script_args, envs)]
    results = []
    for p, args in zip(procs, script_args):
        try:
            out, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return results


def two_node_torchrun(run_dir: Path, *sets: str) -> subprocess.CompletedProcess:
    """launchers/torchrun_multi_node.sh on two simulated nodes of one process each (loopback)."""
    port = str(free_port())
    args = [[str(REPO / "launchers/torchrun_multi_node.sh"), "2", str(node), "1", "127.0.0.1", port,
             *train_args(run_dir, *sets)] for node in (0, 1)]
    node0, node1 = [ok(r) for r in two_node_launch(args, [{}, {}])]
    return node0


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_multi_node_launcher_two_simulated_nodes(runs):
    """The ZeRO-3 run of the module is launched this way (see `runs`); it matches one process."""
    run_dir = runs("zero3_fp32")
    assert (run_dir / "stderr.txt").read_text().count(f"step {STEPS}/{STEPS} ") == 1  # node 0 logs (stderr)
    ref = metrics(runs("single"))
    assert [r["loss"] for r in metrics(run_dir)] == pytest.approx([r["loss"] for r in ref], rel=1e-5)


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_multi_node_launcher_two_simulated_nodes(runs, tmp_path):
    """Two 'nodes' of one process each, from a hostfile naming two hosts; each launcher starts its
    own node's process (--no_ssh --node_rank), as under SLURM."""
    run_dir, port = tmp_path / "ds2n", str(free_port())
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    args = [[str(REPO / "launchers/deepspeed_multi_node.sh"), str(hostfile), "127.0.0.1", port,
             *train_args(run_dir, *ds_sets(1))]] * 2
    for r in two_node_launch(args, [{"NODE_RANK": "0"}, {"NODE_RANK": "1"}]):
        ok(r)
    assert [row["loss"] for row in metrics(run_dir)] == [row["loss"] for row in metrics(runs("zero1_fp32"))]


# ---------------------------------------------------------------- 4. a JSON that disagrees


@pytest.mark.dist
@pytest.mark.slow
def test_disagreeing_batch_key_ends_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 999, "zero_optimization": {"stage": 2}}')
    sets = ["dist.strategy=deepspeed", f"dist.deepspeed_config={bad}"]
    r = run_cli("train", *train_args(tmp_path / "run", *sets), env=ENV)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0, r.stderr
    for word in (str(bad), "train_batch_size = 999", "this run's 8"):
        assert word in line
    assert not (tmp_path / "run").exists()  # stopped before anything was written

    # Under torchrun every rank stops with the same line, before any collective (no hang).
    r = torchrun(tmp_path / "run2", *sets)
    assert r.returncode != 0
    assert r.stderr.count(f"{bad}: train_batch_size = 999 disagrees with this run's 16") == 2


@pytest.mark.slow
def test_missing_deepspeed_json_names_the_file(tmp_path):
    r = run_cli("train", *train_args(tmp_path / "run", "dist.strategy=deepspeed",
                                     "dist.deepspeed_config=ds_configs/nope.json"), env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "ds_configs/nope.json" in r.stderr and "not found" in r.stderr


# ---------------------------------------------------------------- the JSON rules, in process


def build(raw: dict, **kw):
    args = dict(micro_batch=16, accum=8, world=16, clip_grad=0.0, bf16=True, zero_stage=-1)
    return build_ds_config(raw, "x.json", **{**args, **kw})


def test_batch_keys_are_derived_and_auto_accepted():
    ds, notes = build({"train_batch_size": "auto", "gradient_accumulation_steps": 8,
                       "zero_optimization": {"stage": 2}})
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) \
        == (16, 8, 2048)
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 0.0 and notes == []
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"


@pytest.mark.parametrize("raw, words", [
    ({"train_micro_batch_size_per_gpu": 32}, ["train_micro_batch_size_per_gpu = 32", "this run's 16"]),
    ({"gradient_accumulation_steps": 1}, ["gradient_accumulation_steps = 1", "this run's 8"]),
    ({"train_batch_size": 1024}, ["train_batch_size = 1024", "this run's 2048"]),
    ({"gradient_clipping": 1.0}, ["gradient_clipping = 1.0", "optimization.clip_grad"]),
    ({"optimizer": {"type": "Adam"}}, ['"optimizer" section']),
    ({"fp16": {"enabled": True}}, ["fp16.enabled"]),
    ({"zero_optimization": {"stage": 0}}, ["zero_optimization.stage = 0"]),
    ({"communication_data_type": "fp16"}, ['communication_data_type = "fp16"', "fp32"]),
])
def test_disagreements_are_refused(raw, words):
    raw = {"zero_optimization": {"stage": 2}, **raw}
    with pytest.raises(ConfigError) as e:
        build(raw)
    for word in ["x.json", *words]:
        assert word in str(e.value)


def test_bf16_comes_from_meta_use_bfloat16_and_stage_from_dist_zero_stage():
    ds, notes = build({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, bf16=False, zero_stage=3)
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 3
    assert len(notes) == 1 and "meta.use_bfloat16" in notes[0] and "fp32" in notes[0]


def test_gradients_are_reduced_in_fp32_unless_the_json_says_bf16():
    """As under FSDP (reduce_dtype fp32); DeepSpeed's own default under bf16 would be bf16."""
    for given in ({}, {"communication_data_type": "FP32"}):
        ds, notes = build({**given, "zero_optimization": {"stage": 2}})
        assert ds["communication_data_type"] == "fp32" and notes == []
    ds, notes = build({"communication_data_type": "bf16", "zero_optimization": {"stage": 2}})
    assert ds["communication_data_type"] == "bf16"
    assert len(notes) == 1 and "x.json" in notes[0] and "reduced in bf16" in notes[0]
    for path in sorted((REPO / "ds_configs").glob("*_bf16.json")):
        assert read_ds_json(path)["communication_data_type"] == "fp32", path.name


def test_optimizer_offload_is_recognised():
    assert offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}})
    assert not offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "none"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3}})
