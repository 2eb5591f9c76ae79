"""Frozen per-modality encoders for paired sensory streams (audio + video).

:func:`load_paired_backbone` builds one real encoder per modality of a
:class:`~mmcl.spec.PairedBackboneSpec`:

- ``open_clip_vision``: the image tower of an open_clip CLIP (loaded through
  :func:`mmcl.backbones.clip.load_backbone`, so every weight option of the CLIP track
  works); a clip's frames go through it one by one and the per-frame embeddings are
  averaged over time;
- ``ast``: a transformers ``ASTModel`` from ``from_pretrained`` on a local directory or a
  hub id already in the Hugging Face cache, or randomly initialised from a config.

Methods that insert modules between layers (CMA's adapters) need more than a forward:
every encoder is wrapped in a :class:`ModalityEncoder` that exposes ``embed`` (tokens
before the first layer), ``layer(i, h)`` and ``pool``, with tokens always shaped
``[batch, tokens, width]`` (a video's frames are laid side by side in the token axis).

The samples a paired benchmark produces are already in each encoder's input format;
:class:`PairedPreprocess` is how the benchmark gets there from raw frames and waveforms
(CLIP's resize + normalisation; AST's Kaldi-style filterbank via ``ASTFeatureExtractor``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.spec import ASTEncoderSpec, BackboneSpec, ClipVisionEncoderSpec, PairedBackboneSpec, SpecError


class ModalityEncoder(nn.Module):
    """Layer-by-layer access to one frozen transformer encoder."""

    raw_kind: str = ""  # what the benchmark must provide: "video" (frames) or "audio" (waveform)
    num_layers: int
    width: int
    out_dim: int

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for i in range(self.num_layers):
            h = self.layer(i, h)
        return self.pool(h)


class ClipVideoEncoder(ModalityEncoder):
    """open_clip's VisionTransformer over the frames of a clip: input [N, T, 3, S, S]."""

    raw_kind = "video"

    def __init__(self, visual: nn.Module, mean: tuple, std: tuple):
        super().__init__()
        tr = visual.transformer
        if not getattr(tr, "batch_first", True):
            raise SpecError("open_clip_vision: only batch-first vision transformers are supported")
        self.visual = visual
        self.num_layers = len(tr.resblocks)
        self.width = int(tr.width)
        self.out_dim = int(visual.output_dim)
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean, self.std = tuple(mean), tuple(std)
        self._frames = 1

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"video input must be [batch, frames, 3, H, W], got shape {tuple(x.shape)}")
        n, t = x.shape[:2]
        self._frames = t
        h = self.visual._embeds(x.flatten(0, 1))  # [N*T, L, D]
        return h.reshape(n, t * h.shape[1], h.shape[2])

    def _per_frame(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        return h.reshape(n * self._frames, h.shape[1] // self._frames, h.shape[2])

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        # Frames attend within themselves, as the image model was trained; only adapters
        # (outside this call) mix information across frames and modalities.
        n = h.shape[0]
        out = self.visual.transformer.resblocks[i](self._per_frame(h))
        return out.reshape(n, h.shape[1], h.shape[2])

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        pooled, _ = self.visual._pool(self._per_frame(h))
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled.reshape(n, self._frames, -1).mean(1)


class ASTAudioEncoder(ModalityEncoder):
    """transformers' ASTModel: input [N, max_length, num_mel_bins] filterbank features."""

    raw_kind = "audio"

    def __init__(self, model: nn.Module, feature_extractor: Any, sampling_rate: int):
        super().__init__()
        self.model = model
        # transformers 5 keeps the blocks in `layers`; 4.x in `encoder.layer`.
        layers = getattr(model, "layers", None)
        self.blocks = layers if layers is not None else model.encoder.layer
        self.num_layers = len(self.blocks)
        self.width = self.out_dim = int(model.config.hidden_size)
        self.feature_extractor = feature_extractor
        self.sampling_rate = sampling_rate

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(x)

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out = self.blocks[i](h, None)
        return out[0] if isinstance(out, tuple) else out

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        # ASTModel's own pooler: the mean of the [CLS] and distillation tokens.
        h = self.model.layernorm(h)
        return (h[:, 0] + h[:, 1]) / 2


class PairedPreprocess:
    """Raw modality data -> encoder inputs, for benchmarks read from disk or generated.

    ``video(frames)``: float [N, T, 3, H, W] in [0, 1] -> [N, T, 3, S, S] resized (short
    side to S, centre crop) and normalised with the CLIP's mean / std.
    ``audio(waves)``: float [N, samples] at ``sampling_rate`` -> [N, max_length, mel bins].
    """

    def __init__(self, encoders: dict[str, ModalityEncoder]):
        self.kinds = {m: e.raw_kind for m, e in encoders.items()}
        self._enc = encoders
        key = []
        for m, e in sorted(encoders.items()):
            if isinstance(e, ClipVideoEncoder):
                key.append((m, "video", e.image_size, e.mean, e.std))
            else:
                fe = e.feature_extractor
                key.append((m, "audio", e.sampling_rate, fe.num_mel_bins, fe.max_length, fe.do_normalize, fe.mean, fe.std))
        self.cache_key = json.dumps(key)

    def sampling_rate(self, modality: str) -> int:
        return self._enc[modality].sampling_rate  # type: ignore[attr-defined]

    def image_size(self, modality: str) -> int:
        return self._enc[modality].image_size  # type: ignore[attr-defined]

    def video(self, modality: str, frames: torch.Tensor) -> torch.Tensor:
        e = self._enc[modality]
        n, t, c, h, w = frames.shape
        s = e.image_size
        x = frames.reshape(n * t, c, h, w).float()
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[:, :, top : top + s, left : left + s]
        mean = torch.tensor(e.mean).view(1, 3, 1, 1)
        std = torch.tensor(e.std).view(1, 3, 1, 1)
        return ((x.clamp(0, 1) - mean) / std).reshape(n, t, c, s, s).contiguous()

    def audio(self, modality: str, waves: torch.Tensor) -> torch.Tensor:
        e = self._enc[modality]
        arrays = [w.float().numpy() for w in waves]
        out = e.feature_extractor(arrays, sampling_rate=e.sampling_rate, return_tensors="pt")  # type: ignore[attr-defined]
        return out["input_values"].float().contiguous()


class PairedBackbone(nn.Module):
    """One frozen :class:`ModalityEncoder` per modality (``encoders[name]``)."""

    def __init__(self, encoders: dict[str, ModalityEncoder]):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.modalities: list[str] = list(encoders)
        self.preprocess = PairedPreprocess(encoders)
        sizes = [e.image_size for e in encoders.values() if isinstance(e, ClipVideoEncoder)]
        self.image_size: int | None = sizes[0] if sizes else None
        # An MM encoder has as many blocks as the shallowest modality encoder has layers.
        self.num_blocks = min(e.num_layers for e in encoders.values())

    def block_layers(self, modality: str) -> list[int]:
        """For each MM block b, the layer of ``modality`` after which block b's adapter sits:
        evenly spaced over a deeper encoder, ending at its last layer."""
        n, b = self.encoders[modality].num_layers, self.num_blocks
        return [round((i + 1) * n / b) - 1 for i in range(b)]

    def freeze(self) -> "PairedBackbone":
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        return self

    def clear_text_cache(self) -> None:  # the CLIP track's hook; no text heads here
        pass

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """Pooled features per modality, no adapters: {modality: [N, out_dim]}."""
        return {m: e(batch[m]) for m, e in self.encoders.items()}

    def train(self, mode: bool = True) -> "PairedBackbone":
        # Frozen encoders stay in eval mode (dropout off) whatever a caller asks.
        return super().train(False)


# --------------------------------------------------------------------------- loading


def _load_clip_vision(name: str, spec: ClipVisionEncoderSpec, cache_dir: str | None, device) -> ClipVideoEncoder:
    from mmcl.backbones.clip import load_backbone

    key = f"run.backbone.encoders.{name}"
    try:
        clip = load_backbone(
            BackboneSpec(model=spec.model, pretrained=spec.pretrained, checkpoint=spec.checkpoint, cache_dir=cache_dir),
            device,
        )
    except SpecError as e:
        raise SpecError(str(e).replace("run.backbone.", f"{key}.")) from None
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for t in getattr(clip.preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            mean, std = tuple(float(x) for x in t.mean), tuple(float(x) for x in t.std)
    return ClipVideoEncoder(clip.model.visual, mean, std)


def _is_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def _load_ast(name: str, spec: ASTEncoderSpec, device) -> ASTAudioEncoder:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    key = f"run.backbone.encoders.{name}"
    fe = None
    if spec.path is None:
        try:
            config = ASTConfig(**spec.config)
        except (TypeError, ValueError) as e:
            raise SpecError(f"{key}.config: not a valid ASTConfig ({e})") from None
        # A fixed seed: every trial of a study gets the same random "pretrained" encoder.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = ASTModel(config)
    else:
        source = spec.path
        if _is_local(source):
            p = Path(source).expanduser()
            if not p.is_dir() or not (p / "config.json").exists():
                raise SpecError(
                    f"{key}.path: {p} is not a saved transformers model directory (needs config.json and "
                    "weights, as written by save_pretrained)"
                )
            source = str(p)
        try:
            model = ASTModel.from_pretrained(source, cache_dir=spec.cache_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise SpecError(
                f"{key}.path: cannot load an ASTModel from {spec.path!r} without downloading ({e}); "
                "give a local directory or a hub id already in the Hugging Face cache (cache_dir)"
            ) from None
        if spec.config:
            raise SpecError(f"{key}.config: give 'path' or 'config', not both")
        try:
            fe = ASTFeatureExtractor.from_pretrained(source, cache_dir=spec.cache_dir, local_files_only=True)
        except (OSError, ValueError):
            fe = None  # no preprocessor_config.json: derive it from the model config below
    cfg = model.config
    if fe is None:
        fe = ASTFeatureExtractor(num_mel_bins=cfg.num_mel_bins, max_length=cfg.max_length, sampling_rate=spec.sampling_rate)
    if fe.num_mel_bins != cfg.num_mel_bins or fe.max_length != cfg.max_length:
        raise SpecError(
            f"{key}.path: preprocessor_config.json ({fe.num_mel_bins} mel bins, {fe.max_length} frames) does not "
            f"match the model ({cfg.num_mel_bins}, {cfg.max_length})"
        )
    if fe.sampling_rate != spec.sampling_rate:
        raise SpecError(
            f"{key}.sampling_rate: {spec.sampling_rate} but the model's feature extractor expects "
            f"{fe.sampling_rate}; set sampling_rate: {fe.sampling_rate}"
        )
    return ASTAudioEncoder(model.to(device), fe, spec.sampling_rate)


def load_paired_backbone(spec: PairedBackboneSpec, device: str | torch.device = "cpu") -> PairedBackbone:
    encoders: dict[str, ModalityEncoder] = {}
    for name, enc in spec.encoders.items():
        if isinstance(enc, ClipVisionEncoderSpec):
            encoders[name] = _load_clip_vision(name, enc, spec.cache_dir, device)
        else:
            encoders[name] = _load_ast(name, enc, device)
    return PairedBackbone(encoders).to(device).freeze()
