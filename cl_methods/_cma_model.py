"""The trainable part of the paired-modality track: an MM encoder of mixture-of-experts
cross-modality adapters over frozen per-modality encoders, a fusion and a growing head.

Used by CMA (``cl_methods/cma.py``) and, with the same architecture and no continual
mechanism, by the track's baselines, so that every method differs only by how it learns.

Shapes: every modality's hidden states are ``[N, S_m, D_m]`` (see
:mod:`mmcl.backbones.paired`). The MM encoder has B blocks, B = the depth of the shallowest
encoder; block b's adapter sits after layer ``backbone.block_layers(m)[b]`` of each
modality and adds its output to that modality's hidden states (a residual adapter: with
the up-projections initialised at zero the model starts as the frozen encoders).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    """One cross-modality expert.

    Each modality is down-projected to ``r`` with its own weights (GELU); with
    ``cross_modal`` each modality's tokens then attend (one head, scaled dot product) to
    the down-projected tokens of the other modalities; the sum is up-projected with the
    modality's own weights. Without ``cross_modal`` (the ``modality_specific`` ablation)
    it is a plain bottleneck adapter per modality.
    """

    def __init__(self, widths: dict[str, int], r: int, cross_modal: bool):
        super().__init__()
        self.cross_modal = cross_modal
        self.down = nn.ModuleDict({m: nn.Linear(d, r) for m, d in widths.items()})
        self.up = nn.ModuleDict({m: nn.Linear(r, d) for m, d in widths.items()})
        for lin in self.up.values():
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if cross_modal:
            self.q = nn.ModuleDict({m: nn.Linear(r, r, bias=False) for m in widths})
            self.kv = nn.ModuleDict({m: nn.Linear(r, 2 * r, bias=False) for m in widths})

    def forward(self, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = {m: F.gelu(self.down[m](x)) for m, x in h.items()}
        out = {}
        for m in h:
            y = z[m]
            if self.cross_modal:
                others = [o for o in h if o != m]
                k, v = torch.cat([self.kv[o](z[o]) for o in others], 1).chunk(2, -1)
                y = y + F.scaled_dot_product_attention(self.q[m](z[m]), k, v)
            out[m] = self.up[m](y)
        return out


class CrossModalMoE(nn.Module):
    """A mixture of experts with a top-k gate, for one MM block.

    Gate: the tokens of each modality are averaged, layer-normalised (no affine: the
    modalities' scales differ) and concatenated; a linear map gives one logit per expert;
    the top ``top_k`` logits are softmax-normalised (the others weigh exactly 0), per
    sample. Only experts some sample of the batch selected are run.

    ``frozen[e]`` marks experts frozen after earlier tasks (``requires_grad`` False, so
    they are never handed to an optimizer); they still run when selected. :meth:`grow`
    appends experts, and a gate chunk of logits for them, without touching the existing
    ones: the original ``gate`` Linear computes the first experts' logits exactly as
    before, the grown chunks (``gate_growth``) the new experts'.
    """

    def __init__(self, widths: dict[str, int], n_experts: int, top_k: int, r: int, cross_modal: bool):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..experts ({n_experts}), got {top_k}")
        self.widths = dict(widths)
        self.top_k = top_k
        self.r, self.cross_modal = r, cross_modal
        self.gate = nn.Linear(sum(widths.values()), n_experts)
        # One Linear per growth step (logits of the experts it added). Separate modules,
        # not a wider copy of ``gate``: a matmul of another shape may round differently,
        # and old routing must stay bit-identical.
        self.gate_growth = nn.ModuleList()
        self.experts = nn.ModuleList([Expert(widths, r, cross_modal) for _ in range(n_experts)])
        self.register_buffer("frozen", torch.zeros(n_experts, dtype=torch.bool))

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def gate_input(self, h: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the gate sees [N, sum of widths]: per modality the token mean, layer-normalised."""
        x = torch.cat([F.layer_norm(h[m].mean(1).float(), (d,)) for m, d in self.widths.items()], -1)
        return x.to(self.gate.weight.dtype)

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Dense gate logits [N, E] (float32) of gate inputs ``x``."""
        logits = self.gate(x)
        if len(self.gate_growth):
            logits = torch.cat([logits] + [g(x) for g in self.gate_growth], -1)
        return logits.float()

    @staticmethod
    def sparse_weights(logits: torch.Tensor, top_k: int) -> torch.Tensor:
        top = logits.topk(top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, -1))

    def gate_weights(self, h: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sparse gate weights [N, E]: exactly ``top_k`` positive entries per row, summing to 1."""
        return self.sparse_weights(self.gate_logits(self.gate_input(h)), self.top_k)

    def forward(self, h: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(hidden states with the adapter's output added, {"weights": sparse gate weights
        [N, E], "logits": gate logits [N, E], "inputs": gate inputs [N, D]})."""
        x = self.gate_input(h)
        logits = self.gate_logits(x)
        w = self.sparse_weights(logits, self.top_k)
        out = dict(h)
        for e in torch.nonzero((w > 0).any(0)).flatten().tolist():
            delta = self.experts[e](h)
            we = w[:, e].view(-1, 1, 1)
            out = {m: out[m] + (we * delta[m]).to(out[m].dtype) for m in out}
        return out, {"weights": w, "logits": logits, "inputs": x}

    def set_frozen(self, idx: list[int]) -> None:
        for e in idx:
            self.frozen[e] = True
        self.apply_frozen()

    def apply_frozen(self) -> None:
        for e, expert in enumerate(self.experts):
            for p in expert.parameters():
                p.requires_grad_(not bool(self.frozen[e]))

    def grow(self, n: int, weight: torch.Tensor | None = None, bias: float = 0.0) -> list[int]:
        """Append ``n`` fresh trainable experts; returns their indices.

        Every new expert gets the gate row ``weight`` (zeros if None) and bias ``bias``:
        an input whose k-th largest old logit is above ``weight . x + bias`` keeps exactly
        its old top-k and weights (the caller picks them so for the inputs it measured).
        The new rows train like the rest of the gate once an input selects a new expert.
        """
        if n <= 0:
            return []
        ref = self.gate.weight
        chunk = nn.Linear(self.gate.in_features, n, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            chunk.weight.copy_(torch.zeros_like(chunk.weight) if weight is None else weight.expand_as(chunk.weight))
            chunk.bias.fill_(bias)
        self.gate_growth.append(chunk)
        start = self.n_experts
        for _ in range(n):
            self.experts.append(Expert(self.widths, self.r, self.cross_modal).to(device=ref.device, dtype=ref.dtype))
        self.frozen = torch.cat([self.frozen, torch.zeros(n, dtype=torch.bool, device=self.frozen.device)])
        self.apply_frozen()
        return list(range(start, self.n_experts))

    def growth_sizes(self) -> list[int]:
        """Experts added by each growth step (saved, so a resume can rebuild the blocks)."""
        return [g.out_features for g in self.gate_growth]


class GrowingHead(nn.Module):
    """A linear classifier whose output grows by one chunk per group of new classes.

    Column c of :meth:`forward`'s logits is always global class c, so logits of old
    classes keep their meaning (and their values: a new chunk adds columns, it never
    touches old ones). Classes no chunk covers yet get -inf. Under DIL the first task
    brings every class, so there is one shared chunk.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.chunks = nn.ModuleList()
        self.groups: list[list[int]] = []

    @property
    def seen(self) -> list[int]:
        return [c for g in self.groups for c in g]

    def grow(self, class_ids: list[int]) -> list[int]:
        """Add a chunk for the classes of ``class_ids`` not covered yet; returns them."""
        have = set(self.seen)
        new = [int(c) for c in class_ids if int(c) not in have]
        if new:
            bad = [c for c in new if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"class ids {bad} outside 0..{self.num_classes - 1}")
            device = self.chunks[0].weight.device if len(self.chunks) else None
            self.chunks.append(nn.Linear(self.dim, len(new), device=device))
            self.groups.append(new)
        return new

    def rebuild(self, groups: list[list[int]]) -> None:
        """Recreate the chunks of a saved head (before loading its weights)."""
        self.chunks = nn.ModuleList()
        self.groups = []
        for g in groups:
            self.grow(g)

    def seen_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the seen classes only, in :attr:`seen` order: [N, n_seen]."""
        if not self.chunks:
            return z.new_zeros(len(z), 0)
        return torch.cat([c(z) for c in self.chunks], -1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(z), self.num_classes), float("-inf"), device=z.device, dtype=torch.float32)
        if self.chunks:
            out[:, torch.tensor(self.seen, device=z.device)] = self.seen_logits(z).float()
        return out


class PairedModel(nn.Module):
    """MoE adapters in B blocks + per-modality projections + fusion + growing head."""

    def __init__(
        self,
        backbone,
        num_classes: int,
        n_experts: int = 4,
        top_k: int = 2,
        bottleneck: int = 32,
        joint_dim: int = 64,
        cross_modal: bool = True,
    ):
        super().__init__()
        encs = backbone.encoders
        self.modalities = list(encs)
        widths = {m: encs[m].width for m in self.modalities}
        self.blocks = nn.ModuleList(
            [CrossModalMoE(widths, n_experts, top_k, bottleneck, cross_modal) for _ in range(backbone.num_blocks)]
        )
        self.layer_at = {m: backbone.block_layers(m) for m in self.modalities}
        self.proj = nn.ModuleDict({m: nn.Linear(encs[m].out_dim, joint_dim) for m in self.modalities})
        # Joint = mean of the modality embeddings + a learned interaction term that starts
        # at zero, so the joint representation starts as their average.
        self.fusion = nn.Sequential(nn.Linear(joint_dim * len(self.modalities), joint_dim), nn.GELU(), nn.Linear(joint_dim, joint_dim))
        nn.init.zeros_(self.fusion[2].weight)
        nn.init.zeros_(self.fusion[2].bias)
        self.head = GrowingHead(joint_dim, num_classes)

    def forward(self, backbone, batch: dict) -> dict:
        """{"u": {modality: [N, d]}, "joint": [N, d], "gates": [B x [N, E_b]],
        "gate_logits": [B x [N, E_b]], "gate_inputs": [B x [N, D]]} (E_b: block b's experts,
        grown ones included)."""
        encs = backbone.encoders
        h = {m: encs[m].embed(batch[m]) for m in self.modalities}
        done = {m: 0 for m in self.modalities}
        gates, gate_logits, gate_inputs = [], [], []
        for b, block in enumerate(self.blocks):
            for m in self.modalities:
                for i in range(done[m], self.layer_at[m][b] + 1):
                    h[m] = encs[m].layer(i, h[m])
                done[m] = self.layer_at[m][b] + 1
            h, g = block(h)
            gates.append(g["weights"])
            gate_logits.append(g["logits"])
            gate_inputs.append(g["inputs"])
        for m in self.modalities:
            for i in range(done[m], encs[m].num_layers):
                h[m] = encs[m].layer(i, h[m])
        u = {m: self.proj[m](encs[m].pool(h[m]).float()) for m in self.modalities}
        return {"u": u, "joint": self.fuse(u), "gates": gates, "gate_logits": gate_logits, "gate_inputs": gate_inputs}

    def fuse(self, u: dict[str, torch.Tensor]) -> torch.Tensor:
        """The joint representation of the modality embeddings ``u`` (every modality)."""
        cat = torch.cat([u[m] for m in self.modalities], -1)
        return torch.stack([u[m] for m in self.modalities]).mean(0) + self.fusion(cat)

    def joint_without(self, u: dict[str, torch.Tensor], m: str) -> torch.Tensor:
        """The joint representation of the modalities other than ``m``: :meth:`fuse` with
        ``m``'s embedding replaced by the mean of the others' (with two modalities, the
        joint of the other one alone). It does not depend on ``u[m]`` at all."""
        others = [o for o in self.modalities if o != m]
        if not others:
            raise ValueError("the joint of the other modalities needs at least two modalities")
        filled = dict(u)
        filled[m] = torch.stack([u[o] for o in others]).mean(0)
        return self.fuse(filled)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between rows of ``a`` and ``b`` (row i of each is a true pair)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def relation_matrix(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.float(), dim=-1)
    return x @ x.T


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    T = temperature
    return F.kl_div(F.log_softmax(student.float() / T, -1), F.softmax(teacher.float() / T, -1), reduction="batchmean") * T * T


def sqrt_tasks(n: int) -> float:
    return math.sqrt(max(n, 0))
