"""Learning without Forgetting (Li & Hoiem, TPAMI 2017), on a CLIP backbone.

Before each task (after the first) the current model is copied as a frozen teacher.
While training task t, the student's logits on the current images are distilled towards
the teacher's, with temperature ``temperature``, on the class heads of the earlier tasks
(``heads="previous"``, the original LwF) or of all seen tasks including the current one
(``heads="seen"``). There is no old data: only the current task's images are used.

The teacher is rebuilt from the model at the task boundary, so it is not part of the
checkpoint: a resumed run rebuilds the identical teacher.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from cl_methods import register
from cl_methods.base import Method, MethodConfig, set_trainable


class LwFConfig(MethodConfig):
    params: Literal["image", "text", "all"] | list[str] = "image"
    # Weight of the distillation term against the cross-entropy.
    distill_weight: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=2.0, gt=0)
    heads: Literal["previous", "seen"] = "previous"


@register
class LwF(Method):
    name = "lwf"
    Config = LwFConfig
    ablations = {"full": {}, "no_distill": {"distill_weight": 0.0}}

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        set_trainable(backbone, self.config.params)
        self.teacher = None

    def before_task(self, task_index, task):
        self.teacher = None
        if task_index > 0 and self.config.distill_weight > 0:
            self.teacher = copy.deepcopy(self.backbone)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.teacher.eval()

    def training_loss(self, batch, task_index):
        terms = {"ce": self.task_cross_entropy(self.logits, batch)}
        if self.teacher is not None:
            last = task_index + 1 if self.config.heads == "seen" else task_index
            images = batch["image"]
            student_feat = self.backbone.encode_image(images)
            with torch.no_grad():
                teacher_feat = self.teacher.encode_image(images)
            T = self.config.temperature
            kd = torch.zeros((), device=images.device)
            for old in self.ctx.tasks[:last]:
                head = self.teacher.text_head(old, self.ctx.templates)
                scale = self.teacher.logit_scale()
                s = scale * student_feat @ self.backbone.text_head(old, self.ctx.templates).T
                with torch.no_grad():
                    t = scale * teacher_feat @ head.T
                kd = kd + F.kl_div(
                    F.log_softmax(s.float() / T, -1), F.softmax(t.float() / T, -1), reduction="batchmean"
                ) * (T * T)
            terms["distill"] = self.config.distill_weight * kd / max(last, 1)
        return terms

    def after_task(self, task_index, task):
        self.teacher = None  # free the copy between tasks

