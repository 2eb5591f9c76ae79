"""Graph mathematics of DAGR (dynamic alignment graph regularisation, CVPR 2026).

Pure torch functions and small dataclasses, independent of any model: a ``dagr`` method
captures per-layer tensors from a prompted CLIP and hands them here. The paper has no
public code; the facts used are in ``shared/design/METHODS.md`` (DAGR section), and
every choice the paper leaves open is listed below and marked ``[choice]`` in the code.

What the caller provides per batch, for the ``L`` regularised layers ``l = 0 .. L-1``:

- ``tokens[l]``: ``[B, N, D]`` the image tokens that are the *output* of prompted block
  ``l``, already mapped by the caller into ONE shared ``D``-dim space for all layers (the
  joint image-text space). [choice] Outputs, not inputs: a block's output is what its own
  prompts (keys and values) change, so layer ``l``'s graph depends on layer ``l``'s
  prompts, the first layer's included (a block's input is the previous block's output,
  which its own prompts never touch).
- ``attn[l]``: ``[B, H, N, N]`` pre-softmax token-token logits of block ``l`` (scaled as
  the model scales them, so ``beta = 1`` is the block's own attention), or their per-head
  softmax as ``probs``; the caller also hands block ``l + 1``'s (see the path edges).
- ``text[l]``: ``[C, D]`` the current task's class text features at the same depth of the
  text tower (the class prompts' EOT token after text block ``l``, clipped to the tower's
  depth, mapped into the same joint space). Optional: without it the graph is image-only
  (the mechanism tests of the maths use that).
- for node fitting, per layer a ``[M, D]`` tensor of fused features
  ``alpha * Z_img + (1 - alpha) * Z_txt`` (:func:`fuse`).

The graph of one layer (paper notation in brackets):

- Nodes [V_l = KMeans(alpha Z_img + (1 - alpha) Z_txt, K)]: :func:`kmeans` on the
  L2-normalised fused features (:func:`fit_nodes`), **one node set per task**, fitted on
  that task's features. Image tokens are soft-assigned to the nodes,
  ``S = softmax_K(cos(token, centroid) / temperature)`` ``[B, N, K]`` and so are the class
  text features, ``U`` ``[C, K]`` (:func:`soft_assign`).
- Node prototypes (for matching): [choice] fused like the nodes,
  ``alpha * mean_S(normalised tokens) + (1 - alpha) * mean_U(normalised class texts)``
  (image part only without text).
- Intra-layer edges [e_l[i, j] = mean_h softmax_j(beta A_l_h[i, j])], two families over
  the same nodes, each row-normalised, blended ``(1 - cross_weight) E_img + cross_weight
  E_cross`` [choice, 0.5]:
  - ``E_img``: the head-averaged token attention ``P = mean_h softmax(beta * logits)`` of
    block ``l`` pooled to nodes as ``S^T P S`` summed over the batch (:func:`node_edges`).
    [choice] Both sides assigned by the block's output tokens, position by position (the
    residual keeps a position's identity through a block): row ``i`` is where the
    attention of node ``i``'s tokens went, by the node those positions now belong to.
  - ``E_cross`` (couples the towers): ``S^T Q`` with ``Q[a, j] = softmax_j(cos(token_a,
    t_j) / temperature)``, ``t_j = mean_U`` of the class text features assigned to node
    ``j`` at the same depth: how node ``i``'s image tokens align with node ``j``'s text.
    [choice] Aligned to per-node text vectors, not to every class: the cost is ``B N K``
    whatever the number of classes (MTIL's SUN397 has 397), and the rows of two tasks
    with different class sets stay comparable node by node.
  Top-k keeps the ``k`` largest entries of each row and renormalises.
- Multi-hop [RowNorm(A_l^k), k in {2, 3}]: :func:`multi_hop`.
- Inter-layer edges [e_{l->l+1}[i, j] = gamma cos(f(v_i^l), v_j^{l+1}) + (1 - gamma) R[i, j]]:
  [choice] ``f`` is the identity, because the caller maps all layers into one space;
  the cosine is between the node *prototypes* of layers ``l`` and ``l + 1``
  (``path_similarity="prototypes"``, the default: they move with the prompts and, fused,
  with the text prompts too; ``"centroids"`` uses the fitted centroids, constant within a
  task), clamped at 0 so that a row is a non-negative weight vector.
  [choice] ``R`` is one step of the attention rollout (Abnar & Zuidema 2020:
  ``RowNorm(0.5 A + 0.5 I)``, multiplied over layers) at node level: block ``l + 1``
  maps layer ``l``'s tokens (its input) to layer ``l + 1``'s (its output), so
  ``R_l = RowNorm(sum_b S_{l+1}^T Ã_{l+1} S_l)`` with ``Ã_{l+1} = 0.5 P_{l+1} + 0.5 I``
  (:func:`layer_flow`; ``Ã`` is never materialised, ``B N^2 K`` per layer, no ``N^3``
  token-level product; :func:`rollout` implements the classic product for any list of
  square matrices).
  [choice] Orientation: the inter-layer matrices are stored as the rollout orients them,
  ``T_l`` ``[K_{l+1}, K_l]``, row ``j`` = a layer-``l + 1`` node, a distribution over the
  layer-``l`` nodes its tokens draw from (residual + attention). The paper's
  ``e_{l->l+1}[i, j]`` is its transpose before normalisation; normalising over sources
  makes each row depend only on what node ``j``'s own tokens attend to, so a change in
  what new-class tokens attend to cannot rescale old rows (up to the exponentially small
  tails of the soft assignment). The blend is row-normalised and top-k sparsified like
  the intra-layer edges.
- Old-class mask [M_l[i, j] = 1 iff the edge belongs to an old-class subgraph]: the
  current task's nodes are matched one to one with the stored graph's by their prototypes
  (:func:`match_nodes`: the assignment that maximises the summed cosine, Hungarian,
  per layer); [choice] node ``i`` is *old* when its match's cosine is ``>= tau`` and it
  holds at least ``min_mass`` of the tokens in both graphs; ``M[i, j] = old_i * old_j``
  and ``M_{l->l+1}[j, i] = old^{l+1}_j * old^l_i``. The stored graph is re-indexed by the
  match (:meth:`TaskGraph.aligned`) so both graphs index the same nodes. The mask is a
  hard threshold: no gradient. (:func:`old_node_mask` is the same test for two graphs
  that already share their nodes.)

Losses (:func:`graph_losses`), each row ``i`` a distribution over neighbours:

- ``KL(p || q) = sum_j p_j (log clamp(p_j) - log clamp(q_j))`` with the same clamp on both
  sides, so identical inputs give exactly ``0.0`` (:func:`kl_rows`).
- [choice] The mask is applied as the paper writes it for L_path, ``RowNorm(M * X)``, for all
  three terms: each old row is compared as a distribution over its old neighbours. Edges
  into or between new-class nodes then contribute nothing at all, not even through the
  row normalisation.
- L_edge: per layer, the sum over rows of ``KL(RowNorm(M * E_stored) || RowNorm(M * E_cur))``.
- L_multi: the same on ``RowNorm((RowNorm(M * E))^k)`` for ``k`` in ``hops``, averaged
  over hops. [choice] The powers are taken on the *masked* (old) subgraph, so a path
  through a new-class node does not count; they are recomputed at loss time (``L K^3``
  flops, negligible) instead of being stored.
- L_path: per transition ``l -> l + 1``, the same on ``RowNorm(M_{l->l+1} * T)``.
- [choice] Each per-layer sum over rows is divided by ``K`` (a constant) so lambdas
  transfer across node counts. Layers are weighted by :func:`layer_weights` (``decay^l``
  normalised to sum 1, shallow first; transitions use the weights of ``L - 1`` layers)
  and the three terms are returned already multiplied by ``lambda_1..3``.
- [choice] Top-k: the stored graph is sparsified; the current graph is restricted to the
  stored graph's support and renormalised (comparing it on its own top-k support would
  put zeros of ``q`` under mass of ``p``). Identical inputs give identical supports.

Stored per task (:class:`TaskGraph`): per layer the centroids and prototypes ``[K, D]``
(in ``store_dtype``, float16 by default: the centroids are rounded *before* any edge is
computed so the stored edges are exactly reproducible from the stored centroids), the
node token shares ``[K]`` and the edges ``[K, K]``; per consecutive pair the transitions
``[K, K]`` (float32). With the defaults (``K = 16``) and a ViT-B/16-like capture
(8 prompted layers, ``D = 512``) this is about 0.28 MB per task, in line with the
paper's ~0.2 MB. Building it costs ``B N^2 K`` per layer and batch (pooling), the graph
itself ``O(K^2 L)``.

[choice] Defaults (all searchable): ``K = 16``, ``alpha = 0.5``, ``beta = 1``,
``gamma = 0.5``, soft-assignment ``temperature = 0.1``, ``topk = 8``,
``cross_weight = 0.5`` (:class:`GraphConfig`); ``tau = 0.8``, ``min_mass = 1e-4``,
``decay = 0.8``, ``lambdas = (1, 1, 1)``, ``hops = (2, 3)`` (:func:`graph_losses`).

Typical use by a method: at the end of task ``t``, ``fit_nodes`` on the task's fused
features, ``build_graph`` over the task's batches on those nodes, keep the
:class:`TaskGraph` (``state_dict`` for checkpoints). At the start of task ``t + 1``:
``fit_nodes`` on its features, ``build_graph`` once for the prototypes,
``match_nodes`` against task ``t``'s graph, keep ``stored.aligned(perm)`` and the old
masks; per batch ``graph_losses(current_graph(..., centroids=nodes), aligned, old=old)``.

[choice] :func:`kmeans` raises a ``ValueError`` when there are fewer points than
clusters (duplicated centroids would make nodes indistinguishable and their soft
assignment split tokens evenly); with enough points but fewer *distinct* ones, k-means++
falls back to uniform draws and some centroids coincide.

All computations run in float32 with autocast disabled, whatever the caller's precision:
the KL terms and the exact-zero property need it. Nothing happens at import time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class GraphConfig:
    """How a graph is built; stored with it so the current graph is built identically."""

    num_nodes: int = 16  # K per layer
    alpha: float = 0.5  # image weight of the fused node-fitting features
    beta: float = 1.0  # inverse temperature on the attention logits
    gamma: float = 0.5  # weight of the centroid cosine against the rollout in T
    temperature: float = 0.1  # soft-assignment temperature on cosine similarities
    topk: int | None = 8  # neighbours kept per row; None = dense
    residual: float = 0.5  # identity weight of the rollout (Abnar & Zuidema: 0.5)
    path_similarity: Literal["centroids", "prototypes"] = "prototypes"
    cross_weight: float = 0.5  # weight of the image-to-text family in the blended edges
    kmeans_iters: int = 50
    seed: int = 0
    store_dtype: str = "float16"  # centroids and prototypes; edges stay float32

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.cross_weight <= 1.0:
            raise ValueError(f"cross_weight must be in [0, 1], got {self.cross_weight}")
        if not 0.0 <= self.residual <= 1.0:
            raise ValueError(f"residual must be in [0, 1], got {self.residual}")
        if self.temperature <= 0 or self.beta <= 0:
            raise ValueError("temperature and beta must be > 0")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"topk must be >= 1 or None, got {self.topk}")
        if self.path_similarity not in ("centroids", "prototypes"):
            raise ValueError(f"path_similarity must be 'centroids' or 'prototypes', got {self.path_similarity!r}")
        if self.store_dtype not in _DTYPES:
            raise ValueError(f"store_dtype must be one of {sorted(_DTYPES)}, got {self.store_dtype!r}")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.store_dtype]


# --------------------------------------------------------------------------- helpers
def _fp32() -> contextlib.AbstractContextManager:
    """Disable autocast on every device type that has one: graph maths stays float32."""
    stack = contextlib.ExitStack()
    for device_type in ("cuda", "cpu"):
        # Only where autocast is on: asking for an absent device type only warns.
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
    return stack


def row_norm(x: Tensor, eps: float = EPS) -> Tensor:
    """Rows divided by their sums; an all-zero row stays zero (no NaN)."""
    return x / x.sum(dim=-1, keepdim=True).clamp_min(eps)


def restrict(x: Tensor, support: Tensor) -> Tensor:
    """Keep the entries of ``x`` where ``support`` is true, then renormalise rows."""
    return row_norm(x * support.to(x.dtype))


def topk_mask(x: Tensor, k: int | None) -> Tensor:
    """Boolean mask of the ``k`` largest entries of each row (all true when ``k`` is None)."""
    if k is None or k >= x.shape[-1]:
        return torch.ones_like(x, dtype=torch.bool)
    idx = x.topk(k, dim=-1).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def topk_sparsify(x: Tensor, k: int | None) -> Tensor:
    """Keep the ``k`` largest entries per row and renormalise; ``k=None`` means dense.

    Written as :func:`restrict` with the top-k support so that a current graph restricted
    to a stored graph's support is computed by exactly the same operations. Dense
    (``k`` None or ``>= K``) returns ``x`` itself: no second normalisation to mirror.
    """
    if not _sparse(k, x.shape[-1]):
        return x
    return restrict(x, topk_mask(x, k))


def _sparse(k: int | None, width: int) -> bool:
    return k is not None and k < width


def kl_rows(p: Tensor, q: Tensor, eps: float = EPS) -> Tensor:
    """Row-wise ``KL(p || q)`` over the last dim, numerically safe.

    Both logs use the same clamp, so ``p == q`` gives exactly 0.0 (every term is
    ``p * 0``), and a zero of ``p`` contributes nothing whatever ``q`` is there. A zero
    of ``q`` under mass of ``p`` gives a large but finite value.
    """
    return (p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(dim=-1)


# --------------------------------------------------------------------------- nodes
def fuse(z_img: Tensor, z_txt: Tensor, alpha: float) -> Tensor:
    """Per-sample fused node-fitting features ``alpha * Z_img + (1 - alpha) * Z_txt``.

    Each modality is L2-normalised first so that ``alpha`` weighs directions, not norms.
    """
    return alpha * F.normalize(z_img.float(), dim=-1) + (1.0 - alpha) * F.normalize(z_txt.float(), dim=-1)


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None]).clamp_min(0.0)


def kmeans(x: Tensor, k: int, seed: int = 0, iters: int = 50) -> Tensor:
    """Lloyd's k-means with k-means++ initialisation; returns centroids ``[k, D]`` (float32).

    Deterministic for a given ``seed`` on a given device: random draws come from a CPU
    ``torch.Generator``, cluster sums are one-hot matmuls (no atomic adds), an empty
    cluster is reseeded with the point farthest from its centroid (stable sort). Stops
    early once the assignment no longer changes. Raises ``ValueError`` when ``x`` has
    fewer rows than ``k``.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects [M, D] features, got shape {tuple(x.shape)}")
    m = x.shape[0]
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    if m < k:
        raise ValueError(f"kmeans: {m} points cannot give {k} distinct centroids; fit on more samples or lower K")
    with torch.no_grad(), _fp32():
        x = x.detach().float()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        first = int(torch.randint(m, (1,), generator=gen).item())
        chosen = [first]
        d2 = _sq_dist(x, x[first : first + 1]).squeeze(1)
        for _ in range(1, k):
            weights = d2.double().cpu()
            if weights.sum() > 0:
                idx = int(torch.multinomial(weights, 1, generator=gen).item())
            else:  # fewer distinct points than k: any point will do
                idx = int(torch.randint(m, (1,), generator=gen).item())
            chosen.append(idx)
            d2 = torch.minimum(d2, _sq_dist(x, x[idx : idx + 1]).squeeze(1))
        c = x[chosen].clone()
        prev: Tensor | None = None
        for _ in range(iters):
            dist = _sq_dist(x, c)
            assign = dist.argmin(dim=1)
            if prev is not None and torch.equal(assign, prev):
                break
            prev = assign
            onehot = F.one_hot(assign, k).to(x.dtype)
            counts = onehot.sum(0)
            new = (onehot.T @ x) / counts.clamp_min(1.0)[:, None]
            empty = counts == 0
            if bool(empty.any()):
                far = dist.gather(1, assign[:, None]).squeeze(1)
                order = far.argsort(descending=True, stable=True)
                new[empty] = x[order[: int(empty.sum())]]
            c = new
        return c


