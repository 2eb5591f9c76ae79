"""CMA: continual learning with cross-modality (mixture-of-experts) adapters.

After Chee, Hsu & Lee, "Continual Audio-Visual Learning with Cross-Modality Adapters"
(arXiv 2511.06723; no public code). Frozen per-modality encoders (open_clip image tower
over frames, AST over filterbanks); an MM encoder of B blocks (B = depth of the shallowest
encoder) with a cross-modality MoE adapter per block (:mod:`cl_methods._cma_model`); a
fusion of the modality embeddings into a joint representation; a growing head.

Loss on task t (0-based; n = t + 1 tasks seen):

    L = CE(seen classes)
      + distill_weight * sqrt(n) * KD(old-class logits, teacher, temperature)
      + align_weight * mean_m InfoNCE(u_m, joint of the modalities other than m)
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
  task's training samples) is measured; every expert with mass >= ``freeze_threshold``
  ("used" by the task) is frozen for good: ``requires_grad`` False, so the engine, which
  builds a fresh optimizer per task from ``trainable_parameters()``, never hands it to
  an optimizer (no gradient, weight decay or momentum can move it). The gates,
  projections, fusion and head keep training, protected by distillation and preservation;
- growth: a block left with fewer than ``min_trainable_experts`` (default top_k) trainable
  experts before the next task grows fresh experts up to that number, never more than
  ``max_experts`` in total (default experts + min_trainable_experts x (tasks - 1), the
  most growth can need). [choice] New gate rows (one more pass over the finished task's
  training samples): minus that task's mean gate input direction, scaled to the old
  rows' mean norm, so a new expert's logit is highest for inputs unlike the task's; bias
  just below min over those samples of (k-th largest old logit - row . x), so each of
  them keeps exactly its routing and weights right after growth. An input whose new
  logit beats its k-th picks a new expert; the new rows then train with the gate.
  [choice] Reaching ``max_experts`` is an error that names
  the key and the fixes (no fallback that would unfreeze or share a used expert);
- distillation: KL on the logits of the classes seen before task t (DIL: all classes),
  temperature 2, weight x sqrt(number of tasks seen, the current one included);
- alignment: [choice] symmetric InfoNCE (temperature 0.2) between each modality's
  embedding u_m and the joint representation of the *other* modalities,
  J_-m = fuse(u with u_m replaced by the mean of the others' embeddings): with audio and
  video, audio is aligned with the joint of video alone (video + fusion(video, video))
  and video with that of audio. The target does not contain u_m, so a modality cannot
  lower the loss by copying the joint (the joint of all modalities contains u_m, which
  made aligning to it partly trivial); batch negatives, no stop-gradient;
- preservation: MSE between the student's and teacher's similarity matrices of the joint
  and of each modality's embeddings (zero when nothing moved); needs no stored data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from cl_methods import register
from cl_methods._cma_model import PairedModel, info_nce, kd_loss, relation_matrix, sqrt_tasks
from cl_methods._paired import PairedConfig, PairedMethod
from mmcl.spec import SpecError

# How far below the k-th gate logit of every measured input a grown expert's logit sits
# (relative, at least this absolute): strictly below in float32, and close enough that
# inputs unlike the measured ones can reach the new expert.
GROW_MARGIN = 1e-3


class CMAConfig(PairedConfig):
    # Weight of the logit distillation on old classes (times sqrt(tasks seen)).
    distill_weight: float = Field(default=1.0, ge=0)
    # Distillation temperature.
    temperature: float = Field(default=2.0, gt=0)
    # Weight of the alignment of each modality with the joint of the other modalities.
    align_weight: float = Field(default=0.1, ge=0)
    # InfoNCE temperature of the alignment.
    align_temperature: float = Field(default=0.2, gt=0)
    # Weight of the relation preservation against the previous task's model.
    preserve_weight: float = Field(default=1.0, ge=0)
    # Freeze the experts a task used (false: every expert trains on every task, no growth).
    freeze: bool = True
    # Share of a task's gate mass (1/experts = uniform use) from which an expert counts as
    # used by the task, and is frozen for good after it.
    freeze_threshold: float = Field(default=0.2, gt=0, le=1)
    # Trainable experts each block has at the start of every task (None: top_k); a block
    # with fewer after freezing grows new ones.
    min_trainable_experts: int | None = Field(default=None, ge=0)
    # Most experts a block may hold, grown ones included (None: experts +
    # min_trainable_experts x (tasks - 1), the most growth can ever need). Reaching it
    # stops the run with an error naming this key.
    max_experts: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _max_ge_experts(self):
        if self.max_experts is not None and self.max_experts < self.experts:
            raise ValueError(f"max_experts ({self.max_experts}) must be at least experts ({self.experts})")
        return self

    def keep_trainable(self) -> int:
        return self.top_k if self.min_trainable_experts is None else self.min_trainable_experts

    def expert_cap(self, n_tasks: int) -> int:
        if self.max_experts is not None:
            return self.max_experts
        return self.experts + self.keep_trainable() * max(n_tasks - 1, 0)


def preservation_loss(out: dict, teacher_out: dict) -> torch.Tensor:
    pairs = [(out["joint"], teacher_out["joint"])] + [(out["u"][m], teacher_out["u"][m]) for m in out["u"]]
    losses = [torch.mean((relation_matrix(s) - relation_matrix(t)) ** 2) for s, t in pairs]
    return torch.stack(losses).mean()


def alignment_loss(out: dict, temperature: float, model: PairedModel) -> torch.Tensor:
    """Mean over modalities m of InfoNCE(u_m, joint of the modalities other than m)."""
    u = out["u"]
    return torch.stack([info_nce(u[m], model.joint_without(u, m), temperature) for m in u]).mean()


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
        if self.config.freeze and not run.training.reset_optimizer:
            # A carried-over optimizer holds the first task's parameters only: grown
            # experts (and new head chunks) would never train.
            raise SpecError(
                "method cma with freeze: true grows experts between tasks and needs a fresh optimizer "
                "per task: set training.reset_optimizer: true (or method.config.freeze: false)"
            )
        self.n_old = 0
        # Per task: per block, the gate mass of each expert (reported, and saved). Blocks
        # grow, so later tasks' rows may be longer.
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
            terms["align"] = c.align_weight * alignment_loss(out, c.align_temperature, self.model)
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

    def _passes(self, task_index: int):
        """Model outputs over the task's training set, batch by batch (no grad)."""
        data = self.ctx.train_sets[task_index]
        for batch in self.ctx.loader(data, self.run.evaluation.batch_size):
            batch = {key: v.to(self.ctx.device) if torch.is_tensor(v) else v for key, v in batch.items()}
            yield len(batch["label"]), self.forward(batch)

    @torch.no_grad()
    def measure_gates(self, task_index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Over the task's training set, per block: the mean gate weight of each expert
        ([E_b], the gate mass) and the mean gate input ([D])."""
        mass: list[torch.Tensor] | None = None
        mean: list[torch.Tensor] | None = None
        n = 0
        for size, out in self._passes(task_index):
            w = [g.sum(0) for g in out["gates"]]
            x = [g.float().sum(0) for g in out["gate_inputs"]]
            mass = w if mass is None else [a + b for a, b in zip(mass, w)]
            mean = x if mean is None else [a + b for a, b in zip(mean, x)]
            n += size
        assert mass is not None and mean is not None, f"task {task_index} has no training samples"
        return [(m / n).cpu() for m in mass], [m / n for m in mean]

    @torch.no_grad()
    def new_gate_rows(self, task_index: int, blocks: list[int], mean: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, float]]:
        """[choice] Gate row and bias of the experts block b grows after task ``task_index``.

        Row: minus the task's mean gate input direction, scaled to the old rows' mean norm,
        so the new experts' logit is highest for inputs least like this task's. Bias: just
        below min over the task's training samples of (k-th largest old logit - row . x),
        so every one of them keeps exactly its routing right after growth (one more pass).
        """
        k = self.config.top_k
        rows = {}
        for b in blocks:
            gate = self.model.blocks[b].gate
            rows[b] = -F.normalize(mean[b], dim=0) * gate.weight.norm(dim=1).mean()
        low = {b: float("inf") for b in blocks}
        for _, out in self._passes(task_index):
            for b in blocks:
                x, logits = out["gate_inputs"][b], out["gate_logits"][b]
                kth = logits.topk(k, dim=-1).values[:, -1]
                low[b] = min(low[b], float((kth - (x @ rows[b].to(x.dtype)).float()).min()))
        return {b: (rows[b], low[b] - max(GROW_MARGIN, GROW_MARGIN * abs(low[b]))) for b in blocks}

    def after_task(self, task_index, task):
        self.teacher = None
        c = self.config
        mass, mean = self.measure_gates(task_index)
        self.gate_mass.append([m.tolist() for m in mass])
        if not c.freeze:
            return
        for b, block in enumerate(self.model.blocks):
            used = [e for e in range(block.n_experts) if not block.frozen[e] and mass[b][e] >= c.freeze_threshold]
            block.set_frozen(used)
        if task_index + 1 < len(self.ctx.tasks):  # nothing trains after the last task
            self.grow_blocks(task_index, mean)

    def grow_blocks(self, task_index: int, mean: list[torch.Tensor]) -> None:
        """Give every block at least ``min_trainable_experts`` trainable experts."""
        c = self.config
        keep, cap = c.keep_trainable(), c.expert_cap(len(self.ctx.tasks))
        need = {}
        for b, block in enumerate(self.model.blocks):
            trainable = int((~block.frozen).sum())
            if trainable >= keep:
                continue
            need[b] = keep - trainable
            if block.n_experts + need[b] > cap:
                raise SpecError(
                    f"cma: after task {task_index} block {b} has {trainable} trainable expert(s) and needs "
                    f"{need[b]} more, but it holds {block.n_experts} of method.config.max_experts = {cap}; "
                    "raise method.config.max_experts (or leave it null), or lower method.config.top_k / "
                    "min_trainable_experts, or raise method.config.freeze_threshold so fewer experts freeze"
                )
        if not need:
            return
        rows = self.new_gate_rows(task_index, list(need), mean)
        for b, n in need.items():
            self.model.blocks[b].grow(n, *rows[b])
        self.modules.to(self.ctx.device)

    def stats(self) -> dict[str, float]:
        # Experts over all blocks, grown ones included, and how many of them are frozen.
        blocks = self.model.blocks
        return {"experts": float(sum(b.n_experts for b in blocks)), "frozen_experts": float(sum(int(b.frozen.sum()) for b in blocks))}

    def frozen_experts(self) -> list[list[int]]:
        return [torch.nonzero(b.frozen).flatten().tolist() for b in self.model.blocks]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["gate_mass"] = [[list(b) for b in m] for m in self.gate_mass]
        state["growth"] = [b.growth_sizes() for b in self.model.blocks]
        return state

    def load_state_dict(self, state):
        # Grown experts and gate chunks exist only once their task ended: recreate them
        # (any values; the saved ones are loaded over them) before the weights load.
        growth = state.get("growth", [[] for _ in self.model.blocks])
        for block, sizes in zip(self.model.blocks, growth):
            if block.growth_sizes() != list(sizes[: len(block.gate_growth)]):
                raise ValueError(f"resume state's expert growth {sizes} does not extend the model's {block.growth_sizes()}")
            for n in sizes[len(block.gate_growth):]:
                block.grow(int(n))
        super().load_state_dict(state)
        self.gate_mass = [[list(b) for b in m] for m in state.get("gate_mass", [])]
