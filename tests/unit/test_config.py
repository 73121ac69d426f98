import textwrap

import pytest
import yaml

from pijepa.config import Config, ConfigError, dump_config, load_config
from tests.conftest import REPO

# The published I-JEPA ViT-H/14 recipe, key for key (only its data paths would change).
IJEPA_YAML = textwrap.dedent("""
    data:
      batch_size: 128
      color_jitter_strength: 0.0
      crop_scale: [0.3, 1.0]
      crop_size: 224
      image_folder: imagenet_full_size/061417/
      num_workers: 10
      pin_mem: true
      root_path: /datasets
      use_color_distortion: false
      use_gaussian_blur: false
      use_horizontal_flip: false
    logging:
      folder: /logs/vith14.224-bs.2048-ep.300/
      write_tag: jepa
    mask:
      allow_overlap: false
      aspect_ratio: [0.75, 1.5]
      enc_mask_scale: [0.85, 1.0]
      min_keep: 10
      num_enc_masks: 1
      num_pred_masks: 4
      patch_size: 14
      pred_mask_scale: [0.15, 0.2]
    meta:
      copy_data: false
      load_checkpoint: false
      model_name: vit_huge
      pred_depth: 12
      pred_emb_dim: 384
      read_checkpoint: null
      use_bfloat16: true
    optimization:
      ema: [0.996, 1.0]
      epochs: 300
      final_lr: 1.0e-06
      final_weight_decay: 0.4
      ipe_scale: 1.0
      lr: 0.001
      start_lr: 0.0002
      warmup: 40
      weight_decay: 0.04
""")


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_ijepa_yaml_loads_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, IJEPA_YAML.replace("batch_size: 128", "batch_size: 128\n  dataset: folder")))
    assert cfg.meta.model_name == "vit_huge" and cfg.mask.patch_size == 14
    assert cfg.data.crop_scale == (0.3, 1.0) and cfg.optimization.ema == (0.996, 1.0)
    assert cfg.optimization.final_lr == 1e-6 and cfg.optimization.warmup == 40.0


@pytest.mark.parametrize("name", ["cpu_default", "in1k_vith14_ep300", "in1k_vith16-448_ep300",
                                  "in22k_vith14_ep66", "in22k_vitg16_ep44"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.optimization.loss_function in ("L2_PKT", "L2_PKT_chunks")
    if name != "cpu_default":
        assert cfg.data.global_batch_size == 2048


def test_overrides_are_typed_and_dump_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/cpu_default.yaml",
                      ["data.batch_size=16", "data.crop_scale=[0.5, 1.0]", "optimization.lr=1e-4",
                       "meta.use_bfloat16=true", "optimization.loss_function=L2"])
    assert cfg.data.batch_size == 16 and cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.optimization.lr == 1e-4 and cfg.meta.use_bfloat16 is True
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["batch_size"] == 16


@pytest.mark.parametrize("text, words", [
    ("data:\n  batch_sise: 4\n", ["data.batch_sise", "allowed keys", "batch_size"]),
    ("data:\n  batch_size: four\n", ["data.batch_size", "expected int"]),
    ("data:\n  crop_size: 32\nmask:\n  patch_size: 8\n  min_keep: 17\n", ["mask.min_keep", "1..16", "4x4"]),
    ("meta:\n  model_name: vit_enormous\n", ["meta.model_name", "vit_huge"]),
    ("optimization:\n  loss_function: L3\n", ["optimization.loss_function", "L2_PKT"]),
    ("meta:\n  encoder_depth: -2\n", ["meta.encoder_depth", "standard depth"]),
    ("mask:\n  pred_mask_scale: [0.3, 0.1]\n", ["mask.pred_mask_scale"]),
    ("data: [1, 2]\n", ["data must be a mapping"]),
    ("data:\n  crop_size: 30\n", ["data.crop_size", "multiple of mask.patch_size"]),
    ("data: {batch_size: [\n", ["does not parse as YAML"]),
])
def test_bad_configs_name_file_and_key(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_bad_override_is_refused():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["batch_size=3"])
    with pytest.raises(ConfigError, match="unknown key 'data.nope'"):
        load_config(None, ["data.nope=3"])


def test_defaults_are_valid():
    assert load_config(None) == Config()
