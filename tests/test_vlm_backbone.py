"""BLIP-2 / LLaVA backbones: tiny random models saved here and loaded back by path through
the real ``from_pretrained`` code; inputs, the LM loss and generation."""

from __future__ import annotations

import pytest
import torch

from mmcl.backbones import load_backbone
from mmcl.backbones.vlm import IMAGE_TOKEN, save_tiny, tiny_config, tiny_tokenizer
from mmcl.spec import BackboneSpec, RunSpec, SpecError, check_track

PROMPTS = ["what colour is the shape?", "", "how many shapes are there?"]
TARGETS = ["red", "two blue squares on a plain background", "three"]


@pytest.fixture(scope="module", params=["blip2", "llava"])
def saved(request, tmp_path_factory):
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    tok = tiny_tokenizer()
    cfg = tiny_config(kind, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(1)
    model = (Blip2ForConditionalGeneration if kind == "blip2" else LlavaForConditionalGeneration)(cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return kind, d, model


def test_load_by_path_is_the_saved_model_frozen(saved):
    kind, d, model = saved
    bb = load_backbone(BackboneSpec(kind=kind, path=str(d)), "cpu")
    assert type(bb.model) is type(model)
    ours = bb.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert not any(p.requires_grad for p in bb.parameters())
    assert (bb.qformer is not None) == (kind == "blip2") and bb.image_size == 32
    assert bb.num_image_tokens == (8 if kind == "blip2" else 16)


def test_inputs_label_only_the_target(saved):
    kind, d, _ = saved
    bb = load_backbone(BackboneSpec(kind=kind, path=str(d)), "cpu")
    inp = bb.build_inputs(PROMPTS, TARGETS)
    for row, labels, target in zip(inp["input_ids"], inp["labels"], TARGETS):
        n_target = len(bb.tokenizer(target, add_special_tokens=False)["input_ids"]) + 1  # + eos
        assert int((labels != -100).sum()) == n_target
        assert int((row == bb.image_token_id).sum()) == bb.num_image_tokens
        assert bb.tokenizer.decode(labels[labels != -100][:-1]) == target
    gen = bb.build_inputs(PROMPTS)
    assert (gen["attention_mask"][:, -1] == 1).all()  # left padded: every prompt ends at the end


def test_lm_loss_is_the_models_own_loss_and_per_sample(saved):
    kind, d, _ = saved
    bb = load_backbone(BackboneSpec(kind=kind, path=str(d)), "cpu")
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    ours = bb.lm_loss(images, PROMPTS, TARGETS)
    hf = bb.model(**bb.training_inputs({"image": images, "prompt": PROMPTS, "target": TARGETS})).loss
    assert ours.item() == pytest.approx(hf.item(), rel=1e-5)
    per = bb.lm_loss(images, PROMPTS, TARGETS, reduction="none")
    alone = torch.stack([bb.lm_loss(images[i : i + 1], PROMPTS[i : i + 1], TARGETS[i : i + 1]) for i in range(3)])
    assert torch.allclose(per, alone, atol=1e-5)  # right padding does not change a sample's loss


def test_generate_strings_batch_equals_one_by_one(saved):
    kind, d, _ = saved
    bb = load_backbone(BackboneSpec(kind=kind, path=str(d)), "cpu")
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    out = bb.generate(images, PROMPTS, max_new_tokens=5)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    assert all(len(s.split()) <= 5 for s in out)
    # Left padding must not change a greedy answer.
    alone = [bb.generate(images[i : i + 1], PROMPTS[i : i + 1], max_new_tokens=5)[0] for i in range(3)]
    assert out == alone
    assert bb.image_embeds(images).shape == (3, 17, 64)


def test_tiny_path_is_built_once_and_loaded_by_path(tmp_path):
    spec = BackboneSpec(kind="blip2", path="mmcl:tiny", cache_dir=str(tmp_path))
    a = load_backbone(spec, "cpu")
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and (built[0] / "config.json").is_file() and (built[0] / "tokenizer.json").is_file()
    b = load_backbone(spec, "cpu")
    assert list(tmp_path.iterdir()) == built
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_clear_errors_before_loading(tmp_path, saved):
    kind, d, _ = saved
    with pytest.raises(ValueError, match="path: kind 'blip2' needs"):
        BackboneSpec(kind="blip2")
    with pytest.raises(ValueError, match="only for kind blip2 / llava"):
        BackboneSpec(path="x")
    with pytest.raises(SpecError, match="no such directory"):
        load_backbone(BackboneSpec(kind="blip2", path=str(tmp_path / "nope")))
    with pytest.raises(SpecError, match="no config.json"):
        load_backbone(BackboneSpec(kind="blip2", path=str(tmp_path)))
    with pytest.raises(SpecError, match="not in the Hugging Face cache"):
        load_backbone(BackboneSpec(kind="llava", path="nobody-here/no-such-model", cache_dir=str(tmp_path)))
    other = "llava" if kind == "blip2" else "blip2"
    with pytest.raises(SpecError, match=f"run.backbone.kind: '{other}'"):
        load_backbone(BackboneSpec(kind=other, path=str(d)))
    # A CLIP method on a generative backbone, and the reverse, fail at validation.
    with pytest.raises(SpecError, match="classification"):
        check_track(RunSpec.model_validate({"backbone": {"kind": "blip2", "path": "mmcl:tiny"}, "method": {"name": "finetune"}}))
    with pytest.raises(SpecError, match="generation-track"):
        check_track(RunSpec.model_validate({"method": {"name": "gen_adapter"}}))


def test_targets_tokenise_as_they_follow_the_prompt_with_a_bpe_tokenizer(tmp_path):
    """A GPT-2-style byte-level BPE (what OPT uses) marks a word after a space ("Ġred")
    differently from a word at the start: the labelled target must be the former."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Blip2ForConditionalGeneration, PreTrainedTokenizerFast

    from mmcl.data.synthetic_text import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus() + ["Question: Answer:"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip
    cfg = tiny_config("blip2", len(fast), fast.convert_tokens_to_ids(IMAGE_TOKEN))
    Blip2ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    bb = load_backbone(BackboneSpec(kind="blip2", path=str(tmp_path), prompt_format="Question: {prompt} Answer:"))
    inp = bb.build_inputs(["what colour is the shape?"], ["red"])
    labelled = inp["labels"][0][inp["labels"][0] != -100][:-1].tolist()
    in_context = fast("Answer: red", add_special_tokens=False)["input_ids"]
    assert labelled == in_context[-len(labelled):]
    assert labelled != fast("red", add_special_tokens=False)["input_ids"]  # the word-initial form differs
    assert bb.tokenizer.decode(labelled).strip() == "red"


def test_tiny_pretraining_lowers_the_loss_and_saves_in_place(tmp_path):
    from mmcl.backbones.vlm import pretrain_tiny

    save_tiny("blip2", tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    losses = pretrain_tiny(tmp_path, steps=60, batch_size=16, lr=2e-3, n_images=256)
    assert losses[-1] < losses[0] - 1.0  # from ~ln(vocab) toward the answers' prior
    assert (tmp_path / "model.safetensors").read_bytes() != before
    load_backbone(BackboneSpec(kind="blip2", path=str(tmp_path)))  # still loads by path


def _vlm_shapes():
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("vlm_shapes")


@pytest.mark.parametrize("kind", ["blip2", "llava"])
def test_random_weights_build_the_model_from_its_config_alone(tmp_path, kind):
    """A directory with config.json and a tokenizer but no weights: refused by default
    (naming the key), built with random weights when asked (benchmarks of paper shapes)."""
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    d = _vlm_shapes().write_shape(f"tiny-{kind}", tmp_path / "m")
    assert (d / "config.json").is_file() and not list(d.glob("*.safetensors"))
    with pytest.raises(SpecError, match="run.backbone.path"):
        load_backbone(BackboneSpec(kind=kind, path=str(d)))
    bb = load_backbone(BackboneSpec(kind=kind, path=str(d), random_weights=True))
    cls = Blip2ForConditionalGeneration if kind == "blip2" else LlavaForConditionalGeneration
    assert isinstance(bb.model, cls) and not any(p.requires_grad for p in bb.parameters())
    images = torch.randn(2, 3, 32, 32)
    loss = bb.lm_loss(images, ["a photo of", "a photo of"], ["a red circle", "a blue square"])
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="random_weights: only for kind blip2 / llava"):
        BackboneSpec(random_weights=True)


def test_paper_shapes_have_the_published_sizes():
    """BLIP-2 OPT-2.7B and LLaVA-1.5-7B as vlm_shapes.py writes them, built on the meta
    device: the parameter counts of the published checkpoints (3.74B; 7.06B), and the
    Q-Former-to-OPT projection ECA trains (768 x 2560 + 2560)."""
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    shapes = _vlm_shapes()
    tok = tiny_tokenizer()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    counts = {}
    for shape, cls in (("blip2-opt-2.7b", Blip2ForConditionalGeneration), ("llava-1.5-7b", LlavaForConditionalGeneration)):
        with torch.device("meta"):
            m = cls._from_config(shapes.shape_config(shape, len(tok), image_id))
        counts[shape] = sum(p.numel() for p in m.parameters())
        if shape.startswith("blip2"):
            assert sum(p.numel() for p in m.language_projection.parameters()) == 1_968_640
    assert counts == {"blip2-opt-2.7b": 3_744_679_936, "llava-1.5-7b": 7_063_427_072}
