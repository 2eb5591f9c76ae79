"""A reservoir buffer of paired samples for the paired track's replay baselines.

Private to ER / DER++ of the paired track. Unlike the shared
:class:`cl_methods._replay.ReplayBuffer` (which stores (task, index) pairs and reads the
samples back from the datasets), this one stores tensors, because DER++ keeps values that
exist in no dataset: the logits the model gave each sample when it was stored. Samples
are kept as the encoders' input tensors, keyed like the batch (``video``, ``audio``,
``label``, ``task`` and any extra per-sample tensor such as DER++'s logits).
"""

from __future__ import annotations

from typing import Any

import torch


class PairedBuffer:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.data: dict[str, torch.Tensor] = {}
        self.seen = 0  # stream samples offered so far (reservoir sampling)

    def __len__(self) -> int:
        return len(self.data["label"]) if self.data else 0

    def add(self, samples: dict[str, torch.Tensor], g: torch.Generator) -> None:
        """Reservoir sampling (Vitter's algorithm R): every sample offered so far has the
        same chance ``capacity / seen`` to be in the buffer."""
        n = len(samples["label"])
        for i in range(n):
            row = {k: v[i].detach().cpu() for k, v in samples.items()}
            if len(self) < self.capacity:
                for k, v in row.items():
                    self.data[k] = v[None].clone() if k not in self.data else torch.cat([self.data[k], v[None]])
            else:
                j = int(torch.randint(self.seen + 1, (1,), generator=g))
                if j < self.capacity:
                    for k, v in row.items():
                        self.data[k][j] = v
            self.seen += 1

    def sample(self, n: int, g: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self), (n,), generator=g)
        return {k: v[idx].to(device) for k, v in self.data.items()}

    def state(self) -> dict[str, Any]:
        return {"data": dict(self.data), "seen": self.seen}

    def load(self, state: dict[str, Any]) -> None:
        self.data, self.seen = dict(state["data"]), state["seen"]
