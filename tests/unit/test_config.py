import dataclasses
import textwrap
import typing

import pytest
import yaml

from pijepa.config import Config, ConfigError, LoggingConfig, dump_config, load_config, validate
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


# ---------------------------------------------------------------- where a refusal points: file or --set


def test_set_type_error_names_set_not_the_file():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/cpu_default.yaml", ["data.batch_size=abc"])
    message = str(err.value)
    assert message.startswith("--set: data.batch_size = 'abc' is not allowed; expected int or one of auto"), message
    assert "cpu_default.yaml" not in message


def test_set_bound_error_names_set():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/cpu_default.yaml", ["data.batch_size=0"])
    assert str(err.value) == "--set: data.batch_size = 0 is not allowed; expected a positive number"
    with pytest.raises(ConfigError, match=r"^--set: dist\.zero_stage = 4 is not allowed; expected -1 \(use"):
        load_config(None, ["dist.zero_stage=4"])


def test_set_choice_and_unknown_key_errors_name_set():
    with pytest.raises(ConfigError, match=r"^--set: dist\.strategy = 'mpi' is not allowed; expected one of single, "):
        load_config(REPO / "configs/cpu_default.yaml", ["dist.strategy=mpi"])
    with pytest.raises(ConfigError, match=r"^--set: unknown key 'data\.nope'"):
        load_config(REPO / "configs/cpu_default.yaml", ["data.nope=3"])


def test_yaml_bound_error_names_the_file_even_with_other_sets(tmp_path):
    path = write(tmp_path, "data:\n  num_workers: -1\noptimization:\n  ipe_scale: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.batch_size=8"])
    assert str(err.value) == f"{path}: data.num_workers = -1 is not allowed; expected 0 or more"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.num_workers=1"])
    assert str(err.value) == f"{path}: optimization.ipe_scale = 0.0 is not allowed; expected a positive number"