def fit_nodes(features: Sequence[Tensor], config: GraphConfig) -> list[Tensor]:
    """Per-layer centroids ``[K, D]``: k-means on the L2-normalised fused features.

    Normalised because tokens are assigned by cosine similarity; the centroids are rounded
    to ``config.store_dtype`` (and back to float32) here, so the graph built from them is
    exactly what a later task rebuilds from the stored copies.
    """
    out = []
    for layer, feats in enumerate(features):
        c = kmeans(F.normalize(feats.float(), dim=-1), config.num_nodes, config.seed + layer, config.kmeans_iters)
        out.append(c.to(config.dtype).float())
    return out


def soft_assign(tokens: Tensor, centroids: Tensor, temperature: float) -> Tensor:
    """``S = softmax_K(cos(token, centroid) / temperature)``: ``[..., N, D] -> [..., N, K]``.

    ``centroids`` ``[K, D]``, or with leading dims that broadcast against ``tokens``'
    (``[L, 1, K, D]`` for tokens ``[L, B, N, D]``: every layer against its own nodes).
    """
    sim = F.normalize(tokens.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).transpose(-1, -2)
    return torch.softmax(sim / temperature, dim=-1)


def prototypes(tokens: Tensor, assign: Tensor) -> Tensor:
    """Per-node prototype ``[K, D]``: the S-weighted mean of the L2-normalised tokens.

    ``tokens`` ``[B, N, D]`` (or ``[M, D]``), ``assign`` the matching ``[B, N, K]``.
    Normalised tokens keep a few large-norm tokens from dominating the direction.
    """
    sums, mass = _proto_sums(tokens, assign)
    return sums / mass.clamp_min(EPS)[:, None]


