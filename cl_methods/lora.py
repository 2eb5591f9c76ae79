"""Sequential LoRA fine-tuning: one peft LoRA on the frozen CLIP, trained task after task.

The baseline DGG is measured against (and DGG's base class): the same adapter, the same
loss (cross-entropy of each sample on its own task's text head), nothing against
forgetting. Where LoRA goes is ``lora`` (:class:`cl_methods._lora.LoraSettings`: rank,
alpha, dropout, towers, target modules; default the MLP linears of the image tower).
"""

from __future__ import annotations

from pydantic import Field

from cl_methods import register
from cl_methods._lora import LoraSettings, inject_lora
from cl_methods.base import Method, MethodConfig


class LoraFinetuneConfig(MethodConfig):
    lora: LoraSettings = Field(default_factory=LoraSettings)


@register
class LoraFinetune(Method):
    name = "lora"
    Config = LoraFinetuneConfig

    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        self.lora_params = inject_lora(backbone.model, self.config.lora)
        backbone.model.to(ctx.device)  # the LoRA matrices are created on the CPU
        backbone.index_parameters()
        # peft's dropout follows the module's train/eval mode; the frozen backbone stays in
        # eval mode (no CLIP dropout), so only these switch, in training_loss / predict.
        self._dropouts = [m for n, m in backbone.named_modules() if n.endswith("lora_dropout.default")]

    def _train_mode(self, on: bool) -> None:
        for m in self._dropouts:
            m.train(on)

    def training_loss(self, batch, task_index):
        self._train_mode(True)
        return {"ce": self.task_cross_entropy(self.logits, batch)}

    def predict(self, batch, task):
        self._train_mode(False)
        return super().predict(batch, task)
