"""Encoder, predictor, positional embeddings and apply_masks against independent references.

The references below re-implement the official I-JEPA computations functionally (loops of
``gather``, ``repeat``, explicit softmax attention) from the state dict, so they check both the
maths and the parameter names.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pijepa.masks.gather import apply_masks
from pijepa.models import (
    VIT_SIZES,
    Block,
    VisionTransformer,
    VisionTransformerPredictor,
    build_encoder,
    build_predictor,
    get_2d_sincos_pos_embed,
    interpolate_pos_embed,
    vit_giant,
    vit_huge,
    vit_tiny,
)
from pijepa.models.pos_embed import get_2d_sincos_pos_embed_at

# ----------------------------------------------------------------------------- references


def official_apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """I-JEPA's apply_masks: one gather per mask, concatenated mask-major."""
    out = []
    for m in masks:
        index = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        out.append(torch.gather(x, dim=1, index=index))
    return torch.cat(out, dim=0)


def official_repeat_interleave_batch(x: torch.Tensor, batch: int, repeat: int) -> torch.Tensor:
    chunks = len(x) // batch
    return torch.cat(
        [torch.cat([x[i * batch : (i + 1) * batch] for _ in range(repeat)], dim=0) for i in range(chunks)], dim=0
    )


def reference_block(sd: dict, prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, dim = x.shape
    y = F.layer_norm(x, (dim,), sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], eps=1e-6)
    qkv = F.linear(y, sd[prefix + "attn.qkv.weight"], sd[prefix + "attn.qkv.bias"])
    q, k, v = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
    x = x + F.linear(y, sd[prefix + "attn.proj.weight"], sd[prefix + "attn.proj.bias"])
    y = F.layer_norm(x, (dim,), sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"], eps=1e-6)
    y = F.linear(y, sd[prefix + "mlp.fc1.weight"], sd[prefix + "mlp.fc1.bias"])
    y = F.linear(F.gelu(y), sd[prefix + "mlp.fc2.weight"], sd[prefix + "mlp.fc2.bias"])
    return x + y


def reference_encoder(model: VisionTransformer, images, masks=None, pos=None) -> torch.Tensor:
    sd = model.state_dict()
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=model.patch_size)
    dim = x.shape[1]
    x = x.flatten(2).transpose(1, 2) + (sd["pos_embed"] if pos is None else pos)
    if masks is not None:
        x = official_apply_masks(x, masks)
    for i in range(model.depth):
        x = reference_block(sd, f"blocks.{i}.", x, model.num_heads)
    return F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def reference_predictor(pred: VisionTransformerPredictor, ctx, masks_x: list, masks: list, pos=None):
    """The official VisionTransformerPredictor.forward, step by step."""
    sd = pred.state_dict()
    pos = sd["predictor_pos_embed"] if pos is None else pos
    batch = len(ctx) // len(masks_x)
    x = F.linear(ctx, sd["predictor_embed.weight"], sd["predictor_embed.bias"])
    x = x + official_apply_masks(pos.repeat(batch, 1, 1), masks_x)
    num_ctx = x.shape[1]
    pos_embs = official_apply_masks(pos.repeat(batch, 1, 1), masks)
    pos_embs = official_repeat_interleave_batch(pos_embs, batch, repeat=len(masks_x))
    pred_tokens = sd["mask_token"].repeat(pos_embs.size(0), pos_embs.size(1), 1) + pos_embs
    x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens], dim=1)
    for i in range(pred.depth):
        x = reference_block(sd, f"predictor_blocks.{i}.", x, pred.num_heads)
    dim = x.shape[-1]
    x = F.layer_norm(x, (dim,), sd["predictor_norm.weight"], sd["predictor_norm.bias"], eps=1e-6)
    x = x[:, num_ctx:]
    return F.linear(x, sd["predictor_proj.weight"], sd["predictor_proj.bias"])


def random_masks(num_masks: int, batch: int, num_patches: int, keep: int, gen: torch.Generator) -> torch.Tensor:
    rows = [
        torch.stack([torch.randperm(num_patches, generator=gen)[:keep].sort().values for _ in range(batch)])
        for _ in range(num_masks)
    ]
    return torch.stack(rows)  # [M, B, K] long


def small_encoder(**kwargs) -> VisionTransformer:
    config = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    config.update(kwargs)
    return VisionTransformer(**config)


