"""What `pijepa reproduce` compares, as data: the arm type (the pretrained arms themselves come from
`--arms`, see `arms`), the random encoder, the evaluation sets, the metrics and the folder layout
under OUT. The stages, the report and the plots iterate over these, so another evaluation set or
metric is one entry here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Arm:
    """One encoder per seed: the config plus `sets` (pretrained), or the untrained init (`random`)."""

    key: str  # results key and run-name prefix: runs/<key>_s<seed>
    label: str  # row label in the report's tables
    sets: tuple[str, ...]  # --set overrides that make this arm differ from the base config
    color: str  # matplotlib colour in the plots

    def name(self, seed: int) -> str:
        return f"{self.key}_s{seed}"


RANDOM = Arm("random", "random init", (), "tab:gray")
BASELINE = "L2"  # every other pretrained arm gets a paired "arm − L2" comparison when L2 is among --arms
DEFAULT_ARMS = "L2,L2_PKT"


SPLITS = ("train", "test")


@dataclass(frozen=True)
class EvalSet:
    """A labelled dataset under --data (`<name>/train`, `<name>/test`, per-class tars)."""

    name: str
    # the reproduce option that limits each split's images (None: always all of them)
    limit_options: dict[str, str | None] = field(default_factory=dict)
    # images per class of the small copies that --smoke evaluates on
    smoke_per_class: dict[str, int] = field(default_factory=dict)


EVAL_SETS = (
    EvalSet("cifar10", {"train": "train_limit", "test": "test_limit"}, {"train": 16, "test": 8}),
    EvalSet("intel-scenes", {"train": "intel_train_limit", "test": None}, {"train": 10, "test": 5}),
)
DEFAULT_PRETRAIN = "cifar10"  # --pretrain: whose train split is written to shards and pretrained on


@dataclass(frozen=True)
class Metric:
    key: str  # results key
    label: str  # table column
    protocol: str  # knn.json protocol, or "linear" for linear.json
    k: int = 0


METRICS = (
    Metric("knn20", "k-NN k=20 (cos, weighted)", "weighted_cosine", 20),
    Metric("knn5", "k-NN k=5 (paper: eucl., vote)", "euclidean_majority", 5),
    Metric("linear", "linear top-1", "linear"),
)
# Every k the weighted k-NN computes (the report reads the ones METRICS names), its temperature,
# and the paper's Euclidean majority-vote k.
KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
PAPER_K = next(m.k for m in METRICS if m.protocol == "euclidean_majority")
LINEAR_SEED = 0
SHARD_SEED = 0


@dataclass(frozen=True)
class Smoke:
    """--smoke: a few steps on a few hundred images; checks the pipeline, the numbers mean nothing."""

    max_steps: int = 3
    batch_size: int = 8
    samples_per_shard: int = 64
    linear_epochs: int = 3
    sets: tuple[str, ...] = ("logging.log_freq=1", "logging.checkpoint_freq=1000", "logging.tensorboard=false",
                             "data.num_workers=0", "data.shuffle_buffer=64")


SMOKE = Smoke()
SAMPLES_PER_SHARD = 5000


@dataclass(frozen=True)
class Layout:
    """Where every stage writes, under OUT."""

    out: Path

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def shard_index(self) -> Path:
        return self.shards / "shards.json"

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def encoder(self, name: str) -> Path:
        return self.out / "encoders" / f"{name}.pt"

    def features(self, name: str, ds: str, split: str) -> Path:
        return self.out / "features" / name / f"{ds}_{split}.pt"

    def eval_dir(self, name: str, ds: str) -> Path:
        return self.out / "eval" / name / ds

    def log(self, stage: str) -> Path:
        return self.out / "logs" / f"{stage}.log"

    @property
    def smoke_src(self) -> Path:
        return self.out / "smoke_src"


def shown(path: Path) -> str:
    """A path as typed in the folder the command runs in: relative below it, absolute elsewhere."""
    path = Path(os.path.abspath(path))
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if rel.startswith("..") else rel
