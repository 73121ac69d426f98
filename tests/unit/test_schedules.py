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


class _ReferenceWarmupCosine:
    """I-JEPA's WarmupCosineSchedule, written from its rule: step() advances first, then sets the lr."""

    def __init__(self, warmup_steps, start_lr, ref_lr, final_lr, t_max):
        self.warmup, self.start, self.ref, self.final, self.t_max, self._step = (
            warmup_steps, start_lr, ref_lr, final_lr, t_max - warmup_steps, 0)

    def step(self):
        self._step += 1
        if self._step < self.warmup:
            return self.start + self._step / max(1, self.warmup) * (self.ref - self.start)
        progress = (self._step - self.warmup) / max(1, self.t_max)
        return max(self.final, self.final + (self.ref - self.final) * 0.5 * (1 + math.cos(math.pi * progress)))


class _ReferenceCosineWD:
    def __init__(self, ref_wd, final_wd, t_max):
        self.ref, self.final, self.t_max, self._step = ref_wd, final_wd, t_max, 0

    def step(self):
        self._step += 1
        progress = self._step / self.t_max
        wd = self.final + (self.ref - self.final) * 0.5 * (1 + math.cos(math.pi * progress))
        return max(self.final, wd) if self.final <= self.ref else min(self.final, wd)


def test_optimizer_step_k_uses_the_value_ijepa_uses():
    """I-JEPA calls scheduler.step() and wd_scheduler.step() before every optimizer step, and draws
    the EMA momentum from a generator starting at i = 0 after it."""
    opt = OptimizationConfig(epochs=10, warmup=2, start_lr=2e-4, lr=1e-3, final_lr=1e-6,
                             weight_decay=0.04, final_weight_decay=0.4, ema=(0.996, 1.0), ipe_scale=1.0)
    ipe = 50
    s = build_schedules(opt, steps_per_epoch=ipe)
    lr_ref = _ReferenceWarmupCosine(int(opt.warmup * ipe), opt.start_lr, opt.lr, opt.final_lr, s.total)
    wd_ref = _ReferenceCosineWD(opt.weight_decay, opt.final_weight_decay, s.total)
    momentum_ref = (opt.ema[0] + i * (opt.ema[1] - opt.ema[0]) / s.total for i in range(s.total + 1))
    for k in range(s.total):
        assert math.isclose(s.lr_for_step(k), lr_ref.step(), rel_tol=1e-12), k
        assert math.isclose(s.wd_for_step(k), wd_ref.step(), rel_tol=1e-12), k
        assert math.isclose(s.momentum_for_step(k), next(momentum_ref), rel_tol=1e-12), k
    assert math.isclose(s.lr_for_step(0), 2e-4 + (1e-3 - 2e-4) / 100)
    assert math.isclose(s.lr_for_step(s.total - 1), 1e-6)  # the last step reaches final_lr
