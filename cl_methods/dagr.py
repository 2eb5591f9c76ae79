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

Choices where the paper is silent ([choice] in the code; README "DAGR"):

- The graph is the IMAGE tower's, over its prompted blocks ``l = 0 .. L-1``. Tokens of
  layer ``l`` are the input of block ``l`` (the residual stream the block's queries and
  keys come from), mapped into the joint embedding space by the tower's own final LN and
  projection (``ln_post``, ``proj``), the same map for every layer (so ``f`` = identity).
  Attention: the block's token-token logits from the capture (prompt keys excluded).
  Note that DIKI's prompts leave a block's own token attention unchanged; they act on
  the block's output, so layer ``l``'s graph depends on the prompts of blocks ``< l``
  (layer 0's graph is the frozen model's, a constant).
- Nodes (``V_l = KMeans(alpha Z_img + (1 - alpha) Z_txt, K)``) are fitted once, at the end
  of the first task, with the trained model on that task's graph subset, and kept for
  every later task (node identity fixed). ``Z_img`` are token-level features (a random
  ``node_tokens_per_image`` of each image's tokens at that layer, joint space);
  ``Z_txt`` is the image's class embedding through the text tower (the same task's
  prompt set, w = 1) taken at the same depth of the residual stream (clipped to the text
  tower's depth), pooled at the EOT token and mapped by the text tower's ``ln_final`` and
  projection, averaged over the templates. Each token is fused with its image's class
  text, so nodes are class-conditioned token clusters.
- At the end of every task the graph of the trained model (its own prompt set, w = 1) is
  built on ``graph_samples`` training images (a seeded random subset; all with ``null``)
  and stored; all stored graphs are kept (bytes reported), the loss uses the previous one.
- The current graph is built from the training forward itself (capture), no extra pass.
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
    gamma: float = Field(default=0.5, ge=0.0, le=1.0)  # centroid cosine vs rollout in inter-layer edges
    temperature: float = Field(default=0.1, gt=0.0)  # soft assignment of tokens to nodes
    topk: int | None = Field(default=8, ge=1)  # neighbours kept per edge row (null: dense)
    residual: float = Field(default=0.5, ge=0.0, le=1.0)  # identity weight of the rollout
    path_similarity: Literal["centroids", "prototypes"] = "centroids"
    # Loss weights lambda_1 (edge), lambda_2 (multi-hop), lambda_3 (path) and their decay
    # with depth (layer l weighs decay^l, normalised).
    lambda_edge: float = Field(default=1.0, ge=0.0)
    lambda_multi: float = Field(default=1.0, ge=0.0)
    lambda_path: float = Field(default=1.0, ge=0.0)
    lambda_decay: float = Field(default=0.8, gt=0.0)
    hops: list[int] = Field(default_factory=lambda: [2, 3])
    # Old-node match: cos(current prototype, stored prototype) >= tau, token share > min_mass.
    tau: float = Field(default=0.8, ge=-1.0, le=1.0)
    min_mass: float = Field(default=1e-4, ge=0.0)
    # Training images a stored graph (and the first task's nodes) is built from; null = all.
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


@contextmanager
def _residual_stream(blocks: nn.ModuleList, n: int) -> Iterator[list[torch.Tensor]]:
    """Record the residual stream at positions ``0..n``: the input of block 0, then the
    outputs of blocks ``0..n-1`` (position ``l`` = input of block ``l``)."""
    out: list[torch.Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: out.append(args[0]))]
    hooks += [b.register_forward_hook(lambda m, args, o: out.append(o)) for b in blocks[:n]]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


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
        self._img_blocks = clip.visual.transformer.resblocks
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
            kmeans_iters=cfg.kmeans_iters,
            seed=run.seed,
            store_dtype=cfg.store_dtype,
        )
        self.centroids: list[torch.Tensor] | None = None  # per layer [K, E], fixed after task 0
        self.graphs: list[dg.TaskGraph] = []  # graphs[t]: stored at the end of task t
        self._device_graph: tuple[int, dg.TaskGraph] | None = None

    @property
    def graph_on(self) -> bool:
        return any(v > 0 for v in self.config.lambdas)

    # ------------------------------------------------------------------ projections
    def _project_image(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, W] of any image layer -> joint space [B, N, E] (ln_post, proj)."""
        x = self._visual.ln_post(x)
        return x @ self._visual.proj if self._visual.proj is not None else x

    def _project_text(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text stream [C, N, W] -> pooled joint-space features [C, E] (ln_final, EOT, projection)."""
        from open_clip.transformer import text_global_pool

        t = self._text
        x = t.ln_final(x)
        x = text_global_pool(x, tokens, getattr(t, "text_pool_type", "argmax"), getattr(t, "text_eos_id", None))
        if isinstance(x, tuple):  # older open_clip returns (pooled, tokens)
            x = x[0]
        proj = t.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    # ------------------------------------------------------------------ graph inputs
    def graph_inputs(self, images: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        """One prompted image forward (set ``s``, w = 1) with the graph's inputs captured:
        (normalised image features, joint-space tokens [L, B, N, E] = inputs of the
        prompted blocks, per-layer token attention logits [B, H, N, N] and their per-head
        softmax, the attention the blocks applied)."""
        L = self.layers
        with self.prompted.capture() as cap, _residual_stream(self._img_blocks, L - 1) as stream:
            feats = self.prompted.encode_image(images, sets=s, weight=1.0)
        # One projection of all layers stacked (the graph maths is stacked too).
        tokens = self._project_image(torch.stack(stream[:L]))
        return feats, tokens, [c.attn_logits for c in cap.image], [c.attn_probs for c in cap.image]

    @torch.no_grad()
    def _class_text_layers(self, task, s: int) -> list[torch.Tensor]:
        """Per graph layer l, the task's class embeddings [C, E] (normalised, template-
        averaged) at depth min(l, text blocks) of the text stream, with set ``s``, w = 1."""
        tmpls = list(task.templates) if self.ctx.templates == "all" else list(task.templates[:1])
        tmpls = tmpls or ["{}"]
        tokens = self.backbone.tokenize([t.format(c) for c in task.classnames for t in tmpls])
        n_txt = len(self._txt_blocks)
        with _residual_stream(self._txt_blocks, n_txt) as stream:
            self.prompted.encode_text(tokens, sets=s, weight=1.0)
        out = []
        for layer in range(self.layers):
            z = F.normalize(self._project_text(stream[min(layer, n_txt)], tokens).float(), dim=-1)
            out.append(F.normalize(z.view(len(task.classnames), len(tmpls), -1).mean(1), dim=-1))
        return out

    def _graph_loader(self, task_index: int) -> DataLoader:
        data = self.ctx.train_sets[task_index]
        n = self.config.graph_samples
        if n is not None and n < len(data):
            # ctx.generator is reseeded by the engine per task: the same subset on a rerun.
            idx = torch.randperm(len(data), generator=self.ctx.generator)[:n].sort().values
            data = Subset(data, idx.tolist())
        return self.ctx.loader(data, self.run.evaluation.batch_size)

    @torch.no_grad()
    def fit_nodes(self, task_index: int, batches: Iterable[dict]) -> list[torch.Tensor]:
        """[choice] Nodes from task ``task_index``'s images: per layer, k-means of tokens
        fused with their image's class text embedding at the same depth."""
        task = self.ctx.tasks[task_index]
        text = self._class_text_layers(task, task_index)
        m = self.config.node_tokens_per_image
        per_layer: list[list[torch.Tensor]] = [[] for _ in range(self.layers)]
        for batch in batches:
            images = batch["image"].to(self.ctx.device)
            labels = batch["label"].to(self.ctx.device)
            _, tokens, _, _ = self.graph_inputs(images, task_index)
            B, N = tokens[0].shape[:2]
            pick = torch.rand(B, N, generator=self.ctx.generator).argsort(dim=1)[:, : min(m, N)]
            pick = pick.to(images.device)
            for layer, tok in enumerate(tokens):
                sel = tok.float().gather(1, pick[..., None].expand(-1, -1, tok.shape[-1]))  # [B, m, E]
                txt = text[layer][labels][:, None].expand_as(sel)
                per_layer[layer].append(dg.fuse(sel.reshape(-1, sel.shape[-1]), txt.reshape(-1, sel.shape[-1]),
                                                 self.config.alpha))
        return dg.fit_nodes([torch.cat(f) for f in per_layer], self.graph_config)

    @torch.no_grad()
    def store_graph(self, task_index: int, images: Iterable[torch.Tensor]) -> dg.TaskGraph:
        """Build the graph of the current model (set ``task_index``, w = 1) over ``images``
        (an iterable of batches) on the stored nodes, and keep it as task ``task_index``'s."""
        assert self.centroids is not None

        def batches():
            for x in images:
                _, tokens, attn, _ = self.graph_inputs(x.to(self.ctx.device), task_index)
                yield tokens, attn

        graph = dg.build_graph(batches(), self.centroids, self.graph_config)
        del self.graphs[task_index:]  # a retried task replaces its graph
        self.graphs.append(graph)
        self._device_graph = None
        return graph

    # ------------------------------------------------------------------ training
    def graph_terms(
        self, tokens: torch.Tensor, attn: list, task_index: int, probs: list | None = None
    ) -> dict[str, torch.Tensor]:
        """The weighted graph terms against the stored graph of task ``task_index - 1``
        (only those with a non-zero lambda). ``probs`` (the captured per-head attention)
        saves recomputing the softmax; it is only the graph's at ``beta = 1``."""
        prev = task_index - 1
        if self._device_graph is None or self._device_graph[0] != prev:
            # float32 on the device: the stored float16 centroids would otherwise meet
            # bf16 activations under autocast, a mix torch's autocast refuses to stack.
            self._device_graph = (prev, self.graphs[prev].to(tokens[0].device, torch.float32))
        stored = self._device_graph[1]
        cfg = self.config
        current = dg.current_graph(tokens, attn, stored, probs if cfg.beta == 1.0 else None)
        terms = dg.graph_losses(current, stored, cfg.lambdas, cfg.lambda_decay, tuple(cfg.hops), cfg.tau, cfg.min_mass)
        return {k: terms[k] for k, lam in zip(_TERMS, cfg.lambdas) if lam > 0}

    def training_loss(self, batch, task_index):
        if task_index == 0 or not self.graph_on:
            return super().training_loss(batch, task_index)
        if not bool((batch["task"] == task_index).all()):
            raise ValueError("dagr trains on the current task's samples only (no replay or joint batches)")
        task = self.ctx.tasks[task_index]
        head = self.text_head(task, task_index, 1.0, cache=False)
        feats, tokens, attn, probs = self.graph_inputs(batch["image"], task_index)
        logits = self.backbone.logit_scale() * feats.float() @ head.T
        # The same per-sample sum / batch size as DIKI's task_cross_entropy.
        ce = F.cross_entropy(logits.float(), batch["label"], reduction="sum") / len(logits)
        return {"ce": ce, **self.graph_terms(tokens, attn, task_index, probs)}

    def after_task(self, task_index, task):
        super().after_task(task_index, task)
        if not self.graph_on:
            return
        loader = self._graph_loader(task_index)  # one subset for the nodes and the graph
        if self.centroids is None:
            self.centroids = self.fit_nodes(task_index, loader)
        graph = self.store_graph(task_index, (b["image"] for b in loader))
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
        state["dagr"] = {
            "centroids": None if self.centroids is None else [c.detach().cpu().clone() for c in self.centroids],
            "graphs": [g.state_dict() for g in self.graphs],
        }
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        saved = state["dagr"]
        device = self.ctx.device
        self.centroids = None if saved["centroids"] is None else [c.to(device) for c in saved["centroids"]]
        self.graphs = [dg.TaskGraph.from_state_dict(g) for g in saved["graphs"]]
        self._device_graph = None