def test_combination_with_a_set_key_names_the_file_and_the_set_items(tmp_path):
    path = write(tmp_path, "data:\n  crop_size: 32\nmask:\n  patch_size: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["mask.min_keep=100", "logging.log_freq=3"])
    assert str(err.value) == (
        f"{path} with --set mask.min_keep=100: mask.min_keep = 100 is not allowed; expected 1..16, the patches "
        "of the 4x4 grid (data.crop_size 32 / mask.patch_size 8)")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.crop_size=36", "logging.log_freq=3"])
    assert str(err.value).startswith(f"{path} with --set data.crop_size=36: data.crop_size = 36 is not allowed")
    other = write(tmp_path, "data:\n  crop_size: 30\n")
    with pytest.raises(ConfigError) as err:  # no key of the rule came from --set: the file alone
        load_config(other, ["logging.log_freq=3"])
    assert str(err.value).startswith(f"{other}: data.crop_size = 30 is not allowed; expected a multiple of")


def test_literal_choice_error_lists_every_choice(tmp_path):
    from pijepa.masks.multiblock import PLACEMENTS

    path = write(tmp_path, "mask:\n  placement: centre\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: mask.placement = 'centre' is not allowed; expected one of "
                              + ", ".join(PLACEMENTS))


@pytest.mark.parametrize("sets, key, expected", [
    (["data.crop_scale=[0.0, 1.0]"], "data.crop_scale = [0.0, 1.0]", "a lower bound above 0"),
    (["data.crop_scale=[0.5, 0.1]"], "data.crop_scale", "[lo, hi] with 0.0 <= lo <= hi <= 1.0"),
    (["mask.aspect_ratio=[0.0, 2.0]"], "mask.aspect_ratio", "[lo, hi] with 0.001 <= lo <= hi <= 1000.0"),
    (["optimization.ema=[0.9, 1.1]"], "optimization.ema", "[lo, hi] with 0.0 <= lo <= hi <= 1.0"),
    (["mask.num_enc_masks=2"], "mask.num_enc_masks", "1 (every published I-JEPA recipe uses one context block)"),
    (["meta.encoder_depth=-1", "meta.model_name=vit_small"], "meta.encoder_depth",
     "0 (vit_small's standard depth) or a number of blocks"),
    (["data.global_batch_size=-8"], "data.global_batch_size", "0 (= batch_size x ranks) or a positive multiple"),
    (["data.epoch_samples=-1"], "data.epoch_samples",
     "0 (the total of shards.json) or a positive number of samples"),
    (["data.synthetic_classes=1"], "data.synthetic_classes", "2 or more"),
    (["optimization.pkt_chunk_size=1"], "optimization.pkt_chunk_size", "2 or more rows"),
    (["optimization.clip_grad=-0.5"], "optimization.clip_grad", "0 or more"),
    (["logging.mask_viz_freq=-1"], "logging.mask_viz_freq", "0 (off) or a number of optimizer steps"),
    (["dist.hybrid_shard_size=-2"], "dist.hybrid_shard_size",
     "0 (ranks per node) or a positive divisor of the world size"),
    (["dist.ac_every=0"], "dist.ac_every", "a positive number"),
])
def test_declared_bounds_keep_their_messages(sets, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    message = str(err.value)
    assert message.startswith(f"--set: {key}") and message.endswith(f"is not allowed; expected {expected}"), message


@pytest.mark.parametrize("sets, expected", [
    (["meta.load_checkpoint=true"], "a checkpoint path when meta.load_checkpoint is true"),
    (["data.batch_size=6", "data.global_batch_size=16"], "a multiple of data.batch_size (6)"),
    (["data.dataset=folder"], "a path (root_path/image_folder) for data.dataset: folder"),
    (["data.dataset=webdataset"], "a shard pattern or index file for data.dataset: webdataset"),
    (["optimization.epochs=3", "optimization.warmup=4"], "at most optimization.epochs (3)"),
    (["optimization.loss_function=L2_PKT_chunks", "optimization.pkt_grouping=image"],
     "chunk with loss_function L2_PKT_chunks"),
])
def test_combinations_are_checked(sets, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert str(err.value).startswith("<defaults> with --set ") and str(err.value).endswith(expected)


def test_validate_rechecks_a_config_changed_in_code():
    cfg = Config()
    cfg.data.batch_size = 0
    with pytest.raises(ConfigError, match=r"^pijepa bench data: data\.batch_size = 0 is not allowed"):
        validate(cfg, "pijepa bench data")
    cfg = Config()
    cfg.data.dataset = "webdataset"
    with pytest.raises(ConfigError, match=r"^pijepa bench data: data\.shards = '' is not allowed"):
        validate(cfg, "pijepa bench data")
    cfg.data.shards = "a-{000..003}.tar"
    validate(cfg, "pijepa bench data")


def test_bare_name_loads_the_packaged_config():
    assert load_config("cpu_default") == load_config(REPO / "configs/cpu_default.yaml")
    with pytest.raises(ConfigError, match="no packaged config file"):
        load_config("no_such_recipe")


def test_set_fills_an_empty_yaml_section(tmp_path):
    assert load_config(write(tmp_path, "data:\nmask:\n"), ["data.batch_size=8"]).data.batch_size == 8


def test_every_choice_list_is_the_one_its_module_exports():
    from pijepa.config import DataConfig, MaskConfig, MetaConfig, OptimizationConfig
    from pijepa.data import DATASETS
    from pijepa.data.wds import MODES
    from pijepa.losses.pkt import GROUPINGS
    from pijepa.losses.registry import LOSS_NAMES
    from pijepa.masks.multiblock import PLACEMENTS
    from pijepa.models.attention import ATTN_BACKENDS
    from pijepa.models.vit import MODEL_NAMES, WEIGHT_INITS
    from pijepa.parallel.options import AC_MODES, FSDP_SHARDINGS, STRATEGIES, DistConfig

    owners = {
        (MetaConfig, "model_name"): MODEL_NAMES, (MetaConfig, "attn_backend"): ATTN_BACKENDS,
        (MetaConfig, "weight_init"): WEIGHT_INITS,
        (DataConfig, "dataset"): DATASETS, (DataConfig, "wds_mode"): MODES,
        (MaskConfig, "placement"): PLACEMENTS, (OptimizationConfig, "loss_function"): LOSS_NAMES,
        (OptimizationConfig, "pkt_grouping"): GROUPINGS, (DistConfig, "strategy"): STRATEGIES,
        (DistConfig, "fsdp_sharding"): FSDP_SHARDINGS, (DistConfig, "activation_checkpointing"): AC_MODES,
    }
    found = {}
    for section in (MetaConfig, DataConfig, MaskConfig, OptimizationConfig, LoggingConfig, DistConfig):
        for name, hint in typing.get_type_hints(section).items():
            if typing.get_origin(hint) is typing.Literal:
                found[section, name] = typing.get_args(hint)
    assert found == owners  # every Literal field is listed, and each agrees with its owner's tuple
    for (section, name), choices in owners.items():
        assert getattr(section(), name) in choices, (section.__name__, name)


def test_every_field_of_the_defaults_is_within_its_bounds():
    from pijepa.runtime.schema import checks_of

    cfg = Config()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        for f in dataclasses.fields(value):
            for check in checks_of(f):
                assert check.allows(getattr(value, f.name)), (section.name, f.name)


def test_fused_loss_auto_picks_the_faster_path_per_device():
    """The fused loss is 0.79x the plain path on CPU for chunk and block grouping, 21.6x
    faster for image grouping, 25-127x faster on a GPU (`pijepa bench loss`)."""
    import torch

    from pijepa.train.build import use_fused_loss

    cfg = load_config(REPO / "configs/cpu_default.yaml")
    assert cfg.optimization.fused_loss == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_fused_loss(cfg, cpu) and use_fused_loss(cfg, cuda)
    image = load_config(REPO / "configs/cpu_default.yaml", ["optimization.pkt_grouping=image"])
    assert use_fused_loss(image, cpu)
    forced = load_config(REPO / "configs/cpu_default.yaml", ["optimization.fused_loss=true"])
    assert forced.optimization.fused_loss is True and use_fused_loss(forced, cpu)
    refused = r"^--set: optimization\.fused_loss = 'maybe' is not allowed; expected bool or one of auto"
    with pytest.raises(ConfigError, match=refused):
        load_config(REPO / "configs/cpu_default.yaml", ["optimization.fused_loss=maybe"])
