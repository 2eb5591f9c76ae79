"""Dynamic gradient guidance (DGG, CVPR 2026): pull the gradient toward the old optimum.

A reusable gradient component: any method hands it the parameters it trains, takes a
snapshot at each task end (``theta_star``: the previous task's optimum) and calls
:meth:`GradientGuidance.apply` once the engine has clipped the real gradient, before the
optimizer step (the method hook ``after_clip``, see :mod:`cl_methods.base`).

With ``theta`` all trainable tensors flattened into one vector, ``d = theta - theta_star``
and ``g`` the real gradient of the step (the same flattening)::

    g_hat = d                         if ||d|| <= ||g||
    g_hat = d / ||d|| * ||g||         otherwise (``scale``: never larger than the gradient)
    g    <- g + g_hat                 with probability alpha (one Bernoulli draw per step)

Descent on ``g + d`` moves theta toward theta_star, so old-task knowledge is pulled back
without any old data; the Bernoulli draw keeps the pull intermittent so the new task can
still be learned, and the cap stops the pull from dominating the task gradient.

- ``norm: global`` (default): the formula as written, one vector over all trainable
  tensors, so g_hat is parallel to theta - theta_star as a whole and ||g_hat|| <= ||g||
  over the whole model. ``per_tensor`` (an option, the project's earlier default) applies
  the formula to each parameter tensor on its own: each LoRA matrix is capped by its own
  gradient, so g_hat is parallel to theta - theta_star only tensor by tensor.
- Which gradient caps g_hat, and how replay enters it: ``g`` is the gradient of the step's
  loss, i.e. of the current task's training batch. DGG mixes its replay buffer into the
  current task's training set (the engine batches the union, see :mod:`cl_methods._dgg`),
  so replayed samples are part of that batch: their loss terms are in ``g`` and in
  ``||g||``; no separate replay-only or new-data-only gradient is formed.
- Guidance is added after clipping (``training.grad_clip``): clipping bounds the real
  gradient only, and ``g`` above is the gradient as clipped (the one the step applies)
  [choice: the paper's formula has no clipping in it; capping at the clipped norm keeps
  "never larger than the gradient" true for the gradient the step actually uses]. Added
  before clipping, as this project did earlier, a tiny clip would shrink the pull together
  with the gradient, and a large ||g|| would crowd a small pull out of the clipped sum.
  Under fp16 AMP the engine has unscaled the gradients before clipping, so g_hat (in
  parameter units) is added to true gradients; a step whose gradients overflowed is
  skipped by the GradScaler as usual.
- A parameter with no gradient this step (unused by the loss) counts as a zero gradient.
  With ``per_tensor`` its g_hat is capped to zero (it is never moved); with ``global`` it
  only adds nothing to ||g|| and keeps its share of the one vector g_hat [choice].

No guidance during the first task (there is no theta_star yet). ``alpha`` is one value
or one per task from the second task on (DGG on UCIT: 0.1, 0.1, 0.05, 0.05, 0.1 for six
tasks); a longer list than needed is cut, a shorter one is an error at setup.

The authors' code (github.com/lisongze/DGG) could not be retrieved when this was written;
the formula above is the paper's, and the points marked [choice] are this project's.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import field_validator
from torch import nn

from cl_methods.base import MethodConfig

NormMode = Literal["per_tensor", "global"]


class GuidanceSettings(MethodConfig):
    # Probability of guiding a step: one value, or one per task from the second task on.
    alpha: float | list[float] = 0.2
    scale: bool = True  # cap ||g_hat|| at ||g|| (the ablation ``no_scaling`` turns it off)
    # "global": the formula on one vector of all trainable tensors (DGG's); "per_tensor":
    # the formula on each parameter tensor separately (norms and cap per tensor).
    norm: NormMode = "global"

    @field_validator("alpha")
    @classmethod
    def _probabilities(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values:
            raise ValueError("give one probability, or one per task from the second task on")
        for a in values:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha is a probability in [0, 1], got {a}")
        return v

    def check_num_tasks(self, n_tasks: int, where: str = "method.alpha") -> None:
        if isinstance(self.alpha, list) and len(self.alpha) < n_tasks - 1:
            raise ValueError(
                f"{where}: {len(self.alpha)} value(s) for a run of {n_tasks} tasks; give one value, or one "
                f"per task from the second task on ({n_tasks - 1})"
            )


class GradientGuidance:
    """Adds the capped pull toward ``theta_star`` to gradients, with probability alpha."""

    def __init__(self, settings: GuidanceSettings, generator: torch.Generator):
        self.settings = settings
        self.generator = generator
        self.params: list[nn.Parameter] = []
        self.theta_star: list[torch.Tensor] | None = None
        self.alpha_now = 0.0
        # Counters of the current task (curves and the injection-rate test read them).
        self.steps = 0
        self.injections = 0

    # ------------------------------------------------------------------ task boundaries
    def start_task(self, task_index: int, params: list[nn.Parameter]) -> None:
        """Call before training ``task_index`` with the parameters that train in it."""
        self.params = list(params)
        a = self.settings.alpha
        if task_index == 0 or self.theta_star is None:
            self.alpha_now = 0.0
        else:
            self.alpha_now = float(a[task_index - 1]) if isinstance(a, list) else float(a)
        if self.theta_star is not None and len(self.theta_star) != len(self.params):
            raise RuntimeError("the trainable parameters changed between tasks; DGG needs one fixed set")
        self.steps = self.injections = 0

    @torch.no_grad()
    def snapshot(self) -> None:
        """theta_star <- the current parameters (call at the end of every task)."""
        self.theta_star = [p.detach().clone() for p in self.params]

    # ------------------------------------------------------------------ the step
    def draw(self) -> bool:
        """One Bernoulli(alpha) draw from the trial's generator (one per step, always
        drawn while a theta_star exists, so the stream does not depend on alpha's value)."""
        if self.theta_star is None:
            return False
        return bool(torch.rand((), generator=self.generator) < self.alpha_now)

    @torch.no_grad()
    def apply(self) -> bool:
        """Inject g_hat into ``p.grad`` with probability alpha; return whether it did.

        Call it on the step's final real gradient: after backward, AMP unscaling and
        clipping, before the optimizer step (the ``after_clip`` hook)."""
        if self.theta_star is None:
            return False
        self.steps += 1
        if not self.draw():
            return False
        self.injections += 1
        add_guidance(self.params, self.theta_star, self.settings.scale, self.settings.norm)
        return True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"theta_star": None if self.theta_star is None else [t.clone() for t in self.theta_star]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ts = state.get("theta_star")
        self.theta_star = None if ts is None else [t.clone() for t in ts]


