"""Learning without Forgetting on the generation track (Li & Hoiem, TPAMI 2017), on the
generated-token logits of a BLIP-2 / LLaVA.

Before each task after the first, the trained parameters (adapters or LoRA) are
snapshotted as the teacher. While training task t, for the current batch the teacher
answers (greedy decoding, ``distill_on: generated``: the old model's own outputs on the
new data, as LwF records them) or is teacher-forced on the batch targets
(``distill_on: targets``); the student is teacher-forced on the same tokens and the KL
divergence between the teacher's and the student's next-token distributions (temperature
``temperature``, scaled by T^2, averaged over the distilled tokens) is added with weight
``distill_weight``.

The teacher is the same model with the snapshot swapped in for one no-grad forward (no
copy of a 7B language model); it is rebuilt from the parameters at the task boundary, so
a resumed run rebuilds the identical teacher.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from cl_methods import register
from cl_methods._gen import GenConfig, GenMethod


class GenLwFConfig(GenConfig):
    distill_weight: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=2.0, gt=0)
    distill_on: Literal["generated", "targets"] = "generated"
    # Length of the teacher's answers (distill_on: generated).
    max_new_tokens: int = Field(default=20, ge=1)


@contextlib.contextmanager
def swapped(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily load ``values`` into ``params`` (under no_grad; restored after)."""
    with torch.no_grad():
        current = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, current):
                p.copy_(v)


@register
class GenLwF(GenMethod):
    name = "gen_lwf"
    Config = GenLwFConfig
    ablations = {"full": {}, "no_distill": {"distill_weight": 0.0}, "on_targets": {"distill_on": "targets"}}

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        self.teacher: list[torch.Tensor] | None = None

    def before_task(self, task_index, task):
        self.teacher = None
        if task_index > 0 and self.config.distill_weight > 0:
            self.teacher = [p.detach().clone() for p in self.trainable_parameters()]

    def training_loss(self, batch, task_index):
        if self.teacher is None:
            return super().training_loss(batch, task_index)
        cfg, bb = self.config, self.backbone
        images, prompts = batch["image"], batch["prompt"]
        # Teacher first: swapping its weights in and out changes the parameters in place,
        # which must happen before any forward whose graph saves them.
        self._train_mode(False)
        with swapped(self.trainable_parameters(), self.teacher), torch.no_grad():
            targets = bb.generate(images, prompts, cfg.max_new_tokens) if cfg.distill_on == "generated" else batch["target"]
            t_logits, _, mask = bb.target_logits(images, prompts, targets)
        terms = super().training_loss(batch, task_index)
        s_logits, _, _ = bb.target_logits(images, prompts, targets)
        T = cfg.temperature
        kl = F.kl_div(F.log_softmax(s_logits.float() / T, -1), F.log_softmax(t_logits.float() / T, -1),
                      reduction="none", log_target=True).sum(-1)  # fmt: skip
        kd = (kl * mask).sum() / mask.sum().clamp(min=1) * (T * T)
        terms["distill"] = cfg.distill_weight * kd
        return terms

    def after_task(self, task_index, task):
        self.teacher = None
