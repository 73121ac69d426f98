"""`pijepa bench step | loss | masks`: measured speed, as ratios to a baseline timed in the same run.

`bench step` times the full training step (target forward, context forward, predictor, loss,
backward, AdamW, EMA update) for several variants and reports images/s, step time, analytic FLOPs,
model FLOP utilisation against a matmul peak measured on the same device in the same dtype, and
peak memory. The baseline is the straightforward design of the original code: explicit softmax
attention (`math`), the plain loss (gather, then PKT chunk by chunk in a Python loop) and torch's
default (foreach) AdamW; the other variants use pijepa's fused AdamW.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pijepa.losses import build_loss
from pijepa.masks import MultiBlockMaskCollator
from pijepa.masks.reference import ReferenceMaskCollator
from pijepa.models import build_encoder, build_predictor
from pijepa.models.attention import xformers_available
from pijepa.parallel.base import JEPAModels, ema_update_, make_adamw, param_groups
from pijepa.plan.flops import step_flops
from pijepa.runtime.errors import ConfigError, LaunchError
from pijepa.runtime.memory import peak_memory_mb, reset_peak_memory

VARIANTS = ("baseline", "sdpa", "sdpa+fused", "sdpa+fused+compile", "xformers+fused")

# ---------------------------------------------------------------- measurement helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of each timed call, after `warmup` untimed ones (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """FLOP/s of a large square matmul in `dtype`: the ceiling MFU is measured against. The best of
    several calls counts (on a shared machine other processes only ever slow a call down; a median
    would lower the ceiling and inflate the MFU)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = time_calls(lambda: a @ b, device, warmup=2, repeats=10 if device.type == "cpu" else 20)
    return 2 * size**3 / min(times)


# ---------------------------------------------------------------- the step


@dataclass
class StepResult:
    variant: str
    step_s: float
    images_per_s: float
    tflops_per_step: float
    mfu: float
    peak_memory_mb: float
    loss: float


def build_jepa(model: str, patch: int, img: int, pred_depth: int, pred_dim: int, device, attn: str) -> JEPAModels:
    torch.manual_seed(0)
    enc = build_encoder(model, patch_size=patch, img_size=img, attn_backend=attn)
    pred = build_predictor(enc, pred_depth=pred_depth, pred_emb_dim=pred_dim)
    target = copy.deepcopy(enc).requires_grad_(False)
    return JEPAModels(enc.to(device), pred.to(device), target.to(device))


def make_step(models: JEPAModels, loss_fn, images, masks_enc, masks_pred, dtype: torch.dtype,
              fused_adamw: bool = True):
    kwargs: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.04}
    # pijepa's AdamW (fused where torch has it), or the original's (torch's default, foreach)
    opt = make_adamw(param_groups(models), images.device, **kwargs) if fused_adamw else \
        torch.optim.AdamW(param_groups(models), **kwargs)
    online = dict(models.encoder.named_parameters())
    pairs = [(p, online[n]) for n, p in models.target_encoder.named_parameters() if online[n].requires_grad]
    tgt, onl = [p for p, _ in pairs], [p for _, p in pairs]
    device = images.device
    last = {}

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                h = models.target_encoder(images)
            z = models.predictor(models.encoder(images, masks_enc), masks_enc, masks_pred)
            loss, _ = loss_fn(z, h, masks_pred)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update_(tgt, onl, 0.996)
        last["loss"] = loss.detach()

    return step, last


