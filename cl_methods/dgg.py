"""DGG: dynamic gradient guidance toward the old optimum, with replay, on LoRA (CVPR 2026).

An optimizer-level method: it adds no model parts to LoRA fine-tuning (its base class,
:mod:`cl_methods.lora`), it edits gradients and mixes stored samples into the data.

- Gradient guidance (:mod:`cl_methods._guidance`): at the end of every task the LoRA
  parameters are snapshotted as theta_star; in later tasks, after each backward, with
  probability alpha the capped pull ``g_hat`` toward theta_star is added to the gradient.
- Replay (:mod:`cl_methods._replay`): a buffer of past samples is mixed into the current
  task's data (the engine batches the union, as DGG mixes replay data into the training
  set), each sample scored on its own task's head. ``buffer_size`` counts per task
  (``buffer_size_per: task``, the paper's "0.5k per task") or in all.

State for an exact resume: the LoRA weights (base class), theta_star and the buffer.
Ablations are the paper's: ``no_scaling`` (g_hat never capped), ``no_bernoulli``
(alpha = 1: guide every step), ``ghat_only`` (no replay), ``replay_only`` (no g_hat).
"""

from __future__ import annotations

from pydantic import Field
from torch.utils.data import ConcatDataset

from cl_methods import register
from cl_methods._guidance import GradientGuidance, GuidanceSettings, NormMode
from cl_methods._replay import ReplayBuffer, SizePer, Strategy
from cl_methods.lora import LoraFinetune, LoraFinetuneConfig


class DGGConfig(LoraFinetuneConfig):
    # Probability of guiding a step: one value, or one per task from the second task on.
    alpha: float | list[float] = 0.2
    scale: bool = True
    norm: NormMode = "per_tensor"
    buffer_size: int = Field(default=500, ge=0)  # per task by default: DGG's VQAv2 setting (0.5k)
    buffer_size_per: SizePer = "task"
    strategy: Strategy = "per_task"

    def guidance(self) -> GuidanceSettings:
        return GuidanceSettings(alpha=self.alpha, scale=self.scale, norm=self.norm)


@register
class DGG(LoraFinetune):
    name = "dgg"
    Config = DGGConfig
    ablations = {
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
        self.guide = GradientGuidance(cfg.guidance(), ctx.generator)
        cfg.guidance().check_num_tasks(len(ctx.tasks))
        self.buffer = ReplayBuffer(cfg.buffer_size, cfg.strategy, cfg.buffer_size_per, ctx.train_sets)

    def before_task(self, task_index, task):
        self.guide.start_task(task_index, self.trainable_parameters())

    def train_dataset(self, task_index):
        current = self.ctx.train_sets[task_index]
        return ConcatDataset([current, self.buffer]) if len(self.buffer) else current

    def after_backward(self, step):
        self.guide.apply()

    def after_task(self, task_index, task):
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
