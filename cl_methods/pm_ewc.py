"""Paired-track EWC (Kirkpatrick et al., 2017), online form (Schwarz et al., 2018).

After each task, a diagonal empirical Fisher of the trainable parameters on the task's
training clips (squared gradients of mini-batch cross-entropy, scaled by the batch size:
a cheap stand-in for per-sample gradients) is added to the running Fisher (decayed by
``gamma``), and the parameters are stored as the anchor. Later tasks add
``ewc_lambda / 2 * sum F (theta - theta*)^2`` over the parameters that existed then
(head chunks of new classes are unconstrained).
"""

from __future__ import annotations

import torch
from pydantic import Field

from cl_methods import register
from cl_methods._paired import PairedConfig, PairedMethod


class PairedEWCConfig(PairedConfig):
    ewc_lambda: float = Field(default=100.0, ge=0)
    gamma: float = Field(default=1.0, ge=0, le=1)
    fisher_batch_size: int = Field(default=32, ge=1)


@register
class PairedEWC(PairedMethod):
    name = "pm_ewc"
    Config = PairedEWCConfig
    ablations = {"full": {}, "no_penalty": {"ewc_lambda": 0.0}}

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def training_loss(self, batch, task_index):
        terms = super().training_loss(batch, task_index)
        if self.fisher and self.config.ewc_lambda > 0:
            params = dict(self.model.named_parameters())
            pen = sum((f * (params[n] - self.anchor[n]) ** 2).sum() for n, f in self.fisher.items() if params[n].requires_grad)
            terms["ewc"] = 0.5 * self.config.ewc_lambda * pen
        return terms

    def after_task(self, task_index, task):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        fisher = {n: torch.zeros_like(p) for n, p in named}
        data = self.ctx.train_sets[task_index]
        for batch in self.ctx.loader(data, self.config.fisher_batch_size):
            batch = {k: v.to(self.ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = self.cross_entropy(self.forward(batch)["joint"], batch["label"])
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (n, _), gr in zip(named, grads):
                if gr is not None:
                    fisher[n] += gr.detach() ** 2 * len(batch["label"])
        for n in fisher:
            fisher[n] /= len(data)
            old = self.fisher.get(n)
            fisher[n] = fisher[n] + (self.config.gamma * old if old is not None else 0)
        self.fisher = fisher
        self.anchor = {n: p.detach().clone() for n, p in named}

    def state_dict(self):
        state = super().state_dict()
        state["ewc"] = {"fisher": dict(self.fisher), "anchor": dict(self.anchor)}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.fisher = dict(state["ewc"]["fisher"])
        self.anchor = dict(state["ewc"]["anchor"])
