"""Experience replay (ER; Chaudhry et al., 2019) with a fixed-size sample buffer.

A buffer of past samples is mixed into every training batch of later tasks; the replayed
samples are scored on their own task's class head. ER draws a separate replay batch
each step and adds its cross-entropy as the ``replay`` term. The buffer
(:mod:`cl_methods._replay`: ``reservoir`` or ``per_task`` selection, filled at each task
end, part of the checkpoint) is shared with the other replaying methods.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cl_methods import register
from cl_methods._replay import ReplayBuffer
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
        self.buffer = ReplayBuffer(self.config.buffer_size, self.config.strategy, sources=ctx.train_sets)

    def training_loss(self, batch, task_index):
        terms = {"ce": self.task_cross_entropy(self.logits, batch)}
        if len(self.buffer) and self.config.replay_weight > 0:
            n = self.config.replay_batch_size or len(batch["label"])
            dev = batch["image"].device
            replay = {k: v.to(dev) for k, v in self.buffer.sample(n, self.ctx.generator).items()}
            terms["replay"] = self.config.replay_weight * self.task_cross_entropy(self.logits, replay)
        return terms

    def after_task(self, task_index, task):
        self.buffer.add_task(task_index, self.ctx.generator)

    def state_dict(self):
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
