"""Paired-track experience replay: a reservoir buffer of past clips mixed into every batch.

The buffer is filled at the end of each task with that task's training clips (reservoir
over the stream), so task t replays tasks < t. Replayed clips are scored over every class
seen so far, like the current ones (CIL: no task identity).
"""

from __future__ import annotations

from pydantic import Field

from cl_methods import register
from cl_methods._paired import PairedConfig, PairedMethod
from cl_methods._pm_replay import PairedBuffer


class PairedERConfig(PairedConfig):
    buffer_size: int = Field(default=200, ge=0)
    replay_batch_size: int | None = Field(default=None, ge=1)
    replay_weight: float = Field(default=1.0, ge=0)


def task_samples(method, task_index: int) -> dict:
    """All training samples of a task, stacked (what the buffer is offered)."""
    from torch.utils.data import default_collate

    data = method.ctx.train_sets[task_index]
    return default_collate([data[i] for i in range(len(data))])


@register
class PairedER(PairedMethod):
    name = "pm_er"
    Config = PairedERConfig
    ablations = {"full": {}, "no_replay": {"buffer_size": 0}}

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        self.buffer = PairedBuffer(self.config.buffer_size)

    def replay(self, batch) -> dict:
        n = self.config.replay_batch_size or len(batch["label"])
        return self.buffer.sample(n, self.ctx.generator, batch["label"].device)

    def training_loss(self, batch, task_index):
        terms = super().training_loss(batch, task_index)
        if len(self.buffer) and self.config.replay_weight > 0:
            r = self.replay(batch)
            terms["replay"] = self.config.replay_weight * self.cross_entropy(self.forward(r)["joint"], r["label"])
        return terms

    def after_task(self, task_index, task):
        if self.config.buffer_size:
            s = task_samples(self, task_index)
            self.buffer.add({k: v for k, v in s.items() if k in (*self.model.modalities, "label", "task")}, self.ctx.generator)

    def state_dict(self):
        state = super().state_dict()
        state["buffer"] = self.buffer.state()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.buffer.load(state["buffer"])
