"""``synthetic_text``: an offline, generated captioning + open-ended VQA task stream.

The scenes and domains of :mod:`mmcl.data.synthetic` (shapes, colours, patterns, counts
drawn in a per-task visual domain), with text targets instead of class labels:

- ``captions`` (metric ``cider``): "a red ring on a striped background", "two blue
  squares on a plain background"; five reference phrasings per image (with / without the
  background, "a photo of ...", ...); trains on the first.
- ``color_qa``, ``shape_qa``, ``count_qa``, ``pattern_qa`` (metric ``vqa_acc``): "what
  colour is the shape?" -> "red"; ten identical human answers per question.

Each task keeps its own domain, so tasks differ in what is asked and in how the pixels
look, and answers of one task are words another task's captions use (semantic overlap,
as between COCO topics). The whole default stream builds in about a second and the
generation track (engine, metrics, baselines) runs on a CPU in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmcl.data.base import Benchmark, Task, TextTaskDataset
from mmcl.data.synthetic import (
    COLORS,
    COUNTS,
    PATTERNS,
    SHAPE_PLURALS,
    SHAPES,
    TASKS,
    Domain,
    Scenes,
    hash_seed,
    normalize,
    render,
    sample_scenes,
    single_thread,
)

GENERATOR_VERSION = "synthetic-text-v1"


@dataclass(frozen=True)
class TextTaskDef:
    name: str
    metric: str  # "cider" or "vqa_acc"
    factor: str | None  # the factor a question asks about (None: captions)
    question: str  # the prompt ("" for captions)
    domain: Domain


TEXT_TASKS: tuple[TextTaskDef, ...] = (
    TextTaskDef("captions", "cider", None, "", TASKS[1].domain),
    TextTaskDef("color_qa", "vqa_acc", "color", "what colour is the shape?", TASKS[0].domain),
    TextTaskDef("shape_qa", "vqa_acc", "shape", "what shape is it?", TASKS[2].domain),
    TextTaskDef("count_qa", "vqa_acc", "count", "how many shapes are there?", TASKS[4].domain),
    TextTaskDef("pattern_qa", "vqa_acc", "pattern", "what is the background?", TASKS[3].domain),
)
TASK_NAMES: list[str] = [t.name for t in TEXT_TASKS]
_VALUES = {"color": COLORS, "shape": SHAPES, "count": COUNTS, "pattern": PATTERNS}


class SyntheticTextOptions(BaseModel):
    """``run.benchmark.options`` of ``synthetic_text``."""

    model_config = ConfigDict(extra="forbid")

    n_train: int = Field(default=96, ge=1)  # samples per task
    n_test: int = Field(default=48, ge=1)
    data_seed: int = 0
    image_size: int | None = Field(default=None, ge=8)


def _captions(scenes: Scenes, i: int) -> list[str]:
    """Five references of scene ``i``; the first is the training target."""
    count = int(scenes.count[i])
    colour, pattern = COLORS[int(scenes.color[i])], PATTERNS[int(scenes.pattern[i])]
    noun = SHAPE_PLURALS[int(scenes.shape[i])] if count else SHAPES[int(scenes.shape[i])]
    det = COUNTS[count] if count else "a"
    bg = f"on a {pattern} background"
    return [
        f"{det} {colour} {noun} {bg}",
        f"a photo of {det} {colour} {noun} {bg}",
        f"{det} {colour} {noun}",
        f"{det} {noun} {bg}",
        f"an image of {det} {colour} {noun}",
    ]


def _answer(tdef: TextTaskDef, scenes: Scenes, i: int) -> str:
    return _VALUES[tdef.factor][int(getattr(scenes, tdef.factor)[i])]  # type: ignore[index]


def _split(tdef: TextTaskDef, n: int, g: torch.Generator, image_size: int) -> TextTaskDataset:
    if tdef.factor is None:
        scenes = sample_scenes(g, n, p_single=0.5)
    else:
        # Balanced answers: every value of the factor equally often, in random order.
        k = len(_VALUES[tdef.factor])
        labels = torch.arange(n) % k
        labels = labels[torch.randperm(n, generator=g)]
        scenes = sample_scenes(g, n, tdef.factor, labels)
    images = normalize(render(scenes, tdef.domain, g, image_size)).contiguous()
    prompts, targets, refs = [], [], []
    for i in range(n):
        if tdef.factor is None:
            r = _captions(scenes, i)
        else:
            r = [_answer(tdef, scenes, i)] * 10
        prompts.append(tdef.question)
        targets.append(r[0])
        refs.append(r)
    return TextTaskDataset(images, prompts, targets, refs)


def build_synthetic_text(options: dict, image_size: int, seed: int, **_disk: object) -> Benchmark:
    """Builder of ``synthetic_text`` (see :class:`SyntheticTextOptions`)."""
    opts = SyntheticTextOptions.model_validate(options)
    size = opts.image_size or image_size
    tasks = []
    for ti, tdef in enumerate(TEXT_TASKS):
        # Own streams per (task, split), separate from the classification benchmark's.
        g_train = torch.Generator().manual_seed(hash_seed(seed + opts.data_seed, 1000 + ti, 0))
        g_test = torch.Generator().manual_seed(hash_seed(seed + opts.data_seed, 1000 + ti, 1))
        with single_thread():
            train = _split(tdef, opts.n_train, g_train, size)
            test = _split(tdef, opts.n_test, g_test, size)
        tasks.append(
            Task(
                name=tdef.name,
                classnames=[],
                templates=[],
                train=train,
                test=test,
                metric=tdef.metric,
                info={"question": tdef.question, "domain": tdef.domain.description, "n_train": len(train),
                      "n_test": len(test), "image_size": size},
            )
        )
    return Benchmark("synthetic_text", tasks)


def corpus() -> list[str]:
    """Every string the benchmark can produce (prompts, captions, answers): what the tiny
    models' tokenizer is trained on, so it never meets an unknown word here."""
    texts = [t.question for t in TEXT_TASKS if t.question]
    for values in _VALUES.values():
        texts.extend(values)
    n = len(SHAPES) * len(COLORS) * len(PATTERNS) * len(COUNTS)
    idx = torch.arange(n)
    shape, rest = idx % len(SHAPES), idx // len(SHAPES)
    color, rest = rest % len(COLORS), rest // len(COLORS)
    pattern, count = rest % len(PATTERNS), rest // len(PATTERNS)
    scenes = Scenes(shape, color, pattern, count, torch.full((n,), -1), torch.full((n,), -1))
    for i in range(n):
        texts.extend(_captions(scenes, i))
    return texts
