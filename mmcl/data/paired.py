"""The paired-modality track: datasets, protocols and domain corruptions it shares.

A paired sample carries two or more input modalities, a class label and a domain::

    {"video": FloatTensor[T, 3, S, S], "audio": FloatTensor[frames, mel], "label": int, "domain": int}

Labels are GLOBAL class ids (the index in the benchmark's class list) in both protocols:

- ``cil`` (class-incremental): each task is a group of classes (``classes_per_task`` in
  ``class_order``); a model must tell every class seen so far apart, without task identity.
- ``dil`` (domain-incremental): each task is one domain (``domains``), all classes in each.

Every task's ``info`` holds ``protocol``, ``class_ids`` (the task's global ids) and
``num_classes`` (all classes of the protocol), which methods use to size their heads.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from mmcl.data.base import Task
from mmcl.spec import SpecError

Protocol = Literal["cil", "dil"]

# Domain corruptions of raw clips (frames in [0, 1], waveforms in [-1, 1]); one per DIL
# task of the generated benchmark, and of AVE's DIL protocol (see mmcl.data.ave).
DOMAINS = {
    "clean": "no corruption",
    "white": "white noise on the audio (about 3 dB SNR), sensor noise on the frames",
    "hum": "mains hum with harmonics on the audio, dark blue-tinted frames",
    "babble": "a crowd of random tones on the audio, blurred low-contrast frames",
    "pink": "low-frequency (integrated) noise on the audio, washed-out grey frames",
}


class PairedDataset(Dataset):
    """In-memory paired samples: ``inputs[modality][i]``, ``labels[i]``, ``domains[i]``."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, domains: torch.Tensor):
        n = len(labels)
        for m, x in inputs.items():
            if len(x) != n:
                raise ValueError(f"modality {m!r} has {len(x)} samples but there are {n} labels")
        self.inputs = inputs
        self.labels = labels.long()
        self.domains = domains.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{m: x[i] for m, x in self.inputs.items()}, "label": int(self.labels[i]), "domain": int(self.domains[i])}

    def subset(self, idx: torch.Tensor) -> "PairedDataset":
        return PairedDataset({m: x[idx] for m, x in self.inputs.items()}, self.labels[idx], self.domains[idx])


# --------------------------------------------------------------------------- corruptions


def corrupt(domain: str, frames: torch.Tensor, waves: torch.Tensor, sr: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``domain``'s corruption to raw clips: frames [N, T, 3, H, W], waves [N, L]."""
    if domain not in DOMAINS:
        raise SpecError(f"unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")
    n, length = waves.shape
    t = torch.arange(length, dtype=torch.float32) / sr
    f, w = frames.clone(), waves.clone()
    if domain == "white":
        w = w + 0.25 * torch.randn(w.shape, generator=g)
        f = f + 0.08 * torch.randn(f.shape, generator=g)
    elif domain == "hum":
        base = 50.0 + 10.0 * torch.rand(n, 1, generator=g)
        hum = sum(torch.sin(2 * math.pi * k * base * t) / k for k in (1, 2, 3, 4))
        w = w + 0.35 * hum
        f = f * 0.45 * torch.tensor([0.8, 0.9, 1.3]).view(1, 1, 3, 1, 1)
    elif domain == "babble":
        freqs = 200.0 + 1800.0 * torch.rand(n, 6, 1, generator=g)
        phase = 2 * math.pi * torch.rand(n, 6, 1, generator=g)
        w = w + 0.08 * torch.sin(2 * math.pi * freqs * t + phase).sum(1)
        nt = f.shape[0] * f.shape[1]
        flat = f.reshape(nt, *f.shape[2:])
        flat = F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        f = 0.5 + 0.6 * (flat.reshape(f.shape) - 0.5)
    elif domain == "pink":
        noise = torch.cumsum(torch.randn(w.shape, generator=g), -1)
        noise = noise - noise.mean(-1, keepdim=True)
        w = w + 0.3 * noise / noise.abs().amax(-1, keepdim=True).clamp(min=1e-6)
        grey = f.mean(2, keepdim=True)
        f = 0.55 + 0.5 * (0.4 * f + 0.6 * grey - 0.5)
    return f.clamp(0, 1), w.clamp(-1, 1)


# --------------------------------------------------------------------------- protocols


class ProtocolOptions(BaseModel):
    """How a paired benchmark is cut into tasks (shared by every paired benchmark)."""

    model_config = ConfigDict(extra="forbid")

    protocol: Protocol = "cil"
    # CIL: classes per task, in `class_order` (default: the benchmark's class order).
    classes_per_task: int = Field(default=2, ge=1)
    class_order: list[str] | None = None


def class_groups(class_names: list[str], opts: ProtocolOptions, where: str) -> list[list[int]]:
    """CIL: the global class ids of each task."""
    order = opts.class_order or list(class_names)
    unknown = [c for c in order if c not in class_names]
    if unknown:
        raise SpecError(f"{where}.class_order: unknown class(es) {', '.join(map(repr, unknown))}; classes: {', '.join(class_names)}")
    if sorted(order) != sorted(class_names):
        raise SpecError(f"{where}.class_order: must list each of the {len(class_names)} classes exactly once")
    ids = [class_names.index(c) for c in order]
    k = opts.classes_per_task
    if k > len(ids):
        raise SpecError(f"{where}.classes_per_task: {k} but there are only {len(ids)} classes")
    return [ids[i : i + k] for i in range(0, len(ids), k)]


def cil_task_names(n_classes: int, classes_per_task: int) -> list[str]:
    return [f"classes-{i + 1}" for i in range(math.ceil(n_classes / classes_per_task))]


def make_tasks(
    train: PairedDataset,
    test: PairedDataset,
    class_names: list[str],
    domain_names: list[str],
    opts: ProtocolOptions,
    where: str,
    info: dict | None = None,
) -> list[Task]:
    """Cut a whole paired train / test set into the tasks of ``opts.protocol``."""
    tasks = []
    common = {"protocol": opts.protocol, "num_classes": len(class_names), **(info or {})}
    if opts.protocol == "cil":
        groups = class_groups(class_names, opts, where)
        for name, ids in zip(cil_task_names(len(class_names), opts.classes_per_task), groups):
            idt = torch.tensor(ids)
            tr = train.subset(torch.nonzero(torch.isin(train.labels, idt)).flatten())
            te = test.subset(torch.nonzero(torch.isin(test.labels, idt)).flatten())
            tasks.append(_task(name, [class_names[i] for i in ids], ids, tr, te, {**common}))
    else:
        for d, dname in enumerate(domain_names):
            tr = train.subset(torch.nonzero(train.domains == d).flatten())
            te = test.subset(torch.nonzero(test.domains == d).flatten())
            tasks.append(_task(dname, list(class_names), list(range(len(class_names))), tr, te, {**common, "domain": dname}))
    for t in tasks:
        if len(t.train) == 0 or len(t.test) == 0:
            raise SpecError(f"{where}: task {t.name!r} has no {'training' if len(t.train) == 0 else 'test'} samples")
    return tasks


def _task(name, classnames, ids, tr, te, info) -> Task:
    return Task(
        name=name,
        classnames=classnames,
        templates=["{}"],
        train=tr,
        test=te,
        info={**info, "class_ids": list(ids), "n_train": len(tr), "n_test": len(te)},
    )
