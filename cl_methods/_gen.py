"""Shared parts of the generation-track baselines (BLIP-2 / LLaVA, text targets).

:class:`GenMethod` is a :class:`~cl_methods.base.Method` whose loss is the backbone's
teacher-forced LM loss of each sample's target (:meth:`VlmBackbone.lm_loss`) and whose
``predict`` returns generated strings (the engine scores them with the task's metric).

What trains (``params``):

- ``adapters``: parallel adapters in BLIP-2's Q-Former, the ones ECA uses
  (:mod:`cl_methods._eca_adapters`: attention outputs and query FFN, linear, scale 4.0,
  zero-initialised up-projection, so an untrained model is the frozen one), one adapter
  per site for the whole sequence. BLIP-2 only.
- ``lora``: peft LoRA on the language model's decoder linears (LLaVA's usual recipe;
  DGG's setting is rank 128). Either model.
- ``auto`` (default): adapters on BLIP-2, LoRA on LLaVA.
- ``none``: nothing (zero-shot).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field
from torch import nn

from cl_methods._eca_adapters import AdapterSizes, QFormerAdapters, install_adapters
from cl_methods.base import Method, MethodConfig

# Decoder linears of Llama (LLaVA) and OPT (BLIP-2); a name absent from a model is skipped.
DEFAULT_LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"]


class VlmLoraSettings(MethodConfig):
    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)  # peft lora_alpha: update scaled by alpha / rank
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # Module-name suffixes inside the language model's decoder layers.
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_LM_TARGETS), min_length=1)


class GenConfig(MethodConfig):
    params: Literal["auto", "adapters", "lora", "none"] = "auto"
    adapters: AdapterSizes = Field(default_factory=AdapterSizes)
    lora: VlmLoraSettings = Field(default_factory=VlmLoraSettings)


def inject_lm_lora(backbone, settings: VlmLoraSettings) -> int:
    """peft LoRA on the decoder linears of ``backbone.model``'s language model; only the
    LoRA matrices train afterwards. Returns their element count."""
    from peft import LoraConfig, inject_adapter_in_model

    mods = "|".join(re.escape(t) for t in settings.targets)
    pattern = rf"{backbone.lm_prefix}\.\d+\.(?:[\w.]*\.)?(?:{mods})"
    if not any(re.fullmatch(pattern, n) and isinstance(m, nn.Linear) for n, m in backbone.model.named_modules()):
        raise ValueError(f"method.lora.targets {settings.targets} match no nn.Linear of the language model ({pattern!r})")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=pattern, bias="none")  # fmt: skip
    inject_adapter_in_model(config, backbone.model)
    n = 0
    for name, p in backbone.model.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora)
        n += p.numel() if is_lora else 0
    return n


class GenMethod(Method):
    """Base of the generation baselines: LM loss on targets, generation for ``predict``."""

    track = "generation"
    Config = GenConfig

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        from mmcl.backbones.vlm import VlmBackbone

        if not isinstance(backbone, VlmBackbone):
            raise TypeError(f"{self.name} needs a blip2 / llava backbone (run.backbone.kind), got {type(backbone).__name__}")
        for task in ctx.tasks:
            if not task.is_text:
                raise ValueError(f"{self.name}: task {task.name!r} has metric {task.metric!r}; the generation track "
                                 "needs text tasks (cider, vqa_acc)")  # fmt: skip
        part = self.config.params
        if part == "auto":
            part = "adapters" if backbone.kind == "blip2" else "lora"
        if part == "adapters" and backbone.qformer is None:
            raise ValueError(f"method.params: 'adapters' go in BLIP-2's Q-Former; {backbone.kind} has none (use lora)")
        self.part = part
        self._dropouts: list[nn.Module] = []
        if part == "adapters":
            adapters = QFormerAdapters(backbone.qformer, self.config.adapters)
            adapters.expand(ctx.generator)
            self.modules["adapters"] = adapters
            # Hooks on the real Q-Former modules: forward, generate and the LM loss all see
            # the adapters, with no copy of the model.
            self._hooks = install_adapters(backbone.qformer, adapters.site_names, lambda: self.modules["adapters"])
        elif part == "lora":
            inject_lm_lora(backbone, self.config.lora)
            backbone.model.to(ctx.device)  # peft creates the LoRA matrices on the CPU
            # The frozen model stays in eval mode; only LoRA's dropouts switch (training_loss / predict).
            self._dropouts = [m for n, m in backbone.named_modules() if n.endswith("lora_dropout.default")]

    def _train_mode(self, on: bool) -> None:
        for m in self._dropouts:
            m.train(on)

    def lm_loss(self, batch: dict):
        return self.backbone.lm_loss(batch["image"], batch["prompt"], batch["target"])

    def training_loss(self, batch, task_index):
        self._train_mode(True)
        return {"lm": self.lm_loss(batch)}

    def generate(self, batch: dict) -> list[str]:
        ev = self.run.evaluation
        return self.backbone.generate(batch["image"], batch["prompt"], ev.max_new_tokens, ev.num_beams)

    def predict(self, batch, task):
        self._train_mode(False)
        return self.generate(batch)
