"""`pijepa plan`: memory per GPU, largest micro-batch, accumulation, step time and communication of a
config under every parallel strategy, computed from the config alone (no GPU, no weights).

Everything below is bytes per GPU. Notation: Psi = parameters that get gradients (encoder + predictor;
the frozen positional tables excluded), P = all parameters of encoder + predictor, Pe = all
parameters of the encoder (= the EMA target), S = ranks the state is sharded over (the world size,
or the shard group of HSDP), N = world size. "bf16" is `meta.use_bfloat16`.

Model state (bf16 runs; fp32 runs use 4-byte weights everywhere and have no separate master copy):

| strategy     | params           | grads                               | optimizer                    | EMA    |
| ------------ | ---------------- | ----------------------------------- | ---------------------------- | ------ |
| single       | 4P fp32          | 4Psi fp32, from backward to step    | 8Psi: AdamW m, v             | 4Pe    |
| DDP          | 4P fp32          | + 4Psi DDP buckets, always there    | 8Psi                         | 4Pe    |
| FSDP full    | 4P/S fp32 shards | 4Psi/S fp32 shards                  | 8Psi/S                       | 4Pe/S  |
| FSDP grad_op | 4P/S             | 4Psi/S                              | 8Psi/S                       | 4Pe/S  |
| ZeRO-1       | 2P bf16 module   | 4Psi fp32 accumulation buffer       | 12Psi/N: fp32 master + m + v | 4Pe    |
| ZeRO-2       | 2P bf16          | 4Psi/N fp32 partition               | 12Psi/N                      | 4Pe    |
| ZeRO-3       | 2P/N bf16        | 4Psi/N fp32 partition               | 12Psi/N                      | 4Pe/N  |

- FSDP2 keeps fp32 sharded parameters (the optimizer and the EMA work on them) and all-gathers
  bf16 copies for compute (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)). Transient:
  `full` holds two blocks gathered at a time (the running one and the prefetched next); `grad_op`
  keeps every gathered bf16 parameter from forward to backward (2P). The root parameters (patch
  embedding, norms, predictor projections) stay gathered. In backward each block adds its
  unsharded bf16 gradient and the fp32 reduce-scatter input. The EMA target is sharded like the
  encoder.
- Gradient accumulation: pijepa skips gradient synchronisation on all but the last micro-step. DDP
  then keeps 4Psi of param.grad between micro-steps; FSDP2 keeps the UNSHARDED gradients, upcast to
  the fp32 reduce dtype (4Psi, not 4Psi/S), until the last micro-step reduce-scatters them. This is
  counted whenever accumulation > 1 and is why FSDP prefers accumulation 1.
- DeepSpeed bf16 (pijepa/parallel/deepspeed.py, ds_configs/): the engine holds bf16 module weights; the
  ZeRO optimizer holds fp32 master weights and AdamW m, v (the ZeRO paper's K = 12 bytes per
  parameter), partitioned over N; pijepa sets `data_types.grad_accum_dtype: fp32`, so gradients
  accumulate in fp32: in a full buffer at ZeRO-1 (DeepSpeed's BF16_Optimizer), in the rank's
  partition from ZeRO-2. Buffers, from the repository's ds_configs/zero{1,2,3}_{bf16,fp32}.json
  (DeepSpeed's defaults where a key is absent): ZeRO-2/3 pass each micro-step's bf16 gradients
  through the reduce bucket (two with overlap_comm); ZeRO-1 all-reduces its fp32 buffer in buckets
  of that size at the step; ZeRO-1/2 all-gather the updated bf16 weights through the all-gather
  bucket; ZeRO-3 holds two gathered blocks plus the prefetch bucket. Buckets are capped at the
  model's size. The bf16 gradients that autograd produces before they reach the fp32 buffers are
  not counted (they live per bucket).
- EMA target under DeepSpeed: outside the engine, fp32. ZeRO-1/2: replicated (4Pe on every rank),
  moved towards the engine's weights. ZeRO-3: partitioned by a second, optimizer-less ZeRO-3 engine
  (4Pe/N), whose forward gathers fp32 blocks (counted as transient and as communication).
- single/DDP under bf16 autocast: autocast caches one bf16 cast of every trainable weight for the
  forward and the autograd graph keeps it for backward (2Psi). The residual stream is fp32 there
  (fp32 positional table + bf16 branch outputs), but bf16 under FSDP and DeepSpeed, where all
  weights, positional tables included, are bf16.
- Optimizer step on CUDA: torch's foreach AdamW materialises sqrt(v) for the whole local shard (one
  fp32 copy, 4Psi/S); on CPU the per-tensor loop needs about two temporaries of the largest tensor.

Activations at micro-batch B (what autograd keeps for backward, checked against saved tensors and
measured peak memory in tests/unit/test_plan.py):

- Per transformer block and token, width d, MLP width h, a heads: block input and mid-block
  residual (LayerNorm inputs) 2d * r, the two LayerNorm outputs that feed qkv and fc1 2d * c, qkv
  (kept by attention) 3d * c, the attention output (the same storage is proj's input) d * c, fc1 and
  GELU outputs 2h * c, LayerNorm statistics and the attention logsumexp (fp32); r and c are the
  residual and compute byte widths (fp32: 4, 4; bf16 autocast with fp32 weights: 4, 2; bf16 weights:
  2, 2). SDPA / flash / xformers keep O(N) per block; the `math` backend adds the fp32 softmax
  (a * N^2 per sequence, plus its bf16 cast).
- Context encoder: B sequences of the context length; predictor: M*B sequences of context + one
  target block; plus the conv's input cast, the encoder's final norm input and output, the
  predictor's last block output (its norm keeps a view of it), projection input and output.
- Activation checkpointing `full` keeps only each block's input (d * r per token) and recomputes one
  block at a time in backward (its activations plus its backward work, counted as transient);
  `selective` does that for every `ac_every`-th block.
- The target encoder runs without gradient: its activations are transient (one block's working set
  over all N tokens); its output h [B, N, d] fp32 stays until the loss (and backward, conservatively).
- Fused loss: fp32 LayerNorm-ed target rows (kept by smooth L1), the fp32 copy of bf16 predictions,
  unit prediction rows padded to the PKT groups, and per group two C x C fp32 matrices (the log's
  input and the target distribution); transient: the unit target rows and the C x C temporaries of
  the KL and its backward.

Peak = the largest of five phases: target forward, loss (every activation kept plus the loss's
temporaries), the predictor's and the encoder's first block backward (what backward has released
by then is gone; a checkpointed block recomputes its activations there), optimizer step. The table
shows the components of the peak phase. On a GPU, a
margin is added: CUDA_OVERHEAD (CUDA context, NCCL communicators and cuBLAS workspaces) plus
ALLOCATOR_SLACK of the tensor peak for the caching allocator's fragmentation.

Step time = FLOPs (`bench_step.step_flops` at the mean context and target lengths of the config's
masks, plus the recomputed forward under activation checkpointing) / (utilisation x datasheet dense
bf16 peak). Communication is per GPU per optimizer step, ring algorithms: an all-gather or
reduce-scatter of X bytes moves X (N-1)/N per GPU, an all-reduce twice that.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

GiB = 2**30
MiB = 2**20
FP32, BF16 = 4, 2

CUDA_OVERHEAD = 2 * GiB  # CUDA context (~0.5 GiB), NCCL communicators and buffers, cuBLAS workspaces
ALLOCATOR_SLACK = 0.10  # reserved-but-unallocated memory of the caching allocator, fraction of the peak

REPO = Path(__file__).resolve().parents[2]
MASK_SAMPLE_STEPS = 8  # collator draws used for the context / target lengths
MASK_DRAW_BATCH = 256  # images per draw at most; larger micro-batches reuse its (longer) context length


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory: int  # bytes
    bf16_flops: float  # dense bf16 peak, FLOP/s


# Device memory as nvidia-smi reports it, and the datasheet dense bf16 tensor-core peak (SXM parts).
GPUS: dict[str, GPUSpec] = {
    "a100-40gb": GPUSpec("A100-SXM4-40GB", 40960 * MiB, 312e12),
    "a100-80gb": GPUSpec("A100-SXM4-80GB", 81920 * MiB, 312e12),
    "h100-80gb": GPUSpec("H100-SXM5-80GB", 81559 * MiB, 989e12),
    "h200-141gb": GPUSpec("H200-SXM-141GB", 143771 * MiB, 989e12),
}

# Display names. The plan compares PLAN_STRATEGIES, in that order; `single` (one process, no
# wrapper) is what the memory tests measure; `fsdp_hybrid` appears only for a config asking for it.
STRATEGY_NAMES = {
    "single": "single", "ddp": "DDP", "fsdp_full": "FSDP full", "fsdp_grad_op": "FSDP grad_op",
    "fsdp_hybrid": "FSDP hybrid", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
}
PLAN_STRATEGIES = ("ddp", "fsdp_full", "fsdp_grad_op", "zero1", "zero2", "zero3")
PLAN_AC = ("none", "full")


# ---------------------------------------------------------------- model shape


@dataclass(frozen=True)
class Tower:
    """A stack of identical pre-norm transformer blocks."""

    width: int
    depth: int
    heads: int
    hidden: int  # MLP width
    block_params: int


@dataclass(frozen=True)
class ModelShape:
    encoder: Tower
    predictor: Tower
    encoder_params: int  # all, frozen positional table included (= the EMA target's size)
    predictor_params: int  # all
    trainable_params: int  # Psi: encoder + predictor parameters with gradients
    encoder_trainable: int
    largest_param: int  # elements of the largest single parameter tensor (CPU optimizer temporaries)
    num_patches: int
    image_size: tuple[int, int]
    patch_size: int

    @property
    def params(self) -> int:
        return self.encoder_params + self.predictor_params

    @property
    def root_params(self) -> int:
        """Parameters outside the transformer blocks (FSDP's root unit, kept gathered)."""
        blocks = self.encoder.depth * self.encoder.block_params + self.predictor.depth * self.predictor.block_params
        return self.params - blocks


@functools.lru_cache(maxsize=16)
def meta_models(model_name: str, patch_size: int, img_size: int, pred_depth: int, pred_dim: int,
                encoder_depth: int = 0):
    """Encoder and predictor built on the meta device: shapes and counts only, no memory."""
    from pijepa.models import build_encoder, build_predictor

    with torch.device("meta"):
        encoder = build_encoder(model_name, patch_size=patch_size, img_size=img_size, depth=encoder_depth)
        predictor = build_predictor(encoder, pred_depth=pred_depth, pred_emb_dim=pred_dim)
    return encoder, predictor


def _tower(blocks) -> Tower:
    block = blocks[0]
    return Tower(width=block.norm1.normalized_shape[0], depth=len(blocks), heads=block.attn.num_heads,
                 hidden=block.mlp.fc1.out_features, block_params=sum(p.numel() for p in block.parameters()))


def model_shape(model_name: str, patch_size: int, img_size: int, pred_depth: int, pred_dim: int,
                encoder_depth: int = 0) -> ModelShape:
    encoder, predictor = meta_models(model_name, patch_size, img_size, pred_depth, pred_dim, encoder_depth)
    params = list(encoder.parameters()) + list(predictor.parameters())
    return ModelShape(
        encoder=_tower(encoder.blocks), predictor=_tower(predictor.predictor_blocks),
        encoder_params=sum(p.numel() for p in encoder.parameters()),
        predictor_params=sum(p.numel() for p in predictor.parameters()),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        encoder_trainable=sum(p.numel() for p in encoder.parameters() if p.requires_grad),
        largest_param=max(p.numel() for p in params),
        num_patches=encoder.num_patches, image_size=tuple(encoder.img_size), patch_size=encoder.patch_size)


# ---------------------------------------------------------------- tokens from the mask config


@dataclass(frozen=True)
class Tokens:
    """Sequence lengths of one micro-step: context tokens per image, tokens per target block."""

    ctx: float
    tgt: float
    num_targets: int


class MaskTokens:
    """Context / target lengths the collator produces, from a few real draws of the config's masks.

    The collator cuts every context mask to the shortest one of its batch, so the context length
    depends on the micro-batch: it is the minimum over the micro-batch's images. One draw of
    `batch` images per step gives per-image context sizes; a micro-batch of b images is a chunk of
    b of them (statistically what the collator does for b images), so one draw serves every b.
    `worst(b)` (the longest over steps and chunks) sizes memory, `mean(b)` the FLOPs.
    """

    def __init__(self, ctx_per_image: torch.Tensor, tgt_per_step: torch.Tensor, num_targets: int) -> None:
        self.ctx = ctx_per_image  # [steps, batch] context tokens of each image (before the cut)
        self.tgt = tgt_per_step.float()  # [steps] tokens per target block (one size per batch)
        self.num_targets = num_targets

    @classmethod
    def from_collator(cls, collator, batch: int, steps: int = MASK_SAMPLE_STEPS) -> MaskTokens:
        ctx, tgt = [], []
        for step in range(steps):
            blocks = collator.sample_block_masks(batch, step)
            ctx.append(blocks.enc.sum(-1).min(0).values)  # [B]; one context mask per image
            tgt.append(blocks.pred_size[0] * blocks.pred_size[1])
        return cls(torch.stack(ctx), torch.tensor(tgt), collator.npred)

    @classmethod
    def from_config(cls, cfg, batch: int, steps: int = MASK_SAMPLE_STEPS) -> MaskTokens:
        # The collator exactly as train.build.build_collator makes it; built here so that planning
        # does not import the data pipeline (torchvision takes seconds to import).
        from pijepa.masks import MultiBlockMaskCollator

        k = cfg.mask
        collator = MultiBlockMaskCollator(
            input_size=cfg.data.crop_size, patch_size=k.patch_size, enc_mask_scale=k.enc_mask_scale,
            pred_mask_scale=k.pred_mask_scale, aspect_ratio=k.aspect_ratio, nenc=k.num_enc_masks,
            npred=k.num_pred_masks, min_keep=k.min_keep, allow_overlap=k.allow_overlap,
            placement=k.placement, seed=cfg.meta.seed)
        return cls.from_collator(collator, min(max(1, batch), MASK_DRAW_BATCH), steps)

    def _chunk_minima(self, micro_batch: int) -> torch.Tensor:
        b = min(max(1, micro_batch), self.ctx.shape[1])  # beyond the draw: its full batch (conservative)
        chunks = self.ctx.shape[1] // b
        return self.ctx[:, : chunks * b].reshape(self.ctx.shape[0], chunks, b).min(-1).values.float()

    def worst(self, micro_batch: int) -> Tokens:
        return Tokens(float(self._chunk_minima(micro_batch).max()), float(self.tgt.max()), self.num_targets)

    def mean(self, micro_batch: int) -> Tokens:
        return Tokens(float(self._chunk_minima(micro_batch).mean()), float(self.tgt.mean()), self.num_targets)


# ---------------------------------------------------------------- precision per strategy


@dataclass(frozen=True)
class Precision:
    compute: int  # bytes per element of matmul inputs / outputs
    residual: int  # bytes per element of the residual stream (LayerNorm inputs)
    weights: int  # bytes per element of the weights used in forward (gathered / cast / module copy)


def precision(strategy: str, bf16: bool) -> Precision:
    if not bf16:
        return Precision(FP32, FP32, FP32)
    if strategy in ("single", "ddp"):  # fp32 weights under autocast: fp32 residual stream
        return Precision(BF16, FP32, BF16)
    return Precision(BF16, BF16, BF16)  # FSDP param_dtype bf16, DeepSpeed bf16 module


def is_fsdp(strategy: str) -> bool:
    return strategy.startswith("fsdp")


def is_zero(strategy: str) -> bool:
    return strategy.startswith("zero")


# ---------------------------------------------------------------- activations


def block_saved_bytes(seqs: float, seq_len: float, tower: Tower, prec: Precision, attn: str = "sdpa") -> float:
    """What autograd keeps for one block's backward over `seqs` sequences of `seq_len` tokens."""
    d, h, c, r = tower.width, tower.hidden, prec.compute, prec.residual
    tokens = seqs * seq_len
    per_token = (2 * d * r  # LayerNorm inputs: block input and mid-block residual
                 + 2 * 2 * FP32  # LayerNorm mean and rstd, two norms
                 + 2 * d * c  # LayerNorm outputs, the inputs of qkv and fc1
                 + 3 * d * c  # qkv output: q, k, v kept by attention
                 + d * c  # attention output, also the input of proj (a view, no copy)
                 + 2 * h * c)  # fc1 output (GELU input) and GELU output (fc2 input)
    if attn == "math":
        # Explicit softmax: the matmuls keep copies of q, k, v (as large as qkv), the fp32
        # probabilities [seqs, heads, N, N] and their cast for probs @ v; proj keeps a copy of the
        # transposed attention output (as large as SDPA's output). No logsumexp.
        probs = seqs * tower.heads * seq_len * seq_len * (FP32 + (c if c != FP32 else 0))
        return tokens * per_token + probs
    return tokens * (per_token + tower.heads * FP32)  # flash / efficient kernels keep the logsumexp


def block_checkpointed_bytes(seqs: float, seq_len: float, tower: Tower, prec: Precision) -> float:
    """A checkpointed block keeps only its input."""
    return seqs * seq_len * tower.width * prec.residual


def block_backward_work_bytes(seqs: float, seq_len: float, tower: Tower, prec: Precision) -> float:
    """Gradient buffers live inside one block's backward beyond its saved activations: the incoming
    and outgoing residual gradients and, at the MLP, one MLP-width gradient net (the gradients of
    the GELU and fc1 outputs appear as the tensors they replace are released)."""
    d, h = tower.width, tower.hidden
    return seqs * seq_len * (2 * d * prec.residual + h * prec.compute)


def block_forward_work_bytes(seqs: float, seq_len: float, tower: Tower, prec: Precision) -> float:
    """Live set of one block's forward without gradient: at the MLP, the residual stream, the
    LayerNorm output (the MLP's argument) and the fc1 and GELU outputs."""
    d, h = tower.width, tower.hidden
    return seqs * seq_len * (d * prec.residual + d * max(prec.compute, prec.residual) + 2 * h * prec.compute)


def checkpointed_blocks(depth: int, ac: str, every: int = 2) -> int:
    """How many of `depth` blocks apply_ac wraps: none 0, full all, selective every `every`-th."""
    if ac == "none":
        return 0
    if ac == "full":
        return depth
    return depth // max(1, every)


def last_block_checkpointed(depth: int, ac: str, every: int = 2) -> bool:
    """Whether the last block (the first one backward runs through) is wrapped: apply_ac wraps
    block i when (i + 1) % every == 0."""
    return ac == "full" or (ac == "selective" and depth % max(1, every) == 0)


def tower_bytes(seqs: float, seq_len: float, tower: Tower, prec: Precision, ac: str, every: int,
                attn: str) -> float:
    wrapped = checkpointed_blocks(tower.depth, ac, every)
    return (wrapped * block_checkpointed_bytes(seqs, seq_len, tower, prec)
            + (tower.depth - wrapped) * block_saved_bytes(seqs, seq_len, tower, prec, attn))


def backward_block_bytes(seqs: float, seq_len: float, tower: Tower, prec: Precision, recompute: bool,
                         attn: str) -> float:
    """Transient of the first block of a tower's backward; a checkpointed block first recomputes its
    activations (all but its input, which it kept)."""
    work = block_backward_work_bytes(seqs, seq_len, tower, prec)
    if recompute:
        work += (block_saved_bytes(seqs, seq_len, tower, prec, attn)
                 - block_checkpointed_bytes(seqs, seq_len, tower, prec))
    return work


def pkt_groups(rows: float, num_targets: int, tgt: float, grouping: str, chunk_size: int) -> tuple[float, float]:
    """(groups, rows per group) of the PKT similarity matrices."""
    if grouping == "chunk":
        size = min(chunk_size, rows)
        return math.ceil(rows / size), size
    if grouping == "block":
        return rows / tgt, tgt
    return rows / (num_targets * tgt), num_targets * tgt  # image


def loss_bytes(rows: float, dim: int, groups: float, group_size: float, loss: str,
               prec: Precision) -> tuple[float, float]:
    """(kept for backward, transient) of the fused gather + LayerNorm + L2 + PKT loss, all fp32."""
    with_l2, with_pkt = loss != "PKT", loss != "L2"
    row_bytes = rows * dim * FP32
    padded = groups * group_size * dim * FP32
    square = groups * group_size * group_size * FP32
    saved = (row_bytes if with_l2 else 0.0)  # LayerNorm-ed target rows, kept by smooth L1
    saved += row_bytes if prec.compute != FP32 else 0.0  # fp32 copy of the bf16 predictions
    if not with_pkt:
        return saved, row_bytes  # transient: the gathered raw target rows
    saved += padded + 2 * square  # unit prediction rows (padded to the groups); log input, target distribution
    transient = padded + 3 * square + (0.0 if with_l2 else row_bytes)  # unit target rows; KL temporaries
    return saved, transient


@dataclass(frozen=True)
class LossSpec:
    name: str = "L2_PKT"
    grouping: str = "chunk"
    chunk_size: int = 256


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-step's activations, by part."""

    inputs: float  # the fp32 image batch on the device
    target_output: float  # h, the target encoder's output
    encoder: float  # context encoder: blocks, the patch embedding's input cast, encoder_head
    encoder_head: float  # the final norm's input and output (released before the blocks' backward)
    predictor: float  # predictor: blocks, predictor_head
    predictor_head: float  # last block output (kept by the norm), projection input, predictions
    loss: float  # kept by the loss for backward
    loss_transient: float
    target_work: float  # the no-grad target forward's live set (one block over all tokens)
    encoder_backward: float  # the first encoder block's backward (+ its recomputation under AC)
    predictor_backward: float  # the same for the predictor

    @property
    def kept(self) -> float:
        return self.inputs + self.target_output + self.encoder + self.predictor + self.loss


def activation_bytes(shape: ModelShape, batch: int, tokens: Tokens, prec: Precision, ac: str = "none",
                     ac_every: int = 2, attn: str = "sdpa", loss: LossSpec = LossSpec()) -> Activations:
    enc, pred = shape.encoder, shape.predictor
    c, r = prec.compute, prec.residual
    d, dp = enc.width, pred.width
    pixels = shape.image_size[0] * shape.image_size[1]
    ctx, tgt, m = tokens.ctx, tokens.tgt, tokens.num_targets
    seqs = m * batch  # predictor: one sequence per (target block, image)
    encoder_head = batch * ctx * d * r + batch * ctx * d * c  # final norm input; output, kept by predictor_embed
    encoder = (tower_bytes(batch, ctx, enc, prec, ac, ac_every, attn)
               + (batch * 3 * pixels * c if c != FP32 else 0.0)  # the conv keeps its bf16-cast input
               + encoder_head)
    predictor_head = (seqs * (ctx + tgt) * dp * r  # last block output: predictor_norm keeps a view of it
                      + seqs * tgt * dp * c  # predictor_proj input
                      + seqs * tgt * d * c)  # the predictions
    predictor = tower_bytes(seqs, ctx + tgt, pred, prec, ac, ac_every, attn) + predictor_head
    rows = seqs * tgt
    groups, size = pkt_groups(rows, m, tgt, loss.grouping, loss.chunk_size)
    loss_saved, loss_transient = loss_bytes(rows, d, groups, size, loss.name, prec)
    return Activations(
        inputs=batch * 3 * pixels * FP32,
        target_output=batch * shape.num_patches * d * FP32,  # the final LayerNorm runs in fp32 under autocast
        encoder=encoder, encoder_head=encoder_head, predictor=predictor, predictor_head=predictor_head,
        loss=loss_saved, loss_transient=loss_transient,
        target_work=block_forward_work_bytes(batch, shape.num_patches, enc, prec),
        encoder_backward=backward_block_bytes(batch, ctx, enc, prec,
                                              last_block_checkpointed(enc.depth, ac, ac_every), attn),
        predictor_backward=backward_block_bytes(seqs, ctx + tgt, pred, prec,
                                                last_block_checkpointed(pred.depth, ac, ac_every), attn))


# ---------------------------------------------------------------- model state per strategy


@dataclass(frozen=True)
class DSSettings:
    """The DeepSpeed JSON's buffer settings that cost memory (elements; DeepSpeed's defaults)."""

    reduce_bucket: float = 5e8
    allgather_bucket: float = 5e8
    prefetch_bucket: float = 5e7
    overlap_comm: bool = False

    @classmethod
    def from_json(cls, path: Path) -> DSSettings:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        return cls(float(zero.get("reduce_bucket_size", cls.reduce_bucket)),
                   float(zero.get("allgather_bucket_size", cls.allgather_bucket)),
                   float(zero.get("stage3_prefetch_bucket_size", cls.prefetch_bucket)),
                   bool(zero.get("overlap_comm", stage == 3)))  # DeepSpeed turns it on for stage 3

    @classmethod
    def for_stage(cls, stage: int, bf16: bool) -> DSSettings:
        """From the repository's ds_configs/zero{stage}_{bf16,fp32}.json, else DeepSpeed's defaults."""
        path = REPO / "ds_configs" / f"zero{stage}_{'bf16' if bf16 else 'fp32'}.json"
        return cls.from_json(path) if path.is_file() else cls(overlap_comm=stage == 3)


@dataclass(frozen=True)
class State:
    """Per-GPU bytes of model state and engine buffers, by when they are alive."""

    params: float
    optimizer: float
    ema: float
    grads_forward: float  # gradient memory alive during a micro-step's forward
    grads_step: float  # gradient memory alive at the optimizer step
    grads_partial: float  # gradients alive once the predictor's backward is done (encoder backward)
    weights_forward: float  # weight copies alive from the forward through the backward
    weights_target: float  # weight copies alive during the target's forward
    backward_buffers: float  # communication buffers of the backward
    step_transient: float  # optimizer temporaries and step buffers


def state_bytes(shape: ModelShape, strategy: str, shards: int, accum: int, bf16: bool,
                device: str = "cuda", ds: DSSettings | None = None) -> State:
    psi, p_all, pe = shape.trainable_params, shape.params, shape.encoder_params
    pred_trainable = psi - shape.encoder_trainable
    block = max(shape.encoder.block_params, shape.predictor.block_params)
    prec = precision(strategy, bf16)
    w = prec.weights
    accumulating = accum > 1
    foreach = device == "cuda"  # torch's foreach AdamW on CUDA; per-tensor loop on CPU

    def adam_temp(local_params: float) -> float:
        return local_params * FP32 if foreach else 2 * shape.largest_param * FP32

    if strategy in ("single", "ddp"):
        grads = psi * FP32
        bucket = grads if strategy == "ddp" else 0.0  # DDP's flat gradient buckets (not views)
        return State(
            params=p_all * FP32, optimizer=2 * psi * FP32, ema=pe * FP32,
            grads_forward=bucket + (grads if accumulating else 0.0), grads_step=bucket + grads,
            grads_partial=bucket + (grads if accumulating else pred_trainable * FP32),
            weights_forward=psi * BF16 if bf16 else 0.0,  # autocast's cache of bf16 weight casts
            weights_target=block * BF16 if bf16 else 0.0,  # per-op casts of the frozen target
            backward_buffers=0.0, step_transient=adam_temp(psi))
    if is_fsdp(strategy):
        s = shards
        root = shape.root_params * w  # root units stay gathered from forward to backward
        if strategy == "fsdp_grad_op":
            forward = p_all * w  # every block stays gathered until its backward
        else:
            forward = 2 * block * w + root  # the running block and the prefetched next one
        # Without sync, FSDP2 keeps unsharded gradients upcast to the fp32 reduce dtype.
        unsharded = psi * FP32 if accumulating else 0.0
        return State(
            params=p_all * FP32 / s, optimizer=2 * psi * FP32 / s, ema=pe * FP32 / s,
            grads_forward=unsharded, grads_step=psi * FP32 / s,
            grads_partial=unsharded if accumulating else pred_trainable * FP32 / s,
            weights_forward=forward, weights_target=2 * shape.encoder.block_params * w,
            # A block's backward: its unsharded bf16 gradient and the fp32 reduce-scatter input.
            backward_buffers=block * (w + FP32),
            step_transient=adam_temp(psi / s))
    if is_zero(strategy):
        stage, n = int(strategy[-1]), shards
        ds = ds or DSSettings.for_stage(stage, bf16)
        master = FP32 if bf16 else 0  # fp32 master weights exist only under mixed precision
        # Gradients accumulate in fp32 (pijepa sets data_types.grad_accum_dtype fp32 under bf16):
        # ZeRO-1 (DeepSpeed's BF16_Optimizer) in a full fp32 buffer, ZeRO-2/3 in fp32 partitions.
        grads = psi * FP32 if stage == 1 else psi * FP32 / n
        # ZeRO-2/3 send each micro-step's bf16 gradients through the reduce bucket (two with
        # overlap_comm); ZeRO-1 all-reduces the fp32 buffer in buckets of the same size at the step.
        ipg = min(ds.reduce_bucket, psi) * w * (2 if ds.overlap_comm else 1)
        gather_bucket = min(ds.allgather_bucket, p_all) * w  # updated bf16 parameters after the step
        if stage == 3:
            # Layer by layer gathers: the running and the next block plus the prefetch bucket; the
            # EMA target is a second ZeRO-3 engine (fp32, partitioned): its forward gathers in fp32.
            weights_forward = 2 * block * w + min(ds.prefetch_bucket, p_all) * w
            weights_target = 2 * shape.encoder.block_params * FP32 + min(ds.prefetch_bucket, pe) * FP32
        else:
            weights_forward = 0.0
            weights_target = shape.encoder.block_params * BF16 if bf16 else 0.0  # autocast's per-op casts
        step_buffers = (min(ds.reduce_bucket, psi) * FP32 if stage == 1 else 0.0) + (
            gather_bucket if stage < 3 else 0.0)
        return State(
            params=p_all * w / (n if stage == 3 else 1), optimizer=psi * (master + 2 * FP32) / n,
            ema=pe * FP32 / (n if stage == 3 else 1),
            grads_forward=grads, grads_step=grads, grads_partial=grads,
            weights_forward=weights_forward, weights_target=weights_target,
            backward_buffers=ipg if stage > 1 else 0.0,
            step_transient=adam_temp(psi / n) + step_buffers)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGY_NAMES)}")


