"""Benchmarks as task streams.

A benchmark is an ordered list of :class:`Task`. Every task is a classification problem
with its own class names (turned into text prompts with its templates) and its own
train / test split. Samples are dicts so that tracks with other inputs (text targets,
audio) can add keys without changing the engine:

    {"image": FloatTensor[3, H, W] (already preprocessed), "label": int}

The engine adds ``"task"`` (the task's position in the benchmark's base order) when it
batches samples, so that replay and joint training can mix tasks in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset


@dataclass
class Task:
    """One task of a continual sequence.

    ``name`` is unique inside its benchmark and is the value written to the results'
    ``eval_task`` / ``trained_task`` columns.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    train: Dataset
    test: Dataset
    metric: str = "top1"
    # Free-form facts a report may show (domain description, sizes ...).
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass
class Benchmark:
    """Tasks in the order they are trained. ``tasks[i]`` is trained i-th."""

    name: str
    tasks: list[Task]

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


class TensorTaskDataset(Dataset):
    """In-memory dataset of preprocessed images and integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


class BenchmarkBuilder(Protocol):
    """What ``mmcl.data.build_benchmark`` dispatches to, one per benchmark name.

    Generated benchmarks take ``(options, image_size, seed)``. Benchmarks read from disk
    (registered with a ``check_data``) are also called with keywords ``root`` (the
    absolute data root), ``preprocess`` (the backbone's image transform, or None: use a
    default) and ``tasks`` (the task names the run needs, in training order).
    """

    def __call__(self, options: dict, image_size: int, seed: int, **disk: Any) -> Benchmark: ...
