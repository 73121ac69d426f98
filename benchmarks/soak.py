#!/usr/bin/env python3
"""Soak test, run by hand: a long CPU run with 2 FSDP ranks (torchrun, gloo), periodic checkpoints,
and a preemption (SIGTERM) + resume every few minutes, sampling every worker's memory (RSS), open
files and threads. It reports, per resumed segment, the growth between the first and the last
samples after warm-up, and fails (exit 1) when memory or open files keep growing.

    .venv/bin/python benchmarks/soak.py --minutes 30 --restart-every 6 --out runs/soak

Writes OUT/samples.csv (time, segment, pid, step, rss_mb, open_files, threads) and
OUT/summary.json; the run folder is OUT/run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SETS = ["dist.strategy=fsdp", "data.num_workers=1", "optimization.epochs=10000", "optimization.warmup=1",
        "logging.checkpoint_freq=50", "logging.keep_checkpoints=2", "logging.log_freq=10",
        "logging.mask_viz_freq=100"]
# Memory settles after the first steps, the first saves and the allocator's arenas (~3 minutes of
# a loaded 2-core machine); growth is measured after that.
WARMUP_S = 180
# Allowed growth within a segment after warm-up. Measured on CPU: each rank's RSS moves in a band
# of ~110 MB around 2.0 GB (checkpoint copies, batches; the allocator gives it back later), so a
# median-of-thirds difference below 128 MB is that band; a leak of even 1 MB per step over the
# ~500 steps of a 15-minute segment would exceed it.
MAX_RSS_GROWTH_MB, MAX_FD_GROWTH = 128.0, 8


def launch(run_dir: Path, port: int, extra: list[str], log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "pijepa", "train",
           "--config", str(REPO / "configs/cpu_default.yaml")]
    for s in [*SETS, f"logging.folder={run_dir}", *extra]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training ranks: torchrun's direct children (DataLoader workers are summed into them)."""
    try:
        return psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return []


def sample(rank_proc: psutil.Process) -> tuple[float, int, int]:
    family = [rank_proc, *rank_proc.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in family) / 2**20
    return rss, sum(p.num_fds() for p in family), sum(p.num_threads() for p in family)


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return 0
    with path.open() as f:
        return max((int(r["step"]) for r in csv.DictReader(f) if r.get("step")), default=0)


def growth(rows: list[dict], key: str) -> float:
    """Per rank, the median of the last third of the samples after warm-up minus the median of
    the first third (medians: a save or a batch in flight makes single samples jump); the max."""
    out = 0.0
    for pid in {r["pid"] for r in rows}:
        values = [float(r[key]) for r in rows if r["pid"] == pid]
        third = len(values) // 3
        if third >= 3:
            out = max(out, statistics.median(values[-third:]) - statistics.median(values[:third]))
    return out


def summarise(samples_csv: Path) -> list[dict]:
    """Per-segment growth from a samples.csv (also of a soak that was interrupted)."""
    with samples_csv.open() as f:
        rows = list(csv.DictReader(f))
    segments = []
    for segment in sorted({int(r["segment"]) for r in rows}):
        mine = [r for r in rows if int(r["segment"]) == segment]
        start = float(mine[0]["time_s"])
        settled = [r for r in mine if float(r["time_s"]) - start > WARMUP_S]
        segments.append({"segment": segment, "first_step": int(mine[0]["step"]), "last_step": int(mine[-1]["step"]),
                         "rss_growth_mb": round(growth(settled, "rss_mb"), 1),
                         "open_files_growth": growth(settled, "open_files"),
                         "rss_mb_max": max(float(r["rss_mb"]) for r in mine),
                         "open_files_max": max(int(r["open_files"]) for r in mine)})
    return segments


def verdict(segments: list[dict]) -> bool:
    return all(s["rss_growth_mb"] <= MAX_RSS_GROWTH_MB and s["open_files_growth"] <= MAX_FD_GROWTH
               for s in segments)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--restart-every", type=float, default=6, help="minutes between SIGTERM + resume")
    ap.add_argument("--interval", type=float, default=5, help="seconds between samples")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "soak")
    ap.add_argument("--port", type=int, default=29790)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config overrides")
    ap.add_argument("--summarise", type=Path, help="only print the summary of an earlier samples.csv")
    args = ap.parse_args()
    if args.summarise:
        segments = summarise(args.summarise)
        print(json.dumps(segments, indent=1))
        return 0 if verdict(segments) else 1
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir, end = args.out / "run", time.monotonic() + args.minutes * 60
    samples, segments = [], []
    with (args.out / "samples.csv").open("w", newline="") as f, (args.out / "torchrun.log").open("a") as log:
        out = csv.DictWriter(f, ["time_s", "segment", "pid", "step", "rss_mb", "open_files", "threads"])
        out.writeheader()
        t0, segment = time.monotonic(), 0
        while time.monotonic() < end:
            proc, started = launch(run_dir, args.port + segment % 5, args.extra, log), time.monotonic()
            stop_at = min(end, started + args.restart_every * 60)
            rows = []
            while time.monotonic() < stop_at and proc.poll() is None:
                time.sleep(args.interval)
                step = logged_step(run_dir)
                for w in workers(proc):
                    try:
                        rss, fds, threads = sample(w)
                    except psutil.NoSuchProcess:
                        continue
                    row = {"time_s": round(time.monotonic() - t0, 1), "segment": segment, "pid": w.pid,
                           "step": step, "rss_mb": round(rss, 1), "open_files": fds, "threads": threads}
                    out.writerow(row)
                    f.flush()
                    if time.monotonic() - started > WARMUP_S:
                        rows.append(row)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # preemption: save, exit 75, resumed next segment
            code = proc.wait(timeout=600)
            segments.append({"segment": segment, "exit_code": code, "last_step": logged_step(run_dir),
                             "rss_growth_mb": round(growth(rows, "rss_mb"), 1),
                             "open_files_growth": growth(rows, "open_files"),
                             "rss_mb_last": max((r["rss_mb"] for r in rows[-2:]), default=0),
                             "open_files_last": max((r["open_files"] for r in rows[-2:]), default=0)})
            print(json.dumps(segments[-1]), flush=True)
            samples += rows
            segment += 1
    exits = {s["segment"]: s["exit_code"] for s in segments}
    segments = [{**s, "exit_code": exits.get(s["segment"])} for s in summarise(args.out / "samples.csv")]
    ok = verdict(segments)
    summary = {"minutes": args.minutes, "segments": segments, "steps": logged_step(run_dir),
               "ok": ok, "limits": {"rss_growth_mb": MAX_RSS_GROWTH_MB, "open_files_growth": MAX_FD_GROWTH}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "segments"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
