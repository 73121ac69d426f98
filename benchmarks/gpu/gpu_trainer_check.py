"""GPU trainer check: the real trainer (`pijepa train` under torchrun) on one GPU, next to the planner
and the benchmarks, as one time-boxed script. benchmarks/gpu/gpu_check.py checks the
CUDA kernels and times the bare step, this runs what surrounds it.

    PYTHONPATH=. python3 benchmarks/gpu/gpu_trainer_check.py --out DIR [--budget-s 330]
    PYTHONPATH=. python3 benchmarks/gpu/gpu_trainer_check.py --out DIR --cpu-smoke   # plumbing, on CPU

Steps, in order of priority (each time-boxed; a failure or timeout is recorded and the next step
runs; what the budget cannot fit is recorded as skipped, to rerun with --only):
  env           torch, GPU, CPU count, optional packages; bf16 matmul peak (the MFU ceiling);
                xformers vs a math reference when it imports
  plan          `pijepa plan --json --gpus 1` for each trainer setting below (memory, FLOPs)
  fsdp          torchrun, 1 process, FSDP2 over NCCL, bf16, ViT-H/14 micro-batch 128, synthetic data
  trace         `pijepa plan --trace` of the fsdp run: its step on fake CUDA tensors, beside its peak
  bench         `pijepa bench step` at the same shapes (sdpa+fused, + xformers+fused when it imports)
  fsdp_ac       as fsdp with dist.activation_checkpointing=full
  fsdp_compile  as fsdp with dist.compile=true (per block)
  wds           synthetic JPEGs (or --wds-src / --wds-shards) -> `pijepa shards write` ->
                `pijepa bench data --workers 8 16`, against the trainer's images/s
  zero2 zero3   DeepSpeed ZeRO-2 / ZeRO-3 bf16 under torchrun, when deepspeed imports
  bench_compile `pijepa bench step` with the sdpa+fused+compile variant
Writes OUT/gpu_trainer_check.json, OUT/gpu_trainer_check.md (a section for docs/perf.md),
OUT/gpu_trainer_check.log (this script's output) and OUT/gpu_trainer_logs.txt (the end of every
child's log), after every step, so a run cut short still returns what it measured.
How to run it on a machine with one CUDA GPU and no network (the wheels to install, the exact
command): docs/perf.md, "How to run on a GPU".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import gpu_trainer_report as report
from gpu_trainer_modes import MODES, TRAIN_RUNS, Mode

REPO = Path(__file__).resolve().parents[2]
PROBE = str(Path(__file__).resolve().with_name("gpu_trainer_probe.py"))
RESERVE_S = 5  # kept back from every step's time box for writing the results
# name: (cap in seconds, least time left to start it); the order is the order of priority.
STEPS = {"env": (120, 20), "plan": (120, 15), "fsdp": (200, 60), "trace": (150, 40), "bench": (150, 40),
         "fsdp_ac": (200, 60),
         "fsdp_compile": (240, 90), "wds": (180, 40), "zero2": (200, 60), "zero3": (200, 60),
         "bench_compile": (240, 90)}
# Every `pijepa` command needs webdataset (an install requirement: pijepa.config imports its module);
# a GPU machine without network has none unless its wheel is installed (benchmarks/gpu/gpu_wheels.sh).
NEEDS = {name: ("webdataset", *((run.needs,) if (run := TRAIN_RUNS.get(name)) and run.needs else ()))
         for name in STEPS if name != "env"}


class Check:
    """The run's state: settings, deadline, results so far, and where everything goes."""

    def __init__(self, args: argparse.Namespace, mode: Mode, work: Path):
        self.args, self.mode, self.work = args, mode, work
        self.out = Path(args.out)
        self.deadline = time.time() + args.budget_s
        self.results: dict = {"mode": mode.name, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "budget_s": args.budget_s, "argv": sys.argv[1:], "mode_settings": mode.describe(),
                              "steps": {}}
        self.logs: list[Path] = []
        self.env = child_env(mode)

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} {self.left():5.0f}s left] {text}"
        print(line, flush=True)
        with (self.out / "gpu_trainer_check.log").open("a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        report.write_outputs(self.results, self.out, self.logs)


def child_env(mode: Mode) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as launchers/_common.sh
    # DeepSpeed's JIT-built ops outlive the scratch folder, as with the launchers (on CPU one takes ~1 min)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pijepa-torch-extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env["DS_ACCELERATOR"] = "cpu" if mode.smoke else "cuda"  # said up front rather than detected
    if mode.smoke:
        env["OMP_NUM_THREADS"] = "1"  # the smoke run shares a small machine with its own workers
    return env


def run_child(check: Check, name: str, cmd: list[str], timeout: float, split_stderr: bool = False) -> dict:
    """Runs `cmd` in a process group of its own, output to WORK/logs/NAME.log; on timeout the whole
    group (torchrun, its worker, the DataLoader workers) is killed at once: SIGTERM would make the
    trainer save a checkpoint first (its preemption handler). Stray processes are reaped either way."""
    log = check.work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    check.logs.append(Path(str(log) + ".err") if split_stderr else log)  # stdout that is JSON is in the results
    check.say(f"{name}: {' '.join(cmd)[:400]} (time box {timeout:.0f} s)")
    t0 = time.time()
    with log.open("w") as f, open(str(log) + ".err", "w") if split_stderr else f as err:
        p = subprocess.Popen(cmd, cwd=REPO, env=check.env, stdout=f, stderr=err, start_new_session=True)
        try:
            rc, timed_out = p.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    text = log.read_text(errors="replace")
    if split_stderr:
        text += Path(str(log) + ".err").read_text(errors="replace")
    found = {"rc": rc, "timed_out": timed_out, "wall_s": round(time.time() - t0, 1), "log": str(log),
             "log_tail": text[-2500:]}
    if split_stderr:  # the caller reads its JSON from stdout and pops this
        found["stdout"] = log.read_text(errors="replace")
    return found


def result_json(stdout: str | None) -> dict | None:
    """The `RESULT_JSON: {...}` line of a probe, or a whole-stdout JSON document (pijepa plan --json)."""
    if not stdout:
        return None
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT_JSON: "):
            return json.loads(line[len("RESULT_JSON: "):])
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return None


def step_env(check: Check, timeout: float) -> dict:
    cmd = [sys.executable, PROBE, "env", *(["--smoke"] if check.mode.smoke else [])]
    child = run_child(check, "env", cmd, timeout, split_stderr=True)
    facts = result_json(child.pop("stdout"))
    if facts is None:
        return {"status": "failed", **child}
    check.results["env"] = facts
    return {"status": "ok", "wall_s": child["wall_s"]}


def step_plan(check: Check, timeout: float) -> dict:
    """One `pijepa plan` per distinct setting of the trainer runs asked for, run side by side
    (CPU only, seconds each)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = sorted({TRAIN_RUNS[r].plan_key for r in check.args.selected if r in TRAIN_RUNS})
    gpu = report.plan_gpu(check.results.get("env", {}), check.mode.smoke)

    def plan(key: str) -> tuple[str, dict]:
        sets = [*check.mode.sets, *check.mode.batch_sets(), *TRAIN_RUNS[key].sets]
        cmd = [sys.executable, "-m", "pijepa", "plan", "--config", check.mode.config, *set_args(sets),
               "--gpus", "1", "--gpu", gpu, "--global-batch", str(check.mode.batch), "--json"]
        child = run_child(check, f"plan_{key}", cmd, timeout, split_stderr=True)
        data = result_json(child.pop("stdout"))
        return key, (report.plan_summary(data) if data else {"status": "failed", **child})

    with ThreadPoolExecutor(max(1, len(keys))) as pool:
        check.results["plan"] = dict(pool.map(plan, keys))
    failed = [k for k, v in check.results["plan"].items() if v.get("status") == "failed"]
    return {"status": "failed" if failed else "ok", "gpu_entry": gpu, "settings": keys, "failed": failed}


def step_trace(check: Check, timeout: float) -> dict:
    """`pijepa plan --trace` of the fsdp run's setting on one rank: the real step on fake tensors
    (CUDA's kernels on a GPU), beside the planner and the fsdp run's measured peak."""
    gpu = report.plan_gpu(check.results.get("env", {}), check.mode.smoke)
    sets = [*check.mode.sets, *check.mode.batch_sets(), *TRAIN_RUNS["fsdp"].sets]
    cmd = [sys.executable, "-m", "pijepa", "plan", "--config", check.mode.config, *set_args(sets), "--gpus", "1",
           "--gpu", gpu, "--global-batch", str(check.mode.batch), "--trace", "--json"]
    child = run_child(check, "trace", cmd, timeout, split_stderr=True)
    data = result_json(child.pop("stdout"))
    if data is None:  # exit code 2 with a report is a run that does not fit, still a result
        return {"status": "timeout" if child["timed_out"] else "failed", **child}
    peak = data["memory_bytes"]["peak"]
    return {"status": "ok", "wall_s": child["wall_s"], "device": data["device"], "fits": data["fits"],
            "traced_gib": peak["traced"] / 2**30, "planned_gib": peak["planned"] / 2**30,
            "peak_phase": data["peak_phase"]}


def set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def step_train(check: Check, timeout: float, name: str) -> dict:
    """`pijepa train` under torchrun with one process; metrics.csv read back, the run folder
    (checkpoints of several GB) removed afterwards unless --keep-work."""
    run = TRAIN_RUNS[name]
    run_dir = check.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = check.mode.compile_steps if "compile" in name else check.mode.steps
    sets = [*check.mode.sets, *check.mode.batch_sets(), *run.sets, f"optimization.max_steps={steps}",
            f"logging.folder={run_dir}", f"logging.log_freq={check.mode.log_freq}",
            "logging.checkpoint_freq=100000", "logging.tensorboard=false", "logging.mask_viz_freq=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "pijepa", "train", "--config", check.mode.config, *set_args(sets)]
    child = run_child(check, name, cmd, timeout)
    windows = report.read_metrics(run_dir / "metrics.csv")
    found = {"sets": sets, "windows": windows, **report.steady(windows, check.mode.batch),
             "checkpoint_gb": report.folder_gb(run_dir / "checkpoints"), **child}
    if not check.args.keep_work:
        shutil.rmtree(run_dir, ignore_errors=True)
    ok = child["rc"] == 0 and bool(windows)
    return {"status": "ok" if ok else ("timeout" if child["timed_out"] else "failed"), **found}


def step_bench(check: Check, timeout: float, name: str) -> dict:
    variants = ["sdpa+fused+compile"] if name == "bench_compile" else ["sdpa+fused"]
    xformers = check.results.get("env", {}).get("xformers_check") or {}
    if name == "bench" and xformers.get("status") == "ok":  # only where it imported and was right
        variants.append("xformers+fused")
    out = check.work / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pijepa", "bench", "step", *check.mode.bench_args, "--batch",
           str(check.mode.batch), "--dtype", "bfloat16", "--variants", ",".join(variants), "--out", str(out)]
    child = run_child(check, name, cmd, timeout)
    if child["rc"] != 0 or not out.exists():
        return {"status": "timeout" if child["timed_out"] else "failed", **child}
    return {"status": "ok", "wall_s": child["wall_s"], **json.loads(out.read_text())}


def step_wds(check: Check, timeout: float) -> dict:
    """Shards on local disk, then the loader's images/s for the mode's worker counts."""
    m, a, end = check.mode, check.args, time.time() + timeout
    found: dict = {}
    shards = Path(a.wds_shards) if a.wds_shards else check.work / "shards"
    if not a.wds_shards:
        src = Path(a.wds_src) if a.wds_src else check.work / "jpegs"
        if not a.wds_src:
            shutil.rmtree(src, ignore_errors=True)
            cmd = [sys.executable, PROBE, "jpegs", str(src), str(m.jpegs), str(m.jpeg_size), str(os.cpu_count() or 1)]
            child = run_child(check, "wds_jpegs", cmd, end - time.time(), split_stderr=True)
            found["jpegs"] = result_json(child.pop("stdout")) or child
        shutil.rmtree(shards, ignore_errors=True)
        cmd = [sys.executable, "-m", "pijepa", "shards", "write", "--src", str(src), "--out", str(shards),
               "--samples-per-shard", str(m.samples_per_shard), "--workers", str(os.cpu_count() or 1), "--no-progress"]
        found["write"] = run_child(check, "wds_write", cmd, end - time.time())
        if found["write"]["rc"] != 0:
            return {"status": "failed", **found}
    cmd = [sys.executable, "-m", "pijepa", "bench", "data", "--shards", str(shards), "--config", m.config,
           *set_args([*m.data_sets, *m.batch_sets()]), "--workers", *map(str, m.data_workers), *m.data_args]
    child = run_child(check, "wds_bench", cmd, end - time.time())
    found.update(report.parse_bench_data(Path(child["log"]).read_text(errors="replace")), bench=child)
    ok = child["rc"] == 0 and found.get("loader")
    return {"status": "ok" if ok else ("timeout" if child["timed_out"] else "failed"), **found}


def run_step(check: Check, name: str) -> None:
    cap, least = STEPS[name]
    left = check.left()
    missing = [p for p in NEEDS.get(name, ()) if not report.importable(check.results, p)]
    why = (f"{', '.join(missing)} does not import here (install the wheels: docs/perf.md)" if missing
           else f"budget: {left:.0f} s left, needs {least} s" if left < least else None)
    if why:
        check.results["steps"][name] = {"status": "skipped", "why": why}
        check.say(f"{name}: skipped, {why}")
        check.save()
        return
    fns = {"env": step_env, "plan": step_plan, "trace": step_trace, "wds": step_wds}
    t0 = time.time()
    try:
        if name in fns:
            result = fns[name](check, min(cap, left))
        elif name.startswith("bench"):
            result = step_bench(check, min(cap, left), name)
        else:
            result = step_train(check, min(cap, left), name)
    except Exception:  # a bug or a surprise in one step must not cost the others
        result = {"status": "error", "error": traceback.format_exc()[-3000:]}
    result["step_wall_s"] = round(time.time() - t0, 1)
    check.results["steps"][name] = result
    check.say(f"{name}: {result['status']} in {result['step_wall_s']:.0f} s {result.get('why', '')}")
    check.save()


def work_folder(args: argparse.Namespace) -> Path:
    """Where runs, shards and logs go: tmpfs when it has room (the trainer's final checkpoint of a
    ViT-H is ~10 GB: written to memory it costs seconds, not tens of them), else /tmp."""
    if args.work:
        return Path(args.work)
    shm = Path("/dev/shm")
    if not args.cpu_smoke and shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        return Path(tempfile.mkdtemp(prefix="pijepa_gpu_check_", dir=shm))
    return Path(tempfile.mkdtemp(prefix="pijepa_gpu_check_"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the JSON, the markdown and the logs")
    p.add_argument("--budget-s", type=float, default=330, help="wall-clock budget for all steps (default 330)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU (gloo): checks the plumbing")
    p.add_argument("--only", default="",
                   help=f"comma list of steps to run (env always, plan with any trainer run): {','.join(STEPS)}")
    p.add_argument("--skip", default="", help="comma list of steps to leave out")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 128 on GPU, 8 on CPU)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps per trainer run (default 15, the compiled run 25; 3 on CPU)")
    p.add_argument("--wds-src", help="ImageFolder tree or per-class tars for `pijepa shards write`")
    p.add_argument("--wds-shards", help="existing shards (shards.json or its folder): no writing")
    p.add_argument("--work", help="scratch folder (default: a new one in /dev/shm or /tmp, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder and the run folders")
    args = p.parse_args(argv)
    names = [s for s in (args.only or ",".join(STEPS)).split(",") if s]
    unknown = [s for s in names + args.skip.split(",") if s and s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {unknown}; expected {', '.join(STEPS)}")
    # env always runs (the others read its facts), plan whenever a trainer run does (its memory and FLOPs)
    names += ["env"] + (["plan"] if any(n in TRAIN_RUNS for n in names) else [])
    args.selected = [s for s in STEPS if s in names and s not in args.skip.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = MODES["smoke" if args.cpu_smoke else "gpu"].sized(args.batch, args.train_steps)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    work = work_folder(args)
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args, mode, work)
    check.say(f"gpu_trainer_check: mode {mode.name}, budget {args.budget_s:.0f} s, steps {','.join(args.selected)}, "
              f"work {work}")
    try:
        for name in args.selected:
            run_step(check, name)
    finally:
        check.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        check.save()
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(report.markdown(check.results), flush=True)
    bad = [n for n, s in check.results["steps"].items() if s["status"] in ("failed", "error", "timeout")]
    check.say(f"done: {len(check.results['steps']) - len(bad)} steps ok or skipped, failed: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
