"""Reading and reporting for benchmarks/gpu/gpu_trainer_check.py: metrics.csv windows, the plan's JSON,
`pijepa bench data`'s lines, MFU against one ceiling, and the markdown section for docs/perf.md.
Standard library only: the driver must not depend on what it checks."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

from gpu_trainer_modes import TRAIN_RUNS

GiB = 2**30
LOG_TAIL_BYTES = 12_000  # per child log in gpu_trainer_logs.txt


# ---------------------------------------------------------------- reading


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv rows (one per log window) as numbers; [] when the run wrote none."""
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def steady(windows: list[dict], batch: int) -> dict:
    """Step time of the steady state: the median over the second half of the windows (the first
    holds start-up, the compiled run's first ones its compilation); peak memory over the whole run."""
    timed = [w for w in windows if "step_time_s" in w]
    if not timed:
        return {}
    tail = timed[len(timed) // 2:] if len(timed) > 1 else timed
    step = statistics.median(w["step_time_s"] for w in tail)
    return {"step_time_s": step, "images_per_s": batch / step, "steady_windows": len(tail),
            "peak_memory_mb": max(w.get("peak_memory_mb", 0.0) for w in timed),
            "last_loss": timed[-1].get("loss")}


def folder_gb(path: Path) -> float | None:
    if not path.exists():
        return None
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9, 2)


def importable(results: dict, package: str) -> bool:
    """What the env probe found; when it found nothing (it failed), the step is tried anyway."""
    packages = results.get("env", {}).get("packages")
    if packages is None:
        return True
    version = packages.get(package)
    return bool(version) and not str(version).startswith("not importable")


def plan_gpu(env: dict, smoke: bool) -> str:
    """The `pijepa plan --gpu` entry for the GPU at hand (pijepa/plan/hardware.py names
    a100-40gb, a100-80gb, h100-80gb, h200-141gb); the nearest in memory for any other GPU."""
    gpu = env.get("gpu") or {}
    name, mib = gpu.get("name", ""), gpu.get("total_memory_mib", 81920)
    if smoke or not name:
        return "a100-80gb"
    for tag, entry in (("H200", "h200-141gb"), ("H100", "h100-80gb")):
        if tag in name:
            return entry
    sizes = {"a100-40gb": 40960, "a100-80gb": 81920, "h100-80gb": 81559, "h200-141gb": 143771}
    return min(sizes, key=lambda k: abs(sizes[k] - mib))


def plan_summary(plan: dict) -> dict:
    """The configured row of `pijepa plan --json` (memory) and the model FLOPs of one step."""
    cf, mem = plan["configured"], plan["configured"]["memory_bytes"]
    same = [r for r in plan["rows"] if r["strategy"] == cf["strategy"] and r["ac"] == cf["ac"]]
    plain = [r for r in plan["rows"] if r["ac"] == "none"]
    return {"status": "ok", "gpu": plan["gpu"]["name"], "gpu_memory_gib": plan["gpu"]["memory"] / GiB,
            "strategy": cf["strategy"], "ac": cf["ac"], "micro_batch": cf["micro_batch"], "fits": cf["fits"],
            "tensors_gib": mem["tensors"] / GiB, "total_gib": mem["total"] / GiB, "peak_phase": mem["peak_phase"],
            "max_micro_batch": same[0]["max_micro_batch"] if same else None,
            # step_flops of the rows without AC: pijepa.plan.flops.step_flops at the mean mask lengths
            # of the config's masks, no recomputation: model FLOPs, the numerator of MFU.
            "model_tflops_per_step": plain[0]["step_flops"] / 1e12 if plain else None,
            "tokens_mean": plan["tokens"]["mean"]}


def parse_bench_data(text: str) -> dict:
    """The floor and loader images/s that `pijepa bench data` prints."""
    found: dict = {"loader": {}}
    floor = re.search(r"floor \(.*?\):\s*([\d.]+) img/s", text)
    if floor:
        found["floor"] = float(floor.group(1))
    for workers, ips in re.findall(r"loader, (\d+) workers? ?:\s*([\d.]+) img/s", text):
        found["loader"][int(workers)] = float(ips)
    head = re.search(r"pijepa bench data: (.*)", text)
    found["setting"] = head.group(1) if head else None
    return found


