import os
import subprocess
import sys
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


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real image data not found at {DATA}")
    return DATA
