"""Paired-track DER++ (Buzzega et al., NeurIPS 2020): replay with stored logits.

The buffer keeps clips with the logits the model gave them. Each step adds
``alpha * MSE(current logits, stored logits)`` on one replayed batch and
``beta * CE`` on another. Choices: the buffer is filled (reservoir) at the end of each
task with the model's logits at that point, not during training (one pass, no duplicates
across epochs); under CIL the MSE covers the classes that were seen when the logits were
stored (a mask), since later classes had no logit then.
"""

from __future__ import annotations

import torch
from pydantic import Field

from cl_methods import register
from cl_methods._paired import PairedConfig, PairedMethod
from cl_methods._pm_replay import PairedBuffer
from cl_methods.pm_er import task_samples


class DERppConfig(PairedConfig):
    buffer_size: int = Field(default=200, ge=0)
    alpha: float = Field(default=0.3, ge=0)
    beta: float = Field(default=0.5, ge=0)
    replay_batch_size: int | None = Field(default=None, ge=1)


@register
class PairedDERpp(PairedMethod):
    name = "pm_derpp"
    Config = DERppConfig
    ablations = {"full": {}, "no_logits": {"alpha": 0.0}, "no_replay": {"buffer_size": 0}}

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        self.buffer = PairedBuffer(self.config.buffer_size)

    def training_loss(self, batch, task_index):
        terms = super().training_loss(batch, task_index)
        if not len(self.buffer):
            return terms
        n = self.config.replay_batch_size or len(batch["label"])
        dev = batch["label"].device
        if self.config.alpha > 0:
            r = self.buffer.sample(n, self.ctx.generator, dev)
            logits = self.model.head(self.forward(r)["joint"])
            mask = r["logit_mask"]
            diff = torch.where(mask, logits - r["logits"], torch.zeros_like(logits))
            terms["logits"] = self.config.alpha * (diff**2).sum() / mask.sum().clamp(min=1)
        if self.config.beta > 0:
            r = self.buffer.sample(n, self.ctx.generator, dev)
            terms["replay"] = self.config.beta * self.cross_entropy(self.forward(r)["joint"], r["label"])
        return terms

    @torch.no_grad()
    def after_task(self, task_index, task):
        if not self.config.buffer_size:
            return
        s = task_samples(self, task_index)
        s = {k: v for k, v in s.items() if k in (*self.model.modalities, "label", "task")}
        logits = []
        for i in range(0, len(s["label"]), self.run.evaluation.batch_size):
            chunk = {k: v[i : i + self.run.evaluation.batch_size].to(self.ctx.device) for k, v in s.items()}
            logits.append(self.model.head(self.forward(chunk)["joint"]).cpu())
        full = torch.cat(logits)
        s["logit_mask"] = torch.isfinite(full)
        s["logits"] = torch.where(s["logit_mask"], full, torch.zeros_like(full))
        self.buffer.add(s, self.ctx.generator)

    def state_dict(self):
        state = super().state_dict()
        state["buffer"] = self.buffer.state()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.buffer.load(state["buffer"])
