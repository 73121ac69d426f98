"""`pijepa bench data`: images/s of the webdataset training loader against its floor.

The floor is one plain process decoding and augmenting the same JPEG bytes (held in memory: no
tar reading, no shuffle buffer, no worker processes, no inter-process transfer), with the same
per-batch work as a loader worker: decode to RGB, seeded RandomResizedCrop (+ the configured
augmentations), normalise, stack and draw the masks. It runs on one thread, as DataLoader workers
do. The loader is measured end to end in the main process (workers started, shuffle buffers
filled and a few batches taken before the clock starts), for each requested number of workers.

Per-worker efficiency = loader images/s / (workers x floor images/s); 1.0 means the workers spend
all their time decoding and augmenting. On a machine with fewer free cores than workers + 1 (the
main process also receives every batch) it cannot reach 1.0. The CPU times (each batch carries its
worker's CPU clock) show where time goes independently of other load on the machine: worker CPU
per image minus the floor's is the loader's own cost (tar reading, shuffle buffer, webdataset
stages, and moving each float batch into shared memory for the main process).

Settings are rounds of one timed window each (floor, then each worker count), best window per
setting: interleaving gives every setting the same chances on a machine shared with others.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any


def _config(args: argparse.Namespace):
    from pijepa.config import load_config, validate
    from pijepa.runtime.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    cfg.data.dataset, cfg.data.shards = "webdataset", args.shards  # not through YAML: braces stay text
    validate(cfg, "pijepa bench data")
    if args.batches < 1 or args.warmup < 0 or args.repeats < 1 or not args.workers or min(args.workers) < 0:
        raise ConfigError("pijepa bench data: --batches and --repeats must be >= 1, --warmup >= 0, --workers >= 0")
    return cfg


def _raw_samples(urls: list[str], count: int) -> list[tuple[bytes, int]]:
    """The first `count` (image bytes, label) of the shards in order, cycling when there are fewer."""
    import webdataset as wds

    from pijepa.data.wds import IMAGE_KEYS
    from pijepa.runtime.errors import DataError

    found: list[tuple[bytes, int]] = []
    for sample in wds.tarfile_to_samples(handler=wds.ignore_and_continue)(iter([{"url": u} for u in urls])):
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image is not None:
            found.append((image, int(sample.get("cls", b"0"))))
        if len(found) == count:
            break
    if not found:
        raise DataError(f"no image samples found in {urls[0]} ...")
    return list(itertools.islice(itertools.cycle(found), count))


def measure_floor(cfg, transform, collator, samples: list[tuple[bytes, int]], batch_size: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of decode + augment + collate in this process, one thread."""
    import torch

    from pijepa.data.transforms import crop_seed
    from pijepa.data.wds import decode_rgb

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batches = len(samples) // batch_size
    try:
        start, cpu = time.perf_counter(), time.process_time()
        for b in range(batches):
            items = []
            for i, (data, label) in enumerate(samples[b * batch_size:(b + 1) * batch_size]):
                image = decode_rgb(data)
                torch.default_generator.manual_seed(crop_seed(cfg.meta.seed, b, i))
                items.append((b, transform(image), label))
            collator(items)
        images = batches * batch_size
        return images / (time.perf_counter() - start), (time.process_time() - cpu) / images
    finally:
        torch.set_num_threads(threads)


def measure_loader(loader, batches: int, warmup: int) -> tuple[float, float, float]:
    """(images/s, worker CPU s per image, main-process CPU s per image) of the whole loader: fresh
    workers, `warmup` batches per worker untimed (start-up, shuffle buffers filling), then `batches`
    timed. Worker CPU comes from the CPU clock each batch carries (first to last batch per worker),
    which other processes on the machine do not inflate the way they inflate wall time."""
    import torch

    threads = torch.get_num_threads()
    if loader.num_workers == 0:
        torch.set_num_threads(1)  # in-process like a worker: one thread (oversubscribed OpenMP spins)
    try:
        return _time_loader(loader, batches, warmup)
    finally:
        torch.set_num_threads(threads)