def guidance_terms(
    params: list[nn.Parameter], theta_star: list[torch.Tensor], scale: bool = True, norm: NormMode = "global"
) -> list[torch.Tensor]:
    """g_hat, one tensor per parameter (no side effects): ``theta - theta_star``, capped at
    ||grad|| over all tensors together (``global``) or over each tensor (``per_tensor``).

    Written with torch's multi-tensor (``_foreach``) kernels: a handful of launches for
    all tensors instead of several per tensor, which is what keeps DGG's step overhead
    small on models with hundreds of LoRA matrices.
    """
    diffs = torch._foreach_sub([p.detach() for p in params], [s.to(p.device) for p, s in zip(params, theta_star)])
    if not scale:
        return diffs
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dn = torch.stack([n.float() for n in torch._foreach_norm(diffs)])
    gn = torch.stack([n.float() for n in torch._foreach_norm(grads)])
    if norm == "global":
        # The norms of the one flattened vector: the root of the summed squared tensor norms.
        dn, gn = torch.linalg.vector_norm(dn).expand_as(dn), torch.linalg.vector_norm(gn).expand_as(gn)
    elif norm != "per_tensor":
        raise ValueError(f"norm must be 'global' or 'per_tensor', got {norm!r}")
    # Scale d to ||g|| where ||d|| > ||g||; leave it whole otherwise.
    factor = torch.where(dn > gn, gn / dn.clamp_min(1e-30), torch.ones_like(dn))
    torch._foreach_mul_(diffs, [f.to(d.dtype) for f, d in zip(factor.unbind(), diffs)])
    return diffs


@torch.no_grad()
def add_guidance(
    params: list[nn.Parameter], theta_star: list[torch.Tensor], scale: bool = True, norm: NormMode = "global"
) -> None:
    """``p.grad += g_hat`` for every parameter (a missing gradient starts at zero)."""
    ghat = guidance_terms(params, theta_star, scale, norm)
    for p, gh in zip(params, ghat):
        if p.grad is None:
            p.grad = gh
    with_grad = [(p.grad, gh) for p, gh in zip(params, ghat) if p.grad is not gh]
    if with_grad:
        torch._foreach_add_([g for g, _ in with_grad], [gh for _, gh in with_grad])
