"""Benchmarks as task streams.

A benchmark is an ordered list of :class:`Task`. Every task is a classification problem
with its own class names (turned into text prompts with its templates) and its own
train / test split. Samples are dicts so that tracks with other inputs (text targets,
audio) can add keys without changing the engine:

    {"image": FloatTensor[3, H, W] (already preprocessed), "label": int}

or, from the image cache (:mod:`mmcl.data.image_cache`), ``"image"`` a ByteTensor of the
resized, cropped pixels, which the backbone's image tower normalises on its device.

Tasks whose targets are text (captioning, open-ended VQA; ``metric`` ``cider`` or
``vqa_acc``) have no classes; their samples are

    {"image": FloatTensor[3, H, W], "prompt": str, "target": str, "refs": list[str]}

``prompt`` is the question (or a caption task's prefix, often ""), ``target`` the text a
method trains on, ``refs`` every reference the metric scores a generation against (five
captions, ten human answers). Batches of such samples are made with :func:`collate`.

The engine adds ``"task"`` (the task's position in the benchmark's base order) when it
batches samples, so that replay and joint training can mix tasks in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset


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
    # "top1" (classification), "cider" or "vqa_acc" (text targets, see mmcl.metrics_text).
    metric: str = "top1"
    # Free-form facts a report may show (domain description, sizes ...).
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def is_text(self) -> bool:
        """Targets are text, scored on generated strings (not class logits)."""
        return self.metric != "top1"


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


class TextTaskDataset(Dataset):
    """Images (a tensor, or any indexable that yields preprocessed image tensors) with
    one prompt, one training target and the metric's references per sample."""

    def __init__(self, images: Any, prompts: list[str], targets: list[str], refs: list[list[str]]):
        n = len(images)
        if not (n == len(prompts) == len(targets) == len(refs)):
            raise ValueError(f"{n} images, {len(prompts)} prompts, {len(targets)} targets, {len(refs)} reference sets")
        self.images, self.prompts, self.targets, self.refs = images, prompts, targets, refs

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "prompt": self.prompts[i], "target": self.targets[i], "refs": list(self.refs[i])}


def collate(samples: list[dict]) -> dict:
    """torch's ``default_collate`` for tensors and numbers; strings become a list and
    lists of strings (references) a list of lists. ``default_collate`` would transpose
    reference lists and fail on unequal lengths. Classification batches come out exactly
    as ``default_collate`` makes them. A batch a dataset's ``__getitems__`` assembled
    itself (a dict, e.g. from the image cache) passes unchanged."""
    from torch.utils.data import default_collate

    if isinstance(samples, dict):
        return samples
    out: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], str):
            out[key] = values
        elif isinstance(values[0], (list, tuple)):
            out[key] = [list(v) for v in values]
        else:
            out[key] = default_collate(values)
    return out


class BenchmarkBuilder(Protocol):
    """What ``mmcl.data.build_benchmark`` dispatches to, one per benchmark name.

    Generated benchmarks take ``(options, image_size, seed)``. Benchmarks read from disk
    (registered with a ``check_data``) are also called with keywords ``root`` (the
    absolute data root), ``preprocess`` (the backbone's image transform, or None: use a
    default) and ``tasks`` (the task names the run needs, in training order).
    """

    def __call__(self, options: dict, image_size: int, seed: int, **disk: Any) -> Benchmark: ...


def make_loader(data: Dataset, batch_size: int, workers: int, device: torch.device, **kwargs: Any) -> DataLoader:
    """The one place DataLoaders get their worker / pinning options. Worker processes only
    change where samples are decoded, not which or in what order (the sampler stays in the
    main process), so results do not depend on ``workers``."""
    if workers > 0:
        kwargs.setdefault("num_workers", workers)
        # A few batches ahead per worker is enough; more only holds decoded images in memory.
        kwargs.setdefault("prefetch_factor", 2)
    kwargs.setdefault("pin_memory", device.type == "cuda")
    return DataLoader(data, batch_size=batch_size, **kwargs)