# ---------------------------------------------------------------- derived numbers


def ceiling_tflops(results: dict) -> float | None:
    """The highest bf16 matmul rate measured in this run (the env probe's and each bench's): MFU is
    never flattered by a ceiling measured while something else held the GPU."""
    steps = results["steps"]
    found = [results.get("env", {}).get("matmul_peak_tflops")]
    found += [steps.get(b, {}).get("matmul_peak_tflops") for b in ("bench", "bench_compile")]
    found = [f for f in found if f]
    return max(found) if found else None


def trainer_rows(results: dict) -> list[dict]:
    peak, plans = ceiling_tflops(results), results.get("plan", {})
    bench = {r["variant"]: r for b in ("bench", "bench_compile")
             for r in results["steps"].get(b, {}).get("results", [])}
    rows = []
    for name, run in TRAIN_RUNS.items():
        st = results["steps"].get(name)
        if st is None:
            continue
        plan = plans.get(run.plan_key, {})
        row = {"name": name, "label": run.label, "status": st["status"], "why": st.get("why", ""), **st}
        flops = plan.get("model_tflops_per_step")
        if "step_time_s" in st and flops and peak:
            row["mfu"] = flops / st["step_time_s"] / peak
        ref = bench.get("sdpa+fused+compile" if "compile" in name else "sdpa+fused")
        if ref and "images_per_s" in st:
            row["vs_bench"] = st["images_per_s"] / ref["images_per_s"]
        if "peak_memory_mb" in st and plan.get("tensors_gib"):
            row["measured_gib"] = st["peak_memory_mb"] / 1024
            row["plan_ratio"] = row["measured_gib"] / plan["tensors_gib"]
        row["plan"] = plan
        rows.append(row)
    return rows


# ---------------------------------------------------------------- markdown


