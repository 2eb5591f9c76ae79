"""Generative vision-language backbones through transformers: BLIP-2 and LLaVA.

:func:`load_vlm` loads ``Blip2ForConditionalGeneration`` or ``LlavaForConditionalGeneration``
with ``from_pretrained`` from a local directory or a hub id already in the Hugging Face
cache (always offline: ``local_files_only=True``), plus the tokenizer saved with it, and
freezes everything. Methods unfreeze or add what they train (Q-Former adapters, peft LoRA
on the language model).

:class:`VlmBackbone` is the interface methods use:

- ``lm_loss(images, prompts, targets)``: teacher-forced cross-entropy of the target text
  (mean over target tokens, or per sample with ``reduction="none"``);
- ``target_logits(images, prompts, targets)``: the logits that predict each target token
  and its mask (distillation);
- ``generate(images, prompts, max_new_tokens, num_beams)``: greedy / beam answers as strings;
- ``image_embeds(images)``: the vision encoder's patch tokens after its final layer norm;
- parts: ``model`` (the transformers model), ``vision``, ``qformer`` and ``query_tokens``
  (BLIP-2 only, else None), ``language_model``, ``lm_prefix`` (module-name prefix of the
  language model's decoder layers inside ``model``, for LoRA targets).

How a sample becomes input ids (both models take the image as placeholder tokens in
``input_ids`` that the model replaces by projected image features):
BLIP-2 ``[image x num_query_tokens] [bos] prompt target [eos]`` (the order Blip2Processor
uses), LLaVA ``[bos] pre [image x n_patches] post target [eos]`` where the formatted
prompt (``BackboneSpec.prompt_format``) is split at ``<image>`` (no ``<image>``: the image
goes right after bos). Only target and eos tokens are labelled. Training batches are right
padded, generation batches left padded (decoder-only generation continues at the end).

``path: mmcl:tiny`` builds (once per cache directory) a tiny random model of the kind
with a word-level tokenizer trained on the generated benchmark's text, saves both with
``save_pretrained`` and then loads them back by path like any other model.
``mmcl:tiny-pretrained`` is the same model after :func:`pretrain_tiny` (1500 steps, about
a minute or two on a CPU, once per cache): it has learnt the benchmark's language (zero-shot
captions score CIDEr ~75 on ``synthetic_text``) but is only weakly grounded (colour
answers ~30% against 17% chance, other questions at chance), so fine-tuning has something
to add and something to forget.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.spec import BackboneSpec, SpecError

TINY = "mmcl:tiny"
TINY_PRETRAINED = "mmcl:tiny-pretrained"
TINY_VERSION = "tiny-v1"
PRETRAIN_STEPS = 1500
# Bumped when pretrain_tiny's weights change for the same steps (2: the global generator
# seeded, so dropout no longer depends on the caller): names the cached directory.
PRETRAIN_VERSION = 2
IMAGE_TOKEN = "<image>"
# open_clip's OPENAI mean / std: the image statistics of BLIP-2's and LLaVA's CLIP-style
# vision encoders (used when the model directory has no preprocessor_config.json).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- tiny models


def tiny_tokenizer():
    """A word-level tokenizer trained on every string of ``synthetic_text`` (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mmcl.data.synthetic_text import corpus

    specials = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )  # fmt: skip


def tiny_config(kind: str, vocab_size: int, image_token_id: int, image_size: int = 32):
    """Configs of the tiny models: 2 layers x 64 wide everywhere, 8 query tokens."""
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if kind == "blip2":
        from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

        vision = Blip2VisionConfig(**common, image_size=image_size, patch_size=8)
        qformer = Blip2QFormerConfig(**common, encoder_hidden_size=64)
        text = OPTConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=64, **ids)  # fmt: skip
        return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                           num_query_tokens=8, image_token_index=image_token_id)  # fmt: skip
    if kind == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(**common, image_size=image_size, patch_size=8, projection_dim=64)
        text = LlamaConfig(vocab_size=vocab_size, **common, num_key_value_heads=4, max_position_embeddings=256, **ids)
        n_patches = (image_size // 8) ** 2
        return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token_id,
                           image_seq_length=n_patches)  # fmt: skip
    raise ValueError(f"no tiny model for kind {kind!r}")


