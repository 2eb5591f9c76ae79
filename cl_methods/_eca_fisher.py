"""FeDEx (ECA): decide from gradient statistics whether a new task needs a new adapter.

At the end of every task the mean gradient ``g_old`` and the diagonal empirical Fisher
``F_old`` of the LM loss, over that task's data and w.r.t. the adapter that trained on
it, are stored. At the start of task ``t`` the mean gradient ``g_new`` of the new task's
loss w.r.t. the same (current) adapter is measured, and for every earlier task on that
adapter::

    I   = -g_old * g_new + 0.5 * F_old * g_new^2          (elementwise)
    I+  = sum relu(I)      (harm)        I- = sum relu(-I)      (gain)
    S   = I+ / (I+ + I-)

``sum I`` is the second-order estimate of the change of the old task's loss after one
unit step along ``-g_new`` (first-order term ``g_old . (-g_new)``, curvature ``F_old``
standing in for the Hessian), so ``S <= 0.5`` exactly when that estimate is ``<= 0``.
A new adapter is added iff ``S > threshold`` for any earlier task on the current adapter.
``I+ + I- = 0`` (no gradient at all) counts as ``S = 0``: nothing to harm.

Gradients, as ECA's ``update_Q_fisher``: one backward per mini-batch of ``batch_size``
samples (ECA: its training batch, 16), over the task's whole training set; ``g`` is the
mean over batches of the batch gradients and ``F`` the mean over batches of their squares
(ECA keeps both as running means over its loader's iterations, so a short last batch
counts as much as a full one; so does this code). With mini-batches ``F`` is about
``g^2 + Var/batch_size``: the variance part of the empirical Fisher shrinks by the batch
size, the curvature term of ``I`` with it, and ``S`` leans on the first-order term. With
``batch_size = 1`` (an option) the gradients are per-sample and ``F`` is the textbook
empirical Fisher ``mean_i g_i^2``; the same threshold then expands more readily.
``max_samples`` (None = all) caps the pass; the samples are the first ones of a
permutation drawn from the method's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from pydantic import Field

from cl_methods.base import MethodConfig


class FisherSettings(MethodConfig):
    # Expand when S > threshold (ECA: 0.5, 0.3 on one benchmark, for mini-batch F; see the
    # module docstring for how batch_size changes what S measures).
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    batch_size: int = Field(default=16, ge=1)  # ECA: 16 (its training batch); 1 = per-sample gradients
    max_samples: int | None = Field(default=None, ge=1)  # cap on samples per pass; None = all (ECA)


@dataclass
class GradStats:
    """Mean gradient and diagonal Fisher of one task, w.r.t. one adapter's parameters."""

    adapter_index: int
    grad_mean: list[torch.Tensor]
    fisher: list[torch.Tensor]
    n: int

    def state_dict(self) -> dict[str, Any]:
        return {
            "adapter_index": self.adapter_index,
            "grad_mean": [g.detach().cpu().clone() for g in self.grad_mean],
            "fisher": [f.detach().cpu().clone() for f in self.fisher],
            "n": self.n,
        }

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "GradStats":
        return cls(s["adapter_index"], [g.clone() for g in s["grad_mean"]], [f.clone() for f in s["fisher"]], s["n"])


def gradient_stats(
    params: list[torch.Tensor],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    batch_size_of: Callable[[Any], int],
    with_fisher: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, int]:
    """Mean batch gradient and mean squared batch gradient of ``loss_fn`` (over batches).

    Uses ``torch.autograd.grad`` so ``.grad`` of the parameters (the engine's business)
    is never touched. Statistics are accumulated in fp32.
    """
    g_sum = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    f_sum = [torch.zeros_like(p, dtype=torch.float32) for p in params] if with_fisher else None
    n_samples = n_batches = 0
    for batch in batches:
        loss = loss_fn(batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        b = batch_size_of(batch)
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().float()
            g_sum[i].add_(g)
            if f_sum is not None:
                f_sum[i].add_(g * g)
        n_samples += b
        n_batches += 1
    if n_samples == 0:
        raise ValueError("gradient statistics over no data")
    mean = [g / n_batches for g in g_sum]
    fisher = [f / n_batches for f in f_sum] if f_sum is not None else None
    return mean, fisher, n_samples


def interference(
    g_old: list[torch.Tensor], fisher_old: list[torch.Tensor], g_new: list[torch.Tensor]
) -> tuple[float, float, float]:
    """(harm I+, gain I-, S) of moving along ``-g_new`` for the task behind (g_old, F_old)."""
    harm = gain = 0.0
    for go, fo, gn in zip(g_old, fisher_old, g_new):
        dt = torch.promote_types(go.dtype, torch.float32)  # fp32 at least; float64 stays
        go, fo, gn = go.to(dt), fo.to(go.device, dt), gn.to(go.device, dt)
        i = -go * gn + 0.5 * fo * gn * gn
        harm += float(i.clamp_min(0).sum())
        gain += float((-i).clamp_min(0).sum())
    total = harm + gain
    return harm, gain, (harm / total if total > 0 else 0.0)


class FeDEx:
    """Stored per-task statistics and the expansion decision."""

    def __init__(self, settings: FisherSettings):
        self.settings = settings
        self.tasks: dict[int, GradStats] = {}
        self.last_scores: dict[int, float] = {}  # task -> S of the latest decision (logs, tests)

    def record(self, task_index: int, stats: GradStats) -> None:
        self.tasks[task_index] = stats

    def scores(self, g_new: list[torch.Tensor], adapter_index: int) -> dict[int, float]:
        """S for every earlier task trained on adapter ``adapter_index``."""
        return {
            t: interference(s.grad_mean, s.fisher, g_new)[2]
            for t, s in sorted(self.tasks.items())
            if s.adapter_index == adapter_index
        }

    def should_expand(self, g_new: list[torch.Tensor], adapter_index: int) -> bool:
        self.last_scores = self.scores(g_new, adapter_index)
        return any(s > self.settings.threshold for s in self.last_scores.values())

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": {t: s.state_dict() for t, s in self.tasks.items()}, "last_scores": dict(self.last_scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks = {int(t): GradStats.from_state(s) for t, s in state["tasks"].items()}
        self.last_scores = dict(state.get("last_scores", {}))
