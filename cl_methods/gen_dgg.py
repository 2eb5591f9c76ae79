"""DGG on the generation track: gradient guidance toward the previous task's optimum plus
replay, on LLaVA's LoRA or BLIP-2's Q-Former adapters (DGG: LLaVA-7B + LoRA, CVPR 2026).

DGG's mixin (:class:`cl_methods._dgg.GuidedReplay`, shared with the CLIP track's
:mod:`cl_methods.dgg`) in front of :class:`~cl_methods._gen.GenMethod`: the reusable
:class:`cl_methods._guidance.GradientGuidance` (theta_star snapshotted at each task end;
with probability alpha the capped pull toward it is added to the gradient once the
engine has clipped it, before the optimizer step)
and :class:`cl_methods._replay.ReplayBuffer` (past text samples mixed into the current
task's data; the buffer stores (task, index) pairs, so prompts and references replay as
they are). The loss is :class:`~cl_methods._gen.GenMethod`'s LM loss of the targets.

State for an exact resume: the trained adapters / LoRA, theta_star and the buffer.
Ablations as DGG's: ``no_scaling``, ``no_bernoulli``, ``ghat_only``, ``replay_only``.
"""

from __future__ import annotations

from cl_methods import register
from cl_methods._dgg import DGGSettings, GuidedReplay
from cl_methods._gen import GenConfig, GenMethod


class GenDGGConfig(GenConfig, DGGSettings):
    pass


@register
class GenDGG(GuidedReplay, GenMethod):
    name = "gen_dgg"
    Config = GenDGGConfig
