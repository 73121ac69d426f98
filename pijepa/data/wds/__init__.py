"""The training loader for WebDataset shards (``data.dataset: webdataset``), built from webdataset's
pipeline stages (tar reading, shuffle buffer, decode, to_tuple, batched) inside DataLoader workers.

Readers. Rank ``r`` with ``W`` DataLoader workers (1 with ``num_workers: 0``) has ``W`` readers; reader
``(r, w)`` reads its own stream of shards, pass after pass ("reader epochs" ``e = 0, 1, ...``):

* ``finite``: in reader epoch ``e`` the shards are permuted from ``(seed, e)`` and split over all
  ``world x W`` readers (balanced by sample count when ``shards.json`` gives the counts, else
  round-robin), so each reader epoch reads every sample exactly once over all ranks. Readers go
  straight on into their next epoch: batches never drop, pad or repeat a sample. When every reader
  gets the same number of samples, a multiple of ``batch_size``, reader epochs and trainer epochs
  coincide exactly; otherwise a reader's epoch boundary falls inside a batch and readers drift by
  at most about a shard. Needs at least ``world x W`` shards.
* ``resampled``: in reader epoch ``e`` reader ``(r, w)`` draws ``ceil(shards / readers)`` shards
  with replacement from its own stream seeded from ``(seed, e, r, w)``; infinite by nature.

Each reader epoch's samples go through a shuffle buffer seeded from ``(seed, e, r, w)`` that starts
empty and drains at the end of the reader epoch, so a position ``(e, offset)`` (samples out of the
buffer so far) fully determines what comes next. Trainer epochs have ``index num_samples`` (or
``data.epoch_samples``) / global batch steps.

Micro-batch index. DataLoader hands out worker batches round-robin, and every reader stream is
infinite, so this rank's ``c``-th micro-batch is batch ``j`` of logical worker ``w`` with
``c = j * W + w``. The batch carries ``u = c * world + rank``, the same ``u`` the step-addressed
map-style loader uses for micro-batch ``c = step * accum + micro``: masks come from ``(seed, u)``
and the crop of the batch's ``i``-th image from ``(seed, u, i)``, whatever process makes them.

Position and resume. Every batch carries its worker, its batch number, the reader position after
its last sample and the number of samples skipped since the previous batch; the loader records
them as the trainer takes each batch, and ``state_dict()`` (gathered from all ranks) goes into the
checkpoint. On resume each reader replays its current reader epoch from the start through the same
shuffle, dropping the ``offset`` samples already used *before decoding them* (reading their bytes
again: up to one reader epoch of I/O), and DataLoader worker ``i`` plays logical worker
``(i + c) % W`` so that the round-robin continues where it stopped: the resumed run gets exactly
the batches the uninterrupted run would have got. An exact resume needs the same reader layout
(world size and ``data.num_workers``), ``data.batch_size`` and ``data.shuffle_buffer``; other shards,
mode or seed are refused.

Another layout (``restart``). A job requeued on fewer or more ranks, or with another number of
workers, cannot continue the old readers' positions: its readers read other shards in another
shuffle. It restarts every reader from one position that every rank derives alike from the
checkpoint, and warns (once, on rank 0) with what that costs:

* ``finite``: the start of the reader epoch that the checkpoint's position falls in, the position
  being the samples all old readers had read, counted from their own positions (so it stays right
  when readers drift apart, or after an earlier restart shifted the reader epochs against the
  step). Samples the old readers had read in that epoch are read again: less than one reader epoch
  plus the drift below (without drift or an earlier restart, step x global batch mod the epoch's
  samples). Samples of earlier reader epochs that a lagging old reader had not yet reached are
  never read: at most the readers' drift, about a shard per old reader, zero when every reader
  gets the same number of samples. The warning gives both counts (estimates without sample counts
  from ``shards.json``). From there every reader epoch again reads each sample once; reader epochs
  are no longer aligned with trainer epochs (the run's last one may end unfinished).
* ``resampled``: every reader starts a fresh stream, its shard draws and shuffle seeded from
  ``(seed, step)`` (the ``reseed`` saved in the state, so a later exact resume replays it); the old
  readers' unfinished draws are dropped. Draws are with replacement, so nothing is owed.

The micro-batch numbering ``u`` goes on from the step either way (masks and crops as the
step-addressed loader makes them); ``data.batch_size`` and ``data.shuffle_buffer`` may change with
the layout. Keep ``data.global_batch_size`` fixed so that a step means the same samples (else the
warning says so); the skip counter goes on (the old total is carried by rank 0).

Corrupt data never stops the run: an undecodable image, a sample without an image or ``cls``, an
unreadable or truncated tar (with ``shards.json`` counts, the missing samples are counted exactly;
without, each read error counts one) are skipped, counted per batch and summed by the loader
(``counters()``, logged as ``data_skipped``), and the first few are reported on stderr.

Modules: ``spec`` (``data.shards`` -> the checked shard list), ``plan`` (each reader's shards per
reader epoch), ``stream`` (the worker side: reading, shuffling, decoding, batches), ``restart``
(where readers of another layout start) and ``loader`` (the main process: batch order, position,
resume).
"""

from pijepa.data.decode import decode_rgb
from pijepa.data.wds.loader import WebDatasetLoader, build_wds_loader
from pijepa.data.wds.plan import ReaderPlan, balanced_split
from pijepa.data.wds.spec import MODES, ShardSet, WdsMode, check_readers, resolve_shards, split_spec
from pijepa.data.wds.stream import IMAGE_KEYS

__all__ = ["IMAGE_KEYS", "MODES", "ReaderPlan", "ShardSet", "WdsMode", "WebDatasetLoader", "balanced_split",
           "build_wds_loader", "check_readers", "decode_rgb", "resolve_shards", "split_spec"]
