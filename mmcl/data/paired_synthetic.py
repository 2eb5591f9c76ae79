"""``paired_synthetic``: an offline, generated audio-visual event benchmark.

Eight event classes. Each is a (visual, audio) pair: the video shows one object whose
shape and colour is one of 4 looks (frames from the project's scene generator; the object
jitters between frames), the audio is one of 4 sounds (steady tone, rising chirp, pulsed
tone, modulated chord). Class k = (look k % 4, sound k // 2), so neither modality alone
names the class: the look is shared by classes k and k + 4, the sound by classes 2j and
2j + 1. A model has to combine the two streams.

Protocols (:mod:`mmcl.data.paired`): ``cil`` cuts the 8 classes into groups of
``classes_per_task`` (clean domain); ``dil`` makes one task per entry of ``domains``
(corruptions of both streams: white / pink noise, mains hum, babble), all 8 classes each.

Everything is generated with torch from explicit generators (same options, same
tensors); the default benchmark takes a few seconds, mostly the AST filterbanks.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from mmcl.data.base import Benchmark
from mmcl.data.paired import DOMAINS, PairedDataset, ProtocolOptions, cil_task_names, corrupt, make_tasks
from mmcl.spec import SpecError

LOOKS = [("circle", "red"), ("square", "green"), ("triangle", "blue"), ("cross", "yellow")]
SOUNDS = ["steady tone", "rising chirp", "pulsed tone", "modulated chord"]
CLASS_NAMES = [f"{LOOKS[k % 4][1]} {LOOKS[k % 4][0]} + {SOUNDS[k // 2]}" for k in range(8)]
MODALITIES = {"video": "video", "audio": "audio"}  # sample key -> raw kind


class PairedSyntheticOptions(ProtocolOptions):
    """``run.benchmark.options`` of ``paired_synthetic``."""

    domains: list[str] = Field(default_factory=lambda: ["clean", "white", "hum", "babble"])
    n_train_per_class: int = Field(default=40, ge=1)
    n_test_per_class: int = Field(default=20, ge=1)
    frames: int = Field(default=2, ge=1)
    duration_s: float = Field(default=0.5, gt=0.05, le=10)
    data_seed: int = 0

    @field_validator("domains")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [d for d in v if d not in DOMAINS]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"domains must be distinct names among {', '.join(DOMAINS)} (got {v})")
        return v


def task_names(options: dict) -> list[str]:
    opts = PairedSyntheticOptions.model_validate(options)
    if opts.protocol == "cil":
        return cil_task_names(len(CLASS_NAMES), opts.classes_per_task)
    return list(opts.domains)


def sounds(kind: torch.Tensor, sr: int, length: int, g: torch.Generator) -> torch.Tensor:
    """Waveforms [N, length] in [-1, 1] of the given sound kinds (with random jitter)."""
    n = len(kind)
    t = (torch.arange(length, dtype=torch.float32) / sr)[None]
    jit = 1.0 + 0.08 * (2 * torch.rand(n, 1, generator=g) - 1)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    amp = 0.3 + 0.3 * torch.rand(n, 1, generator=g)
    dur = length / sr
    steady = torch.sin(2 * math.pi * 440.0 * jit * t + phase)
    # Linear chirp 300 -> 1500 Hz: phase = 2 pi (f0 t + (f1 - f0) t^2 / (2 dur)).
    chirp = torch.sin(2 * math.pi * jit * (300.0 * t + 1200.0 * t * t / (2 * dur)) + phase)
    pulsed = torch.sin(2 * math.pi * 1000.0 * jit * t + phase) * (torch.sin(2 * math.pi * 8.0 * t) > 0).float()
    chord = (torch.sin(2 * math.pi * 600.0 * jit * t) + torch.sin(2 * math.pi * 900.0 * jit * t + phase)) * 0.5
    chord = chord * (0.6 + 0.4 * torch.sin(2 * math.pi * 5.0 * t))
    all_s = torch.stack([steady, chirp, pulsed, chord], 1)  # [N, 4, L]
    return amp * all_s.gather(1, kind.view(n, 1, 1).expand(n, 1, length))[:, 0]


def clips(labels: torch.Tensor, frames: int, image_size: int, sr: int, length: int, g: torch.Generator):
    """Raw clips of the given classes: frames [N, T, 3, S, S] in [0, 1], waves [N, L]."""
    from mmcl.data.synthetic import BASE_DOMAIN, COLORS, SHAPES, render, sample_scenes, single_thread

    look = labels % 4
    shape = torch.tensor([SHAPES.index(LOOKS[i][0]) for i in range(4)])[look]
    color = torch.tensor([COLORS.index(LOOKS[i][1]) for i in range(4)])[look]
    with single_thread():
        scenes = sample_scenes(g, len(labels), "shape", shape)
        scenes.color = color
        # The renderer jitters object positions per call: successive frames of a clip move.
        video = torch.stack([render(scenes, BASE_DOMAIN, g, image_size) for _ in range(frames)], 1)
    return video, sounds(labels // 2, sr, length, g)


def build_paired_synthetic(options: dict, image_size: int, seed: int, preprocess=None, root=None) -> Benchmark:
    """Builder of ``paired_synthetic``; ``preprocess`` (a PairedPreprocess) turns raw clips
    into encoder inputs (None: raw frames in [0, 1] and waveforms at 16 kHz)."""
    from mmcl.data.synthetic import hash_seed, single_thread

    opts = PairedSyntheticOptions.model_validate(options)
    where = "run.benchmark.options"
    if preprocess is not None:
        missing = [m for m in MODALITIES if preprocess.kinds.get(m) != MODALITIES[m]]
        if missing:
            raise SpecError(
                f"run.backbone.encoders: paired_synthetic provides 'video' (frames) and 'audio' (waveform); "
                f"the backbone has {preprocess.kinds}; name an open_clip_vision encoder 'video' and an ast encoder 'audio'"
            )
        sr = preprocess.sampling_rate("audio")
    else:
        sr = 16000
    length = int(round(opts.duration_s * sr))
    domains = opts.domains if opts.protocol == "dil" else opts.domains[:1]
    splits = []
    for split, per_class in ((0, opts.n_train_per_class), (1, opts.n_test_per_class)):
        vids, waves, labels, doms = [], [], [], []
        for d, dname in enumerate(domains):
            g = torch.Generator().manual_seed(hash_seed(seed + opts.data_seed, d, split))
            lab = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
            lab = lab[torch.randperm(len(lab), generator=g)]
            v, w = clips(lab, opts.frames, image_size, sr, length, g)
            with single_thread():
                v, w = corrupt(dname, v, w, sr, g)
            vids.append(v), waves.append(w), labels.append(lab), doms.append(torch.full((len(lab),), d))
        video, wave = torch.cat(vids), torch.cat(waves)
        if preprocess is not None:
            video, wave = preprocess.video("video", video), preprocess.audio("audio", wave)
        splits.append(PairedDataset({"video": video, "audio": wave}, torch.cat(labels), torch.cat(doms)))
    tasks = make_tasks(splits[0], splits[1], CLASS_NAMES, domains, opts, where, {"benchmark": "paired_synthetic"})
    return Benchmark("paired_synthetic", tasks)
