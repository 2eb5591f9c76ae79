"""ECA's parallel adapters in BLIP-2's Q-Former, as banks that grow with FeDEx.

Sites, per Q-Former layer (``Blip2QFormerLayer``):

- ``L{i}.self``  : the self-attention block (``attention.output``, a ``Blip2QFormerSelfOutput``)
- ``L{i}.cross`` : the cross-attention block (``crossattention.output``), on layers that have one
- ``L{i}.ffn``   : the query feed-forward block (``output_query``, a ``Blip2QFormerOutput``)

A parallel adapter reads the block's input ``x`` and adds ``scale * A(x)`` to the block's
output before its residual LayerNorm::

    LayerNorm(dense(h) + dropout + x + scale * A(x)),     A(x) = up(down(x)), linear

Both ``Blip2QFormerSelfOutput`` and ``Blip2QFormerOutput`` receive ``x`` as their second
argument (``input_tensor``, the residual) and add it before the LayerNorm, so adding
``scale * A(x)`` to that argument in a forward pre-hook is exactly the parallel branch,
with no copy of the module and no change to its parameter names. [choice: the paper says
"parallel adapter on the attention output / the FFN"; the block input as adapter input is
the standard parallel-adapter reading (He et al. 2022).]

Sizes are ECA's for a 768-wide Q-Former: 768 -> 30 -> 768 on attention sites and
768 -> 512 -> 768 on the FFN, linear (no nonlinearity), scale 4.0; the widths are config
fields so tiny test models and other Q-Former widths use their own.

Banks: every site holds a list of adapters, all active, outputs averaged. The first
adapter has a zero up-projection, so an untrained model equals the frozen one exactly.
Expansion (decided by FeDEx, see :mod:`cl_methods._eca_fisher`) appends at every site a
new adapter whose weights are the average of the old ones' and freezes the old ones.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from cl_methods.base import MethodConfig


class AdapterSizes(MethodConfig):
    attn_width: int = Field(default=30, ge=1)  # ECA: 768 -> 30 -> 768 on self/cross attention
    ffn_width: int = Field(default=512, ge=1)  # ECA: 768 -> 512 -> 768 on the query FFN
    scale: float = 4.0
    sites: list[str] = ["self", "cross", "ffn"]  # which block kinds carry adapters


class LinearAdapter(nn.Module):
    """``up(down(x))``, no nonlinearity (ECA's adapters are linear)."""

    def __init__(self, hidden: int, width: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        with torch.no_grad():
            # Kaiming-uniform down-projection as nn.Linear would do, drawn from the
            # method's generator so a resumed / rerun trial builds the same adapter.
            bound = 1 / math.sqrt(hidden)
            self.down.weight.copy_(torch.rand(self.down.weight.shape, generator=generator) * 2 * bound - bound)
            self.down.bias.zero_()
            # Zero up-projection: the adapter's output is 0 until it trains.
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class AdapterBank(nn.Module):
    """All adapters of one site; output ``scale * mean_k A_k(x)``."""

    def __init__(self, hidden: int, width: int, scale: float):
        super().__init__()
        self.hidden, self.width, self.scale = hidden, width, scale
        self.adapters = nn.ModuleList()

    def __len__(self) -> int:
        return len(self.adapters)

    @torch.no_grad()
    def expand(self, generator: torch.Generator | None = None) -> LinearAdapter:
        """Append an adapter (zero-up for the first, the average of the old ones after)."""
        new = LinearAdapter(self.hidden, self.width, generator)
        if len(self.adapters):
            ref = self.adapters[0].up.weight
            new.to(device=ref.device, dtype=ref.dtype)
            for name, p in new.named_parameters():
                p.copy_(torch.stack([dict(a.named_parameters())[name] for a in self.adapters]).mean(0))
            for a in self.adapters:
                a.requires_grad_(False)
        self.adapters.append(new)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.stack([a(x) for a in self.adapters]).mean(0)
        return self.scale * out


def qformer_sites(qformer: nn.Module, kinds: list[str]) -> dict[str, nn.Module]:
    """Site name -> the real transformers module whose ``input_tensor`` the adapter edits."""
    sites: dict[str, nn.Module] = {}
    for i, layer in enumerate(qformer.encoder.layer):
        if "self" in kinds:
            sites[f"L{i}.self"] = layer.attention.output
        if "cross" in kinds and getattr(layer, "has_cross_attention", False):
            sites[f"L{i}.cross"] = layer.crossattention.output
        if "ffn" in kinds:
            sites[f"L{i}.ffn"] = layer.output_query
    return sites


class QFormerAdapters(nn.Module):
    """One :class:`AdapterBank` per site; grows all sites together."""

    def __init__(self, qformer: nn.Module, sizes: AdapterSizes):
        super().__init__()
        hidden = qformer.config.hidden_size
        self.site_names = list(qformer_sites(qformer, sizes.sites))
        # ModuleDict keys may not contain dots.
        self.banks = nn.ModuleDict(
            {
                _key(s): AdapterBank(hidden, sizes.ffn_width if s.endswith(".ffn") else sizes.attn_width, sizes.scale)
                for s in self.site_names
            }
        )

    @property
    def num_adapters(self) -> int:
        return len(next(iter(self.banks.values()))) if len(self.banks) else 0

    def expand(self, generator: torch.Generator | None = None) -> None:
        for bank in self.banks.values():
            bank.expand(generator)

    def resize(self, n: int) -> None:
        """Make ``n`` adapters per site (for loading a saved state); only the last trains."""
        while self.num_adapters < n:
            self.expand()
        for bank in self.banks.values():
            for i, a in enumerate(bank.adapters):
                a.requires_grad_(i == n - 1)

    def current_parameters(self) -> list[nn.Parameter]:
        """The newest adapter at every site: what trains, and what FeDEx measures."""
        return [p for bank in self.banks.values() if len(bank) for p in bank.adapters[-1].parameters()]

    def adapter_parameters(self, index: int) -> list[torch.Tensor]:
        return [p for bank in self.banks.values() for p in bank.adapters[index].parameters()]

    def bank(self, site: str) -> AdapterBank:
        return self.banks[_key(site)]


def _key(site: str) -> str:
    return site.replace(".", "_")


class AdapterHook:
    """Pre-hook for one site: ``input_tensor <- input_tensor + bank(input_tensor)``.

    ``get_adapters`` picks the adapter set at call time (live, an old snapshot, or
    ``None``: plain BLIP-2), so the frozen old model of replay is the same Q-Former run
    with other adapters, not a second copy of it.
    """

    def __init__(self, site: str, get_adapters: Callable[[], QFormerAdapters | None]):
        self.site, self.get_adapters = site, get_adapters

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        adapters = self.get_adapters()
        if adapters is None or adapters.num_adapters == 0:
            return None
        bank = adapters.bank(self.site)
        if "input_tensor" in kwargs:
            x = kwargs["input_tensor"]
            return args, {**kwargs, "input_tensor": x + bank(x).to(x.dtype)}
        x = args[1]
        return (args[0], x + bank(x).to(x.dtype), *args[2:]), kwargs


def install_adapters(
    qformer: nn.Module, sites: list[str], get_adapters: Callable[[], QFormerAdapters | None]
) -> list[RemovableHandle]:
    """Register one pre-hook per site on the real Q-Former modules; returns the handles."""
    modules = qformer_sites(qformer, ["self", "cross", "ffn"])
    return [modules[s].register_forward_pre_hook(AdapterHook(s, get_adapters), with_kwargs=True) for s in sites]