def _f(x, fmt: str, none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def _header(results: dict) -> list[str]:
    env, gpu = results.get("env", {}), results.get("env", {}).get("gpu") or {}
    device = gpu.get("name") or f"CPU ({env.get('cpus', '?')} cores), smoke mode: plumbing only, no real numbers"
    peak = ceiling_tflops(results)
    entry = results["steps"].get("plan", {}).get("gpu_entry", "—")
    return [f"### Trainer on one GPU ({device}, torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
            f"{results['started'][:10]})", "",
            f"Command: `PYTHONPATH=. python3 benchmarks/gpu/gpu_trainer_check.py {' '.join(results['argv'])}` "
            f"({results['mode']} mode, budget {results['budget_s']:.0f} s); {env.get('cpus', '?')} CPUs; "
            f"bf16 matmul ceiling {_f(peak, '.0f')} TFLOP/s (best measured in this run, "
            f"{env.get('matmul_size', '?')}^3); planner entry `--gpu {entry}`; packages: "
            + ", ".join(f"{k} {v if not str(v).startswith('not') else 'absent'}"
                        for k, v in env.get("packages", {}).items()) + ".", ""]


def _trainer_table(results: dict) -> list[str]:
    lines = ["| run | step (s) | images/s | MFU | vs bench step | peak memory (GiB) | plan tensors (GiB) | "
             "measured / plan | plan + margin (GiB) | checkpoint (GB) | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in trainer_rows(results):
        p = r["plan"]
        lines.append(f"| {r['label']} | {_f(r.get('step_time_s'), '.3f')} | {_f(r.get('images_per_s'), '.0f')} | "
                     f"{_f(r.get('mfu'), '.1%')} | {_f(r.get('vs_bench'), '.2f')}{'x' if r.get('vs_bench') else ''} | "
                     f"{_f(r.get('measured_gib'), '.1f')} | {_f(p.get('tensors_gib'), '.1f')} | "
                     f"{_f(r.get('plan_ratio'), '.2f')} | {_f(p.get('total_gib'), '.1f')} | "
                     f"{_f(r.get('checkpoint_gb'), '.1f')} | {r['status']} {r['why']} |")
    peak = ceiling_tflops(results)
    for b in ("bench", "bench_compile"):
        for x in results["steps"].get(b, {}).get("results", []):
            mfu = x["tflops_per_step"] / x["step_s"] / peak if peak else None
            lines.append(f"| `bench step` {x['variant']} | {x['step_s']:.3f} | {x['images_per_s']:.0f} | "
                         f"{_f(mfu, '.1%')} | 1.00x | {x['peak_memory_mb'] / 1024:.1f} | | | | | ok |")
    return lines


def _windows(results: dict) -> list[str]:
    lines = []
    for name in TRAIN_RUNS:
        ws = results["steps"].get(name, {}).get("windows") or []
        if ws:
            shown = ", ".join(f"{w.get('images_per_s', 0):.0f}" for w in ws)
            lines.append(f"- {name}: images/s per window of {int(ws[0]['step'])} steps: {shown}; "
                         f"run {results['steps'][name].get('wall_s', 0):.0f} s in all")
    return lines


def _loader(results: dict) -> list[str]:
    w = results["steps"].get("wds")
    if not w:
        return []
    if w["status"] != "ok":
        return [f"Loader: {w['status']} {w.get('why', '')}".rstrip()]
    train = results["steps"].get("fsdp", {}).get("images_per_s")
    best = max(w["loader"].values()) if w["loader"] else None
    per = ", ".join(f"{n} workers {v:.0f}" for n, v in w["loader"].items())
    jp = w.get("jpegs") or {}
    text = (f"Loader (webdataset, local shards of {jp.get('images', '?')} synthetic {jp.get('size', '?')} px JPEGs, "
            f"{_f(jp.get('mean_kb'), '.0f')} kB each): floor {_f(w.get('floor'), '.0f')} img/s per process; {per} "
            f"img/s; the FSDP trainer consumed {_f(train, '.0f')} img/s")
    if best and train:
        text += f": the best loader delivers {best / train:.1f}x what one GPU's step takes"
    return [text + "."]


def _trace(results: dict) -> list[str]:
    t = results["steps"].get("trace")
    if not t or t["status"] != "ok":
        return []
    measured = results["steps"].get("fsdp", {}).get("peak_memory_mb")
    text = (f"Trace (`pijepa plan --trace`, the FSDP run's step on fake tensors on {t['device']}): peak "
            f"{t['traced_gib']:.2f} GiB traced, {t['planned_gib']:.2f} GiB planned (tensors), peak phase "
            f"{t['peak_phase']['traced']} / {t['peak_phase']['planned']}")
    if measured:
        gib = measured / 1024
        text += f"; the FSDP run measured {gib:.2f} GiB ({gib / t['traced_gib']:.3f}x the trace)"
    return [text + "."]


def markdown(results: dict) -> str:
    lines = (_header(results) + _trainer_table(results) + [""] + _windows(results) + [""] + _loader(results)
             + _trace(results))
    xf = results.get("env", {}).get("xformers_check")
    if xf:
        checks = "; ".join(f"{c['dtype']} rel. err {c['rel_err']:.1e} ({'pass' if c['pass'] else 'FAIL'})"
                           for c in xf.get("checks", []))
        lines.append(f"xformers vs math: {xf['status']} {xf.get('why', '')}{checks}")
    missing = [n for n, s in results["steps"].items() if s["status"] != "ok"]
    if missing:
        lines += ["", "Not run or failed: " + "; ".join(f"{n}: {results['steps'][n]['status']} "
                                                       f"{results['steps'][n].get('why', '')}".rstrip()
                                                       for n in missing),
                  f"Rerun those alone: `--only {','.join(missing)}`."]
    lines += ["", "MFU = model FLOPs of the step (`pijepa.plan.flops.step_flops` at the mean mask lengths, "
              "from `pijepa plan`; AC's recomputation not counted) / step time / the ceiling above. "
              "Peak memory is CUDA's peak allocated bytes (the process's peak resident set in the CPU smoke "
              "mode); the plan's tensors exclude its margin."]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path, logs: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_trainer_check.json").write_text(json.dumps(results, indent=1, default=str))
    try:
        text = markdown(results)
    except Exception as e:  # a report bug must not lose the JSON
        text = f"(markdown failed: {type(e).__name__}: {e})\n"
    (out / "gpu_trainer_check.md").write_text(text)
    with (out / "gpu_trainer_logs.txt").open("w") as f:
        for path in logs:
            if path.exists():
                f.write(f"===== {path.name} (last {LOG_TAIL_BYTES} bytes)\n")
                f.write(path.read_text(errors="replace")[-LOG_TAIL_BYTES:] + "\n")
