"""A frozen open_clip CLIP behind the small interface the engine and methods use.

:func:`load_backbone` goes through open_clip's own loader in every case (a pretrained
tag, a local checkpoint, the project's offline ``synthetic`` weights, or random init),
so what the methods see is the real open_clip ``CLIP`` module and its real
``ResidualAttentionBlock`` layers, whatever the model size.

Text heads (one embedding per class, averaged over the task's templates) are the
expensive part of evaluation for small image batches; :meth:`ClipBackbone.text_head`
caches them whenever no gradient can flow into them (a frozen text tower, or any
evaluation) and recomputes them, with gradients, while a text parameter trains.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.spec import BackboneSpec, SpecError

if TYPE_CHECKING:
    from mmcl.data.base import Task

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# Same ceiling as CLIP's training clamp: beyond it the softmax is one-hot for any margin.
MAX_LOGIT_SCALE = 100.0

Templates = Literal["all", "first"]

_register_lock = threading.Lock()
_registered = False


def register_model_configs() -> None:
    """Make the project's model configs (``mmcl-tiny-clip`` ...) known to open_clip.

    Done on first load, not at import: importing open_clip costs a second and most
    processes that import mmcl (the CLI validating a study) never load a model.
    """
    global _registered
    with _register_lock:
        if _registered:
            return
        import open_clip

        names = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}
        if not names.issubset(open_clip.list_models()):
            open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def _is_text_param(name: str) -> bool:
    """Parameters of the text tower of an open_clip CLIP (names relative to the CLIP)."""
    if name.startswith("visual.") or name in ("logit_scale", "logit_bias"):
        return False
    return True


class ClipBackbone(nn.Module):
    """An open_clip CLIP (submodule ``model``) plus its tokenizer and image transform."""

    def __init__(self, model: nn.Module, tokenizer: Callable[..., torch.Tensor], preprocess: Any, model_name: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_name = model_name
        size = getattr(model.visual, "image_size", 224)
        self.image_size: int = int(size[0] if isinstance(size, (tuple, list)) else size)
        # (task key, templates) -> (text-param versions, head); see text_head.
        self._head_cache: dict[tuple, tuple[tuple[int, ...], torch.Tensor]] = {}
        self._token_cache: dict[tuple, torch.Tensor] = {}
        self._text_params: list[nn.Parameter] = []
        self.index_parameters()
        # Images from the image cache arrive as uint8 pixels (mmcl/data/image_cache.py):
        # the image tower finishes them (/ 255, mean / std) on its own device, per batch,
        # whichever method calls it.
        from mmcl.data.image_cache import split_transform

        split = split_transform(preprocess)
        if split is not None:
            model.visual.register_forward_pre_hook(split.tensor.pre_hook)

    # ------------------------------------------------------------------ state
    def freeze(self) -> "ClipBackbone":
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        self.clear_text_cache()
        return self

    def clear_text_cache(self) -> None:
        self._head_cache.clear()

    def index_parameters(self) -> None:
        """Re-list the text tower's parameters; call after adding modules to the CLIP
        (LoRA, prompts), or cached text heads would not notice the new ones change."""
        self._text_params = [p for n, p in self.model.named_parameters() if _is_text_param(n)]
        self.clear_text_cache()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------ heads
    def _text_trains(self) -> bool:
        return any(p.requires_grad for p in self._text_params)

    def _versions(self) -> tuple[int, ...]:
        # In-place updates (an optimizer step, load_state_dict, copy_) bump a tensor's
        # version counter, so a cached head can never outlive the weights it came from,
        # even if a caller forgets clear_text_cache().
        return tuple(p._version for p in self._text_params)

    def text_head(self, task: "Task", templates: Templates = "all") -> torch.Tensor:
        """Class embeddings of ``task``: Tensor[C, D], L2-normalised.

        Each class is the normalised mean of its normalised template embeddings (CLIP's
        prompt ensembling); ``templates="first"`` uses the task's first template only.
        """
        if templates not in ("all", "first"):
            raise ValueError(f"templates must be 'all' or 'first', got {templates!r}")
        tmpls = list(task.templates) if templates == "all" else list(task.templates[:1])
        if not tmpls:
            tmpls = ["{}"]
        key = (task.name, tuple(task.classnames), tuple(tmpls))
        # A head is cached whenever no gradient can flow into it: a frozen text tower, or
        # evaluation (no_grad) of a training one. The version check keeps it fresh.
        trains = self._text_trains() and torch.is_grad_enabled()
        if not trains:
            hit = self._head_cache.get(key)
            versions = self._versions()
            if hit is not None and hit[0] == versions and hit[1].device == self.device:
                return hit[1]
        tokens = self._token_cache.get(key)
        if tokens is None or tokens.device != self.device:
            # Tokenising is pure Python; worth keeping even when the head itself is not.
            tokens = self.tokenize([t.format(c) for c in task.classnames for t in tmpls])
            self._token_cache[key] = tokens
        if trains:
            return self._compute_head(tokens, len(task.classnames), len(tmpls))
        with torch.no_grad():
            head = self._compute_head(tokens, len(task.classnames), len(tmpls))
        self._head_cache[key] = (self._versions(), head)
        return head

    def _compute_head(self, tokens: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
        emb = self.encode_text(tokens, normalize=True).float()
        emb = emb.view(n_classes, n_templates, -1).mean(1)
        return F.normalize(emb, dim=-1)

    def logits(self, images: torch.Tensor, task: "Task", templates: Templates = "all") -> torch.Tensor:
        """Scaled cosine similarities of ``images`` to ``task``'s classes: Tensor[B, C]."""
        feats = self.encode_image(images, normalize=True)
        head = self.text_head(task, templates)
        return self.logit_scale() * feats @ head.to(feats.dtype).T

    def forward(self, images: torch.Tensor, task: "Task", templates: Templates = "all") -> torch.Tensor:
        return self.logits(images, task, templates)


