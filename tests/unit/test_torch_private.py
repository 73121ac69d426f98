"""The private torch APIs that pijepa.runtime.torch_private rests on, as the pinned torch has them.

torch does not promise to keep these; a torch upgrade that moves or changes one fails here, with
the API named, before any trace gives a wrong answer. Then fix torch_private.py (and only it)."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pijepa.runtime import torch_private as tp

PRIVATE_NAMES = {
    "torch._guards": ("active_fake_mode",),
    "torch._subclasses.fake_tensor": ("FakeTensorMode",),
    "torch.testing._internal.distributed.fake_pg": ("FakeStore",),
    "torch.distributed.tensor._sharding_prop": ("detect_fake_mode", "ShardingPropagator"),
    "torch.distributed._tools.fsdp2_mem_tracker": ("FSDPMemTracker", "_FSDPRefType"),
    "torch.distributed.distributed_c10d": ("_resolve_process_group",),
    "torch.utils._python_dispatch": ("TorchDispatchMode",),
}
TRACKER_METHODS = ("_fsdp_state_pre_forward", "_update_peak_stats", "get_tracker_snapshot", "reset_mod_stats")
REF_TYPES = ("SHARDED_PARAM", "UNSHARDED_PARAM", "BUFFER", "SHARDED_GRAD", "UNSHARDED_GRAD", "ACT", "TEMP",
             "ALL_GATHER", "REDUCE_SCATTER", "OPT", "INP")


@pytest.mark.parametrize("module", sorted(PRIVATE_NAMES))
def test_private_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    for name in PRIVATE_NAMES[module]:
        assert hasattr(mod, name), f"torch changed a private API pijepa uses: {module}.{name} is gone"


def test_fsdp_memory_tracker_internals() -> None:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType

    for name in TRACKER_METHODS:
        assert callable(getattr(FSDPMemTracker, name, None)), f"FSDPMemTracker.{name} is gone"
    for name in REF_TYPES:
        assert hasattr(_FSDPRefType, name), f"_FSDPRefType.{name} is gone"
    init = inspect.getsource(FSDPMemTracker.__init__) + inspect.getsource(FSDPMemTracker._instrument_fsdp_module)
    for used in ("self._root_mod", "self._root_mod.modules()"):
        assert used in init, f"FSDPMemTracker no longer keeps or walks {used}"
    source = inspect.getsource(FSDPMemTracker.__torch_dispatch__)
    for used in ("self._in_opt", "self._mod_tracker.is_bw", "_update_peak_stats"):
        assert used in source, f"FSDPMemTracker.__torch_dispatch__ no longer uses {used}"
    from torch.distributed._tools.mod_tracker import ModTracker

    tracker = ModTracker()
    assert hasattr(tracker, "_known_modules") and hasattr(tracker, "parents"), "ModTracker's names changed"


def test_sharding_propagation_still_asks_for_the_ambient_fake_mode() -> None:
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    assert "detect_fake_mode()" in inspect.getsource(ShardingPropagator), (
        "DTensor's sharding propagation no longer calls detect_fake_mode(); torch_private.fake_tensors patches it")


@pytest.mark.parametrize("op,arguments", [
    ("_allgather_base_", ("output_tensor", "process_group")),
    ("_reduce_scatter_base_", ("input_tensor", "process_group")),
    ("allreduce_", ("tensors", "process_group")),
    ("broadcast_", ("tensors", "process_group")),
    ("allgather_into_tensor_coalesced_", ("outputs", "process_group")),
    ("reduce_scatter_tensor_coalesced_", ("inputs", "process_group")),
])
def test_c10d_op_schemas(op: str, arguments: tuple[str, ...]) -> None:
    names = [a.name for a in getattr(torch.ops.c10d, op).default._schema.arguments]
    for name in arguments:
        assert name in names, f"c10d::{op} has no argument {name} any more: {names}"
    assert hasattr(dist.ProcessGroup, "unbox"), "ProcessGroup.unbox (a c10d op's group argument) is gone"


def test_fake_world_and_tensors_come_and_go() -> None:
    detect = importlib.import_module("torch.distributed.tensor._sharding_prop").detect_fake_mode
    with tp.fake_world(8, 4):
        assert dist.get_world_size() == 8 and dist.get_rank() == 0
        with tp.fake_tensors():
            assert tp.in_fake_mode()
            x = torch.empty(1 << 40, dtype=torch.uint8)  # a terabyte, without storage
            assert x.numel() == 1 << 40
        assert not tp.in_fake_mode()
    assert not dist.is_initialized()
    assert importlib.import_module("torch.distributed.tensor._sharding_prop").detect_fake_mode is detect


def test_collective_counter_counts_what_each_rank_moves() -> None:
    with tp.fake_world(4, 4), tp.CollectiveCounter() as counter:
        dist.all_reduce(torch.ones(1000))
        dist.all_gather_into_tensor(torch.empty(4000), torch.ones(1000))
        dist.reduce_scatter_tensor(torch.empty(1000), torch.ones(4000))
        dist.broadcast(torch.ones(10), src=0)
    t = counter.tallies
    assert (t["all_reduce"].count, t["all_reduce"].payload, t["all_reduce"].moved) == (1, 4000, 2 * 4000 * 3 / 4)
    assert (t["all_gather"].count, t["all_gather"].payload, t["all_gather"].moved) == (1, 16000, 16000 * 3 / 4)
    assert (t["reduce_scatter"].count, t["reduce_scatter"].payload) == (1, 16000)
    assert t["broadcast"].count == 1 and t["other"].count == 0


class _Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(64, 64) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x).relu()
        return x


def test_memory_tracker_follows_three_fsdp_models_through_micro_steps() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with tp.fake_world(4, 4):
        mesh = init_device_mesh("cpu", (4,))  # outside fake mode: making a mesh reads ranks on the host
        with tp.fake_tensors():
            tracker = _train_three_towers(mesh, fully_shard)
    phases = set(tracker.phase_peaks)
    assert {"target forward", "encoder forward", "predictor forward", "predictor backward", "encoder backward",
            "optimizer step"} <= phases, phases
    sharded = 3 * 2 * (64 * 64 + 64) * 4 // 4  # three models, two layers, fp32, a quarter each
    assert all(peak["params"] == sharded for peak in tracker.phase_peaks.values())
    # m and v of the two trained models, and a step count per parameter tensor (8 of them)
    assert tracker.phase_peaks["optimizer step"]["optimizer"] == 2 * sharded * 2 // 3 + 8 * 4


def _train_three_towers(mesh, fully_shard):
    models = {name: _Tower() for name in ("target", "encoder", "predictor")}
    for model in models.values():
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    models["target"].requires_grad_(False)
    params = [p for name in ("encoder", "predictor") for p in models[name].parameters()]
    optimizer = torch.optim.AdamW(params, fused=True)  # the plain loop reads the step count on the host
    tracker = tp.memory_tracker(models, optimizer)
    with tracker:
        for _ in range(2):  # a second forward of each root: the next micro-step
            x = torch.randn(32, 64)
            with torch.no_grad():
                models["target"](x)
            models["predictor"](models["encoder"](x)).sum().backward()
        optimizer.step()
    return tracker
