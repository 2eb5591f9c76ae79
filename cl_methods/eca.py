"""ECA (ICML 2026) on BLIP-2's Q-Former: queries, adapters and replay that grow with tasks.

BLIP-2 stays frozen; ECA adds three parts, each in a private module:

- Mixture-of-Query (:mod:`cl_methods._eca_moq`): per task a key and a query offset; the
  Q-Former's queries become ``Q* + sum_n a_n v_n`` with ``a`` a softmax of the image's
  cosine to every key. Losses ``L_orth`` (new key/queries orthogonal to old ones) and
  ``L_key`` (the new key moves to this task's images).
- Parallel adapters (:mod:`cl_methods._eca_adapters`) on every Q-Former attention output
  and query FFN, in banks whose outputs are averaged; FeDEx
  (:mod:`cl_methods._eca_fisher`) adds an adapter at a task start when the new task's
  gradient would, to second order, raise an earlier task's loss on the current adapter
  (score ``S > fisher_threshold``); a new adapter starts as the average of the old ones,
  which freeze.
- Dictionary replay (:mod:`cl_methods._eca_dictionary`): a sparse dictionary of patch
  embeddings learned at each task end; each step a batch of atoms goes as 1-token images
  through the frozen old model (the ECA parts as they were at the previous task's end)
  and the current one; ``L_DR`` is the MSE of their projected query outputs
  (``language_projection`` of the Q-Former output, i.e. what the LLM would receive).

Loss: ``L = L_ce + replay_weight * L_DR + orth_weight * L_orth + key_weight * L_key``
(the paper: lambda 0.1 for BLIP-2, weights 1.0). What trains, as in ECA's code
(``pa_blip2_opt_cap.py``, whose optimizer groups are the projector, the adapters and the
MoQ): the newest key/offset, the newest adapter and the Q-Former-to-LLM projection
``language_projection`` (ECA's ``opt_proj``, 768 -> 2560 on OPT-2.7B: 1,968,640 of its
12.29M). The Q-Former's own weights, ``query_tokens`` (Q*), the ViT and the LLM are
frozen. The old model of replay holds a snapshot of the projection with the old adapters
and MoQ, so ``L_DR``'s target is what the previous task's LLM input was
(``train_projection: false`` freezes it again, the earlier behaviour).

Train / eval mode, as LAVIS trains (ECA's runner calls ``model.train()`` every epoch and
before both Fisher passes, ``model.eval()`` for evaluation and the dictionary pass; the
old model of replay is frozen in eval): ``dropout: lavis`` puts the Q-Former and the LLM
in train mode for training steps (LAVIS's ``Blip2OPT`` freezes OPT's weights but never
its mode, so OPT's own dropout is on while it trains; only the ViT is pinned to eval by
LAVIS's ``freeze_vit``), and for the Fisher passes when ``fisher_dropout`` is true
(ECA's). Evaluation, the dictionary pass and the old model's replay forward run in eval
mode. ``dropout: qformer`` switches only the Q-Former; ``off`` keeps everything in eval.

All parts act through hooks on the real ``Blip2ForConditionalGeneration`` modules, so
``forward``, ``generate`` and anything built on them (the backbone's own loss and
generation code) see ECA without a copy of the model. The old model of replay is the
same Q-Former run with the snapshot's parts switched in for one forward.

Order at a task start (:meth:`ECA.before_task`), as ECA's ``before_training``: FeDEx
first measures ``g_new`` on the model as the previous task left it (no new key yet), then
the adapter bank expands or not, then the MoQ gets the new task's key and (zero) offset.
Statistics for FeDEx are only gathered when ``expansion`` is ``fedex``; as ECA's
``update_Q_fisher`` they are taken over the task's training set in mini-batches of
``fisher_batch_size`` (ECA: its training batch, 16), shuffled by the method's generator.

[choice] Replay atoms are fed as they are (norm <= 1), as the paper describes, although
real patch embeddings after the ViT's layer norm are much larger; the old and the current
model see the same atoms, so the loss still measures drift on a fixed probe set.

Ablations: ``no_moq`` (plain Q*), ``single_adapter`` (never expand), ``adapter_per_task``
(always expand), ``no_replay``.

Batches: on the generation track (a ``VlmBackbone`` of kind ``blip2``) batches are text
samples (``image``, ``prompt``, ``target``); the loss is the backbone's
``lm_loss`` (mean over target tokens, like the generation baselines) and ``predict`` its
``generate`` (strings). A batch that already holds BLIP-2 model inputs
(``pixel_values``, ``input_ids``, ``attention_mask``, ``labels``) also works, on a bare
``Blip2ForConditionalGeneration`` as backbone; ``predict`` then returns token ids.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Subset

from cl_methods import register
from cl_methods._eca_adapters import AdapterSizes, QFormerAdapters, install_adapters
from cl_methods._eca_dictionary import DictionarySettings, OnlineDictionary
from cl_methods._eca_fisher import FeDEx, FisherSettings, GradStats, gradient_stats
from cl_methods._eca_moq import MixtureOfQueries, MoQHook, install_moq
from cl_methods.base import Method, MethodConfig

Expansion = Literal["fedex", "never", "always"]


class ECAConfig(MethodConfig):
    # Mixture-of-Query
    moq: bool = True
    orth_weight: float = Field(default=1.0, ge=0.0)
    key_weight: float = Field(default=1.0, ge=0.0)
    # Adapters and FeDEx
    expansion: Expansion = "fedex"  # "never": one adapter for all tasks; "always": one per task
    # FeDEx adds an adapter when S = I+ / (I+ + I-) > threshold for an earlier task, with
    # I = -g_old g_new + 0.5 F_old g_new^2 (see _eca_fisher). 0.5 means "the second-order
    # estimate of the old task's loss change is positive". What F is depends on
    # fisher_batch_size: with mini-batches (ECA's 16) F is the mean squared *batch*
    # gradient, about g^2 + Var/16, so the curvature term is small and S mostly measures
    # whether g_new opposes g_old; with 1 (per-sample, the textbook empirical Fisher) F is
    # about g^2 + Var, the curvature term weighs ~batch-size times more, S is higher for
    # the same tasks and a given threshold expands more often. ECA's 0.5 (0.3 on one
    # benchmark) was tuned for mini-batch Fisher.
    fisher_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    # Samples per gradient in the Fisher passes: 16 = ECA's (its training batch); 1 =
    # per-sample gradients (the empirical Fisher; one backward per sample, slower).
    fisher_batch_size: int = Field(default=16, ge=1)
    # Cap on samples per Fisher pass; None = the whole task's training set, as ECA.
    fisher_max_samples: int | None = Field(default=None, ge=1)
    # Dropout in the Fisher passes: True = train mode, as ECA's runner (model.train()
    # before update_Q_fisher); False = eval mode (deterministic statistics).
    fisher_dropout: bool = True
    # Which parts run in train mode during training steps (evaluation, the dictionary pass
    # and the old model of replay always run in eval): "lavis" = Q-Former and LLM (LAVIS's
    # model.train(); OPT's weights are frozen but its dropout is on), "qformer" = only
    # the Q-Former, "off" = everything in eval (the earlier behaviour).
    dropout: Literal["lavis", "qformer", "off"] = "lavis"
    # The Q-Former-to-LLM projection trains, as ECA's opt_proj; False freezes it.
    train_projection: bool = True
    adapter_attn_width: int = Field(default=30, ge=1)
    adapter_ffn_width: int = Field(default=512, ge=1)
    adapter_scale: float = 4.0
    # Dictionary replay
    replay: bool = True
    replay_weight: float = Field(default=0.1, ge=0.0)  # lambda (BLIP-2: 0.1)
    replay_batch_size: int = Field(default=64, ge=1)  # atoms per step [choice]
    # Atoms; None = dictionary_factor x the patch-embedding width (ECA: 5 x 1408 = 7040).
    dictionary_size: int | None = Field(default=None, ge=1)
    dictionary_factor: float = Field(default=5.0, gt=0)
    sparsity: float = Field(default=1.0, ge=0.0)  # Lasso alpha
    dictionary_batch_size: int = Field(default=1024, ge=1)
    patches_per_image: int = Field(default=16, ge=1)
    dictionary_max_images: int = Field(default=512, ge=1)
    sparse_max_iter: int = Field(default=200, ge=1)

    def adapter_sizes(self) -> AdapterSizes:
        return AdapterSizes(attn_width=self.adapter_attn_width, ffn_width=self.adapter_ffn_width, scale=self.adapter_scale)

    def fisher(self) -> FisherSettings:
        return FisherSettings(
            threshold=self.fisher_threshold, batch_size=self.fisher_batch_size, max_samples=self.fisher_max_samples
        )

    def dictionary(self, width: int) -> DictionarySettings:
        size = self.dictionary_size or max(1, round(self.dictionary_factor * width))
        return DictionarySettings(
            size=size,
            alpha=self.sparsity,
            batch_size=self.dictionary_batch_size,
            patches_per_image=self.patches_per_image,
            max_images=self.dictionary_max_images,
            max_iter=self.sparse_max_iter,
        )


def blip2_model(backbone: Any) -> nn.Module:
    """The ``Blip2ForConditionalGeneration`` inside a backbone (or the backbone itself)."""
    for cand in (getattr(backbone, "model", None), backbone):
        # The transformers model itself (a VlmBackbone also exposes qformer / query_tokens).
        if cand is not None and all(hasattr(cand, a) for a in ("qformer", "query_tokens", "language_projection")):
            return cand
    raise TypeError(f"ECA needs a BLIP-2 backbone (a Q-Former and query tokens); got {type(backbone).__name__}")


class _Parts:
    """The ECA parts the hooks use right now (live, an old snapshot, or none).

    ``projection`` is the Q-Former-to-LLM projection that goes with them (the model's own
    for the live parts, a frozen copy in a snapshot); ``None`` means the model's own.
    """

    def __init__(
        self, moq: MixtureOfQueries | None, adapters: QFormerAdapters | None, projection: nn.Module | None = None
    ):
        self.moq, self.adapters, self.projection = moq, adapters, projection


@register
class ECA(Method):
    name = "eca"
    Config = ECAConfig
    track = "generation"
    ablations = {
        "full": {},
        "no_moq": {"moq": False},
        "single_adapter": {"expansion": "never"},
        "adapter_per_task": {"expansion": "always"},
        "no_replay": {"replay": False},
    }

    config: ECAConfig

    # ------------------------------------------------------------------ setup
    def setup(self, backbone, run, ctx):
        super().setup(backbone, run, ctx)
        cfg = self.config
        model = self.model = blip2_model(backbone)
        for task in ctx.tasks:
            if not getattr(task, "is_text", True):
                raise ValueError(f"eca: task {task.name!r} has metric {task.metric!r}; ECA needs text tasks (cider, vqa_acc)")
        model.requires_grad_(False)
        model.language_projection.requires_grad_(cfg.train_projection)
        qformer = model.qformer
        vision_width = model.config.vision_config.hidden_size
        num_query, hidden = model.query_tokens.shape[1], qformer.config.hidden_size
        if cfg.moq:
            self.modules["moq"] = MixtureOfQueries(num_query, hidden, vision_width)
        sizes = cfg.adapter_sizes()
        self.modules["adapters"] = QFormerAdapters(qformer, sizes)
        self.modules.to(ctx.device)
        self._live = _Parts(self.modules["moq"] if cfg.moq else None, self.modules["adapters"])
        self._active = self._live
        self._old: _Parts | None = None
        self.moq_hook = MoQHook(lambda: self._active.moq)
        self._handles = [install_moq(qformer, self.moq_hook)]
        self._handles += install_adapters(qformer, self.adapters.site_names, lambda: self._active.adapters)
        self.fedex = FeDEx(cfg.fisher())
        self.dictionary = OnlineDictionary(cfg.dictionary(vision_width), vision_width)
        self.adapter_of_task: list[int] = []  # which adapter trained on each task (FeDEx bookkeeping)
        self.expanded: list[bool] = []  # whether each task's start added an adapter (logs, tests)
        self._set_mode(False)

    def _set_mode(self, train: bool) -> None:
        """Dropout on (``train``) or off in the parts ``dropout`` names; the ViT stays eval."""
        m, scope = self.model, self.config.dropout
        m.eval()
        if train and scope != "off":
            m.qformer.train()
            if scope == "lavis":
                m.language_model.train()

    @property
    def moq(self) -> MixtureOfQueries | None:
        return self._live.moq

    @property
    def adapters(self) -> QFormerAdapters:
        return self._live.adapters  # type: ignore[return-value]

    def remove_hooks(self) -> None:
        """Detach ECA from the model (it is then plain BLIP-2 again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def using(self, parts: _Parts | None, has_cls: bool = True) -> Iterator[None]:
        """Run the model with other ECA parts (an old snapshot, or ``None`` = plain BLIP-2)."""
        prev, prev_cls = self._active, self.moq_hook.has_cls
        self._active = parts if parts is not None else _Parts(None, None)
        self.moq_hook.has_cls = has_cls
        try:
            yield
        finally:
            self._active, self.moq_hook.has_cls = prev, prev_cls

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.adapters.current_parameters())
        if self.moq is not None:
            params += self.moq.current_parameters()
        if self.config.train_projection:
            params += list(self.model.language_projection.parameters())
        return params

    # ------------------------------------------------------------------ model I/O
    def _pixels(self, batch: dict) -> torch.Tensor:
        images = batch["pixel_values"] if "pixel_values" in batch else batch["image"]
        if images.dtype == torch.uint8:  # cached pixels: the backbone finishes them on its device
            return self.backbone._pixels(images)
        return images.to(next(self.model.vision_model.parameters()).dtype)

    def lm_loss(self, batch: dict) -> torch.Tensor:
        """Teacher-forced LM loss of the batch's targets (ECA's L_ce)."""
        if "input_ids" in batch:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
            return self.model(pixel_values=self._pixels(batch), **inputs).loss
        return self.backbone.lm_loss(batch["image"], batch["prompt"], batch["target"])

    @torch.no_grad()
    def image_embeds(self, batch: dict) -> torch.Tensor:
        """The vision encoder's tokens after its post-layernorm (CLS first)."""
        return self.model.vision_model(pixel_values=self._pixels(batch), return_dict=True).last_hidden_state

    def query_outputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """projection(Q-Former(queries, image_embeds)): what the LLM receives, with the
        projection of the active parts (the old model's snapshot inside ``using(old)``)."""
        m = self.model
        proj = self._active.projection or m.language_projection
        q = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = m.qformer(
            query_embeds=q, encoder_hidden_states=image_embeds, encoder_attention_mask=mask, return_dict=True
        ).last_hidden_state
        return proj(out.to(proj.weight.dtype))

    def replay_loss(self) -> torch.Tensor:
        """MSE between the old and the current model's projected queries on sampled atoms."""
        atoms = self.dictionary.sample(self.config.replay_batch_size, self.ctx.generator)[:, None, :]
        # The old model is frozen in eval mode (ECA's freeze_model); the current one runs
        # in whatever mode the step runs (train mode inside training_loss).
        qformer = self.model.qformer
        was_training = qformer.training
        qformer.eval()
        try:
            with torch.no_grad(), self.using(self._old, has_cls=False):
                target = self.query_outputs(atoms)
        finally:
            qformer.train(was_training)
        with self.using(self._live, has_cls=False):
            current = self.query_outputs(atoms)
        return F.mse_loss(current.float(), target.float())

    # ------------------------------------------------------------------ data passes
    def _loader(self, task_index: int, max_samples: int | None, batch_size: int) -> DataLoader:
        """The task's training set in a random order (the method's generator), capped."""
        data = self.ctx.train_sets[task_index]
        idx = torch.randperm(len(data), generator=self.ctx.generator)[:max_samples].tolist()
        data = Subset(data, idx)
        try:
            from mmcl.data.base import collate  # the engine's collate (text samples as lists)
        except ImportError:  # pragma: no cover - an older engine
            from torch.utils.data import default_collate as collate
        return self.ctx.loader(data, batch_size, collate_fn=collate)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _grad_stats(self, task_index: int, with_fisher: bool):
        s = self.config.fisher()
        batches = (self._to_device(b) for b in self._loader(task_index, s.max_samples, s.batch_size))
        size = lambda b: len(b["pixel_values"] if "pixel_values" in b else b["image"])  # noqa: E731
        self._set_mode(self.config.fisher_dropout)
        try:
            with self.using(self._live):
                return gradient_stats(self.adapters.current_parameters(), batches, self.lm_loss, size, with_fisher)
        finally:
            self._set_mode(False)

    @torch.no_grad()
    def _fit_dictionary(self, task_index: int) -> None:
        self._set_mode(False)  # ECA: model.eval() before update_dictionary
        s = self.dictionary.settings
        pending: list[torch.Tensor] = []
        n_pending = 0
        for batch in self._loader(task_index, s.max_images, 32):
            patches = self.image_embeds(self._to_device(batch))[:, 1:].float()  # the CLS token is not a patch
            k = min(s.patches_per_image, patches.shape[1])
            pick = torch.stack([torch.randperm(patches.shape[1], generator=self.ctx.generator)[:k] for _ in patches])
            chosen = patches[torch.arange(len(patches))[:, None], pick.to(patches.device)].reshape(-1, patches.shape[-1])
            pending.append(chosen)
            n_pending += len(chosen)
            while n_pending >= s.batch_size:
                flat = torch.cat(pending)
                self.dictionary.partial_fit(flat[: s.batch_size], self.ctx.generator)
                pending, n_pending = [flat[s.batch_size :]], len(flat) - s.batch_size
        if n_pending:
            self.dictionary.partial_fit(torch.cat(pending), self.ctx.generator)

    # ------------------------------------------------------------------ lifecycle
    def _snapshot(self) -> _Parts:
        moq = copy.deepcopy(self.moq).requires_grad_(False) if self.moq is not None else None
        adapters = copy.deepcopy(self.adapters).requires_grad_(False)
        projection = copy.deepcopy(self.model.language_projection).requires_grad_(False).eval()
        return _Parts(moq, adapters, projection)

    def before_task(self, task_index, task):
        cfg = self.config
        if len(self.adapter_of_task) <= task_index:
            expand = self.adapters.num_adapters == 0 or cfg.expansion == "always"
            if not expand and cfg.expansion == "fedex":
                g_new, _, _ = self._grad_stats(task_index, with_fisher=False)
                expand = self.fedex.should_expand(g_new, self.adapters.num_adapters - 1)
            if expand:
                self.adapters.expand(self.ctx.generator)
            self.expanded.append(bool(expand))
            self.adapter_of_task.append(self.adapters.num_adapters - 1)
        # After FeDEx, as ECA's before_training: g_new is measured without the new key.
        if self.moq is not None and self.moq.num_tasks <= task_index:
            self.moq.add_task(self.ctx.generator)
        self.modules.to(self.ctx.device)

    def training_loss(self, batch, task_index):
        cfg = self.config
        self._set_mode(True)
        with self.using(self._live):
            terms = {"ce": self.lm_loss(batch)}
            e = self.moq_hook.last_summary
        if self.moq is not None and e is not None:
            terms["orth"] = cfg.orth_weight * self.moq.orth_loss()
            terms["key"] = cfg.key_weight * self.moq.key_loss(e)
        if cfg.replay and self._old is not None and self.dictionary.ready and cfg.replay_weight > 0:
            terms["replay"] = cfg.replay_weight * self.replay_loss()
        return terms

    def after_task(self, task_index, task):
        cfg = self.config
        if cfg.expansion == "fedex":
            g, f, n = self._grad_stats(task_index, with_fisher=True)
            self.fedex.record(task_index, GradStats(self.adapters.num_adapters - 1, g, f, n))
        if cfg.replay:
            self._fit_dictionary(task_index)
        self._old = self._snapshot()

    @torch.no_grad()
    def predict(self, batch, task):
        """Generated strings (the engine scores them); the hooks make it ECA's model.

        Batches of model inputs (no tokenizer at hand) give the new token ids instead;
        their ``input_ids`` are the prompt.
        """
        self._set_mode(False)
        ev = getattr(self.run, "evaluation", None)
        max_new, beams = (ev.max_new_tokens, ev.num_beams) if ev is not None else (20, 1)
        with self.using(self._live):
            if "input_ids" not in batch:
                return self.backbone.generate(batch["image"], batch["prompt"], max_new, beams)
            ids = batch["input_ids"]
            out = self.model.generate(
                pixel_values=self._pixels(batch), input_ids=ids, attention_mask=batch.get("attention_mask"),
                max_new_tokens=max_new, num_beams=beams, do_sample=False,
            )  # fmt: skip
        return [row[ids.shape[1] :].tolist() for row in out]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "moq_tasks": self.moq.num_tasks if self.moq is not None else 0,
            "num_adapters": self.adapters.num_adapters,
            "modules": {k: v.detach().cpu().clone() for k, v in self.modules.state_dict().items()},
            "projection": {k: v.detach().cpu().clone() for k, v in self.model.language_projection.state_dict().items()},
            "adapter_of_task": list(self.adapter_of_task),
            "expanded": list(self.expanded),
            "fedex": self.fedex.state_dict(),
            "dictionary": self.dictionary.state_dict(),
            "has_old": self._old is not None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.moq is not None:
            self.moq.resize(state["moq_tasks"])
        self.adapters.resize(state["num_adapters"])
        self.modules.to(self.ctx.device)
        self.modules.load_state_dict(state["modules"])
        if "projection" in state:  # states saved before the projection trained lack it
            self.model.language_projection.load_state_dict(state["projection"])
        self.adapter_of_task = list(state["adapter_of_task"])
        self.expanded = list(state["expanded"])
        self.fedex.load_state_dict(state["fedex"])
        self.dictionary.load_state_dict(state["dictionary"], self.ctx.device)
        # The state is saved at a task end, right after the snapshot was taken from the
        # very parameters it holds: a copy of them is the same old model, bit for bit.
        self._old = self._snapshot() if state["has_old"] else None