def randomize_(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial values everywhere (default init has zero biases and unit norms, hiding bugs)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pos_embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


# ----------------------------------------------------------------------------- parameter counts

PARAM_COUNTS = {
    ("vit_tiny", 16): 5_524_032,
    ("vit_small", 16): 21_664_896,
    ("vit_base", 16): 85_797_120,
    ("vit_large", 16): 303_299_584,
    ("vit_huge", 14): 630_762_240,
    ("vit_giant", 16): 1_011_368_576,
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,patch", list(PARAM_COUNTS))
def test_encoder_param_counts(name, patch):
    with torch.device("meta"):
        model = build_encoder(name, patch_size=patch, img_size=224)
    assert count(model) == PARAM_COUNTS[(name, patch)]
    assert model.pos_embed.shape == (1, (224 // patch) ** 2, VIT_SIZES[name][0])


def test_constructors_match_sizes():
    with torch.device("meta"):
        huge, giant = vit_huge(patch_size=14), vit_giant(patch_size=16)
    assert (huge.embed_dim, huge.depth, huge.num_heads) == (1280, 32, 16)
    assert (giant.embed_dim, giant.depth, giant.num_heads) == (1408, 40, 16)
    assert giant.blocks[0].mlp.fc1.out_features == 6144  # 1408 * 48/11, robust to float rounding
    with torch.device("meta"):  # the short name is accepted too
        assert build_encoder("huge", 14).embed_dim == 1280
    with pytest.raises(ValueError, match="unknown model_name"):
        build_encoder("vit_enormous", 16)


def test_predictor_param_count_vit_huge():
    with torch.device("meta"):
        predictor = build_predictor(vit_huge(patch_size=14), pred_depth=12, pred_emb_dim=384)
    assert count(predictor) == 22_377_728
    assert predictor.grid_size == (16, 16) and predictor.num_heads == 16


# ----------------------------------------------------------------------------- structure and init


def test_official_parameter_names_and_structure():
    model = small_encoder()
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm.weight", "norm.bias"}
    for i in range(2):
        for leaf in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{leaf}.weight", f"blocks.{i}.{leaf}.bias"}
    assert set(model.state_dict()) == expected
    assert isinstance(model.blocks, nn.ModuleList) and all(isinstance(b, Block) for b in model.blocks)
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert (model.img_size, model.patch_size, model.grid_size) == ((32, 32), 8, (4, 4))
    assert (model.embed_dim, model.num_heads) == (48, 3)

    pred = build_predictor(model, pred_depth=1, pred_emb_dim=24)
    names = set(pred.state_dict())
    assert {"predictor_embed.weight", "mask_token", "predictor_pos_embed", "predictor_norm.weight",
            "predictor_proj.weight", "predictor_blocks.0.attn.qkv.bias", "predictor_blocks.0.mlp.fc2.weight"} <= names
    assert pred.mask_token.shape == (1, 1, 24)


def test_pos_embed_is_fixed_sincos_parameter():
    model = small_encoder(img_size=(32, 48))
    assert isinstance(model.pos_embed, nn.Parameter) and not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(48, (4, 6)))
    pred = build_predictor(model, pred_depth=1, pred_emb_dim=24)
    assert not pred.predictor_pos_embed.requires_grad
    assert torch.equal(pred.predictor_pos_embed[0], get_2d_sincos_pos_embed(24, (4, 6)))


def test_reference_init_is_what_ijepa_training_starts_from():
    """I-JEPA's training script re-draws every Linear of encoder and predictor with
    trunc_normal(std 0.02) and zero bias, LayerNorms to (1, 0), after the constructors ran: no
    depth rescaling survives. The patch-embedding conv keeps the constructor's trunc_normal(0.02)."""
    from torch import nn

    torch.manual_seed(0)
    model = vit_tiny(img_size=32, patch_size=8)
    pred = build_predictor(model, pred_depth=6, pred_emb_dim=384)
    for module in (model, pred):
        for m in module.modules():
            if isinstance(m, nn.Linear) and m.weight.numel() >= 4096:
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.15)
                assert torch.all(m.bias == 0)
            elif isinstance(m, nn.LayerNorm):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    last, pred_last = model.blocks[-1], pred.predictor_blocks[-1]
    for w in (last.attn.proj.weight, last.mlp.fc2.weight, pred_last.attn.proj.weight, pred_last.mlp.fc2.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.15)
    assert model.patch_embed.proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert pred.mask_token.std().item() == pytest.approx(0.02, rel=0.2)


def test_init_matches_ijepa():
    """`depth_scaled_init` keeps I-JEPA's constructor rule (meta.weight_init: depth_scaled)."""
    torch.manual_seed(0)
    model = vit_tiny(img_size=32, patch_size=8, depth_scaled_init=True)
    for i in (0, 5, 11):
        block = model.blocks[i]
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        rescaled = 0.02 / math.sqrt(2.0 * (i + 1))
        assert block.attn.proj.weight.std().item() == pytest.approx(rescaled, rel=0.05)
        assert block.mlp.fc2.weight.std().item() == pytest.approx(rescaled, rel=0.05)
        assert block.mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.mlp.fc2.bias == 0)
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)
    assert model.patch_embed.proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.patch_embed.proj.bias == 0)
    pred = build_predictor(model, pred_depth=2, pred_emb_dim=384)
    assert pred.mask_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert pred.predictor_blocks[1].attn.proj.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_meta_build_then_materialize():
    with torch.device("meta"):
        model = small_encoder()
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(48, (4, 4)))
    assert torch.all(model.norm.weight == 1)


