"""A replay buffer of past samples, shared by every method that replays (ER, DGG, ...).

The buffer stores *which* samples it holds, as (task position, index in that task's
training set) pairs, and reads them from the task datasets when they are replayed. The
datasets are fixed and their transforms deterministic, so a pair names one sample
exactly; a checkpoint therefore stays a few kilobytes even for 500 images per task at
224 pixels (as tensors that would be gigabytes per task boundary), and any track's
samples work (text targets, audio), whatever keys they carry.

It is filled at the end of each task (after training on it), so task t replays tasks < t
only. Capacity: ``size`` samples in all (``size_per="total"``), or ``size`` more for every
task seen (``size_per="task"``: DGG's "0.5k replay per task"). Selection:

- ``reservoir``: reservoir sampling over the whole stream: every sample seen so far has
  the same chance of being in the buffer (Vitter's algorithm R);
- ``per_task``: an equal quota per seen task; at each task end earlier tasks keep the
  first ``quota`` of their stored samples and the new task fills the rest at random.

Every random choice uses the generator it is given (the engine reseeds the method's
generator per task), and :meth:`state_dict` holds the stored pairs, so a resumed trial
continues with exactly the same buffer.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch.utils.data import Dataset

from mmcl.data.base import collate

Strategy = Literal["reservoir", "per_task"]
SizePer = Literal["total", "task"]


class ReplayBuffer(Dataset):
    """Stored (task, index) pairs over ``sources`` (one training set per task position,
    whose samples carry their ``"task"`` key); also a ``Dataset`` of those samples."""

    def __init__(
        self, size: int, strategy: Strategy = "reservoir", size_per: SizePer = "total", sources: Sequence[Dataset] = ()
    ):
        if size < 0:
            raise ValueError(f"replay buffer size must be >= 0, got {size}")
        self.size, self.strategy, self.size_per = size, strategy, size_per
        self.sources = sources
        self.task = torch.empty(0, dtype=torch.long)
        self.index = torch.empty(0, dtype=torch.long)
        self.seen = 0  # stream samples offered so far (reservoir)
        self.tasks_seen = 0

    # ------------------------------------------------------------------ Dataset
    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.sources[int(self.task[i])][int(self.index[i])]

    @property
    def capacity(self) -> int:
        return self.size * max(1, self.tasks_seen) if self.size_per == "task" else self.size

    def sample(self, n: int, generator: torch.Generator) -> dict[str, Any]:
        """``n`` stored samples drawn uniformly with replacement, collated as a batch."""
        idx = torch.randint(len(self), (n,), generator=generator)
        # The engine's collate: text samples (prompts, reference lists) batch as lists.
        return collate([self[i] for i in idx.tolist()])

    # ------------------------------------------------------------------ filling
    def add_task(self, task_index: int, generator: torch.Generator) -> None:
        """Offer the samples of a finished task (``sources[task_index]``)."""
        self.tasks_seen += 1
        if self.size == 0:
            return
        n = len(self.sources[task_index])  # type: ignore[arg-type]
        if self.strategy == "reservoir":
            self._reservoir(task_index, n, generator)
        else:
            self._per_task(task_index, n, generator)

    def _reservoir(self, task_index: int, n: int, g: torch.Generator) -> None:
        cap = self.capacity
        task, index = self.task.tolist(), self.index.tolist()
        for i in range(n):
            if len(task) < cap:
                task.append(task_index)
                index.append(i)
            else:
                j = int(torch.randint(self.seen + 1, (1,), generator=g))
                if j < cap:
                    task[j], index[j] = task_index, i
            self.seen += 1
        self.task, self.index = torch.tensor(task, dtype=torch.long), torch.tensor(index, dtype=torch.long)

    def _per_task(self, task_index: int, n: int, g: torch.Generator) -> None:
        quota = self.size if self.size_per == "task" else self.size // self.tasks_seen
        if len(self):
            keep = torch.cat([torch.nonzero(self.task == t).flatten()[:quota] for t in torch.unique(self.task).tolist()])
            keep = keep.sort().values
            self.task, self.index = self.task[keep], self.index[keep]
        room = self.capacity - len(self)
        new = torch.randperm(n, generator=g)[:room]
        self.task = torch.cat([self.task, torch.full((len(new),), task_index, dtype=torch.long)])
        self.index = torch.cat([self.index, new])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task.clone(), "index": self.index.clone(), "seen": self.seen, "tasks_seen": self.tasks_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task, self.index = state["task"].clone(), state["index"].clone()
        self.seen, self.tasks_seen = state["seen"], state["tasks_seen"]
