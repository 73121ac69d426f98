"""Losses: PKT against a float64 loop reference, fused == plain (values and gradients) for every
loss and grouping, the published L2_PKT_chunks normalisation, float32 under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pijepa.losses import GROUPINGS, LOSS_NAMES, build_loss, pkt_loss
from pijepa.losses.fused import batched_pkt, group_rows
from pijepa.losses.pkt import grouped_pkt, unit_rows
from pijepa.masks import apply_masks

# (M, B, K, N, D, chunk_size): R = M*B*K is 84 (not a multiple of 10), 20 (< chunk 256),
# 48 (a multiple of 8) and 12 (chunks of 5, last one 2 rows).
SHAPES = [(4, 3, 7, 20, 16, 10), (2, 2, 5, 12, 8, 256), (4, 2, 6, 30, 12, 8), (1, 3, 4, 16, 8, 5)]
TOL = dict(rtol=1e-4, atol=1e-6)


def _inputs(shape, seed: int = 0):
    num_masks, batch, keep, tokens, dim, _ = shape
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, tokens, dim, generator=g) * 2 + 0.5
    masks = torch.rand(num_masks, batch, tokens, generator=g).argsort(-1)[..., :keep].sort(-1).values
    pred = torch.randn(num_masks * batch, keep, dim, generator=g)
    return pred, h, masks


def _pkt_reference(p: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    """PKT in float64 with explicit loops over rows (Passalis & Tefas 2018)."""
    p, t = p.double().tolist(), t.double().tolist()
    rows = len(p)

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / (norm + eps) for x in v]

    def dist(vs):
        vs = [unit(v) for v in vs]
        out = []
        for i in range(rows):
            sims = [(sum(a * b for a, b in zip(vs[i], vs[j])) + 1.0) / 2.0 for j in range(rows)]
            total = sum(sims)
            out.append([s / total for s in sims])
        return out

    dp, dt = dist(p), dist(t)
    kl = 0.0
    for i in range(rows):
        for j in range(rows):
            kl += dt[i][j] * math.log((dt[i][j] + eps) / (dp[i][j] + eps))
    return kl / (rows * rows)


@pytest.mark.parametrize("rows,dim", [(1, 4), (5, 3), (17, 8)])
def test_pkt_matches_float64_reference(rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(rows)
    p, t = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    expected = _pkt_reference(p, t)
    assert pkt_loss(p, t).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # The batched kernel on a single unpadded group agrees too.
    fused = batched_pkt(unit_rows(p)[None], unit_rows(t)[None], rows)
    assert fused.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_pkt_zero_for_identical_inputs_and_nonnegative() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=g)
    assert abs(pkt_loss(x, x).item()) < 1e-6
    for _ in range(5):
        assert pkt_loss(torch.randn(32, 16, generator=g), x).item() > 0
    # Through the full loss: predicting the LayerNormed targets exactly gives PKT ~ 0.
    pred, h, masks = _inputs(SHAPES[0])
    exact = apply_masks(F.layer_norm(h, (h.shape[-1],)), masks)
    for grouping in GROUPINGS:
        for fused in (True, False):
            loss, parts = build_loss("PKT", grouping=grouping, chunk_size=10, fused=fused)(exact, h, masks)
            assert abs(loss.item()) < 1e-6 and set(parts) == {"pkt"}


# Every loss with every grouping it accepts (L2_PKT_chunks is defined for chunks only).
COMBOS = [(n, g) for n in LOSS_NAMES for g in GROUPINGS if n != "L2_PKT_chunks" or g == "chunk"]


@pytest.mark.parametrize("name,grouping", COMBOS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_plain(shape, name: str, grouping: str) -> None:
    pred, h, masks = _inputs(shape)
    results = []
    for fused in (False, True):
        fn = build_loss(name, grouping=grouping, chunk_size=shape[-1], l2_weight=0.7, pkt_weight=1.3, fused=fused)
        p = pred.clone().requires_grad_()
        loss, parts = fn(p, h, masks)
        loss.backward()
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert all(v.dim() == 0 and not v.requires_grad for v in parts.values())
        results.append((loss.detach(), p.grad, parts))
    (loss_a, grad_a, parts_a), (loss_b, grad_b, parts_b) = results
    torch.testing.assert_close(loss_b, loss_a, **TOL)
    torch.testing.assert_close(grad_b, grad_a, **TOL)
    assert parts_a.keys() == parts_b.keys()
    for key in parts_a:
        torch.testing.assert_close(parts_b[key], parts_a[key], **TOL)


def test_grouping_definitions() -> None:
    pred, h, masks = _inputs(SHAPES[0])  # M=4, B=3, K=7: R=84 rows, chunks of 10
    target = apply_masks(F.layer_norm(h, (h.shape[-1],)), masks)
    rows_p, rows_t = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
    chunks = grouped_pkt(pred, target, 4, "chunk", 10)
    assert chunks.shape == (9,)
    # The short last chunk (rows 80..83) is averaged over its own 4x4 entries.
    torch.testing.assert_close(chunks[-1], pkt_loss(rows_p[80:], rows_t[80:]))
    images = grouped_pkt(pred, target, 4, "image", 10)
    image1 = torch.cat([pred[m * 3 + 1] for m in range(4)]), torch.cat([target[m * 3 + 1] for m in range(4)])
    torch.testing.assert_close(images[1], pkt_loss(*image1))
    blocks = grouped_pkt(pred, target, 4, "block", 10)
    torch.testing.assert_close(blocks[5], pkt_loss(pred[5], target[5]))
    # The fused grouping lays rows out identically (padding only in the last chunk).
    grouped, last = group_rows(rows_p, 4, 7, "image", 10)
    torch.testing.assert_close(grouped[1], image1[0])
    grouped, last = group_rows(rows_p, 4, 7, "chunk", 10)
    assert grouped.shape == (9, 10, rows_p.shape[1]) and last == 4 and not grouped[-1, 4:].any()


def test_l2_is_ijepa_regression() -> None:
    pred, h, masks = _inputs(SHAPES[0])
    expected = F.smooth_l1_loss(pred, apply_masks(F.layer_norm(h, (h.shape[-1],)), masks))
    for fused in (True, False):
        loss, parts = build_loss("L2", fused=fused)(pred, h, masks)
        torch.testing.assert_close(loss, expected)
        assert set(parts) == {"l2"}


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=["R84-C10", "R20-C256"])
def test_combined_formulas(shape) -> None:
    pred, h, masks = _inputs(shape)
    chunk = shape[-1]
    target = apply_masks(F.layer_norm(h, (h.shape[-1],)), masks)
    rows_p, rows_t = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
    l2 = F.smooth_l1_loss(pred, target)
    per_chunk = [pkt_loss(p, t) for p, t in zip(rows_p.split(chunk), rows_t.split(chunk))]
    published = (sum(per_chunk) + l2) / (rows_p.shape[0] / chunk)
    mean_pkt = torch.stack(per_chunk).mean()
    for fused in (True, False):
        loss, parts = build_loss("L2_PKT_chunks", chunk_size=chunk, fused=fused)(pred, h, masks)
        torch.testing.assert_close(loss, published, **TOL)
        torch.testing.assert_close(parts["pkt"], mean_pkt, **TOL)
        torch.testing.assert_close(parts["l2"], l2, **TOL)
        loss, _ = build_loss("L2_PKT", chunk_size=chunk, l2_weight=0.5, pkt_weight=2.0, fused=fused)(pred, h, masks)
        torch.testing.assert_close(loss, 0.5 * l2 + 2.0 * mean_pkt, **TOL)


def test_float32_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(2)
    p = torch.randn(40, 16, generator=g).bfloat16()
    t = torch.randn(40, 16, generator=g).bfloat16()
    reference = pkt_loss(p.float(), t.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = pkt_loss(p, t)
        fused = batched_pkt(unit_rows(p.float())[None], unit_rows(t.float())[None], 40)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, reference, **TOL)
    torch.testing.assert_close(fused[0], reference, **TOL)
    pred, h, masks = _inputs(SHAPES[0])
    for name in LOSS_NAMES:
        for fused_path in (True, False):
            fn = build_loss(name, chunk_size=10, fused=fused_path)
            expected, _ = fn(pred.bfloat16().float(), h.bfloat16().float(), masks)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, parts = fn(pred.bfloat16(), h.bfloat16(), masks)
            assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
            torch.testing.assert_close(loss, expected, **TOL)


def test_batched_pkt_gradcheck_with_padding() -> None:
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 5, generator=g, dtype=torch.float64)
    target = torch.randn(7, 5, generator=g, dtype=torch.float64)
    t, last = group_rows(unit_rows(target), 1, 7, "chunk", 3)

    def fn(x: torch.Tensor) -> torch.Tensor:
        p, _ = group_rows(unit_rows(x), 1, 7, "chunk", 3)
        return batched_pkt(p, t, last)

    assert last == 1
    assert torch.autograd.gradcheck(fn, (rows.requires_grad_(),))


def test_targets_receive_no_gradient() -> None:
    pred, h, masks = _inputs(SHAPES[0])
    h.requires_grad_()
    for fused in (True, False):
        loss, _ = build_loss("L2_PKT", chunk_size=10, fused=fused)(pred.requires_grad_(), h, masks)
        loss.backward()
        assert h.grad is None


def test_errors() -> None:
    with pytest.raises(ValueError, match="L2, PKT, L2_PKT, L2_PKT_chunks"):
        build_loss("MSE")
    with pytest.raises(ValueError, match="grouping"):
        build_loss("PKT", grouping="row")
    with pytest.raises(ValueError, match="chunk"):
        build_loss("L2_PKT_chunks", grouping="image")
    with pytest.raises(ValueError, match="chunk_size"):
        build_loss("PKT", chunk_size=0)
    pred, h, masks = _inputs(SHAPES[0])
    with pytest.raises(ValueError, match="pred"):
        build_loss("L2")(pred[:-1], h, masks)
