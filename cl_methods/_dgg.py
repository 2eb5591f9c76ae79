"""DGG as a mixin: gradient guidance + replay on top of whatever a base method trains.

DGG adds no model parts; it edits gradients (:mod:`cl_methods._guidance`) and mixes a
buffer of past samples into the current task's data (:mod:`cl_methods._replay`). The
same few hooks therefore serve every track: the CLIP track's ``dgg`` (on
:mod:`cl_methods.lora`) and the generation track's ``gen_dgg`` (on LLaVA's LoRA or
BLIP-2's adapters) are this mixin in front of their base method::

    class DGG(GuidedReplay, LoraFinetune): ...

- at every step, once the engine has clipped the real gradient (hook ``after_clip``),
  with probability alpha the capped pull toward the previous task's optimum (theta_star,
  snapshotted at every task end) is added to it, the norms taken over all trainable
  tensors as one vector (``norm: global``; ``per_tensor`` as an option);
- the engine batches the current task's data together with the buffer, each sample
  scored on its own task by the base method's loss; the gradient whose norm caps the
  pull is this mixed batch's, so replayed samples enter it;
- ``buffer_size`` counts per task (``buffer_size_per: task``, DGG's "0.5k per task") or
  in all.

State for an exact resume: the base method's (LoRA / adapters), theta_star, the buffer.
Ablations are the paper's: ``no_scaling`` (g_hat never capped), ``no_bernoulli``
(alpha = 1: guide every step), ``ghat_only`` (no replay), ``replay_only`` (no g_hat).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch.utils.data import ConcatDataset

from cl_methods._guidance import GradientGuidance, GuidanceSettings, NormMode
from cl_methods._replay import ReplayBuffer, SizePer, Strategy
from cl_methods.base import MethodConfig


class DGGSettings(MethodConfig):
    """DGG's knobs; a method's Config inherits them beside its base method's."""

    # Probability of guiding a step: one value, or one per task from the second task on.
    alpha: float | list[float] = 0.2
    scale: bool = True  # cap ||g_hat|| at the real gradient's norm (off: ablation no_scaling)
    # Norms and cap over all trainable tensors as one vector ("global", the paper's
    # formula) or per parameter tensor ("per_tensor"); see cl_methods/_guidance.py.
    norm: NormMode = "global"
    buffer_size: int = Field(default=500, ge=0)  # per task by default: DGG's VQAv2 setting (0.5k)
    buffer_size_per: SizePer = "task"
    strategy: Strategy = "per_task"

    def guidance(self) -> GuidanceSettings:
        return GuidanceSettings(alpha=self.alpha, scale=self.scale, norm=self.norm)


class GuidedReplay:
    """Method mixin (put it before the base method): DGG's hooks around the base's."""

    ablations: dict[str, dict[str, Any]] = {
        "full": {},
        "no_scaling": {"scale": False},
        "no_bernoulli": {"alpha": 1.0},
        "ghat_only": {"buffer_size": 0},
        "replay_only": {"alpha": 0.0},
    }

    @classmethod
    def check_run(cls, config, n_tasks):
        config.guidance().check_num_tasks(n_tasks)

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        cfg = self.config
        cfg.guidance().check_num_tasks(len(ctx.tasks))
        self.guide = GradientGuidance(cfg.guidance(), ctx.generator)
        self.buffer = ReplayBuffer(cfg.buffer_size, cfg.strategy, cfg.buffer_size_per, ctx.train_sets)

    def before_task(self, task_index, task):
        super().before_task(task_index, task)
        self.guide.start_task(task_index, self.trainable_parameters())

    def train_dataset(self, task_index):
        current = super().train_dataset(task_index)
        return ConcatDataset([current, self.buffer]) if len(self.buffer) else current

    def after_clip(self, step):
        # After clipping: the clip bounds the real gradient only, never the pull.
        super().after_clip(step)
        self.guide.apply()

    def after_task(self, task_index, task):
        super().after_task(task_index, task)
        self.guide.snapshot()
        self.buffer.add_task(task_index, self.ctx.generator)

    @property
    def injection_rate(self) -> float:
        """Share of this task's steps that were guided (alpha, in expectation)."""
        return self.guide.injections / max(1, self.guide.steps)

    def state_dict(self):
        return {**super().state_dict(), "guidance": self.guide.state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.guide.load_state_dict(state["guidance"])
        self.buffer.load_state_dict(state["buffer"])