def check_variants(variants: tuple[str, ...], dev: torch.device) -> None:
    """Known variant names only; an xformers variant only where xformers runs (else the model
    would fall back to sdpa and the table would time sdpa under the xformers name)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"unknown variant(s) {unknown}; expected a comma list of {', '.join(VARIANTS)}")
    wanted = [v for v in variants if "xformers" in v]
    if wanted and not (dev.type == "cuda" and xformers_available()):
        where = "xformers is not importable" if dev.type == "cuda" else f"it needs a CUDA device, not {dev}"
        raise LaunchError(f"variant {wanted[0]} cannot run here: {where}; leave it out of --variants")


def bench_step(model: str = "vit_small", patch: int = 16, img: int = 224, batch: int = 8,
               pred_depth: int = 6, pred_dim: int = 384, dtype: str = "float32", device: str | None = None,
               variants: tuple[str, ...] = ("baseline", "sdpa", "sdpa+fused"),
               warmup: int = 2, repeats: int = 3, chunk_size: int = 256) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    check_variants(variants, dev)
    collator = MultiBlockMaskCollator(input_size=img, patch_size=patch, seed=0)
    masks_enc, masks_pred = collator.sample_masks(batch, step=0)
    masks_enc, masks_pred = masks_enc.to(dev), masks_pred.to(dev)
    images = torch.randn(batch, 3, img, img, device=dev)
    peak = matmul_peak_flops(dev, dt)
    results = []
    for variant in variants:
        attn = "math" if variant == "baseline" else ("xformers" if "xformers" in variant else "sdpa")
        models = build_jepa(model, patch, img, pred_depth, pred_dim, dev, attn)
        if "compile" in variant:
            from pijepa.parallel.parallelize import apply_compile
            for m in (models.encoder, models.predictor, models.target_encoder):
                apply_compile(m)
        loss_fn = build_loss("L2_PKT", chunk_size=chunk_size, fused="fused" in variant)
        step, last = make_step(models, loss_fn, images, masks_enc, masks_pred, dt, fused_adamw=variant != "baseline")
        reset_peak_memory(dev)
        times = time_calls(step, dev, warmup, repeats)
        t = statistics.median(times)
        flops = step_flops(models.encoder, models.predictor, batch, masks_enc.shape[-1], masks_pred.shape[-1],
                           masks_pred.shape[0], min(chunk_size, masks_pred.numel()))
        results.append(StepResult(variant, t, batch / t, flops / 1e12, flops / t / peak,
                                  peak_memory_mb(dev), float(last["loss"])))
        del models, step
    # The ceiling is measured again after the variants and the higher one counts: MFU is never
    # flattered by a peak that was measured while something else held the cores.
    peak_after = matmul_peak_flops(dev, dt)
    if peak_after > peak:
        results = [dataclasses.replace(r, mfu=r.mfu * peak / peak_after) for r in results]
        peak = peak_after
    base = results[0].step_s
    return {"device": _device_name(dev), "dtype": dtype, "model": f"{model}/{patch} {img}px",
            "batch": batch, "matmul_peak_tflops": peak / 1e12,
            "tokens": {"context": masks_enc.shape[-1], "target": masks_pred.shape[-1]},
            "results": [dict(asdict(r), speedup=base / r.step_s) for r in results]}


# ---------------------------------------------------------------- loss and masks


def bench_loss(batch: int = 128, targets: int = 4, tokens: int = 44, grid: int = 16, dim: int = 1280,
               chunk_size: int = 256, device: str | None = None, warmup: int = 1, repeats: int = 3) -> dict:
    """Fused vs plain gather + loss, forward and backward, at the ViT-H/14 recipe's per-GPU shapes."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(0)
    n = grid * grid
    h = torch.randn(batch, n, dim, generator=g).to(dev)
    masks = torch.stack([torch.stack([torch.randperm(n, generator=g)[:tokens].sort().values
                                      for _ in range(batch)]) for _ in range(targets)]).to(dev)
    pred = torch.randn(targets * batch, tokens, dim, generator=g).to(dev).requires_grad_(True)
    out: dict[str, Any] = {"device": _device_name(dev), "shape": {"batch": batch, "targets": targets, "tokens": tokens,
                                                  "dim": dim, "chunk_size": chunk_size}, "results": {}}
    for grouping in ("chunk", "block", "image"):
        row = {}
        for name, fused in (("plain", False), ("fused", True)):
            loss_fn = build_loss("L2_PKT", grouping=grouping, chunk_size=chunk_size, fused=fused)

            def run(loss_fn=loss_fn):
                loss, _ = loss_fn(pred, h, masks)
                loss.backward()
                pred.grad = None

            row[name] = statistics.median(time_calls(run, dev, warmup, repeats))
        row["speedup"] = row["plain"] / row["fused"]
        out["results"][grouping] = row
    return out


def bench_masks(batch: int = 128, img: int = 224, patch: int = 16, batches: int = 20) -> dict:
    """The vectorised collator against the straightforward per-image, per-block reference."""
    out: dict[str, Any] = {"batch": batch, "grid": img // patch, "results": {}}
    collators: dict[str, MultiBlockMaskCollator] = {
        "reference": ReferenceMaskCollator(input_size=img, patch_size=patch, seed=0),
        "vectorised": MultiBlockMaskCollator(input_size=img, patch_size=patch, seed=0),
    }
    for name, collator in collators.items():
        steps = iter(range(10**9))  # a new step per call, as in training: each draws other masks

        def draw(c: MultiBlockMaskCollator = collator, s: Iterator[int] = steps) -> object:
            return c.sample_masks(batch, next(s))

        out["results"][name] = statistics.median(time_calls(draw, torch.device("cpu"), 2, batches))
    out["speedup"] = out["results"]["reference"] / out["results"]["vectorised"]
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"
