"""DGG on the generation track: gradient guidance toward the previous task's optimum plus
replay, on LLaVA's LoRA or BLIP-2's Q-Former adapters (DGG: LLaVA-7B + LoRA, CVPR 2026).

The same components as the CLIP-track :mod:`cl_methods.dgg`: the reusable
:class:`cl_methods._guidance.GradientGuidance` (theta_star snapshotted at each task end;
with probability alpha the capped pull toward it is added to the gradient after backward)
and :class:`cl_methods._replay.ReplayBuffer` (past text samples mixed into the current
task's data; the buffer stores (task, index) pairs, so prompts and references replay as
they are). The loss is :class:`~cl_methods._gen.GenMethod`'s LM loss of the targets.

State for an exact resume: the trained adapters / LoRA, theta_star and the buffer.
Ablations as DGG's: ``no_scaling``, ``no_bernoulli``, ``ghat_only``, ``replay_only``.
"""

from __future__ import annotations

from pydantic import Field
from torch.utils.data import ConcatDataset

from cl_methods import register
from cl_methods._gen import GenConfig, GenMethod
from cl_methods._guidance import GradientGuidance, GuidanceSettings, NormMode
from cl_methods._replay import ReplayBuffer, SizePer, Strategy


class GenDGGConfig(GenConfig):
    alpha: float | list[float] = 0.2  # one value, or one per task from the second task on
    scale: bool = True
    norm: NormMode = "per_tensor"
    buffer_size: int = Field(default=500, ge=0)  # DGG's VQAv2 setting: 0.5k per task
    buffer_size_per: SizePer = "task"
    strategy: Strategy = "per_task"

    def guidance(self) -> GuidanceSettings:
        return GuidanceSettings(alpha=self.alpha, scale=self.scale, norm=self.norm)


@register
class GenDGG(GenMethod):
    name = "gen_dgg"
    Config = GenDGGConfig
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
        cfg.guidance().check_num_tasks(len(ctx.tasks))
        self.guide = GradientGuidance(cfg.guidance(), ctx.generator)
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

    def state_dict(self):
        return {**super().state_dict(), "guidance": self.guide.state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.guide.load_state_dict(state["guidance"])
        self.buffer.load_state_dict(state["buffer"])
