"""Attention backends agree with an explicit per-head reference, forward and backward."""

from __future__ import annotations

import logging

import pytest
import torch

import pijepa.models.attention as attention_module
from pijepa.models import VisionTransformer, build_predictor, resolve_attn_backend, set_attn_backend
from pijepa.models.attention import Attention, attention

SHAPES = [(2, 3, 17, 8), (1, 1, 1, 4), (3, 2, 49, 16), (2, 4, 64, 32), (1, 2, 197, 12)]
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}


def naive_attention(q, k, v):
    """Loops over batch and heads with an explicit exp-normalise softmax, in float64."""
    batch, heads, _, dim = q.shape
    out = torch.empty_like(q, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            scores = q[b, h].double() @ k[b, h].double().T / dim**0.5
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            out[b, h] = (weights / weights.sum(dim=-1, keepdim=True)) @ v[b, h].double()
    return out


def random_qkv(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_math_matches_naive(shape, dtype):
    q, k, v = random_qkv(shape, dtype, seed=0)
    out = attention(q, k, v, "math")
    assert out.shape == shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), naive_attention(q, k, v), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_math_forward_and_backward(shape, dtype):
    q, k, v = random_qkv(shape, dtype, seed=1)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    results = {}
    for backend in ("math", "sdpa"):
        out = attention(q, k, v, backend)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[backend] = (out, *grads)
    for got, want in zip(results["sdpa"], results["math"]):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_encoder_and_predictor_same_output_across_backends():
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    predictor = build_predictor(encoder, pred_depth=2, pred_emb_dim=24)
    images = torch.randn(2, 3, 32, 32)
    masks_enc = torch.arange(10).repeat(1, 2, 1)
    masks_pred = torch.tensor([[[10, 12, 15]] * 2, [[0, 5, 11]] * 2])
    outputs = {}
    for backend in ("sdpa", "math"):
        assert set_attn_backend(encoder, backend) == backend
        set_attn_backend(predictor, backend)
        assert encoder.attn_backend == backend and predictor.attn_backend == backend
        outputs[backend] = (encoder(images), predictor(encoder(images, masks_enc), masks_enc, masks_pred))
    for got, want in zip(outputs["sdpa"], outputs["math"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_set_attn_backend_switches_every_block(monkeypatch):
    calls = []
    real_math = attention_module.math_attention
    monkeypatch.setattr(attention_module, "math_attention", lambda q, k, v: calls.append(1) or real_math(q, k, v))
    encoder = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=3, num_heads=2)
    images = torch.randn(1, 3, 16, 16)
    encoder(images)
    assert calls == []
    set_attn_backend(encoder, "math")
    assert all(block.attn.attn_backend == "math" for block in encoder.blocks)
    encoder(images)
    assert len(calls) == 3


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="unknown attn_backend"):
        VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, attn_backend="flash")
    with pytest.raises(ValueError):
        attention(*random_qkv((1, 1, 2, 4), torch.float32, 0), "flash")


def test_xformers_unavailable_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(attention_module, "xformers_available", lambda: False)
    attention_module._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=attention_module.__name__):
        first = Attention(24, 2, attn_backend="xformers")
        second = Attention(24, 2, attn_backend="xformers")
    assert first.attn_backend == second.attn_backend == "sdpa"
    warnings = [r for r in caplog.records if "xformers" in r.getMessage()]
    assert len(warnings) == 1


def test_xformers_on_cpu_tensors_runs_sdpa(monkeypatch, caplog):
    # Pretend xformers imports: the module keeps "xformers", but CPU inputs must not reach it.
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)
    monkeypatch.setattr(attention_module, "xformers_attention", lambda q, k, v: pytest.fail("xformers on CPU"))
    attention_module._warn_once.cache_clear()
    assert resolve_attn_backend("xformers") == "xformers"
    q, k, v = random_qkv((2, 2, 9, 8), torch.float64, seed=3)
    with caplog.at_level(logging.WARNING, logger=attention_module.__name__):
        out = attention(q, k, v, "xformers")
        attention(q, k, v, "xformers")
    torch.testing.assert_close(out, attention(q, k, v, "math"), **TOLERANCE[torch.float64])
    assert len([r for r in caplog.records if "CUDA" in r.getMessage()]) == 1
