"""The Method interface: what a continual-learning method may do inside a run.

The engine (``mmcl.engine.run_continual``) owns the loop, the optimizer, mixed precision,
seeding and evaluation. A method only says which parameters train, what the loss is, and
what to do around each task; it never steps the optimizer. That keeps every method
comparable: the same schedule, the same clipping, the same evaluation code.

Call order for one run of T tasks::

    setup(backbone, run, ctx)
    predict(...)                      # row 0: before any training
    for t in 0..T-1:
        before_task(t, task)
        for each batch of train_dataset(t):
            training_loss(batch, t)   # dict of named terms; the engine sums them
            (backward and AMP unscaling by the engine)
            after_backward(step)      # gradient surgery that clipping should bound
            (clipping by the engine: training.grad_clip)
            after_clip(step)          # terms clipping must not bound (DGG's g_hat)
            (optimizer step by the engine)
        after_task(t, task)           # snapshots, Fisher passes, stored graphs ...
        predict(...) on every task    # row t + 1

Adding a method = one file in ``cl_methods/`` with a ``@register``-ed subclass, one search
space in ``search_spaces/`` and one entry in the contract tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmcl.data.base import make_loader

if TYPE_CHECKING:  # imported for type hints only: no heavy work at import time
    from mmcl.backbones.clip import ClipBackbone
    from mmcl.data.base import Task
    from mmcl.spec import RunSpec


class MethodConfig(BaseModel):
    """Base of every method's typed config. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class MethodContext:
    """What the engine shares with a method.

    ``tasks`` are all tasks of the benchmark in training order; ``train_sets[i]`` yields
    task ``i``'s samples with the ``"task"`` key set. ``generator`` is reseeded by the
    engine at the start of every task from (seed, task), so random choices a method makes
    (replay sampling, Bernoulli draws) are reproducible and survive a resume.
    """

    tasks: list["Task"]
    train_sets: list[Dataset]
    device: torch.device
    generator: torch.Generator
    templates: str = "all"
    extra: dict[str, Any] = field(default_factory=dict)
    # run.data_workers: worker processes per DataLoader (see loader()).
    data_workers: int = 0

    def loader(self, data: Dataset, batch_size: int, shuffle: bool = False, **kwargs: Any) -> DataLoader:
        """A DataLoader over ``data`` with the run's worker processes (``run.data_workers``)
        and pinned memory on CUDA. Methods use it for their own passes over a task's data
        (Gaussians, Fisher, graphs), so real datasets decode in parallel there too."""
        return make_loader(data, batch_size, self.data_workers, self.device, shuffle=shuffle, **kwargs)


