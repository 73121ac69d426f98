"""GPU check: correctness of the CUDA paths against plain references, then timings with MFU.

Run on a machine with one CUDA GPU (no DeepSpeed/WebDataset needed):

    PYTHONPATH=. python3 benchmarks/gpu/gpu_check.py --out docs/gpu_check.json

Checks (each prints PASS/FAIL with the relative error ||out - ref|| / ||ref||):
  - attention: sdpa (every SDPA kernel the GPU runs) and xformers (when installed) vs math, fp32 and bf16
  - a whole encoder + predictor: sdpa vs math in bf16 autocast
  - the fused gather + L2_PKT loss vs the plain path, value and gradient, fp32 and under bf16 autocast
Timings: the fused vs plain loss at the ViT-H/14 recipe's per-GPU shapes, and full ViT-H/14 training
steps in bf16 at several batch sizes with MFU against a bf16 matmul measured on the same GPU.

This times the bare step only; the trainer itself (torchrun, the Strategy, FSDP2 / DeepSpeed, the
loader) against the planner and these timings is benchmarks/gpu/gpu_trainer_check.py (docs/perf.md,
"How to run on a GPU").
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from pijepa.bench.step import bench_loss, bench_step, build_jepa
from pijepa.losses import build_loss
from pijepa.masks import MultiBlockMaskCollator
from pijepa.models.attention import attention, xformers_available

RESULTS: dict = {"checks": [], "timings": {}}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def check(name: str, err: float, tol: float) -> None:
    ok = err == err and err <= tol  # NaN never passes
    RESULTS["checks"].append({"name": name, "rel_err": err, "tol": tol, "pass": ok})
    print(f"{'PASS' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)


def check_attention(dev: torch.device) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        q, k, v = (torch.randn(8, 16, 257, 80, device=dev, dtype=dtype) for _ in range(3))
        ref = attention(q.double(), k.double(), v.double(), "math")
        kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
        for kname, kernel in kernels.items():
            try:
                with sdpa_kernel(kernel):
                    out = F.scaled_dot_product_attention(q, k, v)
            except RuntimeError as e:  # e.g. flash has no fp32 kernel
                print(f"skip sdpa[{kname}] {dtype}: {str(e).splitlines()[0][:80]}")
                continue
            check(f"sdpa[{kname}] vs math, {dtype}", rel_err(out, ref), tol)
        if xformers_available():
            check(f"xformers vs math, {dtype}", rel_err(attention(q, k, v, "xformers"), ref), tol)
        else:
            print("skip xformers: not installed")


def check_models(dev: torch.device) -> None:
    collator = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=1)
    me, mp = (m.to(dev) for m in collator.sample_masks(8, step=3))
    images = torch.randn(8, 3, 224, 224, device=dev)
    outs = {}
    for attn in ("math", "sdpa"):
        models = build_jepa("vit_base", 16, 224, 4, 384, dev, attn)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            outs[attn] = models.predictor(models.encoder(images, me), me, mp).float()
    check("vit_base encoder+predictor sdpa vs math, bf16 autocast", rel_err(outs["sdpa"], outs["math"]), 3e-2)


def check_loss(dev: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    b, m, k, n, d = 32, 4, 44, 256, 1280
    h = torch.randn(b, n, d, generator=g).to(dev)
    masks = torch.stack([torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])
                         for _ in range(m)]).to(dev)
    pred0 = torch.randn(m * b, k, d, generator=g).to(dev)
    for autocast in (False, True):
        for grouping in ("chunk", "block", "image"):
            vals, grads = {}, {}
            for fused in (False, True):
                pred = pred0.clone().requires_grad_(True)
                fn = build_loss("L2_PKT", grouping=grouping, chunk_size=256, fused=fused)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss, _ = fn(pred, h, masks)
                loss.backward()
                vals[fused], grads[fused] = loss.detach(), pred.grad
            tag = f"fused vs plain L2_PKT[{grouping}]{' bf16 autocast' if autocast else ''}"
            check(f"{tag} value", rel_err(vals[True], vals[False]), 1e-4)
            check(f"{tag} grad", rel_err(grads[True], grads[False]), 1e-4)


def timed(name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except torch.cuda.OutOfMemoryError as e:
        result = {"error": f"out of memory: {str(e).splitlines()[0]}"}
    torch.cuda.empty_cache()
    RESULTS["timings"][name] = result
    print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(result)[:1500]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--batches", default="32,64,128")
    parser.add_argument("--compile", action="store_true", help="add an sdpa+fused+compile variant")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks are against true fp32
    RESULTS["env"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev),
                      "xformers": xformers_available()}
    print(RESULTS["env"], flush=True)
    check_attention(dev)
    check_models(dev)
    check_loss(dev)
    timed("loss_vith14_recipe_b128", bench_loss, batch=128, device="cuda", warmup=2, repeats=10)
    for i, batch in enumerate(int(b) for b in args.batches.split(",")):
        variants = ("baseline", "sdpa", "sdpa+fused") if i == 0 else ("sdpa+fused",)
        if args.compile and i == 1:
            variants += ("sdpa+fused+compile",)
        timed(f"step_vith14_bf16_b{batch}", bench_step, "vit_huge", 14, 224, batch, 12, 384, "bfloat16",
              device="cuda", variants=variants, warmup=3, repeats=10)
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=2)
    failed = [c["name"] for c in RESULTS["checks"] if not c["pass"]]
    print(f"{len(RESULTS['checks']) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
