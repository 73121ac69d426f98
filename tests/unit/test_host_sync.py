"""The hot path decides on the device: a non-finite step is skipped by the fused AdamW kernel
(found_inf), counted on the device, and read by the host only at check points."""

import pytest
import torch

from pijepa.parallel.base import make_adamw, step_if_finite
from pijepa.train.skips import SkipCounter


def _model_and_optimizer(device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    opt = make_adamw(model.parameters(), torch.device(device), lr=0.1, weight_decay=0.05)
    return model, opt


def _backward(model, scale=1.0):
    (model(torch.randn(4, 6)).square().sum() * scale).backward()
    grads = [p.grad for p in model.parameters()]
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for p in model.parameters() for k, v in opt.state.get(p, {}).items()}
    return params, state


def test_adamw_is_fused_on_cpu_and_matches_the_plain_rule():
    model, opt = _model_and_optimizer()
    assert opt.defaults["fused"]
    plain = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    plain.load_state_dict(model.state_dict())
    ref = torch.optim.AdamW(plain.parameters(), lr=0.1, weight_decay=0.05, foreach=False)
    for _ in range(3):
        x = torch.randn(4, 6)
        for m, o in ((model, opt), (plain, ref)):
            m(x).square().sum().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_non_finite_step_is_skipped_on_the_device(clip):
    model, opt = _model_and_optimizer()
    applied = step_if_finite(opt, list(model.parameters()), _backward(model), clip)
    assert isinstance(applied, torch.Tensor) and bool(applied)
    before_params, before_state = _snapshot(model, opt)
    norm = _backward(model, scale=float("inf"))
    applied = step_if_finite(opt, list(model.parameters()), norm, clip)
    assert not bool(applied)
    after_params, after_state = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before_params, after_params))
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)  # moments and step
    assert all(p.grad is None for p in model.parameters())
    # and the next finite step applies again
    assert bool(step_if_finite(opt, list(model.parameters()), _backward(model), clip))
    assert not torch.equal(after_params[0], next(model.parameters()))


def test_skip_counter_counts_runs_and_totals():
    counter = SkipCounter(torch.device("cpu"))
    for applied in (True, False, False, True, False):
        counter.add(torch.tensor(applied))
    counts = counter.read()
    assert (counts.in_a_row, counts.worst_in_a_row, counts.total) == (1, 2, 3)
    counter.add(torch.tensor(False))
    counts = counter.read()  # the longest run restarts from the current one at each read
    assert (counts.in_a_row, counts.worst_in_a_row, counts.total) == (2, 2, 4)
    counter.add(torch.tensor(True))
    assert counter.read().worst_in_a_row == 2
    assert counter.read().worst_in_a_row == 0


def test_trainer_asks_every_rank_only_at_check_points(tmp_path):
    """The preemption flag (an all-reduce with several ranks) and the skip counts are read every
    logging.check_freq steps and at log and checkpoint steps, not every step."""
    from pijepa.config import load_config
    from pijepa.train.trainer import Trainer
    from tests.conftest import REPO, TINY_OVERRIDES

    cfg = load_config(REPO / "configs/cpu_default.yaml", [
        *TINY_OVERRIDES, "logging.log_freq=100", "logging.check_freq=3", "logging.checkpoint_freq=100",
        "optimization.max_steps=7", "logging.tensorboard=false", f"logging.folder={tmp_path}"])
    trainer = Trainer(cfg)
    asked, read = [], []
    any_rank, skips_read = trainer.strategy.any_rank, trainer.skips.read
    trainer.strategy.any_rank = lambda flag: asked.append(trainer.step + 1) or any_rank(flag)
    trainer.skips.read = lambda: read.append(trainer.step + 1) or skips_read()
    try:
        assert trainer.train() == 0
    finally:
        trainer.close()
    assert read == [3, 6, 7]
    assert sorted(set(asked)) == [3, 6, 7]  # step 7 also asks once more while saving