# ----------------------------------------------------------------------------- positional embeddings


def test_sincos_layout():
    dim, (h, w) = 32, (3, 5)
    pos = get_2d_sincos_pos_embed(dim, (h, w))
    assert pos.shape == (h * w, dim) and pos.dtype == torch.float32
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    for i in range(h):
        for j in range(w):
            expected = torch.cat([torch.sin(j * omega), torch.cos(j * omega),
                                  torch.sin(i * omega), torch.cos(i * omega)])
            torch.testing.assert_close(pos[i * w + j], expected.float(), atol=1e-6, rtol=0)
    # Distinct positions get distinct codes.
    assert torch.cdist(pos, pos).add(torch.eye(h * w)).min() > 0.1


def test_interpolate_same_grid_is_identity():
    pos = get_2d_sincos_pos_embed(16, (4, 6)).unsqueeze(0)
    assert interpolate_pos_embed(pos, (4, 6), (4, 6)) is pos


def test_interpolate_shapes():
    pos = get_2d_sincos_pos_embed(16, (4, 6)).unsqueeze(0)
    assert interpolate_pos_embed(pos, (4, 6), (7, 3)).shape == (1, 21, 16)
    assert interpolate_pos_embed(pos, (4, 6), (2, 3)).shape == (1, 6, 16)
    assert interpolate_pos_embed(pos.double(), (4, 6), (5, 5)).dtype == torch.float64
    with pytest.raises(ValueError):
        interpolate_pos_embed(pos, (4, 4), (2, 2))  # pos does not hold a 4 x 4 grid


def test_interpolated_sincos_tracks_continuous_formula():
    dim, (h, w) = 64, (8, 6)
    pos = get_2d_sincos_pos_embed(dim, (h, w)).unsqueeze(0)
    up = interpolate_pos_embed(pos, (h, w), (2 * h, 2 * w))[0].reshape(2 * h, 2 * w, dim)
    # align_corners=False: target cell t sits at source coordinate (t + 0.5) / 2 - 0.5.
    rows = torch.arange(2 * h, dtype=torch.float64) / 2 - 0.25
    cols = torch.arange(2 * w, dtype=torch.float64) / 2 - 0.25
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    expected = get_2d_sincos_pos_embed_at(dim, grid_r, grid_c).reshape(2 * h, 2 * w, dim).float()
    interior = (slice(2, -2), slice(2, -2))  # bicubic clamps at the borders
    error = (up - expected)[interior].abs()
    assert error.max() < 0.06
    # With rows and columns swapped the error would be large: the check has teeth.
    swapped = get_2d_sincos_pos_embed_at(dim, grid_c.T, grid_r.T).reshape(2 * w, 2 * h, dim).float()
    assert (up.transpose(0, 1) - swapped)[interior].abs().max() > 0.5


# ----------------------------------------------------------------------------- apply_masks


def test_apply_masks_matches_official_order_and_grad():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    masks = random_masks(2, 3, 10, 4, gen)
    out = apply_masks(x, masks)
    ref = official_apply_masks(x, list(masks))
    assert out.shape == (6, 4, 4)
    assert torch.equal(out, ref)
    assert torch.equal(apply_masks(x, list(masks)), ref)
    assert torch.equal(apply_masks(x, masks[0]), ref[:3])
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), x)
    assert torch.equal(grad, grad_ref)
    with pytest.raises(ValueError):
        apply_masks(x, masks[:, :2])


# ----------------------------------------------------------------------------- encoder forward


@pytest.fixture
def encoder64():
    gen = torch.Generator().manual_seed(1)
    model = small_encoder().double().eval()
    randomize_(model, gen)
    return model, gen


