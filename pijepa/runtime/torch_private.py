"""Every private torch API pijepa uses to rehearse a run on fake tensors, in this one module.

`pijepa plan --trace` (pijepa.rehearsal) runs the real strategy and train step at the recipe's world
size in one process: fake tensors (shapes, dtypes and devices, no storage), a fake process group
(collectives that return at once), torch's FSDP2 memory tracker and a count of the collectives. All
of it rests on APIs that torch does not promise to keep; torch is pinned (setup.py), and
tests/unit/test_torch_private.py fails loudly, naming the API, when an upgrade changes one.

- FakeTensorMode, active_fake_mode: torch._subclasses / torch._guards.
- The fake process group: torch.testing._internal.distributed.fake_pg registers the "fake" backend;
  FakeStore is its no-op rendezvous.
- FSDPMemTracker (torch.distributed._tools.fsdp2_mem_tracker) and its ModTracker: it takes one FSDP
  root; `PhaseMemoryTracker` gives it the three models and records a peak per phase of the step.
- DTensor's sharding propagation computes output shapes on fake tensors of the full (unsharded)
  size; under an outer fake mode it reuses that mode, and the tracker would count them as memory.
  `fake_tensors` makes it use a fake mode of its own, as it does outside any fake mode.
- A TorchDispatchMode (torch.utils._python_dispatch) that sees every c10d collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

COLLECTIVE_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "other")
MEMORY_CATEGORIES = ("params", "grads", "optimizer", "activations", "gathered", "comm_buffers", "temporaries")


def in_fake_mode() -> bool:
    """Whether tensors made now are fake (a FakeTensorMode is active)."""
    from torch._guards import active_fake_mode

    return active_fake_mode() is not None


@contextlib.contextmanager
def fake_world(world_size: int, local_world_size: int) -> Iterator[None]:
    """This process as rank 0 of `world_size` ranks (`local_world_size` per node) on the fake
    backend; the launch variables a strategy reads are set meanwhile and restored after."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(RANK="0", WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(local_world_size))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def fake_tensors() -> Iterator[None]:
    """Fake tensors for everything made inside; real tensors made before (models on meta, index
    tensors) are accepted and turned fake where they meet fake ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor import _sharding_prop

    detect = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args, **kwargs: None
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        _sharding_prop.detect_fake_mode = detect


# ---------------------------------------------------------------- collectives


@dataclass
class CollectiveTally:
    """Collectives of one kind: how many, the bytes of their tensors, and the bytes one rank moves
    (ring algorithms: an all-gather or reduce-scatter of X bytes over g ranks moves X (g-1)/g, an
    all-reduce twice that, anything else X)."""

    count: int = 0
    payload: float = 0.0
    moved: float = 0.0


def _group_size(value: Any) -> int:
    """Ranks of a c10d ProcessGroup script object, or of the group a functional collective names."""
    if isinstance(value, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(value).size()  # type: ignore[arg-type]
    return dist.ProcessGroup.unbox(value).size()  # the op receives the group boxed as a ScriptObject


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _kind(name: str) -> str:
    for kind, marks in (("all_gather", ("allgather", "all_gather")), ("reduce_scatter", ("reduce_scatter",)),
                        ("all_reduce", ("allreduce", "all_reduce")), ("broadcast", ("broadcast",))):
        if any(mark in name for mark in marks):
            return kind
    return "other"


# The argument that holds what a collective moves, by the kind of collective and its namespace.
_SIZED_ARGUMENT = {"all_gather": ("output_tensor", "output_tensors", "outputs"),
                   "reduce_scatter": ("input_tensor", "input_tensors", "inputs")}


def _describe(func: Any, args: tuple, kwargs: dict) -> tuple[str, int, int] | None:
    """(kind, payload bytes, group size) of a c10d op, or None for any other op."""
    namespace = func.namespace
    if namespace not in ("c10d", "_c10d_functional") or func.__name__.startswith(("wait", "barrier", "monitored")):
        return None
    schema = func._schema.arguments
    bound = {a.name: (args[i] if i < len(args) else kwargs.get(a.name)) for i, a in enumerate(schema)}
    if not {"process_group", "group_name", "group_size"} & set(bound):
        return None  # not a collective (a work handle's or a tensor's bookkeeping)
    kind = _kind(func.__name__)
    if namespace == "c10d":
        names = _SIZED_ARGUMENT.get(kind, ("tensors", "tensor", "input_tensors", "output_tensors"))
        payload = next((_tensor_bytes(bound[n]) for n in names if n in bound), 0)
        return kind, payload, _group_size(bound["process_group"])
    payload = _tensor_bytes(bound.get("input", bound.get("inputs")))
    group = int(bound["group_size"] or 0) if "group_size" in bound else _group_size(bound["group_name"])
    return kind, payload * (group if kind == "all_gather" else 1), group


class CollectiveCounter:
    """Counts every collective issued while active (c10d's in-place ops, which FSDP2 and DeepSpeed
    call, and the functional ones DTensor calls), on real or fake process groups alike."""

    def __init__(self) -> None:
        self.tallies: dict[str, CollectiveTally] = {kind: CollectiveTally() for kind in COLLECTIVE_KINDS}
        self._mode = _counting_mode(self)

    def record(self, kind: str, payload: int, group: int) -> None:
        tally = self.tallies[kind]
        tally.count += 1
        tally.payload += payload
        share = (group - 1) / group if group > 1 else 0.0
        tally.moved += {"all_gather": payload * share, "reduce_scatter": payload * share,
                        "all_reduce": 2 * payload * share}.get(kind, payload if group > 1 else 0.0)

    def reset(self) -> None:
        for tally in self.tallies.values():
            tally.count, tally.payload, tally.moved = 0, 0.0, 0.0

    def __enter__(self) -> CollectiveCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


def _counting_mode(counter: CollectiveCounter) -> Any:
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(t is DTensor for t in types):
                return NotImplemented  # DTensor first turns itself into local ops and collectives
            kwargs = kwargs or {}
            described = _describe(func, args, kwargs)
            if described is not None:
                counter.record(*described)
            return func(*args, **kwargs)

    return _Mode()


# ---------------------------------------------------------------- memory


# FSDPMemTracker's reference types (by name) -> the categories pijepa reports.
CATEGORY_OF = {"SHARDED_PARAM": "params", "BUFFER": "params", "SHARDED_GRAD": "grads", "UNSHARDED_GRAD": "grads",
               "OPT": "optimizer", "ACT": "activations", "INP": "activations", "UNSHARDED_PARAM": "gathered",
               "ALL_GATHER": "gathered", "REDUCE_SCATTER": "comm_buffers", "TEMP": "temporaries"}


def categories(snapshot: Mapping[Any, int]) -> dict[str, int]:
    """One device's tracker snapshot by pijepa's categories, with its "total"."""
    out = dict.fromkeys(MEMORY_CATEGORIES, 0)
    for key, value in snapshot.items():
        name = getattr(key, "name", None)
        if name in CATEGORY_OF:
            out[CATEGORY_OF[name]] += value
    return {**out, "total": snapshot["Total"]}


def _memory_tracker_class() -> type:
    """PhaseMemoryTracker, defined on first use: importing FSDP's tracker takes a while."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class PhaseMemoryTracker(FSDPMemTracker):
        """FSDP2's memory tracker over several FSDP roots at once (the encoder, the predictor and the
        EMA target), with the peak of each phase of the step (`current_phase`)."""

        def __init__(self, roots: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> None:
            super().__init__(next(iter(roots.values())), optimizer)
            # Walked only for its FSDP modules and buffers.
            self._root_mod = nn.ModuleDict(dict(roots))  # type: ignore[assignment]
            for name, module in roots.items():
                self._mod_tracker._known_modules[module] = name
            self.roots, self.root_modules = tuple(roots), tuple(roots.values())
            self.phase = "start"
            self.phase_peaks: dict[str, dict[str, int]] = {}
            self.phase_starts: dict[str, dict[str, int]] = {}  # the first time each phase is entered

        def _fsdp_state_pre_forward(self, fsdp_mod: Any, orig: Any) -> Any:
            # The tracker refuses a root's second forward (the next micro-step) while it still holds
            # the root's module stats; a root's stats are dropped when its forward starts again.
            inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)
            if not any(fsdp_mod is root for root in self.root_modules):
                return inner

            def again(*args: Any, **kwargs: Any) -> Any:
                if not self._mod_tracker.is_bw and fsdp_mod in self.memory_tracking:
                    del self.memory_tracking[fsdp_mod]
                return inner(*args, **kwargs)

            return again

        def current_phase(self) -> str:
            """The optimizer's step; else the model running now (by its name in `roots`), forward or
            backward; else the loss's backward; else the phase that follows the last one (BETWEEN)."""
            running = [name for name in self.roots if name in self._mod_tracker.parents]
            if self._in_opt:
                return "optimizer step"
            if running:
                return f"{running[0]} {'backward' if self._mod_tracker.is_bw else 'forward'}"
            if self._mod_tracker.is_bw:
                return "loss backward"
            return BETWEEN.get(self.phase, self.phase)

        def _update_peak_stats(self, peak_state: Any) -> None:
            super()._update_peak_stats(peak_state)
            phase = self.current_phase()
            for snapshot in self._curr_mem_snap.values():
                now = categories(snapshot)
                if phase != self.phase:  # what the phase starts from: what the phase before left
                    self.phase_starts.setdefault(phase, now)
                if now["total"] > self.phase_peaks.get(phase, {"total": -1})["total"]:
                    self.phase_peaks[phase] = now
            self.phase = phase

    return PhaseMemoryTracker


# Ops outside every model take their phase from the phase before them: the inputs come first, the
# loss follows the predictor's forward; after the encoder's backward come the gradient norm and
# (with accumulation) the next micro-step's inputs; after the optimizer, the EMA update.
BETWEEN = {"start": "inputs", "predictor forward": "loss", "encoder backward": "after backward",
           "optimizer step": "EMA update"}


def memory_tracker(roots: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> Any:
    """A PhaseMemoryTracker over `roots` (name -> FSDP-wrapped model) and `optimizer`; use it as a
    context manager around the steps, then read `phase_peaks` (phase -> `categories` at its peak)
    and `phase_starts`."""
    return _memory_tracker_class()(roots, optimizer)
