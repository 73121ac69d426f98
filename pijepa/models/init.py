"""Initial weights drawn one piece at a time, bit for bit those of a model built in full on the CPU.

Building a model in full draws from the CPU generator twice per model: each layer's constructor
draws torch's default init (``reset_parameters``), then ``init_weights`` re-draws I-JEPA's
(truncated normal, zero biases, unit LayerNorms, sin-cos positions, the predictor's mask token).
A model built on the ``meta`` device has no storage and draws nothing. ``draw_weights`` makes the
same draws in the same order on throwaway CPU tensors, no larger than one transformer block, and
yields every parameter's full value in turn, so that a sharding strategy keeps its shard of each
and drops the rest: no process ever holds a whole model. It runs the models' own init code (each
layer's ``reset_parameters``, ``init_transformer_weights``, ``rescale_residual_branch``) on those
pieces; only which parameters ``init_weights`` sets itself, and in what order, is restated here
(``_own_values``), and tests/distributed/test_meta_init.py checks the result against a full build.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from pijepa.models.pos_embed import get_2d_sincos_pos_embed
from pijepa.models.predictor import VisionTransformerPredictor
from pijepa.models.vit import Block, VisionTransformer, init_transformer_weights, rescale_residual_branch

JEPAModel = VisionTransformer | VisionTransformerPredictor


def cpu_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (on any device, ``meta`` included) with fresh, uninitialised CPU storage."""
    return copy.deepcopy(module).to_empty(device="cpu")


def replay_constructor_draws(model: nn.Module) -> None:
    """Advances the CPU generator as constructing ``model`` did: every layer's ``reset_parameters``,
    in ``modules()`` order (the order the constructors ran in: each layer is built right where it
    is registered), on a throwaway copy of that one layer."""
    for module in model.modules():
        if not hasattr(module, "reset_parameters"):
            continue
        if next(module.children(), None) is not None:
            raise TypeError(f"{type(module).__name__} has both children and reset_parameters: its "
                            f"constructor's draws cannot be replayed layer by layer")
        cpu_twin(module).reset_parameters()  # type: ignore[operator]


def _own_values(model: JEPAModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters that ``init_weights`` sets itself (not through a layer), in its order."""
    if isinstance(model, VisionTransformerPredictor):
        pos = get_2d_sincos_pos_embed(model.predictor_embed_dim, model.grid_size)
        yield "predictor_pos_embed", pos.unsqueeze(0)
        token = torch.empty(model.mask_token.shape, device="cpu")
        yield "mask_token", nn.init.trunc_normal_(token, std=model.init_std)
    elif isinstance(model, VisionTransformer):
        yield "pos_embed", get_2d_sincos_pos_embed(model.embed_dim, model.grid_size).unsqueeze(0)
    else:
        raise TypeError(f"no piecewise init for {type(model).__name__}")


def _pieces(model: nn.Module) -> Iterator[tuple[str, nn.Module, int]]:
    """(name prefix, submodule, 1-based block number or 0) in ``modules()`` order: each transformer
    block of a ModuleList whole, every other child whole."""
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                yield f"{name}.{i}.", block, i + 1
        else:
            yield f"{name}.", child, 0


def init_values(model: JEPAModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full CPU value) of every parameter as ``model.init_weights()`` sets it, drawn from the
    CPU generator in the order it draws (``init_transformer_weights`` visits ``modules()``, i.e.
    these pieces in turn; the depth-scaled rescaling draws nothing, so it may follow each block)."""
    yield from _own_values(model)
    for prefix, piece, layer_id in _pieces(model):
        twin = cpu_twin(piece)
        init_transformer_weights(twin, model.init_std)
        if layer_id and model.depth_scaled_init and isinstance(twin, Block):
            rescale_residual_branch(twin, layer_id)
        for name, p in twin.named_parameters():
            yield prefix + name, p.detach()


def draw_weights(models: Sequence[nn.Module]) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(index into ``models``, parameter name, full CPU value) for every parameter of models built
    one after the other (``build_models``: encoder, then predictor), each value drawn as building
    them in full on the CPU would have drawn it: the caller sets the generator to the state the
    build started from. The models may be on ``meta``; only their shapes and settings are read."""
    for index, model in enumerate(models):
        if not isinstance(model, (VisionTransformer, VisionTransformerPredictor)):
            raise TypeError(f"no piecewise init for {type(model).__name__}")
        replay_constructor_draws(model)
        for name, value in init_values(model):
            yield index, name, value
