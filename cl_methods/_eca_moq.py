"""ECA's Mixture-of-Query (MoQ): image-conditioned query tokens for BLIP-2's Q-Former.

BLIP-2 feeds the Q-Former one learned set of query tokens ``Q*`` (``query_tokens``,
num_query x hidden) for every image. ECA keeps ``Q*`` frozen and adds, per task ``n``, a
key ``k_n`` (in the vision encoder's width) and a query offset ``v_n`` (num_query x
hidden, starting at zero). For an image with summary ``e``::

    e   = mean of the patch tokens (CLS excluded) after the vision post-layernorm
    a   = softmax_n cos(e, k_n)                      (over every task seen so far)
    Q   = Q* + sum_n a_n v_n

Only the newest key and offset train; older ones are frozen (``requires_grad=False``, so
the engine's optimizer never holds them and weight decay cannot touch them either).
Two auxiliary losses act on the newest task ``t``::

    L_orth = ||k_t K_<t^T||_F^2 + ||v_t V_<t^T||_F^2     (v flattened to one row per task)
    L_key  = mean_batch (1 - cos(sg(e), k_t))            (e detached: the key moves, not e)

A new key starts orthogonal to the old keys at their mean norm, so it begins with no
preference for any old task's images and with the same softmax temperature as the others.

The Q-Former is not copied or edited: :func:`install_moq` registers a forward pre-hook on
the real ``Blip2QFormerModel`` that swaps its ``query_embeds`` argument (the expanded
``Q*``) for the per-image ``Q``, reading ``e`` from its ``encoder_hidden_states``
argument (the vision output the Q-Former cross-attends to). That one seam covers
``forward``, ``generate`` and ``get_image_features`` alike.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle


def image_summary(image_embeds: torch.Tensor, has_cls: bool = True) -> torch.Tensor:
    """``e``: the mean of the patch tokens, CLS (position 0 of BLIP-2's ViT) excluded.

    ``image_embeds`` is the vision model's ``last_hidden_state`` (already through its
    post-layernorm). Dictionary replay feeds 1-token "images" with no CLS
    (``has_cls=False``): the single token is then its own summary.
    """
    tokens = image_embeds[:, 1:] if has_cls and image_embeds.shape[1] > 1 else image_embeds
    return tokens.float().mean(dim=1)


class MixtureOfQueries(nn.Module):
    """Per-task keys and query offsets over frozen pretrained queries.

    ``keys[n]``: (key_dim,); ``values[n]``: (num_query, hidden). Tasks are added with
    :meth:`add_task`; everything before the newest is frozen.
    """

    def __init__(self, num_query: int, hidden: int, key_dim: int):
        super().__init__()
        self.num_query, self.hidden, self.key_dim = num_query, hidden, key_dim
        self.keys = nn.ParameterList()
        self.values = nn.ParameterList()

    @property
    def num_tasks(self) -> int:
        return len(self.keys)

    # ------------------------------------------------------------------ growth
    @torch.no_grad()
    def add_task(self, generator: torch.Generator | None = None) -> None:
        """A new key (orthogonal to the old ones, at their mean norm) and a zero offset."""
        # The first task's parts go on torch's default device (the CPU, or the meta device
        # when mmcl.param_count counts them); the engine moves the modules afterwards.
        device = self.keys[0].device if self.num_tasks else torch.empty(0).device
        k = torch.randn(self.key_dim, generator=generator)
        if k.device != device:
            k = k.to(device)
        if self.num_tasks:
            old = torch.stack([p.detach().float() for p in self.keys])  # (T, D)
            target_norm = old.norm(dim=1).mean()
            if self.num_tasks < self.key_dim:
                # Remove the component in the span of the old keys (orthonormal basis by QR).
                basis, _ = torch.linalg.qr(old.T)  # (D, T)
                k = k - basis @ (basis.T @ k)
            # else: the old keys span the space; no orthogonal direction exists, keep random.
        else:
            # First key: unit norm. cos() ignores the scale; only its learning speed
            # under a given lr depends on it.
            target_norm = torch.tensor(1.0, device=device)
        k = k / k.norm().clamp_min(1e-12) * target_norm
        for p in list(self.keys) + list(self.values):
            p.requires_grad_(False)
        self.keys.append(nn.Parameter(k))
        self.values.append(nn.Parameter(torch.zeros(self.num_query, self.hidden, device=device)))

    def current_parameters(self) -> list[nn.Parameter]:
        return [self.keys[-1], self.values[-1]] if self.num_tasks else []

    def resize(self, num_tasks: int) -> None:
        """Give the module ``num_tasks`` slots (zeros) so a saved state dict loads into it."""
        while self.num_tasks < num_tasks:
            self.keys.append(nn.Parameter(torch.zeros(self.key_dim)))
            self.values.append(nn.Parameter(torch.zeros(self.num_query, self.hidden)))
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            trainable = i == num_tasks - 1
            k.requires_grad_(trainable)
            v.requires_grad_(trainable)

    # ------------------------------------------------------------------ mixing
    def weights(self, e: torch.Tensor) -> torch.Tensor:
        """a: (B, T) softmax over tasks of cos(e, k_n)."""
        keys = torch.stack(list(self.keys)).float()
        cos = F.normalize(e.float(), dim=-1) @ F.normalize(keys, dim=-1).T
        return cos.softmax(dim=-1)

    def offset(self, e: torch.Tensor) -> torch.Tensor:
        """sum_n a_n v_n: (B, num_query, hidden); zeros when no task exists yet."""
        if not self.num_tasks:
            return torch.zeros(e.shape[0], self.num_query, self.hidden, device=e.device)
        a = self.weights(e)
        values = torch.stack(list(self.values)).float()  # (T, N, H)
        return torch.einsum("bt,tnh->bnh", a, values)

    def queries(self, q_star: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Q = Q* + sum_n a_n v_n, per image. ``q_star``: (1 or B, N, H)."""
        return q_star + self.offset(e).to(q_star.dtype)

    # ------------------------------------------------------------------ losses
    def orth_loss(self) -> torch.Tensor:
        """||k_t K_<t^T||^2 + ||v_t V_<t^T||^2 for the newest task t (0 for the first)."""
        if self.num_tasks < 2:
            dev = self.keys[0].device if self.num_tasks else None
            return torch.zeros((), device=dev)
        k_t, v_t = self.keys[-1].float(), self.values[-1].float().flatten()
        k_old = torch.stack([k.float() for k in list(self.keys)[:-1]])
        v_old = torch.stack([v.float().flatten() for v in list(self.values)[:-1]])
        return (k_old @ k_t).pow(2).sum() + (v_old @ v_t).pow(2).sum()

    def key_loss(self, e: torch.Tensor) -> torch.Tensor:
        """mean(1 - cos(sg(e), k_t)): pulls the newest key toward this task's images."""
        return (1 - F.cosine_similarity(e.detach().float(), self.keys[-1].float()[None], dim=-1)).mean()