def _proto_sums(tokens: Tensor, assign: Tensor) -> tuple[Tensor, Tensor]:
    t = F.normalize(tokens.float(), dim=-1).reshape(-1, tokens.shape[-1])
    s = assign.reshape(-1, assign.shape[-1])
    return s.T @ t, s.sum(0)


def old_node_mask(
    current: Tensor,
    stored: Tensor,
    tau: float,
    current_mass: Tensor | None = None,
    stored_mass: Tensor | None = None,
    min_mass: float = 0.0,
) -> Tensor:
    """Boolean ``[K]``: node ``i`` is old when ``cos(current_i, stored_i) >= tau``.

    ``current``/``stored`` are prototypes ``[K, D]``. A node that holds less than
    ``min_mass`` of the tokens (token share, in either graph) has no meaningful prototype
    or edge row and is never old. No gradient: the mask is a hard selection.
    """
    with torch.no_grad():
        cos = F.cosine_similarity(current.detach().float(), stored.detach().float().to(current.device), dim=-1)
        old = cos >= tau
        if current_mass is not None:
            old &= current_mass.detach().to(old.device) > min_mass
        if stored_mass is not None:
            old &= stored_mass.detach().to(old.device) > min_mass
        return old


def edge_mask(old_src: Tensor, old_dst: Tensor | None = None) -> Tensor:
    """``M[i, j] = old_src[i] * old_dst[j]`` (float); ``old_dst`` defaults to ``old_src``."""
    dst = old_src if old_dst is None else old_dst
    return old_src.float()[:, None] * dst.float()[None, :]