def test_encoder_forward_matches_reference(encoder64):
    model, gen = encoder64
    images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    out = model(images)
    assert out.shape == (2, 16, 48)
    torch.testing.assert_close(out, reference_encoder(model, images), atol=1e-10, rtol=1e-10)


def test_encoder_forward_with_masks(encoder64):
    model, gen = encoder64
    images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    masks = random_masks(3, 2, 16, 5, gen)
    out = model(images, masks=masks)
    assert out.shape == (6, 5, 48)
    ref = reference_encoder(model, images, masks=list(masks))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(model(images, masks=list(masks)), ref, atol=1e-10, rtol=1e-10)
    # Masking happens before the blocks: different from masking the full output.
    assert not torch.allclose(out, apply_masks(model(images), masks))


def test_encoder_other_image_size(encoder64):
    model, gen = encoder64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 40, 56, generator=gen, dtype=torch.float64)  # grid 5 x 7
    out = model(images)
    assert out.shape == (2, 35, 48)
    grid = model.pos_embed.reshape(1, 4, 4, 48).permute(0, 3, 1, 2).float()
    pos = F.interpolate(grid, size=(5, 7), mode="bicubic", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).reshape(1, 35, 48).double()
    torch.testing.assert_close(out, reference_encoder(model, images, pos=pos), atol=1e-10, rtol=1e-10)
    masks = random_masks(1, 2, 35, 9, gen)
    torch.testing.assert_close(
        model(images, masks), reference_encoder(model, images, masks=list(masks), pos=pos), atol=1e-10, rtol=1e-10
    )
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_encoder_backward_reaches_parameters_but_not_pos_embed():
    model = small_encoder()
    masks = random_masks(1, 2, 16, 6, torch.Generator().manual_seed(0))
    model(torch.randn(2, 3, 32, 32), masks).square().mean().backward()
    assert model.pos_embed.grad is None
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "pos_embed")


# ----------------------------------------------------------------------------- predictor forward


@pytest.fixture
def predictor64():
    gen = torch.Generator().manual_seed(2)
    encoder = small_encoder()
    pred = build_predictor(encoder, pred_depth=2, pred_emb_dim=24).double().eval()
    randomize_(pred, gen)
    return pred, gen


@pytest.mark.parametrize("num_enc", [1, 2])
def test_predictor_matches_official_algorithm(predictor64, num_enc):
    pred, gen = predictor64
    batch, num_ctx, num_tgt, num_pred = 3, 7, 4, 4
    masks_enc = random_masks(num_enc, batch, 16, num_ctx, gen)
    masks_pred = random_masks(num_pred, batch, 16, num_tgt, gen)
    ctx = torch.randn(num_enc * batch, num_ctx, 48, generator=gen, dtype=torch.float64)
    out = pred(ctx, masks_enc, masks_pred)
    assert out.shape == (num_pred * num_enc * batch, num_tgt, 48)
    ref = reference_predictor(pred, ctx, list(masks_enc), list(masks_pred))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(pred(ctx, list(masks_enc), list(masks_pred)), ref, atol=1e-10, rtol=1e-10)


def test_predictor_other_grid(predictor64):
    pred, gen = predictor64
    grid, batch = (5, 7), 2
    masks_enc = random_masks(1, batch, 35, 10, gen)
    masks_pred = random_masks(2, batch, 35, 6, gen)
    ctx = torch.randn(batch, 10, 48, generator=gen, dtype=torch.float64)
    out = pred(ctx, masks_enc, masks_pred, grid_size=grid)
    pos = interpolate_pos_embed(pred.predictor_pos_embed, (4, 4), grid)
    ref = reference_predictor(pred, ctx, list(masks_enc), list(masks_pred), pos=pos)
    assert out.shape == (4, 6, 48)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert pred.predictor_pos_embed.shape == (1, 16, 24)


def test_predictor_rejects_mismatched_context(predictor64):
    pred, gen = predictor64
    masks_enc = random_masks(1, 2, 16, 5, gen)
    masks_pred = random_masks(2, 2, 16, 3, gen)
    with pytest.raises(ValueError):
        pred(torch.randn(2, 6, 48, dtype=torch.float64), masks_enc, masks_pred)


def test_predictor_accepts_num_patches_int():
    pred = VisionTransformerPredictor(16, embed_dim=48, predictor_embed_dim=24, depth=1, num_heads=3)
    assert pred.grid_size == (4, 4)
    with pytest.raises(ValueError):
        VisionTransformerPredictor(15, embed_dim=48, predictor_embed_dim=24, depth=1, num_heads=3)
