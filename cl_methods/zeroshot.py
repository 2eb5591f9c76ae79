"""Zero-shot: the frozen pretrained model, never trained (the lower bound of transfer).

Every row of its accuracy matrix equals row 0; the engine skips training because it has
no trainable parameters.
"""

from __future__ import annotations

from cl_methods import register
from cl_methods.base import Method, MethodConfig


class ZeroShotConfig(MethodConfig):
    pass


@register
class ZeroShot(Method):
    name = "zeroshot"
    Config = ZeroShotConfig

    def trainable_parameters(self):
        return []

    def training_loss(self, batch, task_index):  # never called: nothing trains
        raise RuntimeError("zeroshot does not train")
