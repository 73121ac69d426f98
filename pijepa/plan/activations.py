"""Activations at micro-batch B: what autograd keeps for backward, checked against saved tensors
and measured peak memory in tests/unit/test_plan.py.

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
  over all N tokens); its output h [B, N, d] (fp32 on CUDA, where autocast runs LayerNorm in fp32)
  stays until the step's forward returns, as do the predictions: backward starts without them.
- Fused loss: fp32 LayerNorm-ed target rows (kept by smooth L1), the fp32 copy of bf16 predictions,
  unit prediction rows padded to the PKT groups, and per group two C x C fp32 matrices (the log's
  input and the target distribution); transient: the unit target rows and the C x C temporaries of
  the KL and its backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pijepa.plan.precision import FP32, Precision
from pijepa.plan.shapes import ModelShape, Tokens, Tower

# ---------------------------------------------------------------- one block


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
    residual gradient and, at the MLP, one MLP-width gradient net (the gradients of the GELU and
    fc1 outputs appear as the tensors they replace are released; the outgoing residual gradient
    is made once the MLP's are gone). Measured by the trace (pijepa.rehearsal)."""
    d, h = tower.width, tower.hidden
    return seqs * seq_len * (d * prec.residual + h * prec.compute)


def block_forward_work_bytes(seqs: float, seq_len: float, tower: Tower, prec: Precision) -> float:
    """Live set of one block's forward without gradient: at the MLP, the block's input (its caller
    still holds it) and the mid-block residual, the LayerNorm output (the MLP's argument), the fc1
    and GELU outputs, and one more token-wide temporary (measured by the trace, pijepa.rehearsal)."""
    d, h = tower.width, tower.hidden
    return seqs * seq_len * (2 * d * prec.residual + 2 * d * max(prec.compute, prec.residual)
                             + 2 * h * prec.compute)


# ---------------------------------------------------------------- towers under checkpointing


def forward_extra(seqs: float, seq_len: float, tower: Tower, prec: Precision, ac: str, every: int,
                  head: float) -> float:
    """How far a tower's forward rises above what it keeps: a checkpointed last block runs its whole
    forward without keeping it (its input is kept already), before the head exists."""
    if not last_block_checkpointed(tower.depth, ac, every):
        return 0.0
    work = block_forward_work_bytes(seqs, seq_len, tower, prec) - block_checkpointed_bytes(seqs, seq_len, tower, prec)
    return max(0.0, work - head)


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


# ---------------------------------------------------------------- the fused loss


@dataclass(frozen=True)
class LossSpec:
    name: str = "L2_PKT"
    grouping: str = "chunk"
    chunk_size: int = 256


DEFAULT_LOSS = LossSpec()


def pkt_groups(rows: float, num_targets: int, tgt: float, grouping: str, chunk_size: int) -> tuple[float, float]:
    """(groups, rows per group) of the PKT similarity matrices."""
    if grouping == "chunk":
        size = min(chunk_size, rows)
        return math.ceil(rows / size), size
    if grouping == "block":
        return rows / tgt, tgt
    return rows / (num_targets * tgt), num_targets * tgt  # image


def loss_bytes(rows: float, dim: int, groups: float, group_size: float, loss: str,
               prec: Precision) -> tuple[float, float, float]:
    """(kept for backward, forward transient, backward transient) of the fused gather + LayerNorm +
    L2 + PKT loss, all fp32. Backward: the gradients of the KL's C x C matrices, and of the unit
    rows, the fp32 rows and the L2 term's rows at once."""
    with_l2, with_pkt = loss != "PKT", loss != "L2"
    row_bytes = rows * dim * FP32
    padded = groups * group_size * dim * FP32
    square = groups * group_size * group_size * FP32
    saved = (row_bytes if with_l2 else 0.0)  # LayerNorm-ed target rows, kept by smooth L1
    saved += row_bytes if prec.compute != FP32 else 0.0  # fp32 copy of the bf16 predictions
    if not with_pkt:
        return saved, row_bytes, 2 * row_bytes  # the gathered raw target rows; the rows' gradients
    saved += padded + 2 * square  # unit prediction rows (padded to the groups); log input, target distribution
    transient = padded + 3 * square + (0.0 if with_l2 else row_bytes)  # unit target rows; KL temporaries
    return saved, transient, 2 * padded + row_bytes + 3 * square


