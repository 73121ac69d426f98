"""load_encoder on official-format and pijepa-format files, and its errors on bad files."""

from __future__ import annotations

import copy

import pytest
import torch

from pijepa.models import VisionTransformer, build_predictor, load_encoder

IMG, PATCH = 32, 8


def make_models():
    """A standard-width (192, so 3 heads can be inferred) but shallow encoder, its EMA target and predictor."""
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=192, depth=2, num_heads=3)
    predictor = build_predictor(encoder, pred_depth=1, pred_emb_dim=96)
    target = copy.deepcopy(encoder)
    with torch.no_grad():  # make the two encoders differ, so loading the wrong one is caught
        for p in target.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return encoder, predictor, target


def official_checkpoint(encoder, predictor, target) -> dict:
    """Laid out like I-JEPA's save_checkpoint: DDP-wrapped ("module.") state dicts plus run info."""

    def prefixed(module):
        return {f"module.{k}": v.clone() for k, v in module.state_dict().items()}

    # A real (non-empty) optimizer state, made on a scratch copy so the saved weights stay as given.
    scratch = copy.deepcopy(encoder)
    opt = torch.optim.AdamW(scratch.parameters(), lr=1e-3)
    scratch(torch.randn(1, 3, IMG, IMG)).sum().backward()
    opt.step()
    return {
        "encoder": prefixed(encoder),
        "predictor": prefixed(predictor),
        "target_encoder": prefixed(target),
        "opt": opt.state_dict(),
        "scaler": None,
        "epoch": 3,
        "loss": 0.125,
        "batch_size": 128,
        "world_size": 16,
        "lr": 0.001,
    }


@pytest.fixture(scope="module")
def models():
    encoder, predictor, target = make_models()
    return encoder.eval(), predictor, target.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def assert_same_encoder(loaded, original, images):
    assert isinstance(loaded, VisionTransformer) and not loaded.training
    assert (loaded.embed_dim, loaded.depth, loaded.num_heads, loaded.patch_size, loaded.img_size) == (
        original.embed_dim, original.depth, original.num_heads, original.patch_size, original.img_size)
    assert not loaded.pos_embed.requires_grad
    assert loaded.state_dict().keys() == original.state_dict().keys()
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(images), original(images))


@pytest.mark.parametrize("which", ["target", "context"])
def test_load_official_format(tmp_path, models, images, which):
    encoder, predictor, target = models
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save(official_checkpoint(encoder, predictor, target), path)
    expected = target if which == "target" else encoder
    loaded = load_encoder(path, which=which)
    assert_same_encoder(loaded, expected, images)
    other = load_encoder(str(path), which="context" if which == "target" else "target")
    with torch.no_grad():
        assert not torch.equal(other(images), loaded(images))


def test_load_pijepa_format_with_model_entry(tmp_path, models, images):
    encoder, predictor, target = models
    path = tmp_path / "state.pt"
    torch.save({"format": "pijepa-checkpoint-v1", "encoder": encoder.state_dict(),
                "target_encoder": target.state_dict(), "predictor": predictor.state_dict(),
                "extra": {"model": {"model_name": "vit_tiny", "patch_size": PATCH, "img_size": IMG}}}, path)
    # model_name says 12 blocks but the file has 2: the mismatch must be reported, not ignored.
    with pytest.raises(ValueError, match="missing") as info:
        load_encoder(path)
    assert str(path) in str(info.value) and "blocks.2" in str(info.value)


def test_load_pijepa_format_vit_tiny(tmp_path, images):
    torch.manual_seed(3)
    encoder = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=192, depth=12, num_heads=3).eval()
    target = copy.deepcopy(encoder)
    path = tmp_path / "tiny.pt"
    model_entry = {"model_name": "vit_tiny", "patch_size": PATCH, "img_size": IMG}
    torch.save({"encoder": encoder.state_dict(), "target_encoder": target.state_dict(), "model": model_entry}, path)
    assert_same_encoder(load_encoder(path), encoder, images)
    with_math = load_encoder(path, attn_backend="math")
    assert with_math.attn_backend == "math"
    with torch.no_grad():
        torch.testing.assert_close(with_math(images), encoder(images), atol=1e-5, rtol=1e-5)


