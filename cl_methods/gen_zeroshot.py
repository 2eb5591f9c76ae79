"""Zero-shot on the generation track: the frozen BLIP-2 / LLaVA, never trained.

Every row of its accuracy matrix equals row 0 (the lower bound of transfer, ECA's
"zero-shot" row); the engine skips training because nothing trains.
"""

from __future__ import annotations

from typing import Literal

from cl_methods import register
from cl_methods._gen import GenConfig, GenMethod


class GenZeroShotConfig(GenConfig):
    params: Literal["none"] = "none"


@register
class GenZeroShot(GenMethod):
    name = "gen_zeroshot"
    Config = GenZeroShotConfig

    def trainable_parameters(self):
        return []

    def training_loss(self, batch, task_index):  # never called: nothing trains
        raise RuntimeError("gen_zeroshot does not train")
