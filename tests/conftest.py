import itertools
import os
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

# Tiny but real: ViT-Tiny at 32 px with patch 8 (4x4 grid), synthetic data, fp32 on CPU.
TINY_OVERRIDES = [
    "data.dataset=synthetic", "data.synthetic_images=256", "data.batch_size=8", "data.crop_size=32",
    "data.num_workers=0", "mask.patch_size=8", "mask.min_keep=2", "meta.model_name=vit_tiny",
    "meta.pred_depth=2", "meta.pred_emb_dim=48", "optimization.epochs=2", "optimization.warmup=0.5",
    "logging.log_freq=5", "logging.checkpoint_freq=10", "logging.tensorboard=true",
]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m pijepa ...` in a fresh process, as a user would."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pijepa", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def launch_env(threads: int, **extra: str) -> dict:
    """This process's environment without a torchrun launch's variables, for starting a fresh run."""
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    return {**env, "OMP_NUM_THREADS": str(threads), **extra}


def free_port(ports: Iterable[int]) -> int:
    """The first of `ports` that can be bound on loopback (each test file owns a range)."""
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in this test file's range")


def cifar_shards(factory, name: str, per_class: int, per_shard: int) -> Path:
    """Webdataset shards (and shards.json) of the first `per_class` real CIFAR-10 train images of
    each class, in a fresh folder of `factory` (tmp_path_factory); the test skips without the data."""
    from pijepa.data.shards import write_shards

    src = DATA / "cifar10" / "train"
    if not src.is_dir():
        pytest.skip(f"real image data not found at {src}")
    root = factory.mktemp(name)
    out = root / "shards"
    write_shards(tar_subset(src, root / "src", per_class), out, samples_per_shard=per_shard, progress=False)
    return out


def tar_subset(src: Path, dst: Path, n: int) -> Path:
    """dst/<class>.tar with the first n members of each real per-class tar in src."""
    dst.mkdir(parents=True)
    for tar_path in sorted(src.glob("*.tar")):
        with tarfile.open(tar_path) as tf, tarfile.open(dst / tar_path.name, "w") as out:
            for member in itertools.islice((m for m in tf if m.isfile()), n):
                out.addfile(member, tf.extractfile(member))
    return dst


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real image data not found at {DATA}")
    return DATA


# ---------------------------------------------------------------- the suite's disk
#
# A passing test's tmp_path is removed when it ends (pytest.ini: tmp_path_retention_policy). The
# folders a module's fixtures make with tmp_path_factory (shared run folders, shards) would stay
# until the session ends and add up to many GB; they are removed once the module is done, unless
# one of its tests failed (then they stay for inspection).

_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _FAILED_MODULES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module", autouse=True)
def _remove_module_folders(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__name__ in _FAILED_MODULES:
        return
    import shutil

    for path in set(base.iterdir()) - before:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
