"""Frozen backbones (open_clip CLIP; paired audio / video encoders) and offline pretraining.

``load_backbone`` and ``ensure_pretrained`` are imported lazily by callers; this module
re-exports them through ``__getattr__`` so that ``import mmcl.backbones`` stays cheap
(no torch / open_clip import until a model is actually wanted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmcl.backbones.clip import ClipBackbone
    from mmcl.backbones.pretrain import ensure_pretrained

__all__ = ["ClipBackbone", "load_backbone", "ensure_pretrained"]


def load_backbone(spec: Any, device: Any = "cpu") -> Any:
    """Load the frozen backbone a run spec names: an open_clip CLIP or paired encoders."""
    if getattr(spec, "kind", "open_clip") == "paired":
        from mmcl.backbones.paired import load_paired_backbone

        return load_paired_backbone(spec, device)
    from mmcl.backbones.clip import load_backbone as load_clip

    return load_clip(spec, device)


def __getattr__(name: str) -> Any:
    if name == "ClipBackbone":
        from mmcl.backbones import clip

        return getattr(clip, name)
    if name == "ensure_pretrained":
        from mmcl.backbones import pretrain

        return pretrain.ensure_pretrained
    raise AttributeError(f"module 'mmcl.backbones' has no attribute {name!r}")