class MoQHook:
    """What the Q-Former pre-hook does, with the MoQ it uses chosen at call time.

    ``get_moq`` returns the module to use now (the live one, a frozen snapshot for the
    old model in replay, or ``None`` for plain BLIP-2). ``has_cls`` is switched off while
    1-token replay images go through. The last summary seen is kept in ``last_summary``
    so the method's key loss needs no second vision pass.
    """

    def __init__(self, get_moq: Callable[[], MixtureOfQueries | None]):
        self.get_moq = get_moq
        self.has_cls = True
        self.last_summary: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        moq = self.get_moq()
        enc = kwargs.get("encoder_hidden_states")
        if enc is None and len(args) > 3:
            enc = args[3]
        if enc is None:
            return None  # a text-only Q-Former call: nothing to condition on
        e = image_summary(enc, self.has_cls)
        self.last_summary = e
        if moq is None or not moq.num_tasks:
            return None
        if "query_embeds" in kwargs:
            kwargs = {**kwargs, "query_embeds": moq.queries(kwargs["query_embeds"], e)}
            return args, kwargs
        args = (moq.queries(args[0], e), *args[1:])
        return args, kwargs


def install_moq(qformer: nn.Module, hook: MoQHook) -> RemovableHandle:
    """Register ``hook`` on a ``Blip2QFormerModel`` (its ``query_embeds`` argument)."""
    return qformer.register_forward_pre_hook(hook, with_kwargs=True)


def key_norm_stats(moq: MixtureOfQueries) -> dict[str, float]:
    """Norms of the keys and the largest |cos| between two of them (logging, tests)."""
    if not moq.num_tasks:
        return {}
    keys = torch.stack([k.detach().float() for k in moq.keys])
    cos = F.normalize(keys, dim=-1) @ F.normalize(keys, dim=-1).T
    off = cos - torch.eye(len(keys), device=cos.device)
    return {"key_norm_mean": float(keys.norm(dim=1).mean()), "key_max_abs_cos": float(off.abs().max()) if len(keys) > 1 else 0.0}


__all__ = ["MixtureOfQueries", "MoQHook", "image_summary", "install_moq", "key_norm_stats"]
