"""peft LoRA on the frozen open_clip CLIP: one adapter for the whole task sequence.

``inject_lora`` puts peft's ``lora.Linear`` layers (``peft.inject_adapter_in_model``) on
the chosen ``nn.Linear`` modules of the chosen tower(s); everything else stays frozen.
LoRA's B starts at zero, so an injected but untrained model is exactly the frozen CLIP.

Targets are module-name suffixes inside each residual block (``mlp.c_fc``, ``mlp.c_proj``,
the defaults). The attention's q/k/v live inside ``nn.MultiheadAttention``'s single
``in_proj_weight``, not in ``nn.Linear`` modules; peft's ``MultiheadAttention`` LoRA reaches
them by merging the update into the frozen weight before every forward and subtracting
it afterwards, which leaves the "frozen" weights changed by round-off after every step
(measured: all 24 attention weights of a ViT-B/32 differ after one forward). A method
whose premise is a fixed backbone cannot use that, so ``attn`` targets are refused with
that reason.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from cl_methods.base import MethodConfig

# Module names inside the CLIP (``ClipBackbone.model``) of each tower's residual blocks.
_TOWER_PREFIX = {"image": r"visual\.transformer", "text": r"transformer"}


class LoraSettings(MethodConfig):
    """Where LoRA goes and how big it is (peft ``LoraConfig`` fields)."""

    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)  # peft lora_alpha: the update is scaled by alpha / rank
    dropout: float = Field(default=0.0, ge=0, lt=1)
    towers: Literal["image", "text", "both"] = "image"
    targets: list[str] = Field(default_factory=lambda: ["mlp.c_fc", "mlp.c_proj"], min_length=1)

    @field_validator("targets")
    @classmethod
    def _no_attention(cls, v: list[str]) -> list[str]:
        for t in v:
            if t == "attn" or t.startswith("attn"):
                raise ValueError(
                    f"target {t!r}: LoRA on nn.MultiheadAttention is not supported (peft merges the update "
                    "into the frozen weights and subtracts it again on every forward, which changes them by "
                    "round-off); use nn.Linear targets such as mlp.c_fc, mlp.c_proj"
                )
            if not re.fullmatch(r"[A-Za-z_][\w.]*", t):
                raise ValueError(f"target {t!r}: give a module-name suffix inside a block, such as mlp.c_fc")
        return v

    def pattern(self) -> str:
        """peft ``target_modules`` regex (full match on names inside the CLIP)."""
        towers = ["image", "text"] if self.towers == "both" else [self.towers]
        prefix = "|".join(_TOWER_PREFIX[t] for t in towers)
        mods = "|".join(re.escape(t) for t in self.targets)
        return rf"(?:{prefix})\.resblocks\.\d+\.(?:{mods})"


def inject_lora(clip: nn.Module, settings: LoraSettings) -> int:
    """Add LoRA to ``clip`` (an open_clip CLIP) in place; return the LoRA parameter count.

    Only the LoRA matrices require grad afterwards. Raises ``ValueError`` naming the
    pattern when it matches no ``nn.Linear`` of this model.
    """
    from peft import LoraConfig, inject_adapter_in_model

    pattern = settings.pattern()
    if not any(re.fullmatch(pattern, n) and isinstance(m, nn.Linear) for n, m in clip.named_modules()):
        raise ValueError(
            f"method.lora: targets {settings.targets} in tower(s) {settings.towers!r} match no nn.Linear "
            f"of this model (pattern {pattern!r})"
        )
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=pattern, bias="none"
    )
    inject_adapter_in_model(config, clip)
    n = 0
    for name, p in clip.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora)
        n += p.numel() if is_lora else 0
    return n
