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

Architecture facts, from the published ``config.json`` files:
- Salesforce/blip2-opt-2.7b: EVA ViT-g/14 (1408 wide, 39 layers, 16 heads, MLP 6144, 224 px),
  Q-Former (768 wide, 12 layers, cross-attention every 2nd layer, 32 queries), OPT-2.7B
  (2560 wide, 32 layers, 32 heads, FFN 10240, vocabulary 50272, 2048 positions);
- llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (1024 wide, 24 layers, 16 heads, MLP 4096,
  336 px, features of the second-last layer, 576 image tokens), a 2-layer GELU projector,
  Vicuna-7B / Llama (4096 wide, 32 layers, 32 heads, MLP 11008, vocabulary 32064, 4096
  positions).
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
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if shape == "blip2-opt-2.7b":
        from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

        vision = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                                   image_size=224, patch_size=14, qkv_bias=True)  # fmt: skip
        qformer = Blip2QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                     cross_attention_frequency=2, encoder_hidden_size=1408)  # fmt: skip
        text = OPTConfig(vocab_size=max(50272, vocab_size), hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                         num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560, **ids)  # fmt: skip
        return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                           num_query_tokens=32, image_token_index=image_token_id)  # fmt: skip
    if shape == "llava-1.5-7b":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
        text = LlamaConfig(vocab_size=max(32064, vocab_size), hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, **ids)  # fmt: skip
        return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token_id,
                           projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_seq_length=576)  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


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
