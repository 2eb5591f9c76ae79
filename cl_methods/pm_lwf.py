"""Paired-track LwF (Li & Hoiem): distil the previous model's logits on the current clips.

The teacher is the model at the end of the previous task (before the head grows); the
KL divergence at ``temperature`` is taken over the classes it knew (under DIL, all).
"""

from __future__ import annotations

import torch
from pydantic import Field

from cl_methods import register
from cl_methods._cma_model import kd_loss
from cl_methods._paired import PairedConfig, PairedMethod


class PairedLwFConfig(PairedConfig):
    distill_weight: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=2.0, gt=0)


@register
class PairedLwF(PairedMethod):
    name = "pm_lwf"
    Config = PairedLwFConfig
    ablations = {"full": {}, "no_distill": {"distill_weight": 0.0}}

    def before_task(self, task_index, task):
        self.n_old = len(self.model.head.seen)
        self.teacher = self.snapshot() if task_index > 0 and self.config.distill_weight > 0 else None
        super().before_task(task_index, task)

    def training_loss(self, batch, task_index):
        out = self.forward(batch)
        terms = {"ce": self.cross_entropy(out["joint"], batch["label"])}
        if self.teacher is not None and self.n_old:
            with torch.no_grad():
                t = self.teacher.head.seen_logits(self.forward(batch, self.teacher)["joint"])
            s = self.model.head.seen_logits(out["joint"])[:, : self.n_old]
            terms["distill"] = self.config.distill_weight * kd_loss(s, t, self.config.temperature)
        return terms

    def after_task(self, task_index, task):
        self.teacher = None
