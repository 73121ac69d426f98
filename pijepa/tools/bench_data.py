"""`pijepa bench data`: images/s of the webdataset training loader against its floor.

The floor is one plain process decoding and augmenting the same JPEG bytes (held in memory: no
tar reading, no shuffle buffer, no worker processes, no inter-process transfer), with the same
per-batch work as a loader worker: decode to RGB, seeded RandomResizedCrop (+ the configured
augmentations), normalise, stack and draw the masks. It runs on one thread, as DataLoader workers
do. The loader is measured end to end in the main process (workers started, shuffle buffers
filled and a few batches taken before the clock starts), for each requested number of workers.

Per-worker efficiency = loader images/s / (workers x floor images/s); 1.0 means the workers spend
all their time decoding and augmenting. On a machine with fewer free cores than workers + 1 (the
main process also unpickles every batch) it cannot reach 1.0.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any


def add_bench_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--shards", required=True,
                        help="data.shards: a brace pattern, a list, a shards.json (or its folder) or pipe: commands")
    parser.add_argument("--config", default=None, help="YAML config for crop, augmentation, masks, batch size "
                        "(default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable (e.g. data.batch_size=64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts (default 1 2)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per worker first (default 3)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed windows per measurement; the best counts (default 3: on a shared machine "
                             "other processes only ever slow a window down)")
    return parser


def _config(args: argparse.Namespace):
    from pijepa.config import ConfigError, load_config, validate

    cfg = load_config(args.config, args.overrides)
    cfg.data.dataset, cfg.data.shards = "webdataset", args.shards  # not through YAML: braces stay text
    validate(cfg, "pijepa bench data")
    if args.batches < 1 or args.warmup < 0 or args.repeats < 1 or not args.workers or min(args.workers) < 1:
        raise ConfigError("pijepa bench data: --batches and --repeats must be >= 1, --warmup >= 0, --workers >= 1")
    return cfg


def _raw_samples(urls: list[str], count: int) -> list[tuple[bytes, int]]:
    """The first `count` (image bytes, label) of the shards in order, cycling when there are fewer."""
    import webdataset as wds

    from pijepa.data.wds import IMAGE_KEYS

    found: list[tuple[bytes, int]] = []
    for sample in wds.tarfile_to_samples(handler=wds.ignore_and_continue)(iter([{"url": u} for u in urls])):
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image is not None:
            found.append((image, int(sample.get("cls", b"0"))))
        if len(found) == count:
            break
    if not found:
        raise ValueError(f"no image samples found in {urls[0]} ...")
    return list(itertools.islice(itertools.cycle(found), count))


def measure_floor(cfg, transform, collator, samples: list[tuple[bytes, int]], batch_size: int,
                  repeats: int = 1) -> float:
    """Images/s of decode + augment + collate in this process, one thread (best of `repeats`)."""
    import torch

    from pijepa.data.wds import crop_seed, decode_rgb

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batches, best = len(samples) // batch_size, 0.0
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for b in range(batches):
                items = []
                for i, (data, label) in enumerate(samples[b * batch_size:(b + 1) * batch_size]):
                    image = decode_rgb(data)
                    torch.default_generator.manual_seed(crop_seed(cfg.meta.seed, b, i))
                    items.append((b, transform(image), label))
                collator(items)
            best = max(best, batches * batch_size / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return best


def measure_loader(cfg, shards, transform, collator, workers: int, batches: int, warmup: int,
                   repeats: int = 1) -> float:
    """Images/s of the whole webdataset loader (main process view) with `workers` workers, the best
    of `repeats` consecutive windows."""
    from pijepa.data.wds import build_wds_loader

    d = cfg.data
    loader = build_wds_loader(shards, transform, collator, mode=d.wds_mode, batch_size=d.batch_size, accum=1,
                              world_size=1, rank=0, start_step=0, steps_per_epoch=1, seed=cfg.meta.seed,
                              num_workers=workers, shuffle_buffer=d.shuffle_buffer, pin_memory=False)
    it = iter(loader)
    for _ in range(warmup * workers):
        next(it)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        best = max(best, batches * d.batch_size / (time.perf_counter() - start))
    del it  # stops the workers
    return best


def run_bench_data(args: argparse.Namespace) -> dict[str, Any]:
    from pijepa.train.build import build_collator, build_dataset
    from pijepa.data.transforms import build_train_transform

    cfg = _config(args)
    d = cfg.data
    shards = build_dataset(cfg)  # resolves and checks the shard list (finite mode: 1 rank, 1 worker)
    transform = build_train_transform(d.crop_size, d.crop_scale, d.use_horizontal_flip, d.use_color_distortion,
                                      d.color_jitter_strength, d.use_gaussian_blur)
    collator = build_collator(cfg)
    samples = _raw_samples(list(shards.urls), args.batches * d.batch_size)
    print(f"pijepa bench data: {len(shards.urls)} shards, batch {d.batch_size}, crop {d.crop_size}, "
          f"mode {d.wds_mode}, shuffle buffer {d.shuffle_buffer}, best of {args.repeats} x {args.batches} timed batches; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before", flush=True)
    floor = measure_floor(cfg, transform, collator, samples, d.batch_size, args.repeats)
    print(f"  floor (1 process, 1 thread: decode + augment + masks from memory): {floor:8.1f} img/s", flush=True)
    result: dict[str, Any] = {"floor": floor, "loader": {}}
    for workers in args.workers:
        ips = measure_loader(cfg, shards, transform, collator, workers, args.batches, args.warmup, args.repeats)
        result["loader"][workers] = ips
        line = f"  loader, {workers} worker{'s' if workers > 1 else ' '}: {ips:8.1f} img/s = {ips / (workers * floor):.2f} x floor per worker"
        if 1 in result["loader"] and workers != 1:
            line += f", {ips / result['loader'][1]:.2f} x the 1-worker loader"
        print(line, flush=True)
    print(f"  load average {os.getloadavg()[0]:.2f} after", flush=True)
    return result
