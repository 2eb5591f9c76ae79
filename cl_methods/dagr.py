"""DAGR: dynamic alignment graph regularisation (CVPR 2026), on DIKI's residual prompts.

DAGR is DIKI (:mod:`cl_methods.diki`: frozen CLIP, one residual key/value prompt set per
task, Gaussian task identification at test time) plus a graph regulariser on the task
prompts, and the next task's prompts start from the previous task's
(``init_from_previous: true``). The graph maths lives in :mod:`cl_methods._dagr_graph`;
this module decides what goes in and when.

Loss of task t: ``L = L_match + lambda_1 L_edge + lambda_2 L_multi + lambda_3 L_path``.
``L_match`` is DIKI's cross-entropy over task t's classes (class prompts through the
prompted text tower, task t's set, w = 1). The graph terms (t > 0) compare the graph of
the current batch with the stored graph of task t - 1 (masked KL, layer-wise decay;
:func:`~cl_methods._dagr_graph.graph_losses`) and appear in the curves as
``loss/edge``, ``loss/multi``, ``loss/path`` (a term whose lambda is 0 is not computed
and not logged; with every lambda 0 DAGR stores no graph and is DIKI with
``init_from_previous``).

Choices where the paper is silent ([choice] in the code; docs in the README "DAGR"):

- The graph spans both towers at the image tower's prompted depth ``L``: layer ``l``'s
  image tokens are the OUTPUT of prompted image block ``l`` (so block ``l``'s keys and
  values shape layer ``l``'s graph, the first and the last prompted block included),
  mapped into the joint space by the tower's own ``ln_post`` and ``proj`` (the same map
  for every layer, so the paper's ``f`` is the identity); its text features are the
  current task's class prompts through the prompted text tower (the task's set, w = 1,
  the training forward's own), the EOT token after text block ``min(l, text blocks - 1)``
  through ``ln_final`` and the text projection, averaged over templates. Edges: block
  ``l``'s token attention and the image tokens' alignment with the nodes' class text at
  the same depth (:mod:`cl_methods._dagr_graph`), so the text prompts are regularised too.
- One graph per task: nodes are fitted on the task's fused features (each image token
  fused with its image's class text at the same depth, ``alpha``), at the end of the task
  with the trained set, and the graph built on those nodes is stored. At the start of task
  t + 1, nodes are fitted on ITS features with the inherited set (the model it starts
  from), matched with task t's stored nodes by prototype (Hungarian, ``tau``), and task
  t's graph is re-indexed by the match; unmatched (new-class) nodes are masked out. The
  match is made once per task, not per batch (stable targets, no per-step assignment).
- Fitting and stored graphs use ``graph_samples`` training images (a seeded random
  subset; all with ``null``); all stored graphs are kept (bytes reported), the loss uses
  the previous one. The current graph comes from the training forward itself.
- On a task's first step the method checks that every graph term depends on the
  current set's prompts and that together they reach all four prompt tensors (keys and
  values of both towers): a graph term that is constant in the trainable parameters is
  an error, not a silent no-op.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, Subset

from cl_methods import register
from cl_methods import _dagr_graph as dg
from cl_methods.diki import DIKI, DIKIConfig

log = logging.getLogger(__name__)


class DAGRConfig(DIKIConfig):
    # DAGR initialises task t's prompts from task t-1's.
    init_from_previous: bool = True
    # Graph [choice] defaults (all searchable; see cl_methods/_dagr_graph.py).
    num_nodes: int = Field(default=16, ge=1)  # K nodes per layer
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)  # image weight of the fused node features
    beta: float = Field(default=1.0, gt=0.0)  # inverse temperature on the attention logits
    gamma: float = Field(default=0.5, ge=0.0, le=1.0)  # prototype cosine vs rollout in inter-layer edges
    temperature: float = Field(default=0.1, gt=0.0)  # soft assignment of tokens to nodes
    topk: int | None = Field(default=8, ge=1)  # neighbours kept per edge row (null: dense)
    residual: float = Field(default=0.5, ge=0.0, le=1.0)  # identity weight of the rollout
    path_similarity: Literal["centroids", "prototypes"] = "prototypes"
    # Weight of the cross-modal edge family (image tokens -> nodes' class text) in the edges.
    cross_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    # Loss weights lambda_1 (edge), lambda_2 (multi-hop), lambda_3 (path) and their decay
    # with depth (layer l weighs decay^l, normalised).
    lambda_edge: float = Field(default=1.0, ge=0.0)
    lambda_multi: float = Field(default=1.0, ge=0.0)
    lambda_path: float = Field(default=1.0, ge=0.0)
    lambda_decay: float = Field(default=0.8, gt=0.0)
    hops: list[int] = Field(default_factory=lambda: [2, 3])
    # Old-node match: cos(current prototype, matched stored prototype) >= tau, token share > min_mass.
    # [choice] 0: tasks with disjoint classes (MTIL, the synthetic benchmark) give matched
    # fused prototypes a median cosine of 0.2-0.7 (measured, tiny CLIP); at 0.8 almost no
    # node is old and DAGR falls back to DIKI + inheritance (README "DAGR").
    tau: float = Field(default=0.0, ge=-1.0, le=1.0)
    min_mass: float = Field(default=1e-4, ge=0.0)
    # Training images a task's nodes and stored graph are built from; null = all.
    graph_samples: int | None = Field(default=512, ge=1)
    node_tokens_per_image: int = Field(default=8, ge=1)  # tokens per image fed to k-means
    kmeans_iters: int = Field(default=50, ge=1)
    store_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    @model_validator(mode="after")
    def _hops_positive(self):
        if any(h < 1 for h in self.hops):
            raise ValueError("hops must be >= 1 (e.g. [2, 3])")
        return self

    @property
    def lambdas(self) -> tuple[float, float, float]:
        return (self.lambda_edge, self.lambda_multi, self.lambda_path)


_TERMS = ("edge", "multi", "path")
_PROMPT_TENSORS = ("image_keys", "image_values", "text_keys", "text_values")


@contextmanager
def _block_outputs(blocks: nn.ModuleList) -> Iterator[list[torch.Tensor]]:
    """Record the output of every block of ``blocks`` during the ``with`` block, in order."""
    out: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, args, o: out.append(o)) for b in blocks]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


class _Target:
    """What task t's graph terms compare with, prepared once at the start of task t:
    the task's own nodes, task t - 1's stored graph re-indexed onto them, the old masks."""

    def __init__(
        self, task_index: int, centroids: torch.Tensor, stored: dg.TaskGraph, old: list[torch.Tensor],
        perm: list[torch.Tensor],
    ):  # fmt: skip
        self.task_index = task_index
        self.perm = perm  # per layer [K]: the stored node matched with each current node
        self.centroids = centroids  # [L, K, E] float32
        self.stored = stored  # aligned to the current nodes, float32
        self.old = old  # per layer [K] bool
        self.checked = False  # the first step's dependency check has run

    def to(self, device: torch.device) -> _Target:
        t = _Target(self.task_index, self.centroids.to(device), self.stored.to(device, torch.float32),
                    [o.to(device) for o in self.old], self.perm)  # fmt: skip
        t.checked = self.checked
        return t


@register
class DAGR(DIKI):
    name = "dagr"
    Config = DAGRConfig
    ablations = {
        "full": {},
        "no_graph": {"lambda_edge": 0.0, "lambda_multi": 0.0, "lambda_path": 0.0},
        "edge_only": {"lambda_multi": 0.0, "lambda_path": 0.0},
        "multi_only": {"lambda_edge": 0.0, "lambda_path": 0.0},
        "path_only": {"lambda_edge": 0.0, "lambda_multi": 0.0},
    }

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        cfg = self.config
        clip = backbone.model
        self._visual = clip.visual
        self._text = clip.text if hasattr(clip, "text") else clip  # CustomTextCLIP or CLIP
        self._txt_blocks = self._text.transformer.resblocks
        self.layers = self.prompted.depth["image"]
        self.graph_config = dg.GraphConfig(
            num_nodes=cfg.num_nodes,
            alpha=cfg.alpha,
            beta=cfg.beta,
            gamma=cfg.gamma,
            temperature=cfg.temperature,
            topk=cfg.topk,
            residual=cfg.residual,
            path_similarity=cfg.path_similarity,
            cross_weight=cfg.cross_weight,
            kmeans_iters=cfg.kmeans_iters,
            seed=run.seed,
            store_dtype=cfg.store_dtype,
        )
        self.graphs: list[dg.TaskGraph] = []  # graphs[t]: stored at the end of task t (its nodes inside)
        self._target: _Target | None = None

    @property
    def graph_on(self) -> bool:
        return any(v > 0 for v in self.config.lambdas)

    # ------------------------------------------------------------------ projections
    def _project_image(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [..., N, W] of any image layer -> joint space [..., N, E] (ln_post, proj)."""
        x = self._visual.ln_post(x)
        return x @ self._visual.proj if self._visual.proj is not None else x

    def _project_text(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text stream [C, N, W] -> pooled joint-space features [C, E] (EOT, ln_final, projection;
        pooling first is exact: the layer norm is per token)."""
        from open_clip.transformer import text_global_pool

        t = self._text
        x = text_global_pool(x, tokens, getattr(t, "text_pool_type", "argmax"), getattr(t, "text_eos_id", None))
        if isinstance(x, tuple):  # older open_clip returns (pooled, tokens)
            x = x[0]
        x = t.ln_final(x)
        proj = t.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    # ------------------------------------------------------------------ graph inputs
    def graph_inputs(self, images: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        """One prompted image forward (set ``s``, w = 1) with the graph's inputs captured:
        (normalised image features, joint-space tokens [L, B, N, E] = outputs of the
        prompted blocks, per-block token attention logits [B, H, N, N] and their per-head
        softmax, the attention the blocks applied)."""
        with self.prompted.capture() as cap:
            feats = self.prompted.encode_image(images, sets=s, weight=1.0)
        # One projection of all layers stacked (the graph maths is stacked too).
        tokens = self._project_image(torch.stack([c.tokens for c in cap.image]))
        return feats, tokens, [c.attn_logits for c in cap.image], [c.attn_probs for c in cap.image]

    def class_text(self, task, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``task``'s class embeddings through the text tower with set ``s`` at w = 1, in
        one forward (with grad when grad is on): (DIKI's text head [C, E], exactly as
        :meth:`text_head` computes it; per graph layer the class features [L, C, E] at
        depth ``min(l, text blocks - 1)``, normalised, template-averaged). The text forward
        runs outside any capture: the graph needs no text attention."""
        n_txt = len(self._txt_blocks)
        with _block_outputs(self._txt_blocks) as stream:
            head = self.text_head(task, s, 1.0, cache=False)
        tmpls, tokens = self.class_prompts(task)  # the ones text_head encoded (cached)
        depths = sorted({min(layer, n_txt - 1) for layer in range(self.layers)})
        pooled = {d: self._project_text(stream[d], tokens).float() for d in depths}
        C = len(task.classnames)
        per_layer = []
        for layer in range(self.layers):
            z = F.normalize(pooled[min(layer, n_txt - 1)], dim=-1)
            per_layer.append(F.normalize(z.view(C, len(tmpls), -1).mean(1), dim=-1))
        return head, torch.stack(per_layer)

    def _graph_loader(self, task_index: int) -> DataLoader:
        data = self.ctx.train_sets[task_index]
        n = self.config.graph_samples
        if n is not None and n < len(data):
            # ctx.generator is reseeded by the engine per task: the same subset on a rerun.
            idx = torch.randperm(len(data), generator=self.ctx.generator)[:n].sort().values
            data = Subset(data, idx.tolist())
        return self.ctx.loader(data, self.run.evaluation.batch_size)

    @torch.no_grad()
    def fit_nodes(self, task_index: int, s: int, batches: Iterable[dict], text: torch.Tensor) -> list[torch.Tensor]:
        """[choice] Task ``task_index``'s nodes under prompt set ``s``: per layer, k-means of
        ``node_tokens_per_image`` random image tokens per image, each fused with its image's
        class text at the same depth (``text`` [L, C, E] from :meth:`class_text`)."""
        m = self.config.node_tokens_per_image
        per_layer: list[list[torch.Tensor]] = [[] for _ in range(self.layers)]
        for batch in batches:
            images = batch["image"].to(self.ctx.device)
            labels = batch["label"].to(self.ctx.device)
            _, tokens, _, _ = self.graph_inputs(images, s)
            B, N = tokens[0].shape[:2]
            pick = torch.rand(B, N, generator=self.ctx.generator).argsort(dim=1)[:, : min(m, N)]
            pick = pick.to(images.device)
            for layer, tok in enumerate(tokens):
                sel = tok.float().gather(1, pick[..., None].expand(-1, -1, tok.shape[-1]))  # [B, m, E]
                txt = text[layer][labels][:, None].expand_as(sel)
                per_layer[layer].append(dg.fuse(sel.reshape(-1, sel.shape[-1]), txt.reshape(-1, sel.shape[-1]),
                                                 self.config.alpha))  # fmt: skip
        return dg.fit_nodes([torch.cat(f) for f in per_layer], self.graph_config)

    @torch.no_grad()
    def build_task_graph(
        self, s: int, images: Iterable[torch.Tensor], text: torch.Tensor, centroids: list[torch.Tensor]
    ) -> dg.TaskGraph:
        """The graph of the model with prompt set ``s`` (w = 1) over ``images`` (an iterable
        of batches) and the class features ``text`` [L, C, E], on ``centroids``."""

        def batches():
            for x in images:
                _, tokens, attn, _ = self.graph_inputs(x.to(self.ctx.device), s)
                yield tokens, attn, text

        return dg.build_graph(batches(), centroids, self.graph_config)

    @torch.no_grad()
    def task_graph(self, task_index: int, task, s: int) -> dg.TaskGraph:
        """Nodes fitted on task ``task_index``'s features under set ``s`` and the graph on them."""
        loader = self._graph_loader(task_index)  # one subset for the nodes and the graph
        _, text = self.class_text(task, s)
        centroids = self.fit_nodes(task_index, s, loader, text)
        return self.build_task_graph(s, (b["image"] for b in loader), text, centroids)

    def prepare_target(self, task_index: int, task) -> _Target:
        """Task ``task_index``'s nodes (inherited set, before training), matched with the
        stored graph of task ``task_index - 1``: the target of its graph terms."""
        return self.target_from(task_index, self.task_graph(task_index, task, task_index), task.name)

    def target_from(self, task_index: int, start: dg.TaskGraph, name: str = "") -> _Target:
        """The target of task ``task_index``'s graph terms from ``start`` (the task's graph
        under its inherited prompts): its nodes, task ``task_index - 1``'s stored graph
        re-indexed onto them by prototype matching, and the old-node masks."""
        cfg = self.config
        prev = self.graphs[task_index - 1]
        perm, old, cos = dg.match_nodes(start, prev, cfg.tau, cfg.min_mass)
        centroids = torch.stack([layer.centroids.float() for layer in start.layers])
        target = _Target(task_index, centroids, prev.aligned(perm).to(centroids.device, torch.float32), old, perm)
        counts = [int(o.sum()) for o in old]
        medians = [round(float(c.median()), 3) for c in cos]
        log.info("dagr: task %d (%s): old nodes per layer %s of %d (tau %.2f; median matched cosine %s)",
                 task_index, name, counts, cfg.num_nodes, cfg.tau, medians)  # fmt: skip
        if not any(counts):
            log.warning("dagr: task %d: no node matched task %d's (tau %.2f): the graph terms are 0 for this "
                        "task; lower tau to regularise", task_index, task_index - 1, cfg.tau)  # fmt: skip
        return target

    # ------------------------------------------------------------------ training
    def before_task(self, task_index, task):
        super().before_task(task_index, task)
        self._target = None
        if task_index > 0 and self.graph_on:
            self._target = self.prepare_target(task_index, task)

    def graph_terms(
        self, tokens: torch.Tensor, attn: list, text: torch.Tensor, task_index: int, probs: list | None = None
    ) -> dict[str, torch.Tensor]:
        """The weighted graph terms of the current batch against the prepared target of
        task ``task_index`` (only those with a non-zero lambda). ``probs`` (the captured
        per-head attention) saves recomputing the softmax; it is only the graph's at
        ``beta = 1``."""
        target = self._target
        if target is None or target.task_index != task_index:
            raise RuntimeError(f"dagr: no graph target for task {task_index} (before_task did not run)")
        if target.centroids.device != tokens.device:
            target = self._target = target.to(tokens.device)
        cfg = self.config
        current = dg.current_graph(tokens, attn, target.stored, probs if cfg.beta == 1.0 else None, text,
                                   target.centroids)  # fmt: skip
        terms = dg.graph_losses(current, target.stored, cfg.lambdas, cfg.lambda_decay, tuple(cfg.hops), cfg.tau,
                                cfg.min_mass, old=target.old)  # fmt: skip
        return {k: terms[k] for k, lam in zip(_TERMS, cfg.lambdas) if lam > 0}

    def check_dependencies(self, terms: dict[str, torch.Tensor], task_index: int) -> None:
        """Raise if a graph term does not depend on the current prompts, or if the terms
        together miss one of the four prompt tensors (structurally: autograd finds no path,
        whatever the values). Skipped when no node is old (every term is then 0 by design)."""
        assert self._target is not None
        if not any(bool(o.any()) for o in self._target.old):
            return
        ps = self.prompted.prompts[task_index]
        params = [getattr(ps, n) for n in _PROMPT_TENSORS]
        reached: set[str] = set()
        for name, term in terms.items():
            if not term.requires_grad:
                raise RuntimeError(f"dagr: graph term {name!r} is constant in the trainable prompts")
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            hit = {n for n, g in zip(_PROMPT_TENSORS, grads) if g is not None}
            if not hit:
                raise RuntimeError(f"dagr: graph term {name!r} does not depend on task {task_index}'s prompts")
            reached |= hit
        missed = [n for n in _PROMPT_TENSORS if n not in reached]
        if missed:
            raise RuntimeError(f"dagr: no graph term reaches the prompts {missed} (towers' depths: {self.prompted.depth})")

    def training_loss(self, batch, task_index):
        if task_index == 0 or not self.graph_on:
            return super().training_loss(batch, task_index)
        if not bool((batch["task"] == task_index).all()):
            raise ValueError("dagr trains on the current task's samples only (no replay or joint batches)")
        task = self.ctx.tasks[task_index]
        head, text = self.class_text(task, task_index)
        feats, tokens, attn, probs = self.graph_inputs(batch["image"], task_index)
        logits = self.backbone.logit_scale() * feats.float() @ head.T
        # The same per-sample sum / batch size as DIKI's task_cross_entropy.
        ce = F.cross_entropy(logits.float(), batch["label"], reduction="sum") / len(logits)
        terms = self.graph_terms(tokens, attn, text, task_index, probs)
        assert self._target is not None
        if not self._target.checked and torch.is_grad_enabled():
            self.check_dependencies(terms, task_index)
            self._target.checked = True
        return {"ce": ce, **terms}

    def after_task(self, task_index, task):
        super().after_task(task_index, task)
        if not self.graph_on:
            return
        graph = self.task_graph(task_index, task, task_index)
        del self.graphs[task_index:]  # a retried task replaces its graph
        self.graphs.append(graph)
        self._target = None
        log.info("dagr: stored graph of task %d (%s): %d bytes", task_index, task.name, graph.nbytes())

    def stats(self) -> dict[str, float]:
        if not self.graphs:
            return {"graph_bytes": 0.0, "graph_bytes_total": 0.0}
        return {
            "graph_bytes": float(self.graphs[-1].nbytes()),  # the last task's graph
            "graph_bytes_total": float(sum(g.nbytes() for g in self.graphs)),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self):
        state = super().state_dict()
        state["dagr"] = {"graphs": [g.state_dict() for g in self.graphs]}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.graphs = [dg.TaskGraph.from_state_dict(g) for g in state["dagr"]["graphs"]]
        self._target = None
