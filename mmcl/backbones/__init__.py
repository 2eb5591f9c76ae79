"""Frozen backbones (open_clip CLIP; transformers BLIP-2 / LLaVA; paired audio / video
encoders) and the tiny CLIP's offline pretraining.

``load_backbone`` and ``ensure_pretrained`` are imported lazily by callers; this module
re-exports them through ``__getattr__`` so that ``import mmcl.backbones`` stays cheap
(no torch / open_clip import until a model is actually wanted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmcl.backbones.clip import ClipBackbone
    from mmcl.backbones.vlm import VlmBackbone
    from mmcl.backbones.pretrain import ensure_pretrained

__all__ = ["ClipBackbone", "VlmBackbone", "load_backbone", "ensure_pretrained"]


def load_backbone(spec: Any, device: Any = "cpu") -> Any:
    """Load the frozen backbone a run spec names, by ``kind``: open_clip -> ClipBackbone,
    blip2 / llava -> :class:`mmcl.backbones.vlm.VlmBackbone`, paired -> per-modality
    encoders (:mod:`mmcl.backbones.paired`)."""
    kind = getattr(spec, "kind", "open_clip")
    if kind in ("blip2", "llava"):
        from mmcl.backbones.vlm import load_vlm

        return load_vlm(spec, device)
    if kind == "paired":
        from mmcl.backbones.paired import load_paired_backbone

        return load_paired_backbone(spec, device)
    from mmcl.backbones.clip import load_backbone as load_clip

    return load_clip(spec, device)


def __getattr__(name: str) -> Any:
    if name == "VlmBackbone":
        from mmcl.backbones import vlm

        return vlm.VlmBackbone
    if name == "ClipBackbone":
        from mmcl.backbones import clip

        return getattr(clip, name)
    if name == "ensure_pretrained":
        from mmcl.backbones import pretrain

        return pretrain.ensure_pretrained
    raise AttributeError(f"module 'mmcl.backbones' has no attribute {name!r}")