class Method:
    """Base class. Subclasses set ``name``, ``Config`` and (optionally) ``ablations``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Which kind of run the method works on (mmcl.spec.TRACK_BACKBONES): "clip" (an
    # open_clip backbone, image batches, logits over a task's classes), "generation" (text
    # targets on a blip2 / llava backbone; ``predict`` returns strings) or "paired"
    # (per-modality encoders, paired benchmarks; see cl_methods/_paired.py).
    track: ClassVar[str] = "clip"
    # Named component variants, as overrides of this method's config. "full" is the method
    # as published; an ablation stage lists the names it wants.
    ablations: ClassVar[dict[str, dict[str, Any]]] = {"full": {}}

    @classmethod
    def check_run(cls, config: MethodConfig, n_tasks: int) -> None:
        """Checks of the config against the run's length, when the study loads (before
        any trial): raise ``ValueError`` with the key and the fix. Default: none."""

    def __init__(self, config: MethodConfig):
        self.config = config
        # Modules the method adds (prompts, adapters, heads); saved by state_dict().
        self.modules = nn.ModuleDict()
        self.backbone: "ClipBackbone"
        self.ctx: MethodContext
        self.run: "RunSpec"

    # ------------------------------------------------------------------ lifecycle
    def setup(self, backbone: "ClipBackbone", run: "RunSpec", ctx: MethodContext) -> None:
        self.backbone = backbone
        self.run = run
        self.ctx = ctx

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the engine's optimizer updates for the current task (may change
        between tasks; asked again after ``before_task``)."""
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        params += [p for p in self.modules.parameters() if p.requires_grad]
        return params

    def before_task(self, task_index: int, task: "Task") -> None:
        pass

    def train_dataset(self, task_index: int) -> Dataset:
        """What the engine batches for this task (joint training returns more)."""
        return self.ctx.train_sets[task_index]

    def training_loss(self, batch: dict, task_index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_backward(self, step: int) -> None:
        """After backward, before clipping: ``p.grad`` holds the loss's gradient in true
        units (fp16 AMP has been unscaled); what a method adds here is clipped with it."""

    def after_clip(self, step: int) -> None:
        """After the engine clipped the gradients (``training.grad_clip``), right before
        the optimizer step; gradients are unscaled (AMP) and what a method adds to
        ``p.grad`` here is applied unclipped. Default: nothing."""

    def after_task(self, task_index: int, task: "Task") -> None:
        pass

    def stats(self) -> dict[str, float]:
        """Numbers describing the method's state after a task (e.g. bytes it stores), read
        by the engine after every row. They reach ``TaskEnd.method_stats`` and the trials
        table as columns ``method/<name>`` (the values after the trial's last task).
        Default: none."""
        return {}

    @torch.no_grad()
    def predict(self, batch: dict, task: "Task") -> torch.Tensor:
        """Logits over ``task``'s classes (evaluation uses the task's own class names); for a
        text task (``task.is_text``: cider, vqa_acc) one generated string per sample,
        which the engine scores with the task's metric."""
        return self.logits(batch["image"], task)

    def logits(self, images: torch.Tensor, task: "Task") -> torch.Tensor:
        """The model's class logits for ``task`` (with grad when training)."""
        return self.backbone.logits(images, task, self.ctx.templates)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from a task boundary.

        The base saves the backbone parameters that currently train and the method's own
        modules; subclasses add buffers (replay samples, snapshots) with ``super()``.
        """
        trainable = {n: p.detach().clone() for n, p in self.backbone.named_parameters() if p.requires_grad}
        return {"backbone": trainable, "modules": self.modules.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.backbone.named_parameters())
        with torch.no_grad():
            for n, v in state.get("backbone", {}).items():
                params[n].copy_(v)
        if state.get("modules"):
            self.modules.load_state_dict(state["modules"])
        self.backbone.clear_text_cache()

    # ------------------------------------------------------------------ helpers
    def task_cross_entropy(self, logits_fn, batch: dict) -> torch.Tensor:
        """Cross-entropy where every sample is scored on its own task's class head.

        Replay and joint batches mix tasks; each sample's label only means something
        among the classes of the task it came from.
        """
        tasks = batch["task"]
        total = torch.zeros((), device=batch["image"].device)
        for t in torch.unique(tasks).tolist():
            sel = tasks == t
            logits = logits_fn(batch["image"][sel], self.ctx.tasks[t])
            total = total + F.cross_entropy(logits.float(), batch["label"][sel], reduction="sum")
        return total / len(tasks)


def set_trainable(module: nn.Module, which: str | list[str]) -> int:
    """Unfreeze parameters of a CLIP backbone by part, return how many elements train.

    ``which``: "image" (the vision tower), "text" (text transformer, embeddings and
    projection), "all", or a list of parameter-name prefixes.
    """
    groups = {
        "image": ("model.visual.",),
        "text": (
            "model.transformer.",
            "model.token_embedding.",
            "model.positional_embedding",
            "model.ln_final.",
            "model.text_projection",
        ),
        "all": ("model.",),
    }
    prefixes = tuple(which) if isinstance(which, list) else groups[which]
    n = 0
    for name, p in module.named_parameters():
        if name.startswith(prefixes) and not name.endswith("logit_scale"):
            p.requires_grad_(True)
            n += p.numel()
    if n == 0:
        raise ValueError(f"no backbone parameter matches {which!r}")
    return n
