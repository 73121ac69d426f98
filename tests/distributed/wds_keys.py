"""Run under torchrun (gloo): iterates the webdataset loader of each rank and writes the sample keys.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/wds_keys.py SHARDS OUT STOP BATCHES

Phase "full": BATCHES micro-batches of a fresh loader. Phase "resumed": STOP micro-batches, the
gathered state_dict() saved by rank 0 as a checkpoint would be (torch.save, loaded back with
weights_only), then a new loader restored from it takes the remaining BATCHES - STOP. Each rank
writes OUT/{phase}_rank{r}.json: the keys in the order its micro-batches delivered them.
"""

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pijepa.config import load_config
from pijepa.train.build import build_dataset, build_train_loader

SETS = ["data.dataset=webdataset", "data.shards=set-below", "data.crop_size=32", "mask.patch_size=8",
        "mask.min_keep=2", "data.wds_mode=finite", "data.batch_size=5", "data.shuffle_buffer=20",
        "data.num_workers=2"]


def loader_at(cfg, step: int):
    world, rank = dist.get_world_size(), dist.get_rank()
    return build_train_loader(cfg, build_dataset(cfg, world), accum=1, world_size=world, rank=rank,
                              start_step=step, total_steps=10**6, pin_memory=False)


def keys(loader, n: int) -> list[str]:
    return [k for _, info in itertools.islice(loader.iter_with_info(), n) for k in info["keys"]]


def main() -> None:
    shards, out, stop, batches = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(None, SETS)
    cfg.data.shards = shards

    full = keys(loader_at(cfg, 0), batches)

    first = loader_at(cfg, 0)
    head = keys(first, stop)
    state = first.state_dict()  # collective: every rank's position
    del first
    if rank == 0:
        torch.save(state, out / "loader_state.pt")
    dist.barrier()
    restored = loader_at(cfg, stop)
    restored.load_state_dict(torch.load(out / "loader_state.pt", weights_only=True))
    resumed = head + keys(restored, batches - stop)

    for phase, found in (("full", full), ("resumed", resumed)):
        (out / f"{phase}_rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
