"""DGG: dynamic gradient guidance toward the old optimum, with replay, on LoRA (CVPR 2026).

An optimizer-level method: it adds no model parts to LoRA fine-tuning (its base,
:mod:`cl_methods.lora`); the guidance and the replay are :class:`cl_methods._dgg.GuidedReplay`
(shared with the generation track's ``gen_dgg``), built on the reusable components
:mod:`cl_methods._guidance` and :mod:`cl_methods._replay`.

- Gradient guidance: at the end of every task the LoRA parameters are snapshotted as
  theta_star; in later tasks, at each step after the real gradient is clipped, with
  probability alpha the capped pull ``g_hat`` toward theta_star (one vector over all
  LoRA tensors by default) is added to the gradient.
- Replay: a buffer of past samples is mixed into the current task's data (the engine
  batches the union, as DGG mixes replay data into the training set), each sample scored
  on its own task's head.

Ablations are the paper's: ``no_scaling``, ``no_bernoulli`` (alpha = 1), ``ghat_only``
(no replay), ``replay_only`` (no g_hat).
"""

from __future__ import annotations

from cl_methods import register
from cl_methods._dgg import DGGSettings, GuidedReplay
from cl_methods.lora import LoraFinetune, LoraFinetuneConfig


class DGGConfig(LoraFinetuneConfig, DGGSettings):
    pass


@register
class DGG(GuidedReplay, LoraFinetune):
    name = "dgg"
    Config = DGGConfig
