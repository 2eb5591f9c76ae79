"""Paired-track sequential fine-tuning: the CMA architecture trained with cross-entropy only.

Same frozen encoders, MoE adapters, fusion and growing head as CMA (``cl_methods/_cma_model.py``),
no freezing, no distillation, no alignment or preservation: the lower bound of the track.
"""

from __future__ import annotations

from cl_methods import register
from cl_methods._paired import PairedConfig, PairedMethod


@register
class PairedFinetune(PairedMethod):
    name = "pm_finetune"
    Config = PairedConfig
