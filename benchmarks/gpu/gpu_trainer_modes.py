"""The settings of benchmarks/gpu/gpu_trainer_check.py: the trainer runs, and the sizes of its two modes
(the real one on a GPU, the smoke run on CPU that only checks the plumbing)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainRun:
    label: str
    sets: tuple[str, ...]  # on top of the mode's
    plan_key: str  # the run whose `pijepa plan` stands for this one (compile changes no memory term)
    needs: str | None = None  # a package that must import, else the run is skipped


TRAIN_RUNS = {
    "fsdp": TrainRun("FSDP2, bf16", ("dist.strategy=fsdp",), "fsdp"),
    "fsdp_ac": TrainRun("FSDP2, bf16, AC full", ("dist.strategy=fsdp", "dist.activation_checkpointing=full"),
                        "fsdp_ac"),
    "fsdp_compile": TrainRun("FSDP2, bf16, compile per block", ("dist.strategy=fsdp", "dist.compile=true"), "fsdp"),
    "zero2": TrainRun("DeepSpeed ZeRO-2, bf16", ("dist.strategy=deepspeed", "dist.deepspeed_config=zero2_bf16"),
                      "zero2", "deepspeed"),
    "zero3": TrainRun("DeepSpeed ZeRO-3, bf16", ("dist.strategy=deepspeed", "dist.deepspeed_config=zero3_bf16"),
                      "zero3", "deepspeed"),
}


@dataclass(frozen=True)
class Mode:
    name: str
    smoke: bool
    config: str  # packaged config name
    sets: tuple[str, ...]  # trainer and planner: data source, model, masks
    batch: int  # micro-batch = per-GPU batch (no accumulation: data.global_batch_size=0)
    steps: int  # optimizer steps per trainer run
    compile_steps: int  # the compiled run's: its first windows hold the compilation
    log_freq: int  # steps per metrics.csv window; the first window holds the start-up
    bench_args: tuple[str, ...]  # `pijepa bench step`: the same shapes as the trainer
    data_sets: tuple[str, ...]  # `pijepa bench data` on top of --config
    data_workers: tuple[int, ...]
    data_args: tuple[str, ...]
    jpegs: int  # synthetic JPEGs written for the shards
    jpeg_size: int
    samples_per_shard: int

    def batch_sets(self) -> list[str]:
        return [f"data.batch_size={self.batch}"]

    def sized(self, batch: int | None, steps: int | None) -> Mode:
        steps = steps or self.steps
        return dataclasses.replace(self, batch=batch or self.batch, steps=steps,
                                   compile_steps=max(steps, self.compile_steps))

    def describe(self) -> dict:
        return dataclasses.asdict(self)


MODES = {
    # ViT-H/14 at the recipe's micro-batch 128 (`pijepa plan --gpus 1 --gpu h100-80gb`: FSDP 38.1 GiB,
    # AC 18.0 GiB, ZeRO-3 46.7 GiB, all well inside 80 GB); 12 loader workers render the synthetic
    # images (about 5-8 ms each per core) on the machine's 16 cores, leaving cores for the main
    # process and the compiler. 15 steps in windows of 5: the first window is the start-up.
    "gpu": Mode(
        name="gpu", smoke=False, config="in22k_vith14_ep66",
        sets=("data.dataset=synthetic", "data.synthetic_images=2048", "data.global_batch_size=0",
              "data.num_workers=12", "meta.use_bfloat16=true"),
        batch=128, steps=15, compile_steps=25, log_freq=5,
        bench_args=("--model", "vit_huge", "--patch", "14", "--img", "224", "--pred-depth", "12",
                    "--pred-dim", "384", "--repeats", "10"),
        data_sets=(), data_workers=(8, 16), data_args=("--batches", "10", "--repeats", "2", "--warmup", "2"),
        # 384 px JPEGs at quality 90: about the pixels of an ImageNet image, so decoding costs what it would
        jpegs=2048, jpeg_size=384, samples_per_shard=128),
    # ViT-Tiny/8 at cpu_default's 64 px (an 8x8 grid: `bench step` keeps the collator's default
    # min_keep of 10 context patches, which a 4x4 grid cannot hold), 3 steps of 8 images, bf16
    # autocast on CPU, gloo: seconds per run (DeepSpeed's first start builds a small op, ~1 min).
    "smoke": Mode(
        name="smoke", smoke=True, config="cpu_default",
        sets=("data.dataset=synthetic", "data.synthetic_images=64", "data.global_batch_size=0",
              "data.num_workers=0", "meta.model_name=vit_tiny", "meta.pred_depth=2", "meta.pred_emb_dim=48",
              "meta.use_bfloat16=true"),
        batch=8, steps=3, compile_steps=3, log_freq=1,
        bench_args=("--model", "vit_tiny", "--patch", "8", "--img", "64", "--pred-depth", "2",
                    "--pred-dim", "48", "--repeats", "2"),
        data_sets=(), data_workers=(0, 1),
        data_args=("--batches", "3", "--repeats", "1", "--warmup", "1"),
        jpegs=64, jpeg_size=80, samples_per_shard=16),
}
