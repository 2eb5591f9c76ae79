"""Frozen vision-language backbones (open_clip CLIP) and their offline pretraining.

``load_backbone`` and ``ensure_pretrained`` are imported lazily by callers; this module
re-exports them through ``__getattr__`` so that ``import mmcl.backbones`` stays cheap
(no torch / open_clip import until a model is actually wanted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmcl.backbones.clip import ClipBackbone, load_backbone
    from mmcl.backbones.pretrain import ensure_pretrained

__all__ = ["ClipBackbone", "load_backbone", "ensure_pretrained"]


def __getattr__(name: str) -> Any:
    if name in ("ClipBackbone", "load_backbone"):
        from mmcl.backbones import clip

        return getattr(clip, name)
    if name == "ensure_pretrained":
        from mmcl.backbones import pretrain

        return pretrain.ensure_pretrained
    raise AttributeError(f"module 'mmcl.backbones' has no attribute {name!r}")
