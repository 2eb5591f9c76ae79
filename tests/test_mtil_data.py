"""The ``mtil`` benchmark read from disk, in both layouts, through the real open_clip
preprocess of the tiny CLIP; its data check through the CLI.

The trees are generated here: every class of every dataset gets a few 8x8 images whose
uniform colour encodes the label, so a sample's label can be read back from its
preprocessed pixels (end to end: files -> torchvision / our readers -> transform).
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmcl.cli import main as mmcl_main
from mmcl.data import benchmark_task_names, build_benchmark, clear_cache
from mmcl.data.mtil import build_mtil
from mmcl.data.mtil_classes import (AIRCRAFT, CIFAR100, CLASSNAMES, DTD, EUROSAT_FOLDERS, FLOWERS, MNIST,
                                    OXFORD_PET, STANFORD_CARS)  # fmt: skip
from mmcl.spec import BackboneSpec, BenchmarkSpec, SpecError

from .conftest import mmcl_cmd

# ZSCL's orders, written out here (not imported) so a wrong table in the module fails.
ORDER_I = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
           "StanfordCars", "SUN397"]  # fmt: skip
ORDER_II = ["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD",
            "EuroSAT", "CIFAR100"]  # fmt: skip
N_CLASSES = {"Aircraft": 100, "Caltech101": 101, "CIFAR100": 100, "DTD": 47, "EuroSAT": 10, "Flowers": 102,
             "Food": 101, "MNIST": 10, "OxfordPet": 37, "StanfordCars": 196, "SUN397": 397}  # fmt: skip
SPLIT_N = 5  # images per class where we split 80/20 ourselves: 4 train, 1 test


# --------------------------------------------------------------------------- images


def _rgb(label: int) -> tuple[int, int, int]:
    return ((label % 8) * 32 + 16, ((label // 8) % 8) * 32 + 16, (label // 64) * 32 + 16)


def _decode(image: torch.Tensor, mean, std) -> int:
    rgb = (image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).mean((1, 2)) * 255
    r, g, b = (int(round((float(v) - 16) / 32)) for v in rgb)
    return r + 8 * g + 64 * b


_JPEG: dict[int, bytes] = {}


def _jpg(path: Path, label: int) -> None:
    from PIL import Image

    if label not in _JPEG:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), _rgb(label)).save(buf, format="JPEG", quality=95)
        _JPEG[label] = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_JPEG[label])


def _idx(path: Path, arr: np.ndarray) -> None:
    # MNIST's idx format: big-endian magic (0, 0, dtype 0x08 = uint8, ndim), then the dims.
    path.parent.mkdir(parents=True, exist_ok=True)
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(head + arr.astype(np.uint8).tobytes())


def _mnist(folder: Path, n_train: int) -> None:
    for prefix, n in (("train", n_train), ("t10k", 1)):
        labels = np.repeat(np.arange(10), n)
        images = np.stack([np.full((28, 28), y * 20 + 10) for y in labels])
        _idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


def _cifar(folder: Path, n_train: int, meta_name: str = "meta") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", 1)):
        labels = np.repeat(np.arange(100), n)
        data = np.stack([np.tile(np.array(_rgb(int(y)), dtype=np.uint8)[:, None], (1, 1024)).reshape(-1) for y in labels])
        (folder / split).write_bytes(pickle.dumps({"data": data, "fine_labels": labels.tolist()}))
    names = [c.replace(" ", "_") for c in CIFAR100]
    (folder / meta_name).write_bytes(pickle.dumps({"fine_label_names": names}))


def _mat(path: Path, **arrays) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), arrays)


def _annotations(items: list[tuple[str, int]]) -> np.ndarray:
    ann = np.zeros((len(items),), dtype=[("fname", "O"), ("class", "O")])
    for i, (fname, cls) in enumerate(items):
        ann[i] = (fname, np.uint16(cls))
    return ann


# --------------------------------------------------------------------------- ZSCL tree


def make_zscl(root: Path) -> Path:
    # Aircraft: fgvc-aircraft-2013b/data, one trainval and one test image per variant.
    d = root / "fgvc-aircraft-2013b/data"
    d.mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n")
    for split, off in (("train", 0), ("test", 1)):
        lines = []
        for y, v in enumerate(AIRCRAFT):
            im = f"{1000000 + 2 * y + off}"
            _jpg(d / "images" / f"{im}.jpg", y)
            lines.append(f"{im} {v}")
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    # Caltech101: 101 class folders (+ the background folder torchvision drops).
    d = root / "caltech101/101_ObjectCategories"
    _jpg(d / "BACKGROUND_Google/image_0001.jpg", 0)
    for y in range(101):
        for k in range(1, SPLIT_N + 1):
            _jpg(d / f"c{y:03d}" / f"image_{k:04d}.jpg", y)
    _cifar(root / "cifar-100-python", n_train=2)
    # DTD: torchvision's dtd/dtd/{images/<class>/, labels/{train,val,test}1.txt}
    d = root / "dtd/dtd"
    parts: dict[str, list[str]] = {"train1": [], "val1": [], "test1": []}
    for y, c in enumerate(DTD):
        for k, part in enumerate(parts):
            rel = f"{c}/{c}_{k:04d}.jpg"
            _jpg(d / "images" / rel, y)
            parts[part].append(rel)
    (d / "labels").mkdir()
    for part, rels in parts.items():
        (d / "labels" / f"{part}.txt").write_text("\n".join(rels) + "\n")
    # EuroSAT: the official 2750/<Folder> tree (split 80/20 by the benchmark).
    for y, folder in enumerate(sorted(EUROSAT_FOLDERS)):
        for k in range(SPLIT_N):
            _jpg(root / "eurosat/2750" / folder / f"{folder}_{k + 1}.jpg", y)
    # Flowers: jpg/image_%05d.jpg, imagelabels.mat, setid.mat (two images per class).
    d = root / "flowers-102"
    labels, trn, tst = [], [], []
    for y in range(len(FLOWERS)):
        for k in range(2):
            i = 2 * y + k + 1
            _jpg(d / "jpg" / f"image_{i:05d}.jpg", y)
            labels.append(y + 1)
            (trn if k == 0 else tst).append(i)
    _mat(d / "imagelabels.mat", labels=np.array(labels))
    _mat(d / "setid.mat", trnid=np.array(trn), valid=np.array([], dtype=int), tstid=np.array(tst))
    # Food: images/<class>/<id>.jpg + meta/{train,test}.json
    d = root / "food-101"
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for y in range(101):
        for split, k in (("train", 0), ("test", 1)):
            _jpg(d / "images" / f"f{y:03d}" / f"{k}.jpg", y)
            meta[split][f"f{y:03d}"] = [f"f{y:03d}/{k}"]
    (d / "meta").mkdir()
    for split in meta:
        (d / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
    _mnist(root / "MNIST/raw", n_train=2)
    # OxfordPet: images/<Breed>_<n>.jpg + annotations/{trainval,test}.txt
    d = root / "oxford-iiit-pet"
    (d / "annotations").mkdir(parents=True)
    for split, k in (("trainval", 1), ("test", 2)):
        lines = []
        for y in range(len(OXFORD_PET)):
            _jpg(d / "images" / f"b{y:02d}_{k}.jpg", y)
            lines.append(f"b{y:02d}_{k} {y + 1} 1 1")
        (d / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    # StanfordCars: cars_{train,test}/ + the devkit .mat files.
    d = root / "stanford_cars"
    items: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for y in range(len(STANFORD_CARS)):
        for split in items:
            fname = f"{y:05d}.jpg"
            _jpg(d / f"cars_{split}" / fname, y)
            items[split].append((fname, y + 1))
    _mat(d / "devkit/cars_meta.mat", class_names=np.array(list(STANFORD_CARS), dtype=object))
    _mat(d / "devkit/cars_train_annos.mat", annotations=_annotations(items["train"]))
    _mat(d / "cars_test_annos_withlabels.mat", annotations=_annotations(items["test"]))
    # SUN397: SUN397/<letter>/<name>/sun_*.jpg + ClassName.txt
    d = root / "SUN397"
    d.mkdir()
    (d / "ClassName.txt").write_text("".join(f"/s/s{y:03d}\n" for y in range(397)))
    for y in range(397):
        for k in range(SPLIT_N):
            _jpg(d / "s" / f"s{y:03d}" / f"sun_{k:04d}.jpg", y)
    return root


# --------------------------------------------------------------------------- CoOp tree

COOP_JSON = {  # task -> (folder, image folder, split file, class names written into it)
    "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   [f"coop class {i}" for i in range(100)]),  # CoOp's Caltech101 has 100 classes
    "DTD": ("dtd", "images", "split_zhou_DescribableTextures.json", list(DTD)),
    "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json", [f"eurosat {i}" for i in range(10)]),
    "Flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", list(FLOWERS)),
    "Food": ("food-101", "images", "split_zhou_Food101.json", list(CLASSNAMES["Food"])),
    "OxfordPet": ("oxford_pets", "images", "split_zhou_OxfordPets.json", [c.lower() for c in OXFORD_PET]),
    "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json", list(STANFORD_CARS)),
    "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json", [f"sun {i}" for i in range(397)]),
}  # fmt: skip


def make_coop(root: Path) -> Path:
    for folder, images, split_file, names in COOP_JSON.values():
        split: dict[str, list] = {"train": [], "val": [], "test": []}
        for y, name in enumerate(names):
            for part, n in (("train", 2), ("val", 1), ("test", 1)):
                for k in range(n):
                    rel = f"c{y:03d}/{part}_{k}.jpg"
                    _jpg(root / folder / images / rel, y)
                    split[part].append([rel, y, name])
        (root / folder / split_file).write_text(json.dumps(split))
    d = root / "fgvc_aircraft"
    d.mkdir()
    (d / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n")
    for part, off in (("train", 0), ("val", 1), ("test", 2)):
        lines = []
        for y, v in enumerate(AIRCRAFT):
            im = f"{2000000 + 3 * y + off}"
            _jpg(d / "images" / f"{im}.jpg", y)
            lines.append(f"{im} {v}")
        (d / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    _mnist(root / "mnist", n_train=SPLIT_N)
    _cifar(root / "cifar100", n_train=SPLIT_N)
    return root


@pytest.fixture(scope="module")
def zscl_root(tmp_path_factory) -> Path:
    return make_zscl(tmp_path_factory.mktemp("zscl"))


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> Path:
    return make_coop(tmp_path_factory.mktemp("coop"))


@pytest.fixture(scope="module")
def backbone():
    from mmcl.backbones.clip import load_backbone

    torch.manual_seed(0)
    return load_backbone(BackboneSpec(pretrained=None))


def _norm(backbone):
    from torchvision.transforms import Normalize

    t = next(t for t in backbone.preprocess.transforms if isinstance(t, Normalize))
    return t.mean, t.std


def _build(backbone, root: Path, **options) -> list:
    clear_cache()
    spec = BenchmarkSpec(name="mtil", root=str(root), options=options)
    return build_benchmark(spec, image_size=backbone.image_size, preprocess=backbone.preprocess).tasks


def _model_input(image: torch.Tensor, backbone) -> torch.Tensor:
    """What the image tower computes on: cached uint8 pixels finished as its pre-hook does."""
    from mmcl.data.image_cache import split_transform

    return split_transform(backbone.preprocess).tensor(image[None])[0]


def _check_samples(task, backbone, positions=(0, -1)) -> None:
    mean, std = _norm(backbone)
    for ds in (task.train, task.test):
        for p in positions:
            s = ds[p % len(ds)]
            assert s["image"].shape == (3, backbone.image_size, backbone.image_size)
            assert s["image"].dtype == torch.uint8  # from the image cache (the default)
            s["image"] = _model_input(s["image"], backbone)
            assert isinstance(s["label"], int) and 0 <= s["label"] < task.num_classes
            if task.name == "MNIST":
                grey = float((s["image"] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).mean())
                assert round((grey * 255 - 10) / 20) == s["label"], task.name
            else:
                assert _decode(s["image"], mean, std) == s["label"], (task.name, p)


# --------------------------------------------------------------------------- tests


def test_orders_and_options_without_data():
    assert benchmark_task_names(BenchmarkSpec(name="mtil")) == ORDER_I
    assert benchmark_task_names(BenchmarkSpec(name="mtil", options={"order": "II"})) == ORDER_II
    with pytest.raises(SpecError, match=r"run\.benchmark\.options\.layout"):
        benchmark_task_names(BenchmarkSpec(name="mtil", options={"layout": "imagefolder"}))
    with pytest.raises(SpecError, match=r"run\.benchmark\.options\.shot: unknown option"):
        benchmark_task_names(BenchmarkSpec(name="mtil", options={"shot": 16}))


def test_registry_stays_lazy():
    code = "import sys, mmcl.data; print(any(m.startswith(('mmcl.data.mtil', 'torchvision')) for m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_zscl_layout_reads_every_dataset(zscl_root, backbone):
    tasks = _build(backbone, zscl_root, layout="zscl")
    assert [t.name for t in tasks] == ORDER_I
    sizes = {t.name: (len(t.train), len(t.test)) for t in tasks}
    assert sizes == {
        "Aircraft": (100, 100), "Caltech101": (101 * 4, 101), "CIFAR100": (200, 100), "DTD": (47, 47),
        "EuroSAT": (40, 10), "Flowers": (102, 102), "Food": (101, 101), "MNIST": (20, 10),
        "OxfordPet": (37, 37), "StanfordCars": (196, 196), "SUN397": (397 * 4, 397),
    }  # fmt: skip
    for t in tasks:
        assert t.num_classes == N_CLASSES[t.name]
        # SUN397's names come from ClassName.txt ("/s/s000" here), as ZSCL reads them.
        assert t.classnames == (list(CLASSNAMES[t.name]) if t.name != "SUN397" else [f"s{y:03d}" for y in range(397)])
        assert t.templates and all("{}" in x for x in t.templates)
        assert t.info["layout"] == "zscl"
        if t.name in ("Caltech101", "EuroSAT", "SUN397"):  # ZSCL's unstratified 80/20 (the default here)
            assert set(t.test.labels) <= set(range(t.num_classes)), t.name
        else:
            assert sorted(set(t.test.labels)) == list(range(t.num_classes)), t.name
        _check_samples(t, backbone)
    by = {t.name: t for t in tasks}
    assert by["OxfordPet"].classnames[1] == "American Bulldog"  # official id 2, not CLIP's list position
    assert by["MNIST"].classnames[3] == "3 - three" and by["Food"].templates == ["a photo of a {}, a type of food."]
    assert by["EuroSAT"].classnames[2] == "brushland or shrubland"  # folder HerbaceousVegetation
    assert len(by["Caltech101"].templates) == 34 and len(by["CIFAR100"].templates) == 18
    assert by["StanfordCars"].templates[0] == "a photo of a {}, a type of car." and len(by["StanfordCars"].templates) == 9


def test_split_80_20_is_per_class_seeded_and_deterministic(zscl_root):
    opts = {"layout": "zscl", "split_rule": "per_class"}
    names = ["Caltech101", "EuroSAT", "SUN397"]
    a = build_mtil(opts, 32, 0, root=str(zscl_root), tasks=names).tasks
    b = build_mtil(opts, 32, 0, root=str(zscl_root), tasks=names).tasks
    c = build_mtil({**opts, "split_seed": 7}, 32, 0, root=str(zscl_root), tasks=names).tasks
    for ta, tb, tc in zip(a, b, c):
        assert ta.test.keys == tb.test.keys and ta.train.keys == tb.train.keys
        assert not set(ta.train.keys) & set(ta.test.keys)
        assert len(ta.train) + len(ta.test) == SPLIT_N * ta.num_classes
        # one test image in each class (round(0.2 * 5) = 1)
        assert sorted(ta.test.labels) == list(range(ta.num_classes))
        assert ta.test.keys != tc.test.keys, "the split seed must matter"


def test_zscl_split_rule_and_dtd_unpacked_at_the_root(zscl_root, tmp_path):
    names = ["Caltech101", "EuroSAT"]
    a = build_mtil({"layout": "zscl", "split_rule": "zscl"}, 32, 0, root=str(zscl_root), tasks=names).tasks
    b = build_mtil({"layout": "zscl", "split_rule": "zscl"}, 32, 0, root=str(zscl_root), tasks=names).tasks
    for ta, tb, n in zip(a, b, (101 * SPLIT_N, 10 * SPLIT_N)):
        assert (len(ta.train), len(ta.test)) == (int(0.8 * n), n - int(0.8 * n))  # one random_split of all n
        assert ta.test.keys == tb.test.keys and not set(ta.train.keys) & set(ta.test.keys)
    # auto (the default) is ZSCL's rule in ZSCL's layout: the test sets its matrices used.
    default = build_mtil({"layout": "zscl"}, 32, 0, root=str(zscl_root), tasks=names).tasks
    assert [t.test.keys for t in default] == [t.test.keys for t in a]
    # The DTD archive unpacked at the root (dtd/{images,labels}) reads the same files.
    alt = tmp_path / "alt"
    shutil.copytree(zscl_root / "dtd/dtd", alt / "dtd")
    t = build_mtil({"layout": "zscl"}, 32, 0, root=str(alt), tasks=["DTD"]).tasks[0]
    ref = build_mtil({"layout": "zscl"}, 32, 0, root=str(zscl_root), tasks=["DTD"]).tasks[0]
    assert (t.train.keys, t.test.keys, t.test.labels) == (ref.train.keys, ref.test.keys, ref.test.labels)


def test_coop_layout_reads_split_files(coop_root, backbone):
    tasks = _build(backbone, coop_root, layout="coop", order="II")
    assert [t.name for t in tasks] == ORDER_II
    by = {t.name: t for t in tasks}
    for name, (_, _, _, names) in COOP_JSON.items():
        t = by[name]
        assert t.classnames == names  # class names come from the split file, as in DIKI
        assert (len(t.train), len(t.test)) == (2 * len(names), len(names))  # "val" is not trained on
    assert by["Caltech101"].num_classes == 100
    assert by["Aircraft"].classnames == list(AIRCRAFT)
    assert (len(by["Aircraft"].train), len(by["Aircraft"].test)) == (100, 100)
    # MNIST / CIFAR100: the official test set; 80% of the training set per class.
    assert (len(by["MNIST"].train), len(by["MNIST"].test)) == (10 * 4, 10)
    assert (len(by["CIFAR100"].train), len(by["CIFAR100"].test)) == (100 * 4, 100)
    assert by["CIFAR100"].classnames[1] == "aquarium fish" and by["MNIST"].classnames == list(MNIST)
    for t in tasks:
        assert t.info["layout"] == "coop"
        _check_samples(t, backbone)


def test_auto_layout_follows_the_split_files(zscl_root, coop_root):
    assert build_mtil({}, 32, 0, root=str(coop_root), tasks=["DTD"]).tasks[0].info["layout"] == "coop"
    assert build_mtil({}, 32, 0, root=str(zscl_root), tasks=["DTD"]).tasks[0].info["layout"] == "zscl"


def test_shots_draw_k_per_class_seeded(coop_root):
    names = ["Caltech101", "Food", "MNIST"]
    one = build_mtil({"shots": 1}, 32, 0, root=str(coop_root), tasks=names).tasks
    again = build_mtil({"shots": 1}, 32, 0, root=str(coop_root), tasks=names).tasks
    other = build_mtil({"shots": 1, "shots_seed": 2}, 32, 0, root=str(coop_root), tasks=names).tasks
    for t, t2, t3 in zip(one, again, other):
        assert sorted(t.train.labels) == list(range(t.num_classes))  # exactly one per class
        assert t.train.keys == t2.train.keys
        assert t.train.keys != t3.train.keys
        assert len(t.test) == t.num_classes  # the test set is never subsampled
    many = build_mtil({"shots": 16}, 32, 0, root=str(coop_root), tasks=["Food"]).tasks[0]
    assert len(many.train) == 2 * 101  # fewer than k images: the class keeps all it has


def test_run_order_and_num_tasks_open_only_their_datasets(zscl_root, tmp_path, backbone):
    part = tmp_path / "part"
    part.mkdir()
    for folder in ("stanford_cars", "food-101", "MNIST"):
        (part / folder).symlink_to(zscl_root / folder)
    clear_cache()
    spec = BenchmarkSpec(name="mtil", root=str(part), num_tasks=3, options={"order": "II", "layout": "zscl"})
    bench = build_benchmark(spec, image_size=backbone.image_size, preprocess=backbone.preprocess)
    assert bench.task_names() == ORDER_II[:3]
    spec = BenchmarkSpec(name="mtil", root=str(part), order=["MNIST", "Food"], options={"layout": "zscl"})
    assert build_benchmark(spec, image_size=32, preprocess=backbone.preprocess).task_names() == ["MNIST", "Food"]
    with pytest.raises(SpecError, match=r"DTD \(layout zscl.*missing .*dtd"):
        build_benchmark(BenchmarkSpec(name="mtil", root=str(part), order=["MNIST", "DTD"], options={"layout": "zscl"}))


# --------------------------------------------------------------------------- CLI


def _study(path: Path, root: Path | str, order: list[str], layout: str = "zscl", stage_order=None) -> Path:
    stages: list[dict] = [{"name": "abl", "kind": "ablation", "variants": {"full": {}}}]
    if stage_order:
        stages.append({"name": "orders", "kind": "orders", "overrides": {"benchmark.order": stage_order}})
    study = {
        "name": "mtil-check",
        "storage": str(path.parent / "results"),
        "run": {
            "device": "cpu",
            "backbone": {"pretrained": None},
            "benchmark": {"name": "mtil", "root": str(root), "order": order, "options": {"layout": layout}},
            "method": {"name": "finetune"},
        },
        "stages": stages,
    }
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_validate_check_data_ok_and_plain_validate_touches_no_data(zscl_root, tmp_path, capsys):
    ok = _study(tmp_path / "ok.yaml", zscl_root, ["MNIST", "DTD"])
    assert mmcl_main(["validate", "--check-data", str(ok)]) == 0
    assert "data found under" in capsys.readouterr().out
    nowhere = _study(tmp_path / "nowhere.yaml", tmp_path / "not-mounted-here", ["MNIST", "DTD"])
    assert mmcl_main(["validate", str(nowhere)]) == 0  # a cluster study validates on a laptop
    assert not (tmp_path / "not-mounted-here").exists()
    assert mmcl_main(["validate", "--check-data", str(nowhere)]) == 2
    assert "not-mounted-here is not a directory" in capsys.readouterr().err


def test_missing_dataset_exits_2_naming_dataset_path_layout(zscl_root, tmp_path):
    part = tmp_path / "part"
    part.mkdir()
    (part / "MNIST").symlink_to(zscl_root / "MNIST")
    study = _study(tmp_path / "s.yaml", part, ["MNIST", "DTD"])
    r = subprocess.run(mmcl_cmd("validate", "--check-data", str(study)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "MTIL dataset DTD (layout zscl" in r.stderr
    assert str(part / "dtd/dtd/images") in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr and "MNIST" not in r.stderr.split("DTD", 1)[0]


def test_orders_stage_tasks_are_checked_too(zscl_root, tmp_path, capsys):
    part = tmp_path / "part"
    part.mkdir()
    (part / "MNIST").symlink_to(zscl_root / "MNIST")
    # The run block trains MNIST only; the orders stage's base run adds DTD.
    study = _study(tmp_path / "s.yaml", part, ["MNIST"], stage_order=["MNIST", "DTD"])
    assert mmcl_main(["validate", str(study)]) == 0
    assert mmcl_main(["validate", "--check-data", str(study)]) == 2
    assert "MTIL dataset DTD" in capsys.readouterr().err


def test_incomplete_dataset_names_the_missing_file(zscl_root, coop_root, tmp_path, capsys):
    z = tmp_path / "z"
    shutil.copytree(zscl_root / "dtd", z / "dtd")
    (z / "dtd/dtd/labels/test1.txt").unlink()
    assert mmcl_main(["validate", "--check-data", str(_study(tmp_path / "z.yaml", z, ["DTD"]))]) == 2
    err = capsys.readouterr().err
    assert f"missing {z / 'dtd/dtd/labels/test1.txt'}" in err and "layout zscl" in err

    c = tmp_path / "c"
    shutil.copytree(coop_root / "dtd", c / "dtd")
    (c / "dtd/split_zhou_DescribableTextures.json").unlink()
    assert mmcl_main(["validate", "--check-data", str(_study(tmp_path / "c.yaml", c, ["DTD"], layout="coop"))]) == 2
    err = capsys.readouterr().err
    assert "split_zhou_DescribableTextures.json" in err and "layout coop" in err

    shutil.copytree(coop_root / "dtd", c / "dtd", dirs_exist_ok=True)
    listed = json.loads((c / "dtd/split_zhou_DescribableTextures.json").read_text())["test"][-1][0]
    (c / "dtd/images" / listed).unlink()
    assert mmcl_main(["validate", "--check-data", str(_study(tmp_path / "c.yaml", c, ["DTD"], layout="coop"))]) == 2
    assert f"image {c / 'dtd/images' / listed} listed in split_zhou_DescribableTextures.json 'test'" in (
        capsys.readouterr().err
    )


def test_run_checks_data_before_anything_starts(zscl_root, tmp_path, capsys):
    part = tmp_path / "part"
    part.mkdir()
    study = _study(tmp_path / "s.yaml", part, ["MNIST"])
    out = tmp_path / "out"
    assert mmcl_main(["run", str(study), "--output", str(out)]) == 2
    assert "MTIL dataset MNIST (layout zscl" in capsys.readouterr().err
    assert not out.exists()  # stopped before the output directory, Ray or any trial


def test_a_continual_run_trains_and_evaluates_on_disk_data(coop_root):
    from mmcl.engine import run_continual

    from .helpers import tiny_run

    clear_cache()
    run = tiny_run("finetune", num_tasks=2, steps=2).model_copy(deep=True)
    run.benchmark = BenchmarkSpec(name="mtil", root=str(coop_root), order=["MNIST", "DTD"], options={"shots": 2})
    run.evaluation.max_samples = 16
    result = run_continual(run)
    assert result.task_names == ["MNIST", "DTD"]
    assert len(result.matrix) == 3 and all(len(row) == 2 for row in result.matrix)  # zero-shot row + 2 tasks
    assert all(0.0 <= v <= 100.0 for row in result.matrix for v in row)
