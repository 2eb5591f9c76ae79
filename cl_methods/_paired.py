"""Shared base of the paired-modality track's methods (CMA and its baselines).

A paired method trains a :class:`~cl_methods._cma_model.PairedModel` (MoE cross-modality
adapters, fusion, growing head) on frozen per-modality encoders. The head follows the
protocol through ``task.info["class_ids"]``: a new chunk for new classes under CIL, one
shared chunk under DIL. ``predict`` returns logits over ALL classes of the protocol, with
classes not seen yet at -inf, so the engine's argmax is over the classes seen so far and
labels are global class ids (no task identity at test time).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from cl_methods._cma_model import PairedModel
from cl_methods.base import Method, MethodConfig
from mmcl.spec import SpecError


class PairedConfig(MethodConfig):
    """The architecture every paired method shares (defaults: CMA's)."""

    experts: int = Field(default=6, ge=1)
    top_k: int = Field(default=2, ge=1)
    bottleneck: int = Field(default=32, ge=1)
    joint_dim: int = Field(default=64, ge=2)
    # Experts attend to the other modalities (false: modality-specific bottleneck adapters).
    cross_modal: bool = True

    @model_validator(mode="after")
    def _k_le_e(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed experts ({self.experts})")
        return self


class PairedMethod(Method):
    track: ClassVar[str] = "paired"
    Config = PairedConfig

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        if not hasattr(backbone, "encoders"):
            raise SpecError(f"method {self.name!r} needs run.backbone.kind: paired (per-modality encoders)")
        missing = [t.name for t in ctx.tasks if "class_ids" not in t.info or "num_classes" not in t.info]
        if missing:
            raise SpecError(
                f"method {self.name!r} needs a paired benchmark (paired_synthetic, ave, paired_manifest); "
                f"task(s) {', '.join(missing)} carry no class ids"
            )
        c = self.config
        self.model = PairedModel(
            backbone, ctx.tasks[0].info["num_classes"], c.experts, c.top_k, c.bottleneck, c.joint_dim, c.cross_modal
        )
        self.modules["model"] = self.model
        self.teacher: PairedModel | None = None

    # ------------------------------------------------------------------ model
    def before_task(self, task_index, task):
        self.model.head.grow(task.info["class_ids"])
        self.modules.to(self.ctx.device)

    def forward(self, batch: dict, model: PairedModel | None = None) -> dict:
        return (model or self.model)(self.backbone, batch)

    def snapshot(self) -> PairedModel:
        """A frozen copy of the current model (a teacher)."""
        t = copy.deepcopy(self.model)
        for p in t.parameters():
            p.requires_grad_(False)
        return t.eval()

    def cross_entropy(self, joint: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over every class seen so far (CIL: no task identity)."""
        head = self.model.head
        pos = torch.full((head.num_classes,), -1, dtype=torch.long, device=labels.device)
        pos[torch.tensor(head.seen, device=labels.device)] = torch.arange(len(head.seen), device=labels.device)
        target = pos[labels]
        if (target < 0).any():
            raise RuntimeError(f"labels {labels[target < 0].tolist()} are not among the seen classes {head.seen}")
        return F.cross_entropy(head.seen_logits(joint).float(), target)

    def training_loss(self, batch, task_index):
        out = self.forward(batch)
        return {"ce": self.cross_entropy(out["joint"], batch["label"])}

    @torch.no_grad()
    def predict(self, batch, task):
        return self.model.head(self.forward(batch)["joint"])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["head_groups"] = [list(g) for g in self.model.head.groups]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The head's chunks exist only once their task started: recreate them first.
        self.model.head.rebuild(state["head_groups"])
        self.modules.to(self.ctx.device)
        super().load_state_dict(state)
        for block in self.model.blocks:
            block.apply_frozen()
