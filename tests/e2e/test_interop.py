"""A trained encoder opens in timm and in Hugging Face transformers: `pijepa export --format timm |
hf` of a real (tiny) run, loaded by the real libraries with strict keys, gives pijepa's patch
tokens and mean-pooled features within 1e-5 (fp32), at the training resolution and at a larger one
(the positional table interpolated by each library)."""

from __future__ import annotations

import json

import pytest
import torch

from pijepa import load_encoder
from tests.conftest import TINY_OVERRIDES, run_cli

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

SIZES = (32, 48)  # the training crop, and a 6x6 grid instead of 4x4


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    sets = [a for s in [*TINY_OVERRIDES, "optimization.max_steps=2", "logging.tensorboard=false",
                        f"logging.folder={root / 'run'}"] for a in ("--set", s)]
    r = run_cli("train", "--config", "cpu_default", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    paths = {"pijepa": root / "encoder.pt", "timm": root / "encoder.safetensors", "hf": root / "hf"}
    for fmt, out in paths.items():
        r = run_cli("export", "--run", str(root / "run"), "--out", str(out), "--format", fmt)
        assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export", "--run", str(root / "run"), "--out", str(root / "context.safetensors"), "--format", "timm",
                "--which", "context")
    assert r.returncode == 0, r.stderr[-3000:]
    return {**paths, "timm_context": root / "context.safetensors"}


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))


def timm_model(path, size: int):
    """As the export's JSON says; at another size made for it and loaded through timm's own filter,
    told to resize the positional table as pijepa (and transformers) do: bicubic, no antialiasing."""
    from functools import partial

    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    spec = json.loads(path.with_name(path.name + ".json").read_text())
    model = timm.create_model(spec["architecture"], pretrained=False, **{**spec["model_args"], "img_size": size})
    if size == spec["model_args"]["img_size"]:
        model.load_state_dict(load_file(path), strict=True)
    else:
        resize = partial(checkpoint_filter_fn, antialias=False)
        timm.models.load_checkpoint(model, str(path), strict=True, filter_fn=resize)
    return model.eval(), spec


@pytest.mark.parametrize("which", ["target", "context"])
def test_timm_gives_pijepas_features(exports, which):
    ours = load_encoder(exports["pijepa"], which=which)
    with torch.no_grad():
        for size in SIZES:
            model, spec = timm_model(exports["timm" if which == "target" else "timm_context"], size)
            assert spec["which"] == which and spec["pijepa_config"]["meta"]["model_name"] == "vit_tiny"
            x = images(size)
            tokens, theirs = ours(x), model.forward_features(x)
            torch.testing.assert_close(theirs, tokens, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.forward_head(theirs, pre_logits=True), tokens.mean(1), atol=1e-5, rtol=0)


def test_transformers_gives_pijepas_features(exports):
    model, info = transformers.IJepaModel.from_pretrained(exports["hf"], output_loading_info=True)
    assert not any(info.values()), info  # strict: nothing missing, unexpected or mismatched
    model.eval()
    config = json.loads((exports["hf"] / "config.json").read_text())
    assert config["pijepa"]["which"] == "target" and config["layer_norm_eps"] == 1e-6
    processor = json.loads((exports["hf"] / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406]  # I-JEPA's ImageNet statistics, not 0.5
    ours = load_encoder(exports["pijepa"])
    with torch.no_grad():
        for size in SIZES:
            x = images(size)
            theirs = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
            torch.testing.assert_close(theirs, ours(x), atol=1e-5, rtol=0)
            torch.testing.assert_close(theirs.mean(1), ours(x).mean(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["timm", "hf"])
def test_pijepa_reads_the_exports_back(exports, fmt):
    """`pijepa.load_encoder` (and so `pijepa features`) opens timm and transformers files too."""
    ours, theirs = load_encoder(exports["pijepa"]), load_encoder(exports[fmt])
    with torch.no_grad():
        for size in SIZES:
            x = images(size)
            assert torch.equal(theirs(x), ours(x))


def test_features_from_a_transformers_folder(exports, tmp_path):
    import numpy as np
    from PIL import Image

    from pijepa.cli import main

    data, rng = tmp_path / "images", np.random.default_rng(0)
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / label / f"{i}.png")
    out = tmp_path / "features.pt"
    assert main(["features", "--encoder", str(exports["hf"]), "--data", str(data), "--out", str(out),
                 "--batch-size", "4", "--workers", "0", "--no-progress"]) == 0
    features = torch.load(out, weights_only=True)["features"]
    assert features.shape == (6, 192) and torch.isfinite(features).all()