def match_nodes(
    current: TaskGraph, stored: TaskGraph, tau: float, min_mass: float = 0.0
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Match the current task's nodes with a stored graph's, layer by layer.

    Per layer, the one-to-one assignment of current nodes to stored nodes that maximises
    the summed prototype cosine (Hungarian, ``scipy.optimize.linear_sum_assignment``;
    ``O(K^3)`` on ``K x K``, microseconds). Returns ``(perm, old, cos)``: ``perm[l][i]`` the
    stored node matched with current node ``i`` (``[K]`` long), ``old[l][i]`` whether that
    match is an old-class node: cosine ``>= tau`` and a token share ``> min_mass`` in both
    graphs (``[K]`` bool), ``cos[l][i]`` the match's cosine (what ``tau`` is compared
    with; for logs and for choosing ``tau``). Needs ``K_stored >= K_current`` (equal in DAGR).
    """
    from scipy.optimize import linear_sum_assignment  # scipy only where a graph is matched

    if len(current.layers) != len(stored.layers):
        raise ValueError(f"current graph has {len(current.layers)} layers, stored has {len(stored.layers)}")
    perms, olds, cosines = [], [], []
    with torch.no_grad():
        for cur, old in zip(current.layers, stored.layers):
            a = F.normalize(cur.prototypes.detach().float(), dim=-1)
            b = F.normalize(old.prototypes.detach().float().to(a.device), dim=-1)
            if b.shape[0] < a.shape[0]:
                raise ValueError(f"cannot match {a.shape[0]} current nodes with {b.shape[0]} stored ones")
            cos = a @ b.T  # [K_cur, K_stored]
            rows, cols = linear_sum_assignment(cos.cpu().double().numpy(), maximize=True)
            perm = torch.as_tensor(cols, dtype=torch.long, device=a.device)[torch.as_tensor(rows).argsort()]
            best = cos.gather(1, perm[:, None]).squeeze(1)
            o = (best >= tau) & (cur.mass.detach().to(a.device) > min_mass)
            o &= old.mass.detach().to(a.device)[perm] > min_mass
            perms.append(perm)
            olds.append(o)
            cosines.append(best)
    return perms, olds, cosines


# --------------------------------------------------------------------------- edges
def attention_probs(attn_logits: Tensor, beta: float = 1.0) -> Tensor:
    """Head-averaged ``softmax_j(beta * A_h[i, j])``: ``[B, H, N, N] -> [B, N, N]``."""
    if attn_logits.dim() != 4 or attn_logits.shape[-1] != attn_logits.shape[-2]:
        raise ValueError(f"attention logits must be [B, H, N, N], got {tuple(attn_logits.shape)}")
    x = attn_logits.float()
    return torch.softmax(x if beta == 1.0 else beta * x, dim=-1).mean(dim=1)


def _edge_sums(probs: Tensor, assign: Tensor) -> Tensor:
    """``sum_b S_b^T P_b S_b`` ``[..., K, K]`` (leading dims, e.g. layers, kept); row ``i``
    sums to node ``i``'s token mass."""
    return (assign.transpose(-1, -2) @ (probs @ assign)).sum(-3)


