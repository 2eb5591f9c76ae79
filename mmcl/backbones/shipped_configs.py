"""Architecture facts of the papers' transformers backbones, shipped as ``config.json`` files.

``mmcl/backbones/hf_configs/<name>.json`` holds the published model's config (what
``save_pretrained`` writes as ``config.json``), without weights or tokenizer:

- ``blip2-opt-2.7b``: Salesforce/blip2-opt-2.7b (EVA ViT-g/14, Q-Former with 32 queries,
  OPT-2.7B), 3,744,679,936 parameters;
- ``llava-1.5-7b``: llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336, 2-layer GELU projector,
  Vicuna-7B / Llama), 7,063,427,072 parameters;
- ``ast-finetuned-audioset-10-10-0.4593``: MIT/ast-finetuned-audioset-10-10-0.4593 (the
  AudioSet AST encoder: 768 wide, 12 layers, 128 mel bins x 1024 frames, strides 10 / 10).

They live once, here: ``benchmarks/vlm_shapes.py`` writes model directories of these
shapes from them, and ``mmcl plan`` (:mod:`mmcl.param_count`) counts a study's trainable
parameters on them when the real model directory is not on this machine. They sit in
their own folder, not in ``model_configs/`` (open_clip reads every JSON file there as a
CLIP config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HF_CONFIG_DIR = Path(__file__).resolve().parent / "hf_configs"

# Which shipped configs fit which backbone kind (run.backbone.kind, or "ast" for a paired
# encoder), by name.
KIND_CONFIGS: dict[str, tuple[str, ...]] = {
    "blip2": ("blip2-opt-2.7b",),
    "llava": ("llava-1.5-7b",),
    "ast": ("ast-finetuned-audioset-10-10-0.4593",),
}


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in HF_CONFIG_DIR.glob("*.json"))


def shipped_config(name: str) -> dict[str, Any]:
    """The shipped ``config.json`` dict of ``name`` (a fresh copy: callers may edit it)."""
    path = HF_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no shipped model config {name!r}; shipped: {', '.join(shipped_config_names())}")
    return json.loads(path.read_text())


def match_shipped(kind: str, path: str) -> str | None:
    """The shipped config a model path or hub id names, if any: its last path component,
    lower-cased, equals a shipped name or ends with it after a "-" or "/"
    ("/data/models/blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", "llava-hf/llava-1.5-7b-hf",
    "MIT/ast-finetuned-audioset-10-10-0.4593"). [choice] A trailing "-hf" (llava-hf's
    naming) is ignored; anything else must match exactly, so a fine-tuned variant with
    another architecture is not silently counted as the base model."""
    last = path.rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-hf")
    for name in KIND_CONFIGS.get(kind, ()):
        if last == name or last.endswith("-" + name):
            return name
    return None
