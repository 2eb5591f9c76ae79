"""The pre-decoded image cache (mmcl/data/image_cache.py) on the fake MTIL trees of
tests/test_mtil_data.py: same model inputs as the JPEG path, built once, keyed by what
changes the pixels, whole or absent, and waits that end."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcl.data import build_benchmark, clear_cache
from mmcl.data import image_cache as ic
from mmcl.data.base import collate
from mmcl.spec import BackboneSpec, BenchmarkSpec

from .test_mtil_data import make_coop, make_zscl


@pytest.fixture(scope="module")
def backbone():
    from mmcl.backbones.clip import load_backbone

    torch.manual_seed(0)
    return load_backbone(BackboneSpec(pretrained=None))


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return {"zscl": make_zscl(tmp_path_factory.mktemp("zscl")), "coop": make_coop(tmp_path_factory.mktemp("coop"))}


def _tasks(backbone, root: Path, cache_dir: Path | None, preprocess=None, **options):
    clear_cache()
    opts = {**options, "image_cache": cache_dir is not None}
    if cache_dir is not None:
        opts["cache_dir"] = str(cache_dir)
    spec = BenchmarkSpec(name="mtil", root=str(root), options=opts)
    return build_benchmark(spec, image_size=backbone.image_size, preprocess=preprocess or backbone.preprocess).tasks


def _batch(ds) -> torch.Tensor:
    return collate([ds[i] for i in range(len(ds))])["image"]


@pytest.mark.parametrize("layout", ["zscl", "coop"])
def test_cached_batches_are_the_jpeg_batches_for_every_mtil_dataset(backbone, roots, tmp_path, layout):
    cached = _tasks(backbone, roots[layout], tmp_path / "cache", layout=layout)
    decoded = _tasks(backbone, roots[layout], None, layout=layout)
    finish = ic.split_transform(backbone.preprocess).tensor
    assert [t.name for t in cached] == [t.name for t in decoded] and len(cached) == 11
    for c, d in zip(cached, decoded):
        for split in ("train", "test"):
            u8, ref = _batch(getattr(c, split)), _batch(getattr(d, split))
            assert u8.dtype == torch.uint8 and ref.dtype == torch.float32
            # Bit-identical: ToTensor's / 255 and Normalize's (x - mean) / std, same order.
            assert torch.equal(finish(u8), ref), (c.name, split, (finish(u8) - ref).abs().max())
    # The backbone's image tower finishes uint8 pixels itself, whichever method calls it.
    u8, ref = _batch(cached[0].test), _batch(decoded[0].test)
    with torch.no_grad():
        assert torch.equal(backbone.encode_image(u8), backbone.encode_image(ref))
    # 22 entries (11 datasets x train / test), no temporary folder or stray file left.
    entries = ic.describe(tmp_path / "cache")
    assert len(entries) == 22 and {e["size"] for e in entries} == {backbone.image_size}
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_loader_takes_cached_batches_whole_and_they_equal_the_per_image_ones(backbone, roots, tmp_path, workers):
    from mmcl.data.base import make_loader

    ds = _tasks(backbone, roots["zscl"], tmp_path / "cache", layout="zscl")[0].train
    assert len(ds) > 8
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    loader = make_loader(ds, 4, workers, torch.device("cpu"), collate_fn=collate, sampler=order)
    for k, batch in enumerate(loader):
        ref = collate([ds[i] for i in order[4 * k : 4 * k + 4]])
        assert batch["image"].dtype == torch.uint8 and torch.equal(batch["image"], ref["image"])
        assert batch["label"].dtype == ref["label"].dtype and torch.equal(batch["label"], ref["label"])
    assert k == (len(ds) - 1) // 4


def test_built_once_and_reused_by_another_process(backbone, roots, tmp_path):
    cache = tmp_path / "cache"
    _tasks(backbone, roots["coop"], cache, layout="coop", order="I")
    metas = {p: p.stat().st_mtime_ns for p in cache.glob("*/meta.json")}
    assert len(metas) == 22
    # Another process (a trial) with the same data and transform: found, nothing decoded.
    code = (
        "import sys, torch; from mmcl.backbones.clip import load_backbone; from mmcl.spec import BackboneSpec, BenchmarkSpec;"
        "from mmcl.data import build_benchmark; b = load_backbone(BackboneSpec(pretrained=None));"
        f"s = BenchmarkSpec(name='mtil', root={str(roots['coop'])!r}, options={{'layout': 'coop', 'cache_dir': {str(cache)!r}}});"
        "t = build_benchmark(s, image_size=b.image_size, preprocess=b.preprocess).tasks;"
        "print(type(t[0].train.pixels).__name__, t[0].train[0]['image'].dtype)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["CachedPixels", "torch.uint8"]
    assert "decoding" not in r.stderr
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/meta.json")} == metas


def test_the_key_follows_what_changes_the_pixels(backbone, roots, tmp_path):
    import shutil

    from mmcl.data.mtil import default_preprocess

    root = tmp_path / "data"
    shutil.copytree(roots["coop"], root)
    cache = tmp_path / "cache"
    _tasks(backbone, root, cache, layout="coop")
    first = {e["key"] for e in ic.describe(cache)}
    # Another crop size: every entry anew.
    _tasks(backbone, root, cache, preprocess=default_preprocess(backbone.image_size + 8), layout="coop")
    second = {e["key"] for e in ic.describe(cache)} - first
    assert len(second) == 22
    # One image re-encoded in place: only the entry holding it is rebuilt.
    split = json.loads((root / "dtd" / "split_zhou_DescribableTextures.json").read_text())
    img = root / "dtd" / "images" / split["test"][0][0]
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    _tasks(backbone, root, cache, layout="coop")
    third = {e["key"]: e["what"] for e in ic.describe(cache) if e["key"] not in first | second}
    assert list(third.values()) == ["MTIL DTD test"]


def test_a_failed_build_leaves_nothing_and_the_next_one_builds(backbone, tmp_path):
    split = ic.split_transform(backbone.preprocess)
    from PIL import Image

    def load(i: int):
        if i == 5:
            raise OSError("truncated file")
        return Image.new("RGB", (40, 30), (i, 2 * i, 3 * i))

    identity = {"test": "failing"}
    with pytest.raises(OSError, match="truncated"):
        ic.open_or_build(tmp_path, identity, load, 10, split, "fake", workers=0)
    assert ic.describe(tmp_path) == [] and not list(tmp_path.glob("*.tmp-*"))
    good = ic.open_or_build(tmp_path, identity, lambda i: Image.new("RGB", (40, 30), (i, 0, 0)), 10, split, "fake", workers=0)
    assert len(ic.describe(tmp_path)) == 1 and good[3].shape == (3, split.size, split.size)
    assert int(good[3][0, 0, 0]) == 3


def test_a_waiter_gives_up_on_a_stalled_builder_naming_the_lock(backbone, tmp_path, monkeypatch):
    split = ic.split_transform(backbone.preprocess)
    identity = {"test": "stalled"}
    key = ic.entry_key(identity, split)
    monkeypatch.setattr(ic, "STALL_S", 2.0)
    with open(tmp_path / f"{key}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a builder that never progresses
        with pytest.raises(TimeoutError, match=rf"{key}\.lock for 2 s without progress"):
            ic.open_or_build(tmp_path, identity, lambda i: None, 4, split, "fake", workers=0)


def test_transforms_the_cache_cannot_freeze_are_decoded_as_before(backbone, roots, tmp_path):
    from torchvision import transforms as T

    norm = next(t for t in backbone.preprocess.transforms if isinstance(t, T.Normalize))
    size = backbone.image_size
    augmented = T.Compose([T.RandomResizedCrop(size), T.ToTensor(), norm])
    assert ic.split_transform(augmented) is None
    tasks = _tasks(backbone, roots["coop"], tmp_path / "cache", preprocess=augmented, layout="coop", order="I")
    assert tasks[0].train.pixels is None and tasks[0].train[0]["image"].dtype == torch.float32
    assert ic.describe(tmp_path / "cache") == []


def test_cli_builds_a_study_ahead_and_lists_the_cache(roots, tmp_path):
    import yaml

    from .conftest import mmcl_cmd

    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "name": "c",
        "run": {"device": "cpu", "backbone": {"model": "mmcl-tiny-clip", "pretrained": None},
                "benchmark": {"name": "mtil", "root": str(roots["coop"]), "order": ["DTD", "EuroSAT"],
                              "options": {"layout": "coop", "cache_dir": str(tmp_path / "cache")}}},
        "stages": [{"name": "a", "kind": "ablation", "variants": ["full"]}],
    }))  # fmt: skip
    r = subprocess.run(mmcl_cmd("cache", "build", str(study)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mtil: 2 task(s)" in r.stdout and "decoding MTIL DTD train once" in r.stderr
    r = subprocess.run(mmcl_cmd("cache", "info", "--dir", str(tmp_path / "cache")), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "4 entries" in r.stdout and "MTIL EuroSAT test" in r.stdout, r.stdout


@pytest.mark.parametrize("method,workers", [("er", 0), ("lwf", 2)])
def test_a_continual_run_is_the_same_with_and_without_the_cache(roots, tmp_path, method, workers):
    """Training (replayed samples included), evaluation and the zero-shot row: the same
    numbers from cached pixels as from decoded JPEGs, with or without loader workers."""
    from mmcl.engine import run_continual
    from mmcl.spec import RunSpec

    def run(cache: bool):
        clear_cache()
        spec = RunSpec.model_validate({
            "seed": 0, "device": "cpu", "torch_threads": 1, "data_workers": workers,
            "backbone": {"model": "mmcl-tiny-clip", "pretrained": None},
            "benchmark": {"name": "mtil", "root": str(roots["coop"]), "order": ["DTD", "EuroSAT", "Flowers"],
                          "options": {"layout": "coop", "image_cache": cache, "cache_dir": str(tmp_path / "cache")}},
            "method": {"name": method, "config": {"buffer_size": 8} if method == "er" else {}},
            "training": {"batch_size": 4, "max_steps": 3, "lr": 1e-3},
            "evaluation": {"batch_size": 16},
        })  # fmt: skip
        return run_continual(spec)

    cached, decoded = run(True), run(False)
    assert ic.describe(tmp_path / "cache"), "the cached run did not use the cache"
    assert torch.equal(torch.as_tensor(cached.matrix), torch.as_tensor(decoded.matrix)), (cached.matrix, decoded.matrix)


@pytest.fixture()
def coco_root(tmp_path):
    from .test_gen_data import TEST, TRAIN, _write_split, _write_vqa

    root = tmp_path / "coco"
    _write_split(root, "train", TRAIN, {i: [f"caption {k} of image {i}" for k in range(2)] for i in TRAIN})
    _write_split(root, "val", TEST, {i: [f"caption {k} of test image {i}" for k in range(5)] for i in TEST})
    ten = lambda a: [a] * 10  # noqa: E731
    _write_vqa(root, "train", [(100, 1, "what is it?", "what is", ten("dog")), (101, 1, "how many?", "how many", ten("2")),
                               (102, 2, "what is it?", "what is", ten("car")), (103, 3, "what is it?", "what is", ten("banana"))])
    _write_vqa(root, "val", [(200, 11, "what is it?", "what is", ten("dog")), (201, 12, "what is it?", "what is", ten("car")),
                             (202, 13, "what is it?", "what is", ten("banana"))])  # fmt: skip
    return root


@pytest.mark.parametrize("name", ["coco_caption", "vqav2"])
def test_cached_coco_and_vqav2_batches_are_the_decoded_ones(coco_root, tmp_path, name):
    from mmcl.backbones.vlm import OPENAI_MEAN, OPENAI_STD, ImageTransform

    from .test_gen_data import GROUPS

    transform = ImageTransform(32, OPENAI_MEAN, OPENAI_STD)

    def tasks(cache: bool):
        clear_cache()
        opts = {"groups": GROUPS, "image_cache": cache, "cache_dir": str(tmp_path / "cache")}
        return build_benchmark(BenchmarkSpec(name=name, root=str(coco_root), options=opts), image_size=32,
                               preprocess=transform).tasks  # fmt: skip

    finish = transform.pixel_split().tensor
    cached, decoded = tasks(True), tasks(False)
    for c, d in zip(cached, decoded):
        for split in ("train", "test"):
            u8, ref = _batch(getattr(c, split)), _batch(getattr(d, split))
            assert u8.dtype == torch.uint8 and torch.equal(finish(u8), ref), (name, c.name, split)
    # Each image once, however many captions / questions it has (image 1: two of each).
    entries = ic.describe(tmp_path / "cache")
    by_what = {e["what"]: e["images"] for e in entries}
    # living train: COCO's images 1 and 5 (two captions each), VQAv2's image 1 (two questions).
    assert by_what[f"{'COCO' if name == 'coco_caption' else 'VQAv2'} living train"] == (2 if name == "coco_caption" else 1)
    assert sum(len(getattr(c, s)) for c in cached for s in ("train", "test")) > sum(by_what.values())


def test_a_generation_run_is_the_same_with_and_without_the_cache(coco_root):
    """Tiny BLIP-2 on COCO captions: the backbone finishes cached pixels on its device
    (VlmBackbone._pixels); losses and CIDEr match the decoded path."""
    from mmcl.engine import run_continual
    from mmcl.spec import RunSpec

    from .test_gen_data import GROUPS

    def run(cache: bool):
        clear_cache()
        return run_continual(RunSpec.model_validate({
            "device": "cpu", "torch_threads": 1,
            "backbone": {"kind": "blip2", "path": "mmcl:tiny"},
            "benchmark": {"name": "coco_caption", "root": str(coco_root), "num_tasks": 2,
                          "options": {"groups": GROUPS, "image_cache": cache}},
            "method": {"name": "gen_adapter", "config": {"params": "lora"}},
            "training": {"batch_size": 2, "max_steps": 2, "log_every": 1},
            "evaluation": {"batch_size": 4, "max_new_tokens": 4},
        }))  # fmt: skip

    # Building the cache (first run) must not change the run either: nothing it does
    # draws from torch's global generator.
    building, decoded, found = run(True), run(False), run(True)
    for other in (decoded, found):
        assert [c["loss"] for c in building.curves] == [c["loss"] for c in other.curves]
        assert torch.equal(torch.as_tensor(building.matrix), torch.as_tensor(other.matrix))


def test_the_driver_gets_the_trials_transform_without_weights(backbone):
    """build_image_caches keys entries with the transform open_clip's configs give, read
    without weights; it must be the loaded backbone's, or trials would miss the cache."""
    from mmcl.backbones.clip import image_transform

    t, size = image_transform(BackboneSpec(pretrained=None))
    assert repr(t) == repr(backbone.preprocess) and size == backbone.image_size
    split = ic.split_transform(t)
    assert split is not None and split.key == ic.split_transform(backbone.preprocess).key
    # A tag's own preprocessing (SigLIP: squash resize, mean 0.5): cached at its size.
    siglip, size = image_transform(BackboneSpec(model="ViT-B-16-SigLIP", pretrained="webli"))
    assert size == 224 and ic.split_transform(siglip).size == 224
    assert ic.split_transform(siglip).tensor.mean == (0.5, 0.5, 0.5)
