"""Sequential fine-tuning on the generation track: one set of parallel adapters in
BLIP-2's Q-Former (or peft LoRA on LLaVA's language model), trained task after task on
the LM loss of the targets, nothing against forgetting.

The baseline ECA's adapters and DGG's guidance are measured against; ``params`` picks
the trained part (see :mod:`cl_methods._gen`: ``auto`` = adapters on BLIP-2, LoRA on
LLaVA).
"""

from __future__ import annotations

from cl_methods import register
from cl_methods._gen import GenConfig, GenMethod


class GenAdapterConfig(GenConfig):
    pass


@register
class GenAdapter(GenMethod):
    name = "gen_adapter"
    Config = GenAdapterConfig