def _available_models() -> list[str]:
    import open_clip

    return list(open_clip.list_models())


def unknown_model_error(name: str) -> SpecError:
    names = _available_models()
    ours = [n for n in names if n.startswith("mmcl-")]
    close = [n for n in names if n.lower().startswith(name.lower()[:4])][:8]
    shown = list(dict.fromkeys(ours + close + names[:12]))
    return SpecError(
        f"run.backbone.model: unknown open_clip model {name!r}; available models include "
        f"{', '.join(shown)} ({len(names)} in all, see open_clip.list_models())"
    )


def image_transform(spec: BackboneSpec) -> tuple[Any, int]:
    """(the eval transform, the input size) :func:`load_backbone` gives ``spec``'s model,
    from open_clip's configs alone: no weights are read or downloaded (the driver builds
    the image cache with it, on a head node that may hold no weights). As open_clip's
    factory: defaults, merged with the pretrained tag's config when ``pretrained`` is a
    tag of the model (not for a checkpoint file or ``synthetic``), size from the model's
    vision config."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    register_model_configs()
    if spec.model not in _available_models():
        raise unknown_model_error(spec.model)
    cfg = asdict(PreprocessCfg())
    if not spec.checkpoint and spec.pretrained not in (None, "synthetic"):
        tag = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
        if tag:
            cfg = merge_preprocess_dict(cfg, tag)
    size = open_clip.get_model_config(spec.model)["vision_cfg"]["image_size"]
    cfg["size"] = size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False), image_size


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> ClipBackbone:
    """Load a frozen CLIP as ``spec`` says (see :class:`mmcl.spec.BackboneSpec`).

    Precedence: ``checkpoint`` (a local file) > ``pretrained="synthetic"`` (pretrained
    here once and cached) > ``pretrained=<open_clip tag>`` > ``pretrained=None`` (random
    init, seeded by the caller's torch seed).
    """
    import open_clip

    register_model_configs()
    if spec.model not in _available_models():
        raise unknown_model_error(spec.model)

    weights: str | None
    key = "run.backbone.pretrained"
    if spec.checkpoint:
        path = Path(spec.checkpoint).expanduser()
        if not path.is_file():
            raise SpecError(f"run.backbone.checkpoint: no such file {path}")
        weights, key = str(path), "run.backbone.checkpoint"
    elif spec.pretrained == "synthetic":
        from mmcl.backbones.pretrain import ensure_pretrained

        weights = str(ensure_pretrained(spec))
    else:
        weights = spec.pretrained

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=weights, device=device, cache_dir=spec.cache_dir
        )
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        if key == "run.backbone.pretrained" and weights and "not a known tag" in str(e):
            tags = open_clip.list_pretrained_tags_by_model(spec.model)
            raise SpecError(
                f"run.backbone.pretrained: {weights!r} is not a pretrained tag of {spec.model} nor a file; "
                f"tags: {', '.join(tags) if tags else '(none)'}; or use 'synthetic' / null / run.backbone.checkpoint"
            ) from None
        raise SpecError(f"{key}: cannot load {spec.model} weights {weights!r}: {e}") from None
    tokenizer = open_clip.get_tokenizer(spec.model)
    backbone = ClipBackbone(model, tokenizer, preprocess, spec.model)
    return backbone.to(device).freeze()