def save_tiny(kind: str, directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Build a tiny random ``kind`` model and its tokenizer and save both to ``directory``."""
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    tok = tiny_tokenizer()
    cfg = tiny_config(kind, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), image_size)
    cls = Blip2ForConditionalGeneration if kind == "blip2" else LlavaForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pretrain_tiny(directory: str | Path, steps: int = PRETRAIN_STEPS, batch_size: int = 32, lr: float = 1e-3,
                  seed: int = 0, n_images: int = 4096, progress: bool = False) -> list[float]:
    """Train a saved tiny model (every weight) on the generated scenes of the neutral
    *base* domain: captions and the four question types of ``synthetic_text``, so that it
    answers zero-shot while each task's own domain is still a shift (as the tiny CLIP is
    pretrained for the classification track). Saves the result in place; returns the
    losses (every 50 steps)."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    from mmcl.data import synthetic as syn
    from mmcl.data.synthetic_text import TEXT_TASKS, _answer, _captions
    from mmcl.progress import work_bar

    directory = Path(directory)
    kind = "blip2" if json.loads((directory / "config.json").read_text())["model_type"] == "blip-2" else "llava"
    cls = Blip2ForConditionalGeneration if kind == "blip2" else LlavaForConditionalGeneration
    model = cls.from_pretrained(directory, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    bb = VlmBackbone(model, tok, kind, "{prompt}", (OPENAI_MEAN, OPENAI_STD))
    g = torch.Generator().manual_seed(seed)
    # The weights are a function of the recipe alone: train mode draws dropout masks from
    # torch's *global* generator, so that one is forked and seeded here too (forking alone
    # would hand it the caller's state, and the model would depend on what the caller drew
    # before). One thread: float reductions round differently on two, a 64-wide model gains
    # nothing from more, and on a busy machine OpenMP's barriers make two many times slower.
    with torch.random.fork_rng(devices=[]), syn.single_thread():
        torch.manual_seed(seed)
        scenes = syn.sample_scenes(g, n_images, p_single=0.5)
        images = syn.normalize(syn.render(scenes, syn.BASE_DOMAIN, g, bb.image_size, jitter_domain=True))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        losses = []
        # A progress bar for the minutes a first run spends here (mmcl/progress.py).
        with work_bar(steps, f"pretraining the tiny {kind} (once per machine)", show=progress) as bar:
            for step in range(steps):
                idx = torch.randint(0, n_images, (batch_size,), generator=g).tolist()
                kinds = torch.randint(0, len(TEXT_TASKS), (batch_size,), generator=g).tolist()
                prompts, targets = [], []
                for i, k in zip(idx, kinds):
                    tdef = TEXT_TASKS[k]
                    if tdef.factor is None:
                        refs = _captions(scenes, i)
                        targets.append(refs[int(torch.randint(0, len(refs), (1,), generator=g))])
                    else:
                        targets.append(_answer(tdef, scenes, i))
                    prompts.append(tdef.question)
                loss = bb.lm_loss(images[idx], prompts, targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if step % 50 == 0 or step == steps - 1:
                    losses.append(float(loss.detach()))
                bar.update()
    model.eval()
    model.save_pretrained(directory)
    return losses


def tiny_model_dir(spec: BackboneSpec) -> Path:
    """Where ``mmcl:tiny`` / ``mmcl:tiny-pretrained`` of ``spec.kind`` lives in the cache,
    whether it is built yet or not (``mmcl plan`` reads its config.json without building)."""
    cache = Path(spec.cache_dir or os.environ.get("MMCL_CACHE", Path.home() / ".cache" / "mmcl")).expanduser()
    from mmcl.data.synthetic_text import GENERATOR_VERSION

    from mmcl.backbones.pretrain import recipe_seed

    seed = recipe_seed()
    name = f"{TINY_VERSION}-{spec.kind}"
    if spec.path == TINY_PRETRAINED:
        name += f"-pretrained-{GENERATOR_VERSION}-{PRETRAIN_STEPS}-r{PRETRAIN_VERSION}"
    if seed:
        name += f"-s{seed}"
    return cache / name


def _tiny_dir(spec: BackboneSpec) -> Path:
    from mmcl.backbones.pretrain import recipe_seed

    final = tiny_model_dir(spec)
    if (final / "config.json").is_file():
        return final
    cache, pretrained, seed = final.parent, spec.path == TINY_PRETRAINED, recipe_seed()
    cache.mkdir(parents=True, exist_ok=True)
    # Built in a private directory and renamed into place: trials that start together
    # never see a half-written model.
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{final.name}-"))
    save_tiny(spec.kind, tmp, seed=seed)
    if pretrained:
        pretrain_tiny(tmp, seed=seed, progress=True)
    try:
        tmp.rename(final)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_dir(spec: BackboneSpec) -> str:
    """What ``from_pretrained`` gets: a local directory, or a hub id found in the cache.

    Offline by design: a hub id must already be cached. Every problem is a SpecError
    naming ``run.backbone.path`` and the fix.
    """
    if spec.path in (TINY, TINY_PRETRAINED):
        return str(_tiny_dir(spec))
    assert spec.path is not None
    local = Path(spec.path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise SpecError(
                f"run.backbone.path: {local} has no config.json; give the directory that save_pretrained wrote "
                f"(a {spec.kind} model and its tokenizer)"
            )
        return str(local.resolve())
    if spec.path.count("/") == 1 and not spec.path.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec.path, "config.json", cache_dir=spec.cache_dir)
        if isinstance(hit, str):
            return spec.path
        raise SpecError(
            f"run.backbone.path: {spec.path!r} is not a local directory and the hub id is not in the Hugging Face "
            f"cache ({spec.cache_dir or '$HF_HOME/hub'}); nothing is downloaded here: copy the model directory to "
            "the cluster and give its path"
        )
    raise SpecError(f"run.backbone.path: no such directory {local}; give a local model directory or a cached hub id")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _image_stats(directory: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    p = Path(directory) / "preprocessor_config.json"
    if p.is_file():
        cfg = json.loads(p.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return OPENAI_MEAN, OPENAI_STD


class ImageTransform:
    """PIL image -> normalised tensor at the model's input size (resize, centre crop)."""

    def __init__(self, size: int, mean, std):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        return TF.normalize(TF.to_tensor(self._pixels(image)), self.mean, self.std)

    def __repr__(self) -> str:  # the benchmark cache keys on it
        return f"ImageTransform(size={self.size}, mean={self.mean}, std={self.std})"

    def _pixels(self, image):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = TF.resize(image.convert("RGB"), self.size, interpolation=InterpolationMode.BICUBIC)
        return TF.center_crop(image, [self.size, self.size])

    def pixel_split(self):
        """The pixel steps (RGB, resize, crop) and the tensor steps (``to_tensor``,
        ``normalize``: the image cache's :class:`~mmcl.data.image_cache.Uint8Pixels`)."""
        import PIL
        import torchvision

        from mmcl.data.image_cache import PixelSplit, Uint8Pixels

        key = f"ImageTransform pixels size={self.size} bicubic|PIL {PIL.__version__}|torchvision {torchvision.__version__}"
        return PixelSplit(self._pixels, self.size, Uint8Pixels(self.mean, self.std), key)


# --------------------------------------------------------------------------- the backbone


class VlmBackbone(nn.Module):
    """A frozen BLIP-2 or LLaVA (``model``) with its tokenizer; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: Any, kind: str, prompt_format: str, image_stats):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.prompt_format = prompt_format
        cfg = model.config
        vcfg = cfg.vision_config
        self.image_size: int = int(vcfg.image_size)
        self.preprocess = ImageTransform(self.image_size, *image_stats)
        self._finish_pixels = self.preprocess.pixel_split().tensor
        token = getattr(cfg, "image_token_index", None)
        if token is None:
            token = getattr(cfg, "image_token_id", None)
        if token is None:
            # Without it transformers cannot place the image features in input_ids.
            raise SpecError(
                f"run.backbone.path: the {kind} config has no image_token_index; re-save the model with a "
                "transformers version whose processor adds the image token (>= 4.47), or set it in config.json"
            )
        self.image_token_id = int(token)
        if kind == "blip2":
            self.num_image_tokens = int(cfg.num_query_tokens)
        else:
            n = (self.image_size // int(vcfg.patch_size)) ** 2
            self.num_image_tokens = n + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id

    # ------------------------------------------------------------------ parts
    @property
    def vision(self) -> nn.Module:
        return self.model.vision_model if self.kind == "blip2" else self.model.model.vision_tower

    @property
    def qformer(self) -> nn.Module | None:
        """BLIP-2's Q-Former (``Blip2QFormerModel``: ``encoder.layer[i]`` with ``attention``,
        ``crossattention``, ``intermediate_query`` / ``output_query``); None for LLaVA."""
        return self.model.qformer if self.kind == "blip2" else None

    @property
    def query_tokens(self) -> nn.Parameter | None:
        return self.model.query_tokens if self.kind == "blip2" else None

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def lm_prefix(self) -> str:
        """Prefix of the decoder layers' module names inside ``model`` (LoRA targets)."""
        return r"language_model\.model\.decoder\.layers" if self.kind == "blip2" else r"model\.language_model\.layers"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def freeze(self) -> "VlmBackbone":
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        return self

    # CLIP-backbone hooks the method base class calls; nothing is cached here.
    def clear_text_cache(self) -> None:
        pass

    def index_parameters(self) -> None:
        pass

    # ------------------------------------------------------------------ inputs
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _parts(self, prompt: str) -> tuple[str, str]:
        """The formatted prompt's text before and after the image tokens."""
        text = self.prompt_format.format(prompt=prompt).strip()
        if IMAGE_TOKEN in text:
            pre, _, post = text.partition(IMAGE_TOKEN)
            return pre.strip(), post.strip()
        return "", text

    def _prefix(self, prompt: str) -> list[int]:
        pre, post = self._parts(prompt)
        image = [self.image_token_id] * self.num_image_tokens
        bos = [self.bos_id] if self.bos_id is not None else []
        if self.kind == "blip2":
            return image + bos + self._encode(pre) + self._encode(post)
        return bos + self._encode(pre) + image + self._encode(post)

    def _target(self, prompt: str, target: str) -> list[int]:
        """Target tokens as they follow the prompt: the tail of encoding "prompt target"
        together. BPE tokenizers (OPT) mark a word after a space differently from a word
        at the start, SentencePiece ones (Llama) add their own prefix space; encoding the
        pair and cutting the prompt off gives what the model sees in running text."""
        _, post = self._parts(prompt)
        target = target.strip()
        if not post:
            return self._encode(target) + [self.eos_id]
        head, full = self._encode(post), self._encode(post + " " + target)
        tail = full[len(head):] if full[: len(head)] == head else self._encode(" " + target)
        return tail + [self.eos_id]

    def _pad(self, seqs: list[list[int]], left: bool, value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def build_inputs(self, prompts: list[str], targets: list[str] | None = None) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask (and labels when ``targets`` are given) of a batch."""
        prefixes = [self._prefix(p) for p in prompts]
        if targets is None:
            ids = self._pad(prefixes, left=True, value=self.pad_id)
            mask = self._pad([[1] * len(p) for p in prefixes], left=True, value=0)
            return {"input_ids": ids, "attention_mask": mask}
        tails = [self._target(p, t) for p, t in zip(prompts, targets)]
        seqs = [a + b for a, b in zip(prefixes, tails)]
        labels = [[-100] * len(a) + b for a, b in zip(prefixes, tails)]
        return {
            "input_ids": self._pad(seqs, left=False, value=self.pad_id),
            "attention_mask": self._pad([[1] * len(s) for s in seqs], left=False, value=0),
            "labels": self._pad(labels, left=False, value=-100),
        }

    def training_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Model inputs of a text-sample batch (``image``, ``prompt``, ``target``):
        ``pixel_values``, ``input_ids``, ``attention_mask``, ``labels`` (-100 except on the
        target and eos tokens), ready for ``self.model(**inputs).loss``."""
        return {"pixel_values": self._pixels(batch["image"]), **self.build_inputs(batch["prompt"], batch["target"])}

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            # From the image cache: finished here, on the model's device (mmcl/data/image_cache.py).
            images = self._finish_pixels(images.to(self.device))
        return images.to(self.device, self.dtype)

    # ------------------------------------------------------------------ language modelling
    def target_logits(self, images: torch.Tensor, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, L, V] that predict each next token, labels [B, L], mask [B, L]),
        shifted so that ``logits[:, i]`` predicts ``labels[:, i]``; mask marks target tokens."""
        inputs = self.build_inputs(prompts, targets)
        labels = inputs.pop("labels")
        out = self.model(pixel_values=self._pixels(images), **inputs)
        logits = out.logits[:, :-1]
        labels = labels[:, 1:]
        return logits, labels, labels != -100

    def lm_loss(self, images: torch.Tensor, prompts: list[str], targets: list[str], reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the targets given image and prompt: the mean over all target
        tokens of the batch, or (``reduction="none"``) each sample's mean, Tensor[B]."""
        logits, labels, mask = self.target_logits(images, prompts, targets)
        tok = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none") * mask
        if reduction == "none":
            return tok.sum(1) / mask.sum(1).clamp(min=1)
        return tok.sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompts: list[str], max_new_tokens: int = 20, num_beams: int = 1) -> list[str]:
        """Greedy (or beam) generations, decoded without special tokens and stripped."""
        inputs = self.build_inputs(prompts)
        out = self.model.generate(
            pixel_values=self._pixels(images), **inputs, max_new_tokens=max_new_tokens, num_beams=num_beams,
            do_sample=False, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
        )  # fmt: skip
        n = inputs["input_ids"].shape[1]
        # transformers returns prompt + continuation for these decoder-only models; a
        # version that returns the continuation only is handled too.
        if out.shape[1] >= n and torch.equal(out[:, :n], inputs["input_ids"]):
            out = out[:, n:]
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the vision encoder after its final layer norm, [B, 1 + P, D]
        (index 0 is CLS for both BLIP-2's ViT and LLaVA's CLIP tower)."""
        return self.vision(pixel_values=self._pixels(images)).last_hidden_state


def _random_model(cls, directory: str, dtype: torch.dtype, device: torch.device, kw: dict) -> nn.Module:
    """The model of ``directory``'s config.json with random weights, built on ``device`` in
    ``dtype`` (a 7B model built on the CPU in float32 would take 28 GB and minutes)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, **kw)
    with torch.device(device):
        return cls._from_config(config, dtype=dtype)


def image_transform(spec: BackboneSpec) -> ImageTransform:
    """The transform :func:`load_vlm`'s backbone will have, from the model directory's
    config files, without loading weights (the image cache is built with it)."""
    directory = resolve_model_dir(spec)
    cfg = json.loads((Path(directory) / "config.json").read_text())
    size = int(cfg["vision_config"]["image_size"])
    return ImageTransform(size, *_image_stats(directory))


def load_vlm(spec: BackboneSpec, device: str | torch.device = "cpu") -> VlmBackbone:
    """Load a frozen BLIP-2 / LLaVA and its tokenizer, offline, as ``spec`` says."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    device = torch.device(device)
    directory = resolve_model_dir(spec)
    cls = Blip2ForConditionalGeneration if spec.kind == "blip2" else LlavaForConditionalGeneration
    expected = {"blip2": "blip-2", "llava": "llava"}[spec.kind]
    cfg_file = Path(directory) / "config.json"
    if cfg_file.is_file():
        found = json.loads(cfg_file.read_text()).get("model_type")
        if found != expected:  # before from_pretrained, which would fail with a long list
            raise SpecError(f"run.backbone.kind: {spec.kind!r} but {directory} holds a {found!r} model")
    kw = {"local_files_only": True}
    if spec.cache_dir and spec.path not in (TINY, TINY_PRETRAINED):
        kw["cache_dir"] = spec.cache_dir
    try:
        if spec.random_weights:
            model = _random_model(cls, directory, _dtype(spec.dtype, device), device, kw)
        else:
            model = cls.from_pretrained(directory, dtype=_dtype(spec.dtype, device), **kw)
        tokenizer = AutoTokenizer.from_pretrained(directory, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise SpecError(f"run.backbone.path: cannot load a {spec.kind} model and tokenizer from {directory!r}: {e}") from None
    if getattr(model.config, "model_type", "") != expected:
        raise SpecError(f"run.backbone.kind: {spec.kind!r} but {directory} holds a {model.config.model_type!r} model")
    stats = _image_stats(directory) if Path(directory).is_dir() else (OPENAI_MEAN, OPENAI_STD)
    backbone = VlmBackbone(model, tokenizer, spec.kind, spec.prompt_format, stats)
    return backbone.to(device).freeze()