# ---------------------------------------------------------------- one micro-step


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-step's activations, by part."""

    inputs: float  # the fp32 image batch on the device
    target_output: float  # h, the target encoder's output (released when the forward returns)
    encoder: float  # context encoder: blocks, the patch embedding's input cast, encoder_head
    encoder_head: float  # the final norm's input and output (released before the blocks' backward)
    predictor: float  # predictor: blocks, predictor_head
    predictor_head: float  # last block output (kept by the norm), projection input, predictions
    predictions: float  # the predictor's output (part of predictor_head; kept by nothing once the loss has it)
    loss: float  # kept by the loss for backward
    loss_transient: float
    loss_backward: float  # the loss's backward temporaries
    target_work: float  # the no-grad target forward's live set (one block over all tokens)
    encoder_forward: float  # how far the encoder's forward rises above what it keeps (forward_extra)
    predictor_forward: float  # the same for the predictor
    encoder_backward: float  # the first encoder block's backward (+ its recomputation under AC)
    predictor_backward: float  # the same for the predictor

    @property
    def kept(self) -> float:
        return self.inputs + self.target_output + self.encoder + self.predictor + self.loss

    @property
    def at_backward(self) -> float:
        """What backward starts from: the step's forward has returned the loss, and the target's
        output and the predictions, referenced by nothing that autograd keeps, are gone."""
        return self.kept - self.target_output - self.predictions


def activation_bytes(shape: ModelShape, batch: int, tokens: Tokens, prec: Precision, ac: str = "none",
                     ac_every: int = 2, attn: str = "sdpa", loss: LossSpec = LossSpec(),
                     device: str = "cuda") -> Activations:
    """`device` "cpu": the CPU's autocast keeps LayerNorm in bf16, so the target's output is bf16."""
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
    predictions = seqs * tgt * d * c
    predictor_head = (seqs * (ctx + tgt) * dp * r  # last block output: predictor_norm keeps a view of it
                      + seqs * tgt * dp * c  # predictor_proj input
                      + predictions)
    predictor = tower_bytes(seqs, ctx + tgt, pred, prec, ac, ac_every, attn) + predictor_head
    rows = seqs * tgt
    groups, size = pkt_groups(rows, m, tgt, loss.grouping, loss.chunk_size)
    loss_saved, loss_transient, loss_backward = loss_bytes(rows, d, groups, size, loss.name, prec)
    target_width = FP32 if device == "cuda" else c  # CUDA's autocast runs the final LayerNorm in fp32
    return Activations(
        inputs=batch * 3 * pixels * FP32,
        target_output=batch * shape.num_patches * d * target_width,
        encoder=encoder, encoder_head=encoder_head, predictor=predictor, predictor_head=predictor_head,
        predictions=predictions, loss=loss_saved, loss_transient=loss_transient, loss_backward=loss_backward,
        target_work=block_forward_work_bytes(batch, shape.num_patches, enc, prec),
        encoder_forward=forward_extra(batch, ctx, enc, prec, ac, ac_every, encoder_head),
        predictor_forward=forward_extra(seqs, ctx + tgt, pred, prec, ac, ac_every, predictor_head),
        encoder_backward=backward_block_bytes(batch, ctx, enc, prec,
                                              last_block_checkpointed(enc.depth, ac, ac_every), attn),
        predictor_backward=backward_block_bytes(seqs, ctx + tgt, pred, prec,
                                                last_block_checkpointed(pred.depth, ac, ac_every), attn))
