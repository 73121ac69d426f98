"""Training data: the built-in synthetic shapes, ImageFolder trees and WebDataset shards, the
step-addressed loader, transforms and the shard writer."""

from __future__ import annotations

from typing import Literal, get_args

DatasetName = Literal["synthetic", "folder", "webdataset"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