def node_edges(attn_logits: Tensor, assign: Tensor, beta: float = 1.0, topk: int | None = None) -> Tensor:
    """Intra-layer node edges ``[K, K]`` of one batch: ``TopK(RowNorm(sum_b S^T P S))``.

    ``attn_logits`` ``[B, H, N, N]`` pre-softmax, ``assign`` ``[B, N, K]`` from
    :func:`soft_assign`. Rows are distributions over neighbours.
    """
    with _fp32():
        return topk_sparsify(row_norm(_edge_sums(attention_probs(attn_logits, beta), assign.float())), topk)


def multi_hop(edges: Tensor, k: int) -> Tensor:
    """``RowNorm(E^k)``: where ``k`` steps of the node walk lead (``k >= 1``)."""
    if k < 1:
        raise ValueError(f"hop count must be >= 1, got {k}")
    out = edges
    for _ in range(k - 1):
        out = out @ edges
    return row_norm(out)


def rollout(attn: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of square attention matrices in layer order.

    ``Ã_l = RowNorm((1 - residual) A_l + residual I)``; returns ``Ã_{L-1} ... Ã_1 Ã_0``
    (``[..., N, N]``; token or node level, any leading batch dims). Row ``n`` tells how
    much the last layer's token ``n`` draws from each input token; rows sum to 1.
    """
    if not attn:
        raise ValueError("rollout needs at least one attention matrix")
    out: Tensor | None = None
    for a in attn:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        step = row_norm((1.0 - residual) * a + residual * eye)
        out = step if out is None else step @ out
    assert out is not None
    return out


def _flow_sums(probs: Tensor, assign: Tensor, assign_next: Tensor, residual: float) -> Tensor:
    """``sum_b S_{l+1}^T Ã S_l`` ``[..., K_{l+1}, K_l]`` with ``Ã = (1 - r) P + r I`` (never
    built); ``P`` is the block between the two layers, so ``P @ S_l`` is not the
    intra-layer edges' product and cannot be shared with them."""
    ps = probs @ assign
    return (assign_next.transpose(-1, -2) @ ((1.0 - residual) * ps + residual * assign)).sum(-3)


def layer_flow(probs: Tensor, assign: Tensor, assign_next: Tensor, residual: float = 0.5) -> Tensor:
    """One rollout step between consecutive layers, pooled to nodes: ``R_l`` ``[K_{l+1}, K_l]``.

    ``probs`` ``[B, N, N]`` head-averaged attention of the block between the two layers
    (its input tokens are layer ``l``'s, its output tokens layer ``l + 1``'s: block
    ``l + 1`` in DAGR's layout), ``assign`` the input tokens' assignment to layer-``l``
    nodes, ``assign_next`` the output tokens' to layer-``l + 1`` nodes. Row ``j`` (a
    layer-``l + 1`` node) is a distribution over the layer-``l`` nodes it draws from.
    """
    with _fp32():
        return row_norm(_flow_sums(probs.float(), assign.float(), assign_next.float(), residual))


def inter_layer_edges(
    upper: Tensor, lower: Tensor, rollout_step: Tensor, gamma: float, topk: int | None = None
) -> Tensor:
    """``T = TopK(RowNorm(gamma * relu(cos(upper_j, lower_i)) + (1 - gamma) * R[j, i]))``.

    ``upper`` ``[K', D]`` / ``lower`` ``[K, D]`` are node vectors of layers ``l + 1`` and
    ``l`` (``f`` = identity), ``rollout_step`` ``[K', K]`` from :func:`layer_flow`;
    negative cosines are clamped to 0 so rows are non-negative weights. Returns ``[K', K]``.
    """
    cos = F.normalize(upper.float(), dim=-1) @ F.normalize(lower.float(), dim=-1).transpose(-1, -2)
    return topk_sparsify(row_norm(gamma * cos.clamp_min(0.0) + (1.0 - gamma) * rollout_step), topk)


def layer_weights(num_layers: int, decay: float) -> Tensor:
    """``w_l = decay^l / sum_m decay^m`` for ``l = 0..L-1``: shallow layers weigh most
    (``decay < 1``); ``decay = 1`` gives equal weights."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if decay <= 0:
        raise ValueError(f"decay must be > 0, got {decay}")
    w = torch.tensor([decay**i for i in range(num_layers)], dtype=torch.float32)
    return w / w.sum()


# --------------------------------------------------------------------------- stored graph
@dataclass
class LayerGraph:
    """One layer's graph: nodes and intra-layer edges."""

    centroids: Tensor  # [K, D] node identity (soft-assignment anchors)
    prototypes: Tensor  # [K, D] S-weighted mean of normalised tokens (old-class matching)
    mass: Tensor  # [K] share of the tokens each node holds (sums to 1)
    edges: Tensor  # [K, K] row-stochastic, top-k sparsified (stored) or restricted (current)

    def tensors(self) -> dict[str, Tensor]:
        return {"centroids": self.centroids, "prototypes": self.prototypes, "mass": self.mass, "edges": self.edges}


@dataclass
class TaskGraph:
    """What DAGR keeps of a task (or computes for the current batch).

    ``transitions[l]`` is ``T_{l->l+1}`` ``[K_{l+1}, K_l]``, rows the upper layer's nodes
    (``len(layers) - 1`` of them).
    """

    layers: list[LayerGraph]
    transitions: list[Tensor]
    config: GraphConfig = field(default_factory=GraphConfig)

    def _all_tensors(self) -> Iterator[Tensor]:
        for layer in self.layers:
            yield from layer.tensors().values()
        yield from self.transitions

    def nbytes(self) -> int:
        """Bytes of all stored tensors (the per-task memory cost of the method)."""
        return sum(t.numel() * t.element_size() for t in self._all_tensors())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskGraph:
        """On ``device``; with ``dtype``, every floating tensor in it too."""

        def move(v: Tensor) -> Tensor:
            return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)

        return TaskGraph(
            layers=[LayerGraph(**{k: move(v) for k, v in layer.tensors().items()}) for layer in self.layers],
            transitions=[move(t) for t in self.transitions],
            config=self.config,
        )

    def aligned(self, perm: Sequence[Tensor]) -> TaskGraph:
        """This graph re-indexed so that its node ``i`` of layer ``l`` is node
        ``perm[l][i]`` (from :func:`match_nodes`): edges ``[perm][:, perm]``, transitions
        ``[perm_{l+1}][:, perm_l]``, so it indexes the nodes of the graph it was matched with."""
        if len(perm) != len(self.layers):
            raise ValueError(f"need one permutation per layer ({len(self.layers)}), got {len(perm)}")
        layers = []
        for layer, p in zip(self.layers, perm):
            p = p.to(layer.edges.device)
            layers.append(LayerGraph(
                centroids=layer.centroids[p], prototypes=layer.prototypes[p], mass=layer.mass[p],
                edges=layer.edges[p][:, p],
            ))  # fmt: skip
        transitions = [t[perm[i + 1].to(t.device)][:, perm[i].to(t.device)] for i, t in enumerate(self.transitions)]
        return TaskGraph(layers=layers, transitions=transitions, config=self.config)

    def detach(self) -> TaskGraph:
        return TaskGraph(
            layers=[LayerGraph(**{k: v.detach() for k, v in layer.tensors().items()}) for layer in self.layers],
            transitions=[t.detach() for t in self.transitions],
            config=self.config,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and primitives only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "version": 2,
            "config": asdict(self.config),
            "layers": [{k: v.detach().cpu().clone() for k, v in layer.tensors().items()} for layer in self.layers],
            "transitions": [t.detach().cpu().clone() for t in self.transitions],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TaskGraph:
        # Version 2: per-task nodes on block outputs, cross-modal edges (version 1 graphs
        # were built on block inputs and cannot be compared with a version 2 graph).
        if state.get("version") != 2:
            raise ValueError(f"unknown TaskGraph state version {state.get('version')!r}")
        return cls(
            layers=[LayerGraph(**layer) for layer in state["layers"]],
            transitions=list(state["transitions"]),
            config=GraphConfig(**state["config"]),
        )


class GraphAccumulator:
    """Running sums over a stream of batches; ``finalize`` turns them into a :class:`TaskGraph`.

    Holds per layer ``2 [K, D] + 2 [K] + 3 [K, K]`` sums, never the data. Gradients flow
    through the sums when the inputs require grad (the current-batch graph).

    Every layer has the same ``K`` and ``D`` and the image tower the same ``N``, so all
    layers are computed together, stacked on a leading layer dim: one batched op instead
    of one per layer. The graph runs once per training step; at the tiny model's sizes a
    per-layer loop spent as long dispatching its many small ops as computing them.
    """

    def __init__(self, centroids: Sequence[Tensor] | Tensor, config: GraphConfig):
        if len(centroids) == 0:
            raise ValueError("need centroids for at least one layer")
        self.config = config
        self.centroids = (centroids if isinstance(centroids, Tensor) else torch.stack(list(centroids))).float()  # [L, K, D]
        L = self.centroids.shape[0]
        self.num_layers = L
        self.proto_sums: Tensor | None = None  # [L, K, D] image part
        self.mass: Tensor | None = None  # [L, K]
        self.text_sums: Tensor | None = None  # [L, K, D] text part of the prototypes
        self.text_mass: Tensor | None = None  # [L, K]
        self.edge_sums: Tensor | None = None  # [L, K, K] image attention family
        self.cross_sums: Tensor | None = None  # [L, K, K] image-to-text family
        self.flow_sums: Tensor | None = None  # [L - 1, K, K]
        self.tokens_seen = 0

    @staticmethod
    def _add(acc: Tensor | None, x: Tensor) -> Tensor:
        # Starting from the first batch's value (not zeros + x) keeps one batch exact.
        return x if acc is None else acc + x

    def update(
        self,
        tokens: Sequence[Tensor] | Tensor,
        attn: Sequence[Tensor],
        probs: Sequence[Tensor] | None = None,
        text: Sequence[Tensor] | Tensor | None = None,
    ) -> None:
        """Add one batch: ``tokens`` per layer ``[B, N, D]`` (or stacked ``[L, B, N, D]``),
        the outputs of blocks ``0 .. L-1``; ``attn`` per block ``[B, H, N, N]`` pre-softmax
        logits of those blocks (layer ``l``'s edges use block ``l``'s, the transition
        ``l -> l + 1`` block ``l + 1``'s). ``probs``: optionally the per-head
        ``softmax(beta * attn)`` per block, when the caller has it already (a capturing
        forward at ``beta = 1``). ``text``: per layer the class text features ``[C, D]``
        (or ``[L, C, D]``) for the cross-modal family and the fused prototypes."""
        cfg, L = self.config, self.num_layers
        if len(tokens) != L or len(attn) != L:
            raise ValueError(f"expected {L} layers of tokens and attention, got {len(tokens)} and {len(attn)}")
        for layer in range(L):
            t, a = tokens[layer], attn[layer]
            if t.dim() != 3 or a.dim() != 4 or a.shape[0] != t.shape[0] or a.shape[-1] != t.shape[1]:
                raise ValueError(
                    f"layer {layer}: tokens must be [B, N, D] and attention [B, H, N, N], "
                    f"got {tuple(t.shape)} and {tuple(a.shape)}"
                )
        if text is not None and len(text) != L:
            raise ValueError(f"expected {L} layers of class text features, got {len(text)}")
        with _fp32():
            t = tokens.float() if isinstance(tokens, Tensor) else torch.stack([x.float() for x in tokens])
            if self.centroids.device != t.device:  # once: the graph lives with the data
                self.centroids = self.centroids.to(t.device)
            s = soft_assign(t, self.centroids[:, None], cfg.temperature)  # [L, B, N, K]
            # The softmax runs per layer (the [B, H, N, N] logits are the large tensors:
            # stacking them would copy them all); everything after it on [L, B, N, N].
            if probs is not None:
                p = torch.stack([x.float().mean(dim=1) for x in probs])
            else:
                p = torch.stack([attention_probs(a, cfg.beta) for a in attn])
            unit = F.normalize(t, dim=-1)
            flat_t = unit.flatten(1, 2)  # [L, B N, D]
            flat_s = s.flatten(1, 2)  # [L, B N, K]
            self.proto_sums = self._add(self.proto_sums, flat_s.transpose(-1, -2) @ flat_t)
            self.mass = self._add(self.mass, flat_s.sum(1))
            self.edge_sums = self._add(self.edge_sums, _edge_sums(p, s))
            if text is not None:
                z = text.float() if isinstance(text, Tensor) else torch.stack([x.float() for x in text])
                z = F.normalize(z, dim=-1)  # [L, C, D]
                u = soft_assign(z, self.centroids, cfg.temperature)  # [L, C, K]
                t_sums, t_mass = u.transpose(-1, -2) @ z, u.sum(1)  # [L, K, D], [L, K]
                self.text_sums = self._add(self.text_sums, t_sums)
                self.text_mass = self._add(self.text_mass, t_mass)
                # Per-node text vectors of this batch's classes; each token's alignment to
                # them, pooled by the token's node (row i: node i's tokens -> node j's text).
                node_text = F.normalize(t_sums / t_mass.clamp_min(EPS)[..., None], dim=-1)
                align = torch.softmax(unit @ node_text[:, None].transpose(-1, -2) / cfg.temperature, dim=-1)
                self.cross_sums = self._add(self.cross_sums, (s.transpose(-1, -2) @ align).sum(1))
            if L > 1:
                # Transition l -> l + 1 runs through block l + 1: its attention over its
                # input (layer l's tokens) and its output (layer l + 1's).
                flow = _flow_sums(p[1:], s[:-1], s[1:], cfg.residual)
                self.flow_sums = self._add(self.flow_sums, flow)
        self.tokens_seen += t.shape[1] * t.shape[2]

    def finalize(self, support: TaskGraph | None = None) -> TaskGraph:
        """The graph of everything seen so far.

        Without ``support``: a graph to store (top-k sparsified, centroids and prototypes
        in ``store_dtype``). With ``support`` (a stored graph on the same nodes, e.g.
        :meth:`TaskGraph.aligned`): the current graph, its edges restricted to the stored
        graph's support, everything float32 and differentiable.
        """
        if self.tokens_seen == 0:
            raise ValueError("no batch was added")
        cfg = self.config
        store = support is None
        assert self.mass is not None and self.edge_sums is not None and self.proto_sums is not None
        with _fp32():
            edges = row_norm(self.edge_sums)  # [L, K, K]
            if self.cross_sums is not None:
                edges = row_norm((1.0 - cfg.cross_weight) * edges + cfg.cross_weight * row_norm(self.cross_sums))
            if store:
                edges = topk_sparsify(edges, cfg.topk)
            elif _sparse(cfg.topk, edges.shape[-1]):
                edges = restrict(edges, torch.stack([layer.edges for layer in support.layers]).to(edges.device) > 0)
            protos = self.proto_sums / self.mass.clamp_min(EPS)[..., None]
            if self.text_sums is not None:
                assert self.text_mass is not None
                txt = self.text_sums / self.text_mass.clamp_min(EPS)[..., None]
                protos = cfg.alpha * protos + (1.0 - cfg.alpha) * txt
            mass = self.mass / float(self.tokens_seen)
            if store:
                # Own storage per stored tensor (not views of the stacked sums).
                centroids, protos, mass, edges = (x.clone() for x in (self.centroids.to(cfg.dtype), protos.to(cfg.dtype), mass, edges))
            else:
                centroids = self.centroids
            layers = [
                LayerGraph(centroids=centroids[i], prototypes=protos[i], mass=mass[i], edges=edges[i])
                for i in range(self.num_layers)
            ]
            transitions: list[Tensor] = []
            if self.flow_sums is not None:
                flow = self.flow_sums
                if cfg.path_similarity == "centroids":
                    nodes = self.centroids
                else:  # rounded like the stored prototypes, so stored and current agree exactly
                    nodes = protos.to(cfg.dtype).float()
                nodes = nodes.to(flow.device)
                upper, lower = nodes[1:], nodes[:-1]
                if store:
                    t = inter_layer_edges(upper, lower, row_norm(flow), cfg.gamma, cfg.topk).clone()
                else:
                    t = inter_layer_edges(upper, lower, row_norm(flow), cfg.gamma, None)
                    if _sparse(cfg.topk, t.shape[-1]):
                        t = restrict(t, torch.stack(list(support.transitions)).to(t.device) > 0)
                transitions = list(t.unbind(0))
        graph = TaskGraph(layers=layers, transitions=transitions, config=cfg)
        return graph.detach() if store else graph


def build_graph(batches: Iterable[tuple], centroids: Sequence[Tensor], config: GraphConfig) -> TaskGraph:
    """The graph of a whole task, to store: ``batches`` yields ``(tokens, attn)`` or
    ``(tokens, attn, text)`` per batch (see :meth:`GraphAccumulator.update`); only running
    sums are kept. ``centroids`` from :func:`fit_nodes` (rounded to ``config.store_dtype``)."""
    acc = GraphAccumulator(torch.stack([c.to(config.dtype).float() for c in centroids]), config)
    with torch.no_grad():
        for batch in batches:
            tokens, attn = batch[0], batch[1]
            text = batch[2] if len(batch) > 2 else None
            acc.update([t.detach() for t in tokens], [a.detach() for a in attn], None,
                       None if text is None else [z.detach() for z in text])  # fmt: skip
        return acc.finalize()


def current_graph(
    tokens: Sequence[Tensor] | Tensor,
    attn: Sequence[Tensor],
    stored: TaskGraph,
    probs: Sequence[Tensor] | None = None,
    text: Sequence[Tensor] | Tensor | None = None,
    centroids: Sequence[Tensor] | Tensor | None = None,
) -> TaskGraph:
    """The graph of the current batch, with the stored graph's config and top-k support;
    differentiable w.r.t. ``tokens``, ``attn`` (or ``probs``) and ``text`` (see
    :meth:`GraphAccumulator.update`). On ``centroids`` (the current task's nodes, with
    ``stored`` aligned to them) or, by default, on the stored graph's own nodes."""
    if centroids is None:
        centroids = torch.stack([layer.centroids for layer in stored.layers])
    acc = GraphAccumulator(centroids, stored.config)
    acc.update(tokens, attn, probs, text)
    return acc.finalize(support=stored)


# --------------------------------------------------------------------------- losses
def graph_losses(
    current: TaskGraph,
    stored: TaskGraph,
    lambdas: tuple[float, float, float] = (1.0, 1.0, 1.0),
    decay: float = 0.8,
    hops: Sequence[int] = (2, 3),
    tau: float = 0.8,
    min_mass: float = 1e-4,
    old: Sequence[Tensor] | None = None,
) -> dict[str, Tensor]:
    """DAGR's graph terms ``{"edge", "multi", "path"}``, each already weighted.

    ``edge = lambda_1 sum_l w_l L_edge_l``, ``multi = lambda_2 sum_l w_l L_multi_l``,
    ``path = lambda_3 sum_l w'_l L_path_l`` with ``w = layer_weights(L, decay)`` and
    ``w' = layer_weights(L - 1, decay)``. ``old`` overrides the per-layer old-node masks
    (boolean ``[K]``), which are otherwise matched from prototypes with ``tau`` and
    ``min_mass``. Differentiable w.r.t. whatever ``current`` was built from.
    """
    L = len(stored.layers)
    if len(current.layers) != L:
        raise ValueError(f"current graph has {len(current.layers)} layers, stored has {L}")
    device = current.layers[0].edges.device

    def stack(graph: TaskGraph, key: str) -> Tensor:
        return torch.stack([getattr(layer, key) for layer in graph.layers]).to(device).float()

    with _fp32():
        # All layers at once, stacked [L, ...] (see GraphAccumulator).
        if old is None:
            old_nodes = old_node_mask(
                stack(current, "prototypes"), stack(stored, "prototypes"), tau,
                stack(current, "mass"), stack(stored, "mass"), min_mass,
            )  # fmt: skip
        else:
            old_nodes = torch.stack([o.to(device) for o in old])
        old_f = old_nodes.float()  # [L, K]
        w = layer_weights(L, decay).to(device)
        mask = old_f[:, :, None] * old_f[:, None, :]  # [L, K, K]
        p, q = stack(stored, "edges").detach(), stack(current, "edges")
        k_rows = p.shape[-2]
        pm, qm = row_norm(mask * p), row_norm(mask * q)
        edge = (w * kl_rows(pm, qm).sum(-1) / k_rows).sum()
        multi = torch.zeros((), device=device)
        if hops:
            # Powers of the old subgraph only: a path through a new node does not count.
            per_hop = torch.stack([kl_rows(multi_hop(pm, k), multi_hop(qm, k)).sum(-1) / k_rows for k in hops])
            multi = (w * per_hop.mean(0)).sum()
        path = torch.zeros((), device=device)
        if L > 1:
            wp = layer_weights(L - 1, decay).to(device)
            mask_t = old_f[1:, :, None] * old_f[:-1, None, :]  # [L - 1, K_{l+1}, K_l]
            ts = torch.stack(list(stored.transitions)).to(device).float().detach()
            tc = torch.stack(list(current.transitions)).float()
            path = (wp * kl_rows(row_norm(mask_t * ts), row_norm(mask_t * tc)).sum(-1) / ts.shape[-2]).sum()
    return {"edge": lambdas[0] * edge, "multi": lambdas[1] * multi, "path": lambdas[2] * path}


__all__ = [
    "GraphAccumulator",
    "GraphConfig",
    "LayerGraph",
    "TaskGraph",
    "attention_probs",
    "build_graph",
    "current_graph",
    "edge_mask",
    "fit_nodes",
    "fuse",
    "graph_losses",
    "inter_layer_edges",
    "kl_rows",
    "kmeans",
    "layer_flow",
    "layer_weights",
    "match_nodes",
    "multi_hop",
    "node_edges",
    "old_node_mask",
    "prototypes",
    "restrict",
    "rollout",
    "row_norm",
    "soft_assign",
    "topk_mask",
    "topk_sparsify",
]
