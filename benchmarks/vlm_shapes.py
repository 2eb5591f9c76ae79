"""Model directories of the papers' generation-track shapes, without their weights.

    uv run python benchmarks/vlm_shapes.py blip2-opt-2.7b /tmp/shapes/blip2
    uv run python benchmarks/vlm_shapes.py llava-1.5-7b /tmp/shapes/llava

Writes ``config.json`` (the published model's architecture) and the tiny word-level
tokenizer of the generated caption / VQA benchmark (its ids fit in either vocabulary), and
no weights: a run block with ``backbone.path: <dir>`` and ``backbone.random_weights: true``
builds the model on its device with random weights (``mmcl.backbones.vlm.load_vlm``).
Speed and memory of a step do not depend on the weights' values, so ``gen_step.py`` takes
the figures of BLIP-2 OPT-2.7B (ECA) and LLaVA-1.5-7B (DGG) from these. ``tiny-blip2`` and
``tiny-llava`` write the tests' tiny shapes (the CPU dry run).

Architecture facts: the published ``config.json`` files, shipped once under
``mmcl/backbones/hf_configs/`` (see :mod:`mmcl.backbones.shipped_configs`; ``mmcl plan``
counts parameters on the same files). Written here with the tiny tokenizer's special ids
and a vocabulary at least as large as the model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHAPES = ("blip2-opt-2.7b", "llava-1.5-7b", "tiny-blip2", "tiny-llava")


def shape_config(shape: str, vocab_size: int, image_token_id: int):
    """The transformers config of ``shape`` (special token ids: the tiny tokenizer's)."""
    from mmcl.backbones.vlm import tiny_config

    if shape in ("tiny-blip2", "tiny-llava"):
        return tiny_config(shape.removeprefix("tiny-"), vocab_size, image_token_id)
    if shape not in ("blip2-opt-2.7b", "llava-1.5-7b"):
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    from transformers import Blip2Config, LlavaConfig

    from mmcl.backbones.shipped_configs import shipped_config

    cfg = shipped_config(shape)
    text = cfg["text_config"]
    # The tiny tokenizer's ids (its ids fit in either vocabulary), as its directory holds it.
    text.update(pad_token_id=0, bos_token_id=2, eos_token_id=3, vocab_size=max(int(text["vocab_size"]), vocab_size))
    cfg["image_token_index"] = image_token_id
    return (Blip2Config if shape == "blip2-opt-2.7b" else LlavaConfig).from_dict(cfg)


def write_shape(shape: str, directory: str | Path) -> Path:
    """``directory`` with the config of ``shape`` and the tiny tokenizer, no weights."""
    from mmcl.backbones.vlm import IMAGE_TOKEN, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = shape_config(shape, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=SHAPES)
    ap.add_argument("directory")
    args = ap.parse_args()
    print(write_shape(args.shape, args.directory))


if __name__ == "__main__":
    main()