def test_encoder_depth_override_round_trips_through_model_entry(tmp_path, images):
    # meta.encoder_depth builds fewer blocks than the size's standard 12; the model entry the trainer
    # and `pijepa export` save must say so, or load_encoder would rebuild a 12-block encoder.
    from pijepa.config import load_config
    from pijepa.train.build import build_models, model_entry

    cfg = load_config(None, ["meta.encoder_depth=3", f"mask.patch_size={PATCH}", f"data.crop_size={IMG}"])
    models = build_models(cfg)
    assert len(models.encoder.blocks) == 3 and models.encoder.embed_dim == 192
    entry = model_entry(cfg)
    assert entry["depth"] == 3 and "depth" not in model_entry(load_config(None, []))
    path = tmp_path / "shallow.pt"
    torch.save({"encoder": models.encoder.state_dict(), "target_encoder": models.target_encoder.state_dict(),
                "model": entry}, path)
    assert_same_encoder(load_encoder(path), models.target_encoder.eval(), images)


def test_load_pijepa_format_inferred(tmp_path, models, images):
    encoder, _, target = models
    path = tmp_path / "enc.pt"
    torch.save({"encoder": encoder.state_dict(), "target_encoder": target.state_dict()}, path)
    assert_same_encoder(load_encoder(path, which="context"), encoder, images)
    assert_same_encoder(load_encoder(path), target, images)


def test_inferred_non_square_grid_needs_model_entry(tmp_path):
    encoder = VisionTransformer(img_size=(32, 48), patch_size=PATCH, embed_dim=192, depth=1, num_heads=3)
    path = tmp_path / "wide.pt"
    torch.save({"encoder": encoder.state_dict(), "target_encoder": encoder.state_dict()}, path)
    with pytest.raises(ValueError, match="square"):
        load_encoder(path)


def test_inferred_non_standard_width_rejected(tmp_path):
    encoder = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=48, depth=1, num_heads=3)
    path = tmp_path / "narrow.pt"
    torch.save({"encoder": encoder.state_dict(), "target_encoder": encoder.state_dict()}, path)
    with pytest.raises(ValueError, match="head count"):
        load_encoder(path)


def test_bad_files(tmp_path, models):
    encoder, _, _ = models
    not_dict = tmp_path / "list.pt"
    torch.save([encoder.state_dict()], not_dict)
    with pytest.raises(ValueError, match="expected a dict") as info:
        load_encoder(not_dict)
    assert str(not_dict) in str(info.value)

    no_target = tmp_path / "no_target.pt"
    torch.save({"encoder": {f"module.{k}": v for k, v in encoder.state_dict().items()}, "epoch": 1}, no_target)
    with pytest.raises(ValueError, match="target_encoder") as info:
        load_encoder(no_target, which="target")
    assert str(no_target) in str(info.value)
    assert isinstance(load_encoder(no_target, which="context"), VisionTransformer)

    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint") as info:
        load_encoder(text)
    assert str(text) in str(info.value)

    truncated = {k: v for k, v in encoder.state_dict().items() if k != "blocks.1.mlp.fc2.bias"}
    missing_key = tmp_path / "missing_key.pt"
    torch.save({"encoder": truncated, "target_encoder": truncated}, missing_key)
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.bias"):
        load_encoder(missing_key)

    bad_shape = dict(encoder.state_dict())
    bad_shape["norm.weight"] = torch.ones(7)
    shape_file = tmp_path / "bad_shape.pt"
    torch.save({"encoder": bad_shape, "target_encoder": bad_shape}, shape_file)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_encoder(shape_file)

    with pytest.raises(ValueError, match="which"):
        load_encoder(no_target, which="online")
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "absent.pth.tar")
    with pytest.raises(ValueError, match="directory"):
        load_encoder(tmp_path)
