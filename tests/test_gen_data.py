"""Generation-track data: the generated caption / VQA stream, COCO captions and VQAv2 read
from tiny JSON + image trees written here, the main-topic split, and the data check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmcl.data import benchmark_task_names, build_benchmark, check_benchmark_data, clear_cache
from mmcl.data.base import collate
from mmcl.data.coco import main_topics
from mmcl.spec import BenchmarkSpec, SpecError

# --------------------------------------------------------------------------- synthetic_text


def test_synthetic_text_tasks_metrics_and_determinism():
    spec = BenchmarkSpec(name="synthetic_text", options={"n_train": 10, "n_test": 6})
    assert benchmark_task_names(spec) == ["captions", "color_qa", "shape_qa", "count_qa", "pattern_qa"]
    a = build_benchmark(spec, image_size=32)
    clear_cache()
    b = build_benchmark(spec, image_size=32)
    assert [t.metric for t in a.tasks] == ["cider", "vqa_acc", "vqa_acc", "vqa_acc", "vqa_acc"]
    for ta, tb in zip(a.tasks, b.tasks):
        assert torch.equal(ta.test.images, tb.test.images) and ta.test.targets == tb.test.targets
    cap = a.tasks[0].train[0]
    assert cap["prompt"] == "" and cap["target"] == cap["refs"][0] and len(cap["refs"]) == 5
    assert cap["target"].endswith("background") and cap["image"].shape == (3, 32, 32)
    qa = a.tasks[1].test[0]
    assert qa["prompt"] == "what colour is the shape?" and qa["refs"] == [qa["target"]] * 10
    # Balanced answers on a VQA task; collate keeps reference lists whole.
    answers = [s["target"] for s in a.tasks[1].train]
    assert len(set(answers)) == 6
    batch = collate([a.tasks[0].test[i] for i in range(3)])
    assert isinstance(batch["prompt"], list) and len(batch["refs"]) == 3 and len(batch["refs"][0]) == 5
    assert batch["image"].shape == (3, 3, 32, 32)


def test_tiny_tokenizer_knows_every_word_of_the_benchmark():
    from mmcl.backbones.vlm import tiny_tokenizer

    tok = tiny_tokenizer()
    bench = build_benchmark(BenchmarkSpec(name="synthetic_text", options={"n_train": 20, "n_test": 4}), image_size=32)
    texts = [s["prompt"] + " " + " ".join(s["refs"]) for t in bench.tasks for s in t.train]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in {i for row in ids for i in row}
    assert tok.decode(tok("a red ring on a striped background", add_special_tokens=False)["input_ids"]) == (
        "a red ring on a striped background"
    )


# --------------------------------------------------------------------------- COCO tree

CATS = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 52, "name": "banana", "supercategory": "food"},
]


def _write_split(root: Path, split: str, images: dict[int, list[tuple[int, float]]], captions: dict[int, list[str]]):
    from PIL import Image

    folder = root / f"{split}2014"
    folder.mkdir(parents=True, exist_ok=True)
    ann = root / "annotations"
    ann.mkdir(exist_ok=True)
    imgs = []
    for i, img_id in enumerate(images):
        name = f"COCO_{split}2014_{img_id:012d}.jpg"
        Image.new("RGB", (40 + i, 30), (10 * i, 100, 200)).save(folder / name)
        imgs.append({"id": img_id, "file_name": name, "width": 40 + i, "height": 30})
    caps = [{"id": k, "image_id": img, "caption": c} for k, (img, c) in enumerate((i, c) for i in captions for c in captions[i])]
    (ann / f"captions_{split}2014.json").write_text(json.dumps({"images": imgs, "annotations": caps}))
    inst = [{"id": k, "image_id": img, "category_id": cat, "area": area, "bbox": [0, 0, 1, 1], "iscrowd": 0}
            for k, (img, cat, area) in enumerate((i, c, a) for i in images for c, a in images[i])]  # fmt: skip
    (ann / f"instances_{split}2014.json").write_text(json.dumps({"images": imgs, "annotations": inst, "categories": CATS}))


# image id -> instances (category, area). 1: one big dog beats two small people (area);
# by count the people win. 2: car. 3: banana. 4: no instances (no topic). 5: person.
TRAIN = {1: [(1, 10.0), (1, 10.0), (18, 500.0)], 2: [(3, 50.0)], 3: [(52, 20.0)], 4: [], 5: [(1, 80.0)]}
TEST = {11: [(18, 30.0)], 12: [(3, 60.0), (1, 5.0)], 13: [(52, 9.0)]}
GROUPS = {"living": ["person", "animal"], "street": ["vehicle"], "food": ["food"]}


@pytest.fixture()
def coco_root(tmp_path):
    train_caps = {i: [f"caption {k} of image {i}" for k in range(2)] for i in TRAIN}
    test_caps = {i: [f"caption {k} of test image {i}" for k in range(5)] for i in TEST}
    _write_split(tmp_path, "train", TRAIN, train_caps)
    _write_split(tmp_path, "val", TEST, test_caps)
    return tmp_path


def test_main_topic_by_area_and_by_count(coco_root):
    inst = json.loads((coco_root / "annotations" / "instances_train2014.json").read_text())
    by_area, by_count = main_topics(inst, "area"), main_topics(inst, "count")
    assert by_area == {1: "animal", 2: "vehicle", 3: "food", 5: "person"}  # image 4: no instances
    assert by_count[1] == "person"


def test_coco_captions_main_topic_split(coco_root):
    from mmcl.backbones.vlm import ImageTransform

    clear_cache()
    spec = BenchmarkSpec(name="coco_caption", root=str(coco_root), options={"groups": GROUPS})
    assert benchmark_task_names(spec) == ["living", "street", "food"]
    check_benchmark_data(spec)
    bench = build_benchmark(spec, image_size=24, preprocess=ImageTransform(24, (0.5,) * 3, (0.5,) * 3))
    living, street, food = bench.tasks
    assert all(t.metric == "cider" for t in bench.tasks)
    # living: images 1 (animal by area) and 5 (person), two captions each -> 4 training pairs.
    assert sorted(living.train.targets) == sorted([f"caption {k} of image {i}" for i in (1, 5) for k in range(2)])
    assert len(street.train) == 2 and len(food.train) == 2
    # Test samples are images with all five references.
    s = living.test[0]
    assert s["refs"] == [f"caption {k} of test image 11" for k in range(5)] and s["image"].shape == (3, 24, 24)
    # By count, image 1 still goes to living (person is in the same group): the split is by group.
    clear_cache()
    spec2 = BenchmarkSpec(name="coco_caption", root=str(coco_root), options={"groups": {"people": ["person"], "rest": ["animal", "vehicle", "food"]}, "topic_by": "count"})
    people, rest = build_benchmark(spec2, image_size=24).tasks
    assert {t.split(" of image ")[1] for t in people.train.targets} == {"1", "5"}


def test_topic_manifest_overrides_instances(coco_root):
    (coco_root / "topics.csv").write_text("image_id,topic\n1,food\n2,food\n3,food\n5,vehicle\n11,food\n12,vehicle\n13,food\n")
    clear_cache()
    spec = BenchmarkSpec(name="coco_caption", root=str(coco_root),
                         options={"groups": {"street": ["vehicle"], "food": ["food"]}, "topic_manifest": "topics.csv"})  # fmt: skip
    street, food = build_benchmark(spec, image_size=24).tasks
    assert len(food.train) == 6 and len(street.train) == 2 and len(street.test) == 1


def test_missing_files_name_dataset_path_and_fix(coco_root, tmp_path):
    (coco_root / "annotations" / "instances_val2014.json").unlink()
    spec = BenchmarkSpec(name="coco_caption", root=str(coco_root), options={"groups": GROUPS})
    with pytest.raises(SpecError) as e:
        check_benchmark_data(spec)
    msg = str(e.value)
    assert "coco_caption" in msg and "instances_val2014.json" in msg and "test_instances" in msg and "download" in msg
    with pytest.raises(SpecError, match="run.benchmark.root"):
        check_benchmark_data(BenchmarkSpec(name="vqav2"))
    with pytest.raises(SpecError, match="v2_OpenEnded_mscoco_train2014_questions.json"):
        check_benchmark_data(BenchmarkSpec(name="vqav2", root=str(coco_root)))
    with pytest.raises(SpecError, match="question_type needs groups"):
        benchmark_task_names(BenchmarkSpec(name="vqav2", options={"split_by": "question_type"}))
    with pytest.raises(SpecError, match="in both"):
        benchmark_task_names(BenchmarkSpec(name="coco_caption", options={"groups": {"a": ["food"], "b": ["food"]}}))


def _write_vqa(root: Path, split: str, rows: list[tuple[int, int, str, str, list[str]]]):
    qs = [{"question_id": q, "image_id": img, "question": text} for q, img, text, _, _ in rows]
    anns = [{"question_id": q, "image_id": img, "question_type": qt, "answer_type": "other",
             "multiple_choice_answer": ans[0], "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(ans)]}
            for q, img, text, qt, ans in rows]  # fmt: skip
    (root / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps({"questions": qs}))
    (root / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps({"annotations": anns}))


def test_vqav2_question_type_and_main_topic_splits(coco_root):
    ten = lambda a: [a] * 10  # noqa: E731
    _write_vqa(coco_root, "train", [(100, 1, "what color is the dog?", "what color is the", ten("brown")),
                                    (101, 2, "how many cars?", "how many", ten("2")),
                                    (102, 3, "what color is the fruit?", "what color is the", ten("yellow"))])  # fmt: skip
    _write_vqa(coco_root, "val", [(200, 11, "what color is the dog?", "what color is the", ["white"] * 9 + ["grey"]),
                                  (201, 12, "how many cars?", "how many", ten("1"))])  # fmt: skip
    clear_cache()
    groups = {"color": ["what color is the"], "count": ["how many"]}
    spec = BenchmarkSpec(name="vqav2", root=str(coco_root), options={"split_by": "question_type", "groups": groups})
    check_benchmark_data(spec)
    color, count = build_benchmark(spec, image_size=16).tasks
    assert color.metric == "vqa_acc" and color.train.targets == ["brown", "yellow"] and count.train.prompts == ["how many cars?"]
    s = color.test[0]
    assert s["target"] == "white" and len(s["refs"]) == 10 and s["image"].shape == (3, 16, 16)
    clear_cache()
    topic = BenchmarkSpec(name="vqav2", root=str(coco_root), options={"groups": {"living": ["animal", "person"], "street": ["vehicle"]}})
    living, street = build_benchmark(topic, image_size=16).tasks
    # Image 1's dominant topic is animal (area), image 3 (food) is in no group: left out.
    assert living.train.targets == ["brown"] and street.train.targets == ["2"] and street.test.targets == ["1"]
    clear_cache()
    empty = BenchmarkSpec(name="vqav2", root=str(coco_root), options={"groups": {"living": ["animal"], "food": ["food"]}})
    with pytest.raises(SpecError, match="task 'food'.*0 test"):
        build_benchmark(empty, image_size=16)


def test_coco_captions_train_and_score_through_the_engine(coco_root):
    """Disk images -> the backbone's transform -> batches -> LM loss and CIDEr, end to end."""
    from mmcl.engine import run_continual
    from mmcl.spec import RunSpec

    clear_cache()
    run = RunSpec.model_validate({
        "device": "cpu", "torch_threads": 1,
        "backbone": {"kind": "blip2", "path": "mmcl:tiny"},
        "benchmark": {"name": "coco_caption", "root": str(coco_root), "options": {"groups": GROUPS}, "num_tasks": 2},
        "method": {"name": "gen_adapter", "config": {"params": "lora"}},
        "training": {"batch_size": 2, "max_steps": 2, "log_every": 1},
        "evaluation": {"batch_size": 4, "max_new_tokens": 4},
    })  # fmt: skip
    ends = []
    result = run_continual(run, on_task_end=ends.append)
    assert result.matrix.shape == (3, 2) and ends[-1].metric_names == {"living": "cider", "street": "cider"}
    assert ends[-1].n_samples == {"living": 1, "street": 1}
    # living: 4 (image, caption) pairs -> 2 steps of 2; street: 2 pairs -> 1 step (one epoch).
    assert all(c["loss"] > 0 for c in result.curves) and [c["task"] for c in result.curves] == [0, 0, 1]
