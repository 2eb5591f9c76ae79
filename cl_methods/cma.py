"""CMA: continual learning with cross-modality (mixture-of-experts) adapters.

After Chee, Hsu & Lee, "Continual Audio-Visual Learning with Cross-Modality Adapters"
(arXiv 2511.06723; no public code). Frozen per-modality encoders (open_clip image tower
over frames, AST over filterbanks); an MM encoder of B blocks (B = depth of the shallowest
encoder) with a cross-modality MoE adapter per block (:mod:`cl_methods._cma_model`); a
fusion of the modality embeddings into a joint representation; a growing head.

Loss on task t (0-based; n = t + 1 tasks seen):

    L = CE(seen classes)
      + distill_weight * sqrt(n) * KD(old-class logits, teacher, temperature)
      + align_weight * mean_m InfoNCE(u_m, joint)
      + preserve_weight * mean_{r in joint, u_m} MSE(R(r), R(r_teacher))

with the teacher the model at the end of task t - 1 and R(x) the batch's cosine-similarity
matrix of x (the relations between the samples' representations).

Choices where the paper is silent (see also the README):

- gate: tokens of each modality averaged, layer-normalised (no affine), concatenated; a
  linear map to E logits; top-k per sample, softmax over the k chosen (others exactly 0);
- expert: per-modality down-projection (GELU) to ``bottleneck``, one-head attention of
  each modality's tokens to the other modalities' down-projected tokens, per-modality
  up-projection initialised at zero; output added to the block's hidden states;
- freezing: after each task, each block's gate mass per expert (mean gate weight over the
  task's training samples) is measured; unfrozen experts with mass >= ``freeze_threshold``
  are frozen (largest first) for good, but at least ``min_trainable_experts`` (default
  top_k) experts per block stay trainable so later tasks can still adapt. The gates,
  projections, fusion and head keep training, protected by distillation and preservation;
- distillation: KL on the logits of the classes seen before task t (DIL: all classes),
  temperature 2, weight x sqrt(number of tasks seen, the current one included);
- alignment: symmetric InfoNCE (temperature 0.2) between each modality's embedding and
  the joint one, batch negatives, no stop-gradient;
- preservation: MSE between the student's and teacher's similarity matrices of the joint
  and of each modality's embeddings (zero when nothing moved); needs no stored data.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from cl_methods import register
from cl_methods._cma_model import info_nce, kd_loss, relation_matrix, sqrt_tasks
from cl_methods._paired import PairedConfig, PairedMethod


class CMAConfig(PairedConfig):
    distill_weight: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=2.0, gt=0)
    align_weight: float = Field(default=0.1, ge=0)
    align_temperature: float = Field(default=0.2, gt=0)
    preserve_weight: float = Field(default=1.0, ge=0)
    freeze: bool = True
    # Share of a task's gate mass (1/experts = uniform use) from which an expert is frozen.
    freeze_threshold: float = Field(default=0.2, gt=0, le=1)
    # Experts per block that always stay trainable (None: top_k).
    min_trainable_experts: int | None = Field(default=None, ge=0)


def preservation_loss(out: dict, teacher_out: dict) -> torch.Tensor:
    pairs = [(out["joint"], teacher_out["joint"])] + [(out["u"][m], teacher_out["u"][m]) for m in out["u"]]
    losses = [torch.mean((relation_matrix(s) - relation_matrix(t)) ** 2) for s, t in pairs]
    return torch.stack(losses).mean()


def alignment_loss(out: dict, temperature: float) -> torch.Tensor:
    return torch.stack([info_nce(u, out["joint"], temperature) for u in out["u"].values()]).mean()


@register
class CMA(PairedMethod):
    name = "cma"
    Config = CMAConfig
    ablations = {
        "full": {},
        "modality_specific": {"cross_modal": False},
        "no_alignment": {"align_weight": 0.0},
        "no_preservation": {"preserve_weight": 0.0},
        "no_freezing": {"freeze": False},
    }

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        self.n_old = 0
        # Per task: per block, the gate mass of each expert (reported, and saved).
        self.gate_mass: list[list[list[float]]] = []

    def before_task(self, task_index, task):
        c = self.config
        self.teacher = None
        self.n_old = len(self.model.head.seen)
        if task_index > 0 and (c.distill_weight > 0 or c.preserve_weight > 0):
            self.teacher = self.snapshot()  # before the head grows: it knows old classes only
        super().before_task(task_index, task)

    def training_loss(self, batch, task_index):
        c = self.config
        out = self.forward(batch)
        terms = {"ce": self.cross_entropy(out["joint"], batch["label"])}
        if c.align_weight > 0:
            terms["align"] = c.align_weight * alignment_loss(out, c.align_temperature)
        if self.teacher is not None:
            with torch.no_grad():
                tout = self.forward(batch, self.teacher)
            if c.distill_weight > 0 and self.n_old > 0:
                s = self.model.head.seen_logits(out["joint"])[:, : self.n_old]
                t = self.teacher.head.seen_logits(tout["joint"])
                terms["distill"] = c.distill_weight * sqrt_tasks(task_index + 1) * kd_loss(s, t, c.temperature)
            if c.preserve_weight > 0:
                terms["preserve"] = c.preserve_weight * preservation_loss(out, tout)
        return terms

    @torch.no_grad()
    def measure_gate_mass(self, task_index: int) -> torch.Tensor:
        """Mean gate weight per (block, expert) over the task's training set: [B, E]."""
        data = self.ctx.train_sets[task_index]
        total = None
        n = 0
        for batch in self.ctx.loader(data, self.run.evaluation.batch_size):
            batch = {k: v.to(self.ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            gates = torch.stack([w.sum(0) for w in self.forward(batch)["gates"]])
            total = gates if total is None else total + gates
            n += len(batch["label"])
        return (total / max(n, 1)).cpu()

    def after_task(self, task_index, task):
        self.teacher = None
        c = self.config
        mass = self.measure_gate_mass(task_index)
        self.gate_mass.append(mass.tolist())
        if not c.freeze:
            return
        keep = c.top_k if c.min_trainable_experts is None else c.min_trainable_experts
        for b, block in enumerate(self.model.blocks):
            free = [e for e in range(block.n_experts) if not block.frozen[e]]
            chosen = [e for e in sorted(free, key=lambda e: -float(mass[b, e])) if mass[b, e] >= c.freeze_threshold]
            chosen = chosen[: max(0, len(free) - keep)]
            block.set_frozen(chosen)

    def frozen_experts(self) -> list[list[int]]:
        return [torch.nonzero(b.frozen).flatten().tolist() for b in self.model.blocks]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["gate_mass"] = [list(map(list, m)) for m in self.gate_mass]
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.gate_mass = [list(map(list, m)) for m in state.get("gate_mass", [])]
