"""Experience replay (ER; Chaudhry et al., 2019) with a fixed-size sample buffer.

A buffer of past samples is mixed into every training batch of later tasks; the replayed
samples are scored on their own task's class head. ``strategy``:

- ``reservoir``: reservoir sampling over the whole stream (every sample seen so far has
  the same chance to be in the buffer);
- ``per_task``: an equal quota per seen task, re-balanced at each task end.

The buffer is filled at the end of each task (after training on it), so task t trains
with replay of tasks < t only. It is part of ``state_dict`` so a resumed trial continues
with the same buffer. Samples are kept as preprocessed tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cl_methods import register
from cl_methods.base import Method, MethodConfig, set_trainable


class ERConfig(MethodConfig):
    params: Literal["image", "text", "all"] | list[str] = "image"
    buffer_size: int = Field(default=200, ge=0)
    strategy: Literal["reservoir", "per_task"] = "reservoir"
    # Replayed samples per batch; None = the training batch size.
    replay_batch_size: int | None = Field(default=None, ge=1)
    replay_weight: float = Field(default=1.0, ge=0)


@register
class ExperienceReplay(Method):
    name = "er"
    Config = ERConfig
    ablations = {"full": {}, "no_replay": {"buffer_size": 0}}

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        set_trainable(backbone, self.config.params)
        self.images: torch.Tensor | None = None
        self.labels = torch.empty(0, dtype=torch.long)
        self.tasks = torch.empty(0, dtype=torch.long)
        self.seen = 0  # stream samples seen (reservoir)

    def __len__(self) -> int:
        return len(self.labels)

    def training_loss(self, batch, task_index):
        terms = {"ce": self.task_cross_entropy(self.logits, batch)}
        if len(self) and self.config.replay_weight > 0:
            n = self.config.replay_batch_size or len(batch["label"])
            idx = torch.randint(len(self), (n,), generator=self.ctx.generator)
            dev = batch["image"].device
            replay = {"image": self.images[idx].to(dev), "label": self.labels[idx].to(dev), "task": self.tasks[idx].to(dev)}
            terms["replay"] = self.config.replay_weight * self.task_cross_entropy(self.logits, replay)
        return terms

    def after_task(self, task_index, task):
        if self.config.buffer_size == 0:
            return
        data = self.ctx.train_sets[task_index]
        g = self.ctx.generator
        if self.config.strategy == "reservoir":
            for i in range(len(data)):
                if len(self) < self.config.buffer_size:
                    self._append(data[i])
                else:
                    j = int(torch.randint(self.seen + 1, (1,), generator=g))
                    if j < self.config.buffer_size:
                        self._put(j, data[i])
                self.seen += 1
        else:
            n_tasks = task_index + 1
            quota = self.config.buffer_size // n_tasks
            keep = []
            for t in range(task_index):
                where = torch.nonzero(self.tasks == t).flatten()
                keep.append(where[:quota])
            keep_idx = torch.cat(keep) if keep else torch.empty(0, dtype=torch.long)
            if self.images is not None:
                self.images, self.labels, self.tasks = self.images[keep_idx], self.labels[keep_idx], self.tasks[keep_idx]
            new = torch.randperm(len(data), generator=g)[: self.config.buffer_size - len(keep_idx)]
            for i in new.tolist():
                self._append(data[i])

    def _append(self, sample):
        img = sample["image"].unsqueeze(0)
        self.images = img.clone() if self.images is None else torch.cat([self.images, img])
        self.labels = torch.cat([self.labels, torch.tensor([sample["label"]])])
        self.tasks = torch.cat([self.tasks, torch.tensor([sample["task"]])])

    def _put(self, j, sample):
        self.images[j] = sample["image"]
        self.labels[j] = sample["label"]
        self.tasks[j] = sample["task"]


    def state_dict(self):
        state = super().state_dict()
        state["buffer"] = {"images": self.images, "labels": self.labels, "tasks": self.tasks, "seen": self.seen}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        b = state["buffer"]
        self.images, self.labels, self.tasks, self.seen = b["images"], b["labels"], b["tasks"], b["seen"]
