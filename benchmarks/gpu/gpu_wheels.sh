#!/usr/bin/env bash
# Fetches, here, the wheels that benchmarks/gpu/gpu_trainer_check.py needs on a GPU machine without
# network (one with torch 2.11 but no deepspeed, webdataset or xformers) into .whl/, which git
# ignores; copy it there with the working tree (about 9 MB):
#
#   benchmarks/gpu/gpu_wheels.sh
#
# The GPU machine's Python is 3.12 on x86-64, whatever this machine runs: the platform flags ask
# for its wheels. Versions are the ones this repo's .venv tests (deepspeed as pinned in setup.py);
# xformers 0.0.35 asks for torch>=2.10. One version of each: two would stop the install there.
# Usage on the GPU machine: docs/perf.md, "How to run on a GPU".
set -euo pipefail
source "$(dirname "$0")/../../launchers/_common.sh"
cd "$REPO"
PY="$(tool python)"
rm -rf .whl
mkdir -p .whl
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64)
# What the GPU machine lacks (its package list: numpy, pyyaml, tqdm, psutil, py-cpuinfo, msgpack,
# einops, ninja and packaging are there); pydantic's typing-extensions floor may be above its copy.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .whl \
  webdataset==1.0.2 braceexpand==0.1.7 \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 \
  xformers==0.0.35
# DeepSpeed publishes a source archive only: its wheel is built here, pure Python (DS_BUILD_OPS=0:
# no op compiled ahead; the trainer uses torch's AdamW). Building imports torch, hence the .venv's.
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -l .whl
du -sh .whl
