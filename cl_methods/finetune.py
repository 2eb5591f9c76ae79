"""Sequential fine-tuning: train the chosen backbone parameters on each task in turn.

The usual lower bound on forgetting. ``params`` picks what trains: the image tower (the
ZSCL / MTIL "continual fine-tune" baseline), the text tower, both, or parameter-name
prefixes. Loss: cross-entropy of each sample on its own task's text head.
"""

from __future__ import annotations

from typing import Literal

from cl_methods import register
from cl_methods.base import Method, MethodConfig, set_trainable


class FinetuneConfig(MethodConfig):
    params: Literal["image", "text", "all"] | list[str] = "image"


@register
class Finetune(Method):
    name = "finetune"
    Config = FinetuneConfig

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        set_trainable(backbone, self.config.params)

    def training_loss(self, batch, task_index):
        return {"ce": self.task_cross_entropy(self.logits, batch)}

