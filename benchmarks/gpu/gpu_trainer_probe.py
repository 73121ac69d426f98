"""Child processes of benchmarks/gpu/gpu_trainer_check.py: each subcommand prints one line
`RESULT_JSON: {...}` for the driver to read.

    python benchmarks/gpu/gpu_trainer_probe.py env [--smoke]     environment facts, bf16 matmul peak,
                                                            xformers vs math (when importable)
    python benchmarks/gpu/gpu_trainer_probe.py jpegs OUT N SIZE WORKERS
                                                            an ImageFolder tree of N synthetic JPEGs

They run in their own processes so that the driver never initialises CUDA (its context would
hold GPU memory while the trainer runs) and so that a crash or hang here costs one step only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGES = ("deepspeed", "webdataset", "xformers", "triton")


def package_versions() -> dict:
    """Version of each optional package, or the one-line reason it does not import."""
    found: dict = {}
    for name in PACKAGES:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except Exception as e:  # any failure, ImportError or a broken install, is a fact to record
            found[name] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return found


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.strip() or r.stderr.strip()[:200]


def gpu_facts(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    facts = {"name": torch.cuda.get_device_name(0), "total_memory_mib": total / 2**20,
             "free_memory_mib": free / 2**20, "capability": f"{props.major}.{props.minor}",
             "multiprocessors": props.multi_processor_count}
    for key, fn in (("nvidia_smi", nvidia_smi), ("nccl", lambda: str(torch.cuda.nccl.version()))):
        try:  # extras: their failure must not hide the GPU's name, which picks the planner's entry
            facts[key] = fn()
        except Exception as e:
            facts[key] = f"{type(e).__name__}: {str(e)[:200]}"
    return facts


def xformers_check(torch, device) -> dict:
    """xformers' memory-efficient attention against a float64 math reference, fp32 and bf16, as
    benchmarks/gpu/gpu_check.py does for SDPA (tolerances 1e-3 and 2e-2)."""
    from pijepa.models.attention import attention, xformers_available

    if device.type != "cuda":
        return {"status": "skipped", "why": "xformers runs on CUDA only"}
    if not xformers_available():
        return {"status": "skipped", "why": "xformers is not importable"}
    out: dict = {"status": "ok", "checks": []}
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        q, k, v = (torch.randn(8, 16, 257, 80, device=device, dtype=dtype) for _ in range(3))
        ref = attention(q.double(), k.double(), v.double(), "math")
        got = attention(q, k, v, "xformers").double()
        err = float((got - ref).norm() / ref.norm())
        passed = err == err and err <= tol  # NaN never passes
        out["checks"].append({"dtype": str(dtype), "rel_err": err, "tol": tol, "pass": passed})
        out["status"] = out["status"] if passed else "failed"
    return out


def probe_env(smoke: bool) -> dict:
    import torch

    from pijepa.bench.step import matmul_peak_flops

    facts: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "cpus": os.cpu_count(), "packages": package_versions(), "cuda_available": torch.cuda.is_available()}
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    # The ceiling MFU is measured against: bf16, 8192^3 on a GPU (the trainer runs in bf16 autocast);
    # a small size on the CPU, where the smoke run only checks the plumbing.
    size = 8192 if device.type == "cuda" else 512
    parts = {"gpu": lambda: gpu_facts(torch) if device.type == "cuda" else None,
             "matmul_peak_tflops": lambda: matmul_peak_flops(device, torch.bfloat16, size) / 1e12,
             "xformers_check": lambda: xformers_check(torch, device)}
    for key, fn in parts.items():
        try:  # each fact on its own: a broken xformers must not hide the GPU's name
            facts[key] = fn()
        except Exception as e:
            facts[key] = None
            facts.setdefault("errors", {})[key] = f"{type(e).__name__}: {str(e)[:300]}"
    if facts.get("xformers_check") is None and "xformers_check" in facts.get("errors", {}):
        facts["xformers_check"] = {"status": "failed", "why": facts["errors"]["xformers_check"]}
    facts["matmul_size"] = size
    return facts


def _write_class(job: tuple) -> int:
    """Renders images `indices` of the synthetic dataset and saves them as JPEG (one pool task)."""
    out, indices, size, count = job
    import torch
    from PIL import Image

    from pijepa.data.synthetic import SyntheticShapes

    torch.set_num_threads(1)  # one process per core already
    data = SyntheticShapes(count, 10, image_size=size, seed=0)
    for i in indices:
        image, label = data[i]
        folder = Path(out) / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.jpg", quality=90)
    return len(indices)


def write_jpegs(out: str, count: int, size: int, workers: int) -> dict:
    """An ImageFolder tree of `count` JPEGs (size x size, quality 90: about ImageNet's pixels per
    image, so decoding costs what it would on the real data)."""
    import multiprocessing as mp

    workers = max(1, workers)
    jobs = [(out, list(range(w, count, workers)), size, count) for w in range(workers) if w < count]
    with mp.get_context("fork").Pool(len(jobs)) as pool:
        written = sum(pool.map(_write_class, jobs))
    total = sum(f.stat().st_size for f in Path(out).rglob("*.jpg"))
    return {"images": written, "size": size, "mean_kb": total / max(1, written) / 1e3}


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    env = sub.add_parser("env")
    env.add_argument("--smoke", action="store_true")
    jpegs = sub.add_parser("jpegs")
    jpegs.add_argument("out")
    jpegs.add_argument("count", type=int)
    jpegs.add_argument("size", type=int)
    jpegs.add_argument("workers", type=int)
    args = parser.parse_args()
    result = probe_env(args.smoke) if args.what == "env" else write_jpegs(args.out, args.count, args.size,
                                                                          args.workers)
    print("RESULT_JSON: " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