# ---------------------------------------------------------------- peak memory


@dataclass
class MemoryEstimate:
    """Components of the peak phase (they sum to `tensors`), the margin and every phase's total."""

    params: float
    grads: float
    optimizer: float
    ema: float
    activations: float
    transient: float
    margin: float
    peak_phase: str
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def tensors(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + self.activations + self.transient

    @property
    def total(self) -> float:
        return self.tensors + self.margin


def estimate_memory(shape: ModelShape, batch: int, tokens: Tokens, strategy: str, *, shards: int = 1,
                    accum: int = 1, ac: str = "none", ac_every: int = 2, bf16: bool = True,
                    attn: str = "sdpa", loss: LossSpec = LossSpec(), device: str = "cuda") -> MemoryEstimate:
    """Peak memory of one GPU (or one CPU process) for a micro-step of `batch` images."""
    st = state_bytes(shape, strategy, shards, accum, bf16, device)
    act = activation_bytes(shape, batch, tokens, precision(strategy, bf16), ac, ac_every, attn, loss)
    # Backward releases what it has used: when the predictor's first block runs, the loss and the
    # predictor head are gone; when the encoder's first block runs, the whole predictor too (its
    # gradients are there, the encoder's are coming).
    pred_backward = act.kept - act.loss - act.predictor_head
    enc_backward = act.inputs + act.target_output + act.encoder - act.encoder_head
    # (grads, activations, transient) of each phase; params, optimizer and EMA are always resident.
    phases = {
        "target forward": (st.grads_forward, act.inputs, st.weights_target + act.target_work),
        "loss": (st.grads_forward, act.kept, st.weights_forward + act.loss_transient),
        "predictor backward": (st.grads_forward, pred_backward,
                               st.weights_forward + st.backward_buffers + act.predictor_backward),
        "encoder backward": (st.grads_partial, enc_backward,
                             st.weights_forward + st.backward_buffers + act.encoder_backward),
        "optimizer step": (st.grads_step, 0.0, st.step_transient),
    }
    resident = st.params + st.optimizer + st.ema
    totals = {name: resident + sum(parts) for name, parts in phases.items()}
    peak = max(totals, key=totals.get)
    grads, activations, transient = phases[peak]
    margin = (CUDA_OVERHEAD + ALLOCATOR_SLACK * totals[peak]) if device == "cuda" else 0.0
    return MemoryEstimate(st.params, grads, st.optimizer, st.ema, activations, transient, margin, peak, totals)


# ---------------------------------------------------------------- FLOPs, time, communication


def micro_step_flops(shape_args: tuple, batch: int, tokens: Tokens, ac: str, ac_every: int,
                     loss: LossSpec) -> float:
    """`bench_step.step_flops` at these lengths, plus the forward recomputed under checkpointing."""
    from pijepa.bench.step import step_flops, transformer_flops

    encoder, predictor = meta_models(*shape_args)
    rows = tokens.num_targets * batch * tokens.tgt
    _, group = pkt_groups(rows, tokens.num_targets, tokens.tgt, loss.grouping, loss.chunk_size)
    flops = step_flops(encoder, predictor, batch, tokens.ctx, tokens.tgt, tokens.num_targets, group)
    enc, pred = _tower(encoder.blocks), _tower(predictor.predictor_blocks)
    flops += transformer_flops(tokens.ctx, batch, enc.width, checkpointed_blocks(enc.depth, ac, ac_every), enc.hidden)
    flops += transformer_flops(tokens.ctx + tokens.tgt, tokens.num_targets * batch, pred.width,
                               checkpointed_blocks(pred.depth, ac, ac_every), pred.hidden)
    return flops


@dataclass(frozen=True)
class Communication:
    """Per-GPU bytes moved per optimizer step (ring algorithms), by collective."""

    all_gather: float
    reduce_scatter: float
    all_reduce: float

    @property
    def total(self) -> float:
        return self.all_gather + self.reduce_scatter + self.all_reduce


def communication_bytes(shape: ModelShape, strategy: str, world: int, accum: int, bf16: bool,
                        shards: int | None = None) -> Communication:
    psi, p_all, pe = shape.trainable_params, shape.params, shape.encoder_params
    if strategy == "single" or world == 1:
        return Communication(0.0, 0.0, 0.0)
    w = BF16 if bf16 else FP32
    s = shards or world

    def ring(size: float, ranks: int) -> float:
        return size * (ranks - 1) / ranks

    if strategy == "ddp":  # fp32 gradients all-reduced once, on the last micro-step
        return Communication(0.0, 0.0, 2 * ring(psi * FP32, world))
    if is_fsdp(strategy):
        # Each micro-step gathers encoder + predictor for forward and the target for its forward;
        # `full` gathers encoder + predictor again in backward. The fp32 reduce-scatter runs once.
        gathers = p_all + pe + (p_all if strategy != "fsdp_grad_op" else 0)
        replicas = world // s
        across = 2 * ring(psi * FP32 / s, replicas) if replicas > 1 else 0.0  # HSDP: all-reduce of shards
        return Communication(accum * ring(gathers * w, s), ring(psi * FP32, s), across)
    stage = int(strategy[-1])
    if stage == 1:
        # The fp32 accumulation buffer is reduced once per step: all-reduced by DeepSpeed's
        # BF16_Optimizer (bf16), reduce-scattered by the ZeRO optimizer (fp32).
        grads = (0.0, 2 * ring(psi * FP32, world)) if bf16 else (ring(psi * FP32, world), 0.0)
        return Communication(ring(p_all * w, world), *grads)
    # From stage 2 every micro-step's bf16 gradients are reduce-scattered into the partitions.
    reduce = accum * ring(psi * w, world)
    if stage == 2:
        return Communication(ring(p_all * w, world), reduce, 0.0)  # + updated parameters after the step
    # Stage 3: encoder + predictor gathered for forward and again for backward, the fp32 target
    # engine gathered for its forward, every micro-step; the EMA works on partitions (no traffic).
    return Communication(accum * (2 * ring(p_all * w, world) + ring(pe * FP32, world)), reduce, 0.0)


# ---------------------------------------------------------------- the plan


@dataclass
class PlanRow:
    strategy: str
    ac: str
    micro_batch: int | None  # the largest fitting divisor of the per-GPU batch; None when none fits
    accumulation: int | None
    max_micro_batch: int  # the largest micro-batch that fits at all (0: not even 1)
    fits: bool
    memory: MemoryEstimate  # at micro_batch (at 1 when nothing fits)
    step_flops: float  # per GPU per optimizer step
    step_time_s: float
    communication: Communication

    @property
    def label(self) -> str:
        return STRATEGY_NAMES[self.strategy]


@dataclass
class PlanContext:
    """Everything fixed for one plan: the model, its masks, the machine."""

    shape: ModelShape
    shape_args: tuple
    tokens: MaskTokens
    gpu: GPUSpec
    gpus: int
    global_batch: int
    utilization: float
    bf16: bool
    attn: str
    loss: LossSpec
    ac_every: int = 2

    @property
    def per_gpu_batch(self) -> int:
        return self.global_batch // self.gpus

    def memory(self, strategy: str, ac: str, micro_batch: int, shards: int) -> MemoryEstimate:
        accum = max(1, self.per_gpu_batch // micro_batch)
        return estimate_memory(self.shape, micro_batch, self.tokens.worst(micro_batch), strategy,
                               shards=shards, accum=accum, ac=ac, ac_every=self.ac_every, bf16=self.bf16,
                               attn=self.attn, loss=self.loss)

    def fits(self, strategy: str, ac: str, micro_batch: int, shards: int) -> bool:
        return self.memory(strategy, ac, micro_batch, shards).total <= self.gpu.memory


def _largest(pred, lo: int, hi: int) -> int:
    """Largest x in [lo, hi] with pred(x), pred monotone (true then false); lo - 1 when none."""
    if hi < lo or not pred(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_micro_batch(ctx: PlanContext, strategy: str, ac: str, shards: int, limit: int = 8192) -> int:
    """Largest micro-batch that fits. Memory grows with the micro-batch, except that it drops where
    accumulation ends (at the per-GPU batch), so the two sides are searched separately."""
    per_gpu = ctx.per_gpu_batch

    def ok(b: int) -> bool:
        return ctx.fits(strategy, ac, b, shards)

    without_accum = _largest(ok, per_gpu, limit)
    if without_accum >= per_gpu:
        return without_accum
    return _largest(ok, 1, per_gpu - 1)


def plan_row(ctx: PlanContext, strategy: str, ac: str, shards: int | None = None) -> PlanRow:
    shards = shards or (1 if strategy in ("single", "ddp") else ctx.gpus)
    per_gpu = ctx.per_gpu_batch
    divisors = [b for b in range(per_gpu, 0, -1) if per_gpu % b == 0]
    chosen = next((b for b in divisors if ctx.fits(strategy, ac, b, shards)), None)
    micro = chosen or 1
    accum = per_gpu // micro
    flops = accum * micro_step_flops(ctx.shape_args, micro, ctx.tokens.mean(micro), ac, ctx.ac_every, ctx.loss)
    return PlanRow(
        strategy=strategy, ac=ac, micro_batch=chosen, accumulation=accum if chosen else None,
        max_micro_batch=max_micro_batch(ctx, strategy, ac, shards), fits=chosen is not None,
        memory=ctx.memory(strategy, ac, micro, shards), step_flops=flops,
        step_time_s=flops / (ctx.utilization * ctx.gpu.bf16_flops),
        communication=communication_bytes(ctx.shape, strategy, ctx.gpus, accum, ctx.bf16, shards))


def configured_strategy(cfg, gpus: int) -> tuple[str, int]:
    """(plan strategy, shard ranks) of the config's `dist` section."""
    t = cfg.dist
    if t.strategy in ("single", "ddp"):
        return ("single" if gpus == 1 else "ddp"), 1
    if t.strategy == "fsdp":
        if t.fsdp_sharding == "hybrid":
            shard = t.hybrid_shard_size or min(8, gpus)  # 0: the GPUs of one node
            return "fsdp_hybrid", shard
        return f"fsdp_{t.fsdp_sharding}", gpus
    stage = t.zero_stage
    if stage < 0:
        stage = 2
        # As pijepa.parallel.deepspeed resolves it: as given, else relative to the repository.
        path = next((p for p in (Path(t.deepspeed_config), REPO / t.deepspeed_config) if p.is_file()), None)
        if path is not None:
            stage = int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 2))
    return f"zero{max(1, stage)}", gpus


def build_context(cfg, gpu: str, gpus: int, utilization: float, global_batch: int | None,
                  steps: int = MASK_SAMPLE_STEPS) -> PlanContext:
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r}: expected one of {', '.join(GPUS)}")
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: expected 1 or more")
    if not 0 < utilization <= 1:
        raise ValueError(f"--utilization {utilization}: expected a fraction in (0, 1]")
    global_batch = global_batch or cfg.data.global_batch_size or cfg.data.batch_size * gpus
    if global_batch % gpus:
        raise ValueError(f"--global-batch {global_batch} is not a multiple of --gpus {gpus}")
    o = cfg.optimization
    args = (cfg.meta.model_name, cfg.mask.patch_size, cfg.data.crop_size, cfg.meta.pred_depth,
            cfg.meta.pred_emb_dim, cfg.meta.encoder_depth)
    return PlanContext(
        shape=model_shape(*args), shape_args=args,
        tokens=MaskTokens.from_config(cfg, global_batch // gpus, steps), gpu=GPUS[gpu], gpus=gpus,
        global_batch=global_batch, utilization=utilization, bf16=cfg.meta.use_bfloat16,
        attn=cfg.meta.attn_backend, loss=LossSpec(o.loss_function, o.pkt_grouping, o.pkt_chunk_size),
        ac_every=cfg.dist.ac_every)


def make_plan(cfg, gpu: str = "a100-80gb", gpus: int = 16, utilization: float = 0.4,
              global_batch: int | None = None, steps: int = MASK_SAMPLE_STEPS) -> dict[str, Any]:
    ctx = build_context(cfg, gpu, gpus, utilization, global_batch, steps)
    rows = [plan_row(ctx, s, ac) for s in PLAN_STRATEGIES for ac in PLAN_AC]
    fitting = [r for r in rows if r.fits]
    best = min(fitting, key=lambda r: (r.step_time_s, r.communication.total)) if fitting else None
    strategy, shards = configured_strategy(cfg, gpus)
    configured = configured_row(ctx, cfg, strategy, shards)
    return {"context": ctx, "rows": rows, "best": best, "configured": configured}


def configured_row(ctx: PlanContext, cfg, strategy: str, shards: int) -> dict[str, Any]:
    """The config as written: its strategy, micro-batch and checkpointing."""
    micro, ac = cfg.data.batch_size, cfg.dist.activation_checkpointing
    per_gpu = ctx.per_gpu_batch
    mem = ctx.memory(strategy, ac, micro, shards)
    divides = per_gpu % micro == 0
    return {"strategy": strategy, "shards": shards, "ac": ac, "micro_batch": micro,
            "accumulation": per_gpu // micro if divides else None, "divides": divides,
            "fits": mem.total <= ctx.gpu.memory, "memory": mem}


# ---------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def format_plan(plan: dict[str, Any], config_name: str) -> str:
    ctx: PlanContext = plan["context"]
    s, t = ctx.shape, ctx.tokens
    worst, mean = t.worst(ctx.per_gpu_batch), t.mean(ctx.per_gpu_batch)
    lines = [
        f"plan: {config_name}: {ctx.shape_args[0]}/{s.patch_size} {s.image_size[0]}px, predictor "
        f"{s.predictor.depth}x{s.predictor.width}; params {s.encoder_params / 1e6:.0f}M encoder + "
        f"{s.predictor_params / 1e6:.1f}M predictor ({s.trainable_params / 1e6:.0f}M trained); "
        f"{'bf16' if ctx.bf16 else 'fp32'}, attention {ctx.attn}, loss {ctx.loss.name}",
        f"{ctx.gpus} x {ctx.gpu.name} ({ctx.gpu.memory / GiB:.1f} GiB, {ctx.gpu.bf16_flops / 1e12:.0f} TFLOP/s "
        f"bf16 dense); effective batch {ctx.global_batch} = {ctx.per_gpu_batch} per GPU = micro-batch x "
        f"accumulation; step time at {ctx.utilization:.0%} of peak",
        f"tokens per image (masks of {ctx.per_gpu_batch} images, {t.ctx.shape[0]} draws): context "
        f"{mean.ctx:.0f} mean / {worst.ctx:.0f} worst, target blocks {mean.num_targets} x {mean.tgt:.0f} "
        f"mean / {worst.tgt:.0f} worst, of {s.num_patches}",
        "memory in GiB per GPU at the micro-batch, components of the peak phase; margin = "
        f"{CUDA_OVERHEAD / GiB:.0f} GiB CUDA/NCCL + {ALLOCATOR_SLACK:.0%} allocator slack",
        "",
    ]
    header = (f"{'strategy':<13}{'AC':<5}{'params':>7}{'grads':>7}{'optim':>7}{'EMA':>6}{'activ':>7}"
              f"{'trans':>7}{'margin':>7}{'total':>7}  {'fits':<5}{'mb':>4}{'x acc':>6}{'max mb':>7}"
              f"{'step s':>8}{'AG GB':>7}{'RS GB':>7}{'AR GB':>7}  peak phase")
    lines += [header, "-" * len(header)]
    for r in plan["rows"]:
        m = r.memory
        mb = f"{r.micro_batch}" if r.fits else "-"
        acc = f"x{r.accumulation}" if r.fits else "-"
        c = r.communication
        lines.append(
            f"{r.label:<13}{r.ac:<5}{_gib(m.params):>7}{_gib(m.grads):>7}{_gib(m.optimizer):>7}{_gib(m.ema):>6}"
            f"{_gib(m.activations):>7}{_gib(m.transient):>7}{_gib(m.margin):>7}{_gib(m.total):>7}  "
            f"{'yes' if r.fits else 'NO':<5}{mb:>4}{acc:>6}{r.max_micro_batch:>7}{r.step_time_s:>8.2f}"
            f"{c.all_gather / 1e9:>7.1f}{c.reduce_scatter / 1e9:>7.1f}{c.all_reduce / 1e9:>7.1f}  {m.peak_phase}")
    lines.append("")
    lines.append("mb = largest micro-batch dividing the per-GPU batch that fits (memory columns at it; at 1 "
                 "when none fits); max mb = largest that fits at all; step s = FLOPs / (utilisation x peak), "
                 "communication not included; AG / RS / AR = all-gather / reduce-scatter / all-reduce GB per "
                 "GPU per optimizer step. ZeRO rows use the buffer sizes of ds_configs/zero{1,2,3}_*.json.")
    best = plan["best"]
    if best is not None:
        lines.append(f"fastest that fits: {best.label}, AC {best.ac}, micro-batch {best.micro_batch} x "
                     f"{best.accumulation} accumulation x {ctx.gpus} GPUs = {ctx.global_batch}, "
                     f"{best.memory.total / GiB:.1f} GiB, {best.step_time_s:.2f} s/step, "
                     f"{best.step_flops / 1e12:.0f} TFLOP per GPU per step")
    else:
        lines.append("nothing fits at micro-batch 1: more GPUs, a larger GPU or a smaller model")
    cf = plan["configured"]
    acc = f"x {cf['accumulation']} accumulation" if cf["divides"] else "(does not divide the per-GPU batch)"
    lines.append(f"as configured: {STRATEGY_NAMES[cf['strategy']]} (sharded over {cf['shards']}), AC "
                 f"{cf['ac']}, micro-batch {cf['micro_batch']} {acc}: {cf['memory'].total / GiB:.1f} GiB, "
                 f"{'fits' if cf['fits'] else 'does NOT fit'}")
    return "\n".join(lines)


def plan_to_json(plan: dict[str, Any], config_name: str) -> dict[str, Any]:
    ctx: PlanContext = plan["context"]

    def memory(m: MemoryEstimate) -> dict[str, Any]:
        return {**asdict(m), "tensors": m.tensors, "total": m.total}

    def row(r: PlanRow) -> dict[str, Any]:
        return {"strategy": r.strategy, "name": r.label, "ac": r.ac, "fits": r.fits, "micro_batch": r.micro_batch,
                "accumulation": r.accumulation, "max_micro_batch": r.max_micro_batch,
                "memory_bytes": memory(r.memory), "step_flops": r.step_flops, "step_time_s": r.step_time_s,
                "communication_bytes": {**asdict(r.communication), "total": r.communication.total}}

    worst, mean = ctx.tokens.worst(ctx.per_gpu_batch), ctx.tokens.mean(ctx.per_gpu_batch)
    best = plan["best"]
    cf = plan["configured"]
    return {
        "config": config_name,
        "model": {"name": ctx.shape_args[0], **asdict(ctx.shape)},
        "gpu": {**asdict(ctx.gpu), "count": ctx.gpus},
        "global_batch": ctx.global_batch, "per_gpu_batch": ctx.per_gpu_batch, "utilization": ctx.utilization,
        "bf16": ctx.bf16, "attn_backend": ctx.attn, "loss": asdict(ctx.loss),
        "tokens": {"worst": asdict(worst), "mean": asdict(mean)},
        "assumptions": {"cuda_overhead_bytes": CUDA_OVERHEAD, "allocator_slack": ALLOCATOR_SLACK,
                        "deepspeed": {f"zero{k}": asdict(DSSettings.for_stage(k, ctx.bf16)) for k in (1, 2, 3)}},
        "rows": [row(r) for r in plan["rows"]],
        "best": row(best) if best is not None else None,
        "configured": {**{k: v for k, v in cf.items() if k != "memory"}, "memory_bytes": memory(cf["memory"])},
    }


# ---------------------------------------------------------------- CLI


__all__ = [
    "GPUS", "Tokens", "MaskTokens", "ModelShape", "Precision", "LossSpec", "model_shape", "precision",
    "block_saved_bytes", "activation_bytes", "state_bytes", "estimate_memory", "communication_bytes",
    "micro_step_flops", "make_plan", "format_plan", "plan_to_json",
]
