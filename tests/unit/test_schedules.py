import math

from pijepa.config import OptimizationConfig
from pijepa.train.schedules import build_schedules


def test_schedules_follow_ijepa():
    opt = OptimizationConfig(epochs=10, warmup=2, start_lr=2e-4, lr=1e-3, final_lr=1e-6,
                             weight_decay=0.04, final_weight_decay=0.4, ema=(0.996, 1.0), ipe_scale=1.0)
    s = build_schedules(opt, steps_per_epoch=100)
    assert s.warmup_steps == 200 and s.total == 1000
    assert math.isclose(s.lr_at(0), 2e-4) and math.isclose(s.lr_at(100), 6e-4)
    assert math.isclose(s.lr_at(200), 1e-3)
    assert math.isclose(s.lr_at(600), 1e-6 + (1e-3 - 1e-6) * 0.5)  # halfway through the cosine
    assert math.isclose(s.lr_at(1000), 1e-6)
    assert math.isclose(s.wd_at(0), 0.04) and math.isclose(s.wd_at(500), 0.22) and math.isclose(s.wd_at(1000), 0.4)
    assert math.isclose(s.momentum_at(0), 0.996) and math.isclose(s.momentum_at(500), 0.998)
    assert s.momentum_at(5000) == 1.0


def test_ipe_scale_stretches_the_horizon():
    opt = OptimizationConfig(epochs=10, warmup=1, ipe_scale=1.25)
    s = build_schedules(opt, steps_per_epoch=100)
    assert s.total == 1250 and s.momentum_at(1000) < 1.0
