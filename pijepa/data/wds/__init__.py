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
the batches the uninterrupted run would have got.

Corrupt data never stops the run: an undecodable image, a sample without an image or ``cls``, an
unreadable or truncated tar (with ``shards.json`` counts, the missing samples are counted exactly;
without, each read error counts one) are skipped, counted per batch and summed by the loader
(``counters()``, logged as ``data_skipped``), and the first few are reported on stderr.

Modules: ``spec`` (``data.shards`` -> the checked shard list), ``plan`` (each reader's shards per
reader epoch), ``stream`` (the worker side: reading, shuffling, decoding, batches) and ``loader``
(the main process: batch order, position, resume).
"""

from pijepa.data.wds.loader import WebDatasetLoader, build_wds_loader
from pijepa.data.wds.plan import ReaderPlan, balanced_split
from pijepa.data.wds.spec import MODES, ShardSet, WdsMode, check_readers, resolve_shards, split_spec
from pijepa.data.wds.stream import IMAGE_KEYS, decode_rgb

__all__ = ["IMAGE_KEYS", "MODES", "ReaderPlan", "ShardSet", "WdsMode", "WebDatasetLoader", "balanced_split",
           "build_wds_loader", "check_readers", "decode_rgb", "resolve_shards", "split_spec"]
