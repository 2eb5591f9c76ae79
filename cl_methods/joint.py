"""Joint training: the upper bound that ignores the continual constraint.

At task t the model trains on the union of the training sets of tasks 0..t (each sample
scored on its own task's head), continuing from the model after task t-1. Row T of its
matrix is a model trained on all tasks together; earlier rows are the cumulative
multi-task models. Same optimizer budget per step as every other method; the number of
steps per task grows with the data (``training.max_steps`` caps it).
"""

from __future__ import annotations

from typing import Literal

from torch.utils.data import ConcatDataset

from cl_methods import register
from cl_methods.base import Method, MethodConfig, set_trainable


class JointConfig(MethodConfig):
    params: Literal["image", "text", "all"] | list[str] = "image"


@register
class Joint(Method):
    name = "joint"
    Config = JointConfig

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        set_trainable(backbone, self.config.params)

    def train_dataset(self, task_index):
        return ConcatDataset(self.ctx.train_sets[: task_index + 1])

    def training_loss(self, batch, task_index):
        return {"ce": self.task_cross_entropy(self.logits, batch)}