def _time_loader(loader, batches: int, warmup: int) -> tuple[float, float, float]:
    it = loader.iter_with_info()  # a new DataLoader each time: workers start here and stop with `it`
    for _ in range(warmup * max(1, loader.num_workers)):
        next(it)
    first: dict[int, tuple[float, int]] = {}
    last: dict[int, tuple[float, int]] = {}
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        _, info = next(it)
        first.setdefault(info["worker"], (info["cpu_s"], info["batch"]))
        last[info["worker"]] = (info["cpu_s"], info["batch"])
    elapsed, main_cpu = time.perf_counter() - start, time.process_time() - cpu
    del it
    spans = [(last[w][0] - first[w][0], last[w][1] - first[w][1]) for w in first if last[w][1] > first[w][1]]
    worker_cpu = sum(c for c, _ in spans) / max(1, sum(n for _, n in spans) * loader.batch_size)
    if loader.num_workers == 0:  # the "worker" is this process: its clock already holds everything
        worker_cpu, main_cpu = main_cpu / (batches * loader.batch_size), 0.0
    return batches * loader.batch_size / elapsed, worker_cpu, main_cpu / (batches * loader.batch_size)


def run_bench_data(args: argparse.Namespace) -> dict[str, Any]:
    """Prints and returns the floor and the loader's images/s and CPU times (see the module doc)."""
    from pijepa.data.transforms import build_train_transform
    from pijepa.data.wds import ShardSet, build_wds_loader
    from pijepa.train.build import build_collator, build_dataset

    cfg = _config(args)
    d = cfg.data
    shards = build_dataset(cfg)  # resolves and checks the shard list (finite mode: 1 rank, 1 worker)
    assert isinstance(shards, ShardSet), "_config sets data.dataset to webdataset"
    transform = build_train_transform(d.crop_size, d.crop_scale, d.use_horizontal_flip, d.use_color_distortion,
                                      d.color_jitter_strength, d.use_gaussian_blur)
    collator = build_collator(cfg)
    samples = _raw_samples(list(shards.urls), args.batches * d.batch_size)
    loaders = {w: build_wds_loader(shards, transform, collator, mode=d.wds_mode, batch_size=d.micro_batch, accum=1,
                                   world_size=1, rank=0, start_step=0, steps_per_epoch=1, seed=cfg.meta.seed,
                                   num_workers=w, shuffle_buffer=d.shuffle_buffer, pin_memory=False)
               for w in args.workers}
    print(f"pijepa bench data: {len(shards.urls)} shards, batch {d.micro_batch}, crop {d.crop_size}, "
          f"mode {d.wds_mode}, shuffle buffer {d.shuffle_buffer}, best of {args.repeats} windows of "
          f"{args.batches} batches; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before", flush=True)
    floor, floor_cpu = 0.0, float("inf")
    best = {w: (0.0, float("inf"), float("inf")) for w in args.workers}
    for _ in range(args.repeats):
        ips, cpu = measure_floor(cfg, transform, collator, samples, d.micro_batch)
        floor, floor_cpu = max(floor, ips), min(floor_cpu, cpu)
        for w, loader in loaders.items():
            rate, worker_cpu, main_cpu = measure_loader(loader, args.batches, args.warmup)
            best[w] = (max(best[w][0], rate), min(best[w][1], worker_cpu), min(best[w][2], main_cpu))
    print(f"  floor (1 process, 1 thread: decode + augment + masks from memory): {floor:8.1f} img/s, "
          f"{floor_cpu * 1e3:.3f} ms CPU/img")
    for w, (ips, worker_cpu, main_cpu) in best.items():
        line = (f"  loader, {w} worker{'s' if w != 1 else ' '}: {ips:8.1f} img/s = {ips / (max(1, w) * floor):.2f} "
                f"x floor per worker")
        if 1 in best and w != 1:
            line += f", {ips / best[1][0]:.2f} x the 1-worker loader"
        line += (f"; worker CPU {worker_cpu * 1e3:.3f} ms/img = {worker_cpu / floor_cpu:.2f} x floor's, "
                 f"main process {main_cpu * 1e3:.3f} ms/img")
        print(line)
    print(f"  load average {os.getloadavg()[0]:.2f} after (wall-clock numbers are the best window; "
          f"other processes on the machine slow them down, CPU times much less)", flush=True)
    return {"floor": floor, "floor_cpu_s": floor_cpu, "loader": {w: b[0] for w, b in best.items()},
            "worker_cpu_s": {w: b[1] for w, b in best.items()}, "main_cpu_s": {w: b[2] for w, b in best.items()}}
