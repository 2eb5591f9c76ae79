"""COCO captions and VQAv2 from disk, split into tasks (ECA's main-topic split, or by
question / answer type).

Files, relative to ``run.benchmark.root`` (the names of the official downloads; every
path is an option):

- COCO captions (``coco_caption``): ``annotations/captions_train2014.json`` and
  ``annotations/captions_val2014.json`` (``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``), images in ``train2014/`` and ``val2014/``.
  Training samples are (image, caption) pairs; a test sample is an image with all its
  captions as references (CIDEr).
- VQAv2 (``vqav2``): ``v2_OpenEnded_mscoco_{train,val}2014_questions.json``
  (``{"questions": [{"question_id", "image_id", "question"}]}``) and
  ``v2_mscoco_{train,val}2014_annotations.json`` (``{"annotations": [{"question_id",
  "multiple_choice_answer", "answers": [{"answer"}] x 10, "question_type",
  "answer_type"}]}``); images ``train2014/COCO_train2014_<id:012d>.jpg`` (the pattern is
  an option). Targets are ``multiple_choice_answer``; references the ten answers.

Task split (``split_by``):

- ``main_topic`` (ECA's ToS split): an image's dominant topic is the COCO supercategory
  with the largest total instance area (``topic_by: count``: most instances) in
  ``instances_*.json``, or the ``topic`` column of a CSV manifest (``image_id,topic``).
  Each task (``groups``: task name -> supercategories) gathers the images whose topic is
  in its group. Images keep every caption / question, so a "kitchen" image that also
  shows a person stays in one task while its captions mention both: the semantic overlap
  between tasks ECA studies stays. Images without instances have no topic and are left out.
- ``question_type`` / ``answer_type`` (VQAv2 only): groups list the annotations'
  ``question_type`` strings ("what color is the", "how many" ...) or answer types
  ("yes/no", "number", "other").

Default topic groups (a [choice]: ECA's paper names its tasks by topic, not the exact
supercategory sets): people_animals (person, animal), vehicles_outdoor (vehicle,
outdoor), food_kitchen (food, kitchen), home (furniture, appliance, indoor, electronic),
sports_accessories (sports, accessory).

Nothing is read at import; ``check_data`` opens no image and parses no JSON.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmcl.spec import SpecError

DEFAULT_TOPIC_GROUPS: dict[str, list[str]] = {
    "people_animals": ["person", "animal"],
    "vehicles_outdoor": ["vehicle", "outdoor"],
    "food_kitchen": ["food", "kitchen"],
    "home": ["furniture", "appliance", "indoor", "electronic"],
    "sports_accessories": ["sports", "accessory"],
}
DEFAULT_ANSWER_TYPE_GROUPS: dict[str, list[str]] = {"yes_no": ["yes/no"], "number": ["number"], "other": ["other"]}


class _Split(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split_by: Literal["main_topic"] = "main_topic"
    groups: dict[str, list[str]] | None = None
    topic_by: Literal["area", "count"] = "area"
    # COCO instance annotations of the train / test images (main_topic), or a CSV manifest
    # with columns image_id,topic covering both (wins when set).
    train_instances: str = "annotations/instances_train2014.json"
    test_instances: str = "annotations/instances_val2014.json"
    topic_manifest: str | None = None
    train_images: str = "train2014"
    test_images: str = "val2014"
    # Caps per task (None = all), taken in file order after the split: a fixed subset.
    max_train_per_task: int | None = Field(default=None, ge=1)
    max_test_per_task: int | None = Field(default=None, ge=1)
    # Decode each image once into the node's image cache (mmcl/data/image_cache.py);
    # false decodes on every access. Same model inputs either way.
    image_cache: bool = True
    cache_dir: str | None = None  # default <$MMCL_CACHE or ~/.cache/mmcl>/images, node-local

    @model_validator(mode="after")
    def _groups_disjoint(self):
        seen: dict[str, str] = {}
        for task, values in (self.groups or {}).items():
            if not values:
                raise ValueError(f"groups.{task}: an empty group")
            for v in values:
                if v in seen:
                    raise ValueError(f"groups: {v!r} is in both {seen[v]!r} and {task!r}; a value goes to one task")
                seen[v] = task
        return self

    def task_groups(self) -> dict[str, list[str]]:
        if self.groups:
            return self.groups
        return DEFAULT_ANSWER_TYPE_GROUPS if self.split_by == "answer_type" else DEFAULT_TOPIC_GROUPS


class CocoCaptionOptions(_Split):
    """``run.benchmark.options`` of ``coco_caption``."""

    train_captions: str = "annotations/captions_train2014.json"
    test_captions: str = "annotations/captions_val2014.json"
    # The prompt a captioning sample gives the model ("" = caption from the image alone).
    prompt: str = ""


class Vqav2Options(_Split):
    """``run.benchmark.options`` of ``vqav2``."""

    split_by: Literal["main_topic", "question_type", "answer_type"] = "main_topic"  # type: ignore[assignment]
    train_questions: str = "v2_OpenEnded_mscoco_train2014_questions.json"
    train_annotations: str = "v2_mscoco_train2014_annotations.json"
    test_questions: str = "v2_OpenEnded_mscoco_val2014_questions.json"
    test_annotations: str = "v2_mscoco_val2014_annotations.json"
    # Image file names (VQAv2 gives ids only); {split} is train2014 / val2014.
    image_pattern: str = "COCO_{split}_{image_id:012d}.jpg"

    @model_validator(mode="after")
    def _groups_needed(self):
        if self.split_by == "question_type" and not self.groups:
            raise ValueError("groups: split_by question_type needs groups (task name -> question_type strings)")
        return self


def caption_task_names(options: dict[str, Any]) -> list[str]:
    return list(CocoCaptionOptions.model_validate(options).task_groups())


def vqa_task_names(options: dict[str, Any]) -> list[str]:
    return list(Vqav2Options.model_validate(options).task_groups())


# --------------------------------------------------------------------------- checks


def _base(root: str | None, name: str) -> Path:
    if not root:
        raise SpecError(
            f"run.benchmark.root: the {name} benchmark reads its files from disk; set it to the directory that "
            "holds them (see the README's 'Generation track' section)"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise SpecError(f"run.benchmark.root: {base} is not a directory ({name} reads its files from it)")
    return base


def _need(base: Path, rel: str, what: str, key: str, name: str, is_dir: bool = False) -> str | None:
    p = base / rel
    ok = p.is_dir() if is_dir else p.is_file()
    if ok:
        return None
    kind = "directory" if is_dir else "file"
    return (
        f"{name}: missing {what} {kind} {p} (run.benchmark.options.{key}); download it from the official site "
        f"(cocodataset.org / visualqa.org) into run.benchmark.root, or point the option at its path"
    )


def _check_split(opts: _Split, base: Path, name: str) -> list[str]:
    problems = [
        _need(base, opts.train_images, "train image", "train_images", name, True),
        _need(base, opts.test_images, "test image", "test_images", name, True),
    ]
    if opts.split_by == "main_topic":
        if opts.topic_manifest:
            problems.append(_need(base, opts.topic_manifest, "topic manifest", "topic_manifest", name))
        else:
            problems += [
                _need(base, opts.train_instances, "COCO instances (main-topic split)", "train_instances", name),
                _need(base, opts.test_instances, "COCO instances (main-topic split)", "test_instances", name),
            ]
    return [p for p in problems if p]


def check_caption_data(options: dict[str, Any], root: str | None, tasks: list[str] | None = None) -> None:
    opts = CocoCaptionOptions.model_validate(options)
    base = _base(root, "coco_caption")
    problems = [
        _need(base, opts.train_captions, "captions", "train_captions", "coco_caption"),
        _need(base, opts.test_captions, "captions", "test_captions", "coco_caption"),
    ]
    problems = [p for p in problems if p] + _check_split(opts, base, "coco_caption")
    if problems:
        raise SpecError("\n".join(problems))


def check_vqa_data(options: dict[str, Any], root: str | None, tasks: list[str] | None = None) -> None:
    opts = Vqav2Options.model_validate(options)
    base = _base(root, "vqav2")
    problems = [
        _need(base, getattr(opts, k), "VQAv2 " + k.replace("_", " "), k, "vqav2")
        for k in ("train_questions", "train_annotations", "test_questions", "test_annotations")
    ]
    problems = [p for p in problems if p] + _check_split(opts, base, "vqav2")
    if problems:
        raise SpecError("\n".join(problems))


# --------------------------------------------------------------------------- main topic


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"cannot read {path}: {e}") from None


def main_topics(instances: dict, by: str = "area") -> dict[int, str]:
    """image id -> dominant supercategory (largest total instance area, or most
    instances); ties go to the alphabetically first supercategory."""
    supercat = {c["id"]: c["supercategory"] for c in instances["categories"]}
    weight: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for a in instances["annotations"]:
        weight[a["image_id"]][supercat[a["category_id"]]] += float(a.get("area", 0.0)) if by == "area" else 1.0
    return {img: min(w.items(), key=lambda kv: (-kv[1], kv[0]))[0] for img, w in weight.items()}


def _topics(opts: _Split, base: Path, split: str) -> dict[int, str]:
    if opts.topic_manifest:
        with open(base / opts.topic_manifest, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"image_id", "topic"} <= set(rows[0]):
            raise SpecError(f"{base / opts.topic_manifest}: needs columns image_id,topic (got {', '.join(rows[0])})")
        return {int(r["image_id"]): r["topic"] for r in rows}
    rel = opts.train_instances if split == "train" else opts.test_instances
    return main_topics(_load_json(base / rel), opts.topic_by)


def _assign(groups: dict[str, list[str]]) -> dict[str, str]:
    return {v: task for task, values in groups.items() for v in values}


# --------------------------------------------------------------------------- datasets


class DiskImages:
    """Image files read and transformed on access (indexable like a tensor of images)."""

    def __init__(self, paths: list[Path], preprocess: Any, image_size: int):
        self.paths, self.preprocess, self.image_size = paths, preprocess, image_size
        self.pixels: Any = None  # CachedFiles once attach_cache found the transform splittable

    def __len__(self) -> int:
        return len(self.paths)

    def _transform(self) -> Any:
        if self.preprocess is None:
            from mmcl.backbones.vlm import OPENAI_MEAN, OPENAI_STD, ImageTransform

            self.preprocess = ImageTransform(self.image_size, OPENAI_MEAN, OPENAI_STD)
        return self.preprocess

    def attach_cache(self, opts: "_Split", identity: dict[str, Any], what: str) -> None:
        """Serve the images from the image cache (uint8 pixels the backbone finishes)."""
        if not opts.image_cache or not self.paths:
            return
        from mmcl.data.image_cache import cached_files

        self.pixels = cached_files(self.paths, self._transform(), opts.cache_dir, what, identity)

    def __getitem__(self, i: int):
        if self.pixels is not None:
            return self.pixels[i]
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, FileNotFoundError) as e:
            raise FileNotFoundError(f"cannot read image {path}: {e}") from None
        return self._transform()(img)


def _cap(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


def build_coco_caption(options: dict, image_size: int, seed: int, root=None, preprocess=None, tasks=None, **_: Any):
    from mmcl.data.base import Benchmark, Task, TextTaskDataset

    opts = CocoCaptionOptions.model_validate(options)
    check_caption_data(options, root)
    base = Path(root).expanduser()
    groups = opts.task_groups()
    to_task = _assign(groups)
    per_task: dict[str, dict[str, TextTaskDataset]] = defaultdict(dict)
    for split, caps_rel, img_rel in (("train", opts.train_captions, opts.train_images),
                                     ("test", opts.test_captions, opts.test_images)):  # fmt: skip
        data = _load_json(base / caps_rel)
        files = {im["id"]: im["file_name"] for im in data["images"]}
        caps: dict[int, list[str]] = defaultdict(list)
        for a in data["annotations"]:
            caps[a["image_id"]].append(a["caption"].strip())
        topics = _topics(opts, base, split)
        buckets: dict[str, list[int]] = defaultdict(list)
        for img in files:  # file order: deterministic
            t = to_task.get(topics.get(img, ""))
            if t is not None and caps.get(img):
                buckets[t].append(img)
        for task in groups:
            imgs = buckets.get(task, [])
            if split == "train":
                pairs = _cap([(i, c) for i in imgs for c in caps[i]], opts.max_train_per_task)
                paths = [base / img_rel / files[i] for i, _ in pairs]
                ds = TextTaskDataset(DiskImages(paths, preprocess, image_size), [opts.prompt] * len(pairs),
                                     [c for _, c in pairs], [caps[i] for i, _ in pairs])  # fmt: skip
            else:
                imgs = _cap(imgs, opts.max_test_per_task)
                paths = [base / img_rel / files[i] for i in imgs]
                ds = TextTaskDataset(DiskImages(paths, preprocess, image_size), [opts.prompt] * len(imgs),
                                     [caps[i][0] for i in imgs], [caps[i] for i in imgs])  # fmt: skip
            ds.images.attach_cache(opts, {"benchmark": "coco_caption", "task": task, "split": split, "root": str(base)},
                                   f"COCO {task} {split}")  # fmt: skip
            per_task[task][split] = ds
    out = []
    for task in groups:
        tr, te = per_task[task]["train"], per_task[task]["test"]
        if len(tr) == 0 or len(te) == 0:
            raise SpecError(
                f"coco_caption: task {task!r} (topics {groups[task]}) has {len(tr)} train / {len(te)} test samples; "
                "check run.benchmark.options.groups against the supercategories of the instances file"
            )
        out.append(Task(task, [], [], tr, te, metric="cider", info={"topics": groups[task], "n_train": len(tr), "n_test": len(te)}))
    return Benchmark("coco_caption", out)


def build_vqav2(options: dict, image_size: int, seed: int, root=None, preprocess=None, tasks=None, **_: Any):
    from mmcl.data.base import Benchmark, Task, TextTaskDataset

    opts = Vqav2Options.model_validate(options)
    check_vqa_data(options, root)
    base = Path(root).expanduser()
    groups = opts.task_groups()
    to_task = _assign(groups)
    per_task: dict[str, dict[str, TextTaskDataset]] = defaultdict(dict)
    for split, q_rel, a_rel, img_rel in (
        ("train", opts.train_questions, opts.train_annotations, opts.train_images),
        ("test", opts.test_questions, opts.test_annotations, opts.test_images),
    ):
        questions = _load_json(base / q_rel)["questions"]
        anns = {a["question_id"]: a for a in _load_json(base / a_rel)["annotations"]}
        topics = _topics(opts, base, split) if opts.split_by == "main_topic" else {}
        folder = Path(img_rel).name
        rows: dict[str, list[tuple[int, str, str, list[str]]]] = defaultdict(list)
        for q in questions:
            a = anns.get(q["question_id"])
            if a is None:
                raise SpecError(f"{base / a_rel}: no annotation for question {q['question_id']} of {base / q_rel}")
            key = {"main_topic": topics.get(q["image_id"], ""), "question_type": a.get("question_type", ""),
                   "answer_type": a.get("answer_type", "")}[opts.split_by]  # fmt: skip
            t = to_task.get(key)
            if t is not None:
                rows[t].append((q["image_id"], q["question"], a["multiple_choice_answer"], [x["answer"] for x in a["answers"]]))
        for task in groups:
            r = _cap(rows.get(task, []), opts.max_train_per_task if split == "train" else opts.max_test_per_task)
            paths = [base / img_rel / opts.image_pattern.format(split=folder, image_id=i) for i, *_ in r]
            images = DiskImages(paths, preprocess, image_size)
            images.attach_cache(opts, {"benchmark": "vqav2", "task": task, "split": split, "root": str(base)},
                                f"VQAv2 {task} {split}")  # fmt: skip
            per_task[task][split] = TextTaskDataset(images, [x[1] for x in r], [x[2] for x in r], [x[3] for x in r])
    out = []
    for task in groups:
        tr, te = per_task[task]["train"], per_task[task]["test"]
        if len(tr) == 0 or len(te) == 0:
            raise SpecError(
                f"vqav2: task {task!r} ({opts.split_by} {groups[task]}) has {len(tr)} train / {len(te)} test questions; "
                "check run.benchmark.options.groups"
            )
        out.append(Task(task, [], [], tr, te, metric="vqa_acc", info={opts.split_by: groups[task], "n_train": len(tr), "n_test": len(te)}))
    return Benchmark("vqav2", out)
