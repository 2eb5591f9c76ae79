"""``mtil``: Multi-domain Task Incremental Learning (ZSCL, Zheng et al. 2023; DIKI, Tang et al. 2024).

Eleven image-classification datasets learnt one after another, each a task with its own
class names and CLIP prompt templates (:mod:`mmcl.data.mtil_classes`). Images are read
lazily from disk under ``run.benchmark.root`` and go through the backbone's open_clip
preprocessing when a sample is fetched.

Two on-disk layouts (``options.layout``):

``zscl``
    torchvision's dataset folders, as ZSCL's code reads them. Aircraft, Food, OxfordPet,
    StanfordCars, SUN397, MNIST, Caltech101 and EuroSAT (``eurosat/2750``) are opened with
    torchvision's own dataset classes (``download=False``). CIFAR100, DTD and Flowers are
    read here because torchvision either checks the archives' MD5 sums (CIFAR100,
    Flowers102) or expects a different folder (DTD: ``dtd/dtd``); the folders and files
    are the official archives' own.
``coop``
    CoOp / DIKI: one folder per dataset with its images and ``split_zhou_<Name>.json``
    (``{"train"|"val"|"test": [[relative image path, label, class name], ...]}``); Aircraft
    uses FGVC's ``images_variant_{train,test}.txt``, MNIST its four idx files, CIFAR100
    its python pickles. Class names come from those files, as in DIKI. DIKI's "val" lists
    are not used (train = "train", test = "test").
``auto`` (default)
    ``coop`` when any dataset's CoOp split file is present under the root, else ``zscl``.

Datasets without an official test split (Caltech101, EuroSAT from ``2750``, SUN397 in the
ZSCL layout; MNIST and CIFAR100 training sets in the CoOp layout, where DIKI holds 20% out
as validation) are split 80/20: with ZSCL's own unstratified split (:func:`split_like_zscl`)
in the ZSCL layout and per class (:func:`split_per_class`) in the CoOp layout by default
(``split_rule: auto``); ``split_rule: per_class`` / ``zscl`` choose one for both.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmcl.data.base import Benchmark, Task
from mmcl.data.mtil_classes import CLASSNAMES, EUROSAT_FOLDERS, TEMPLATES
from mmcl.spec import SpecError

TASK_NAMES = ("Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST",
              "OxfordPet", "StanfordCars", "SUN397")  # fmt: skip

# ZSCL's two task orders (Zheng et al. 2023, sec. 5 / appendix; DIKI's configs MTIL.yaml
# and MTIL-order-II.yaml list the same).
ORDERS: dict[str, tuple[str, ...]] = {
    "I": TASK_NAMES,
    "II": ("StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101",
           "DTD", "EuroSAT", "CIFAR100"),  # fmt: skip
}

TEST_FRACTION = 0.2

# open_clip's OPENAI_DATASET_MEAN / STD, for the fallback transform (no backbone given).
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class MtilOptions(BaseModel):
    """``run.benchmark.options`` of the ``mtil`` benchmark."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["auto", "zscl", "coop"] = "auto"
    # The benchmark's default task order (run.benchmark.order still overrides it).
    order: Literal["I", "II"] = "I"
    # k training images per class (few-shot MTIL as in CoOp / DIKI); None = all.
    shots: int | None = Field(default=None, ge=1)
    shots_seed: int = 1
    # The 80/20 split of datasets without an official test split: per_class (stratified,
    # see split_per_class) or zscl (ZSCL's own: one torch random_split of the whole set).
    # auto: zscl in the zscl layout (its test sets are then exactly those ZSCL's published
    # matrices were measured on), per_class in the coop layout (DIKI's 20% validation).
    split_rule: Literal["auto", "per_class", "zscl"] = "auto"
    split_seed: int = 42
    # Decode each image once into the node's image cache (mmcl/data/image_cache.py) and
    # serve uint8 pixels that the backbone normalises per batch on its device; false
    # decodes every image in every epoch as before. Same inputs either way.
    image_cache: bool = True
    # Where the cache lives (default <$MMCL_CACHE or ~/.cache/mmcl>/images): a node-local disk.
    cache_dir: str | None = None


def task_names(options: dict[str, Any]) -> list[str]:
    return list(ORDERS[MtilOptions.model_validate(options).order])


# --------------------------------------------------------------------------- samples


class _Paths:
    """Loads image i from a list of files."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __call__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")


class _Arrays:
    """Image i of a uint8 array [N, H, W] (grey) or [N, H, W, 3]."""

    def __init__(self, arrays: Any):
        self.arrays = arrays

    def __call__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.arrays[i]).convert("RGB")


class _Torchvision:
    """Image i of a torchvision dataset built without a transform."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __call__(self, i: int):
        return self.dataset[i][0].convert("RGB")


@dataclass
class Source:
    """One split of one dataset, indexable without decoding anything.

    ``keys`` identify samples stably (relative paths, or "<split>:<index>" for arrays);
    they order the per-class split and the few-shot draw, so both are independent of
    directory listing order.
    """

    load: Callable[[int], Any]
    labels: list[int]
    keys: list[str]


class MtilDataset:
    """Samples ``indices`` of a source: ``{"image": preprocess(PIL image), "label": int}``;
    with ``pixels`` (:mod:`mmcl.data.image_cache`) the image is the cached uint8 tensor
    that the backbone's image tower normalises."""

    def __init__(self, source: Source, indices: list[int], preprocess: Callable[[Any], Any], pixels: Any = None):
        self.source = source
        self.indices = list(indices)
        self.preprocess = preprocess
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> list[int]:
        return [self.source.labels[j] for j in self.indices]

    @property
    def keys(self) -> list[str]:
        return [self.source.keys[j] for j in self.indices]

    def __getitem__(self, i: int) -> dict:
        j = self.indices[i]
        image = self.pixels[i] if self.pixels is not None else self.preprocess(self.source.load(j))
        return {"image": image, "label": int(self.source.labels[j])}

    def __getitems__(self, idx: list[int]) -> list[dict] | dict:
        """A DataLoader's batch at once. From the cache it is the collated batch itself
        (``collate`` passes it on): one gather from the memory map instead of a copy per
        image and a stack; equal to ``collate([self[i] for i in idx])``."""
        if self.pixels is None:
            return [self[i] for i in idx]
        import torch

        labels = [int(self.source.labels[self.indices[i]]) for i in idx]
        return {"image": self.pixels.take(idx), "label": torch.tensor(labels)}

    def load(self, i: int) -> Any:
        """Sample i's image as read (PIL), before any transform (the cache builds from it)."""
        return self.source.load(self.indices[i])


def split_per_class(labels: list[int], keys: list[str], seed: int, task: str) -> tuple[list[int], list[int]]:
    """The 80/20 rule for datasets without an official test split -> (train, test) indices.

    Per class c: its samples sorted by key (relative path), shuffled with
    ``random.Random(f"{seed}:{task}:{c}")``; the first ``round(0.2 n)`` (half up, at least
    one when the class has two or more samples) are test, the rest train. Each class has
    its own stream, so adding or removing one class changes no other class's split.
    """
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, test = [], []
    for c in sorted(by_class):
        idx = sorted(by_class[c], key=lambda i: keys[i])
        random.Random(f"{seed}:{task}:{c}").shuffle(idx)
        n = len(idx)
        n_test = max(1, int(TEST_FRACTION * n + 0.5)) if n >= 2 else 0
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return sorted(train), sorted(test)


def split_like_zscl(n: int, seed: int) -> tuple[list[int], list[int]]:
    """ZSCL's split (``ClassificationDataset.split_dataset``): ``torch.utils.data.random_split``
    of all n samples into ``int(0.8 n)`` train and the rest test, generator seeded with
    ``seed`` (42 in ZSCL), over the samples in torchvision's order. Not stratified."""
    import torch

    n_train = int((1 - TEST_FRACTION) * n)
    train, test = torch.utils.data.random_split(range(n), [n_train, n - n_train],
                                                generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return list(train), list(test)


def few_shot(labels: list[int], keys: list[str], indices: list[int], k: int, seed: int, task: str) -> list[int]:
    """k indices per class out of ``indices`` (all of a class that has fewer, as CoOp's
    ``repeat=False``): per class sorted by key, then ``random.Random(f"{seed}:{task}:{c}").sample``."""
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(labels[i], []).append(i)
    out: list[int] = []
    for c in sorted(by_class):
        idx = sorted(by_class[c], key=lambda i: keys[i])
        out.extend(idx if len(idx) <= k else random.Random(f"{seed}:{task}:{c}").sample(idx, k))
    return sorted(out)


# --------------------------------------------------------------------------- layouts


@dataclass
class Layout:
    """Where one dataset lives in one layout and how to read it.

    ``required`` are paths (relative to the root) that must exist; ``alternatives`` are
    lists of such paths of which one complete list suffices (EuroSAT in the ZSCL layout).
    """

    folder: str
    required: list[str] = field(default_factory=list)
    alternatives: list[list[str]] = field(default_factory=list)
    split_json: str | None = None  # CoOp: relative path of split_zhou_*.json
    image_prefix: str = ""  # CoOp: folder the JSON's paths are relative to


ZSCL: dict[str, Layout] = {
    "Aircraft": Layout("fgvc-aircraft-2013b", [
        "fgvc-aircraft-2013b/data/images", "fgvc-aircraft-2013b/data/variants.txt",
        "fgvc-aircraft-2013b/data/images_variant_train.txt", "fgvc-aircraft-2013b/data/images_variant_test.txt"]),
    "Caltech101": Layout("caltech101", ["caltech101/101_ObjectCategories"]),
    "CIFAR100": Layout("cifar-100-python", ["cifar-100-python/train", "cifar-100-python/test"]),
    "DTD": Layout("dtd/dtd or dtd", alternatives=[
        ["dtd/dtd/images", "dtd/dtd/labels/train1.txt", "dtd/dtd/labels/test1.txt"],
        ["dtd/images", "dtd/labels/train1.txt", "dtd/labels/test1.txt"]]),
    "EuroSAT": Layout("EuroSAT_splits or eurosat", alternatives=[
        ["EuroSAT_splits/train", "EuroSAT_splits/test"], ["eurosat/2750"]]),
    "Flowers": Layout("flowers-102", ["flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"]),
    "Food": Layout("food-101", ["food-101/images", "food-101/meta/train.json", "food-101/meta/test.json"]),
    "MNIST": Layout("MNIST/raw", [f"MNIST/raw/{f}" for f in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]),
    "OxfordPet": Layout("oxford-iiit-pet", [
        "oxford-iiit-pet/images", "oxford-iiit-pet/annotations/trainval.txt", "oxford-iiit-pet/annotations/test.txt"]),
    "StanfordCars": Layout("stanford_cars", [
        "stanford_cars/cars_train", "stanford_cars/cars_test", "stanford_cars/devkit/cars_meta.mat",
        "stanford_cars/devkit/cars_train_annos.mat", "stanford_cars/cars_test_annos_withlabels.mat"]),
    "SUN397": Layout("SUN397", ["SUN397/ClassName.txt"]),
}  # fmt: skip

COOP: dict[str, Layout] = {
    "Aircraft": Layout("fgvc_aircraft", [
        "fgvc_aircraft/images", "fgvc_aircraft/variants.txt", "fgvc_aircraft/images_variant_train.txt",
        "fgvc_aircraft/images_variant_test.txt"]),
    "Caltech101": Layout("caltech-101", ["caltech-101/101_ObjectCategories"],
                         split_json="caltech-101/split_zhou_Caltech101.json", image_prefix="caltech-101/101_ObjectCategories"),
    "CIFAR100": Layout("cifar100", ["cifar100/meta", "cifar100/train", "cifar100/test"]),
    "DTD": Layout("dtd", ["dtd/images"], split_json="dtd/split_zhou_DescribableTextures.json", image_prefix="dtd/images"),
    "EuroSAT": Layout("eurosat", ["eurosat/2750"], split_json="eurosat/split_zhou_EuroSAT.json",
                      image_prefix="eurosat/2750"),
    "Flowers": Layout("oxford_flowers", ["oxford_flowers/jpg"], split_json="oxford_flowers/split_zhou_OxfordFlowers.json",
                      image_prefix="oxford_flowers/jpg"),
    "Food": Layout("food-101", ["food-101/images"], split_json="food-101/split_zhou_Food101.json",
                   image_prefix="food-101/images"),
    "MNIST": Layout("mnist", [f"mnist/{f}" for f in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]),
    "OxfordPet": Layout("oxford_pets", ["oxford_pets/images"], split_json="oxford_pets/split_zhou_OxfordPets.json",
                        image_prefix="oxford_pets/images"),
    "StanfordCars": Layout("stanford_cars", [], split_json="stanford_cars/split_zhou_StanfordCars.json",
                           image_prefix="stanford_cars"),
    "SUN397": Layout("sun397", ["sun397/SUN397"], split_json="sun397/split_zhou_SUN397.json",
                     image_prefix="sun397/SUN397"),
}  # fmt: skip

LAYOUTS = {"zscl": ZSCL, "coop": COOP}


def resolve_layout(layout: str, root: Path) -> str:
    """``auto`` -> ``coop`` if any CoOp split file exists under ``root``, else ``zscl``."""
    if layout != "auto":
        return layout
    for lay in COOP.values():
        if lay.split_json and (root / lay.split_json).is_file():
            return "coop"
    return "zscl"


# --------------------------------------------------------------------------- data check


def _fix(task: str, layout: str) -> str:
    return (
        f"fix: put {task} there as the README's 'The MTIL benchmark' section shows for the {layout} layout, "
        f"point run.benchmark.root at the directory that holds it, set run.benchmark.options.layout "
        f"(zscl | coop), or leave {task} out of run.benchmark.order / num_tasks"
    )


def _problem(task: str, layout: str, root: Path, what: str) -> str:
    return f"MTIL dataset {task} (layout {layout}, root {root}): {what}; {_fix(task, layout)}"


def _check_one(task: str, layout: str, root: Path) -> str | None:
    """The first problem of one dataset's files, or None. Existence checks only, plus
    reading the CoOp split file (a JSON parse) and testing its first and last image of each
    split, so a half-copied dataset fails here rather than in the middle of a trial."""
    lay = LAYOUTS[layout][task]
    missing = [p for p in lay.required if not (root / p).exists()]
    if missing:
        return _problem(task, layout, root, f"missing {root / missing[0]}")
    if lay.alternatives and not any(all((root / p).exists() for p in alt) for alt in lay.alternatives):
        # Name the first missing file of the form that is most nearly there.
        best = max(lay.alternatives, key=lambda alt: sum((root / p).exists() for p in alt))
        first = next(p for p in best if not (root / p).exists())
        others = " or ".join(" + ".join(alt) for alt in lay.alternatives if alt is not best)
        return _problem(task, layout, root, f"missing {root / first} (the other accepted form: {others})")
    if lay.split_json:
        path = root / lay.split_json
        if not path.is_file():
            return _problem(task, layout, root, f"missing split file {path}")
        try:
            split = json.loads(path.read_text())
            for name in ("train", "test"):
                items = split[name]
                if not items:
                    return _problem(task, layout, root, f"split file {path} has an empty '{name}' list")
                for rel, *_ in (items[0], items[-1]):
                    img = root / lay.image_prefix / rel
                    if not img.is_file():
                        return _problem(task, layout, root, f"image {img} listed in {path.name} '{name}' is missing")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return _problem(task, layout, root, f"cannot read split file {path} ({type(e).__name__}: {e})")
    return None


def check_data(options: dict[str, Any], root: str | None, tasks: list[str] | None = None) -> None:
    """Raise one SpecError listing every missing or incomplete dataset among ``tasks``
    (default: all eleven). Cheap: no image is decoded."""
    opts = MtilOptions.model_validate(options)
    if not root:
        raise SpecError(
            "run.benchmark.root: the mtil benchmark reads its datasets from disk; set it to the "
            "directory that holds them (see the README's 'The MTIL benchmark' section)"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise SpecError(
            f"run.benchmark.root: {base} is not a directory; the mtil benchmark reads its datasets from it "
            "(see the README's 'The MTIL benchmark' section)"
        )
    layout = resolve_layout(opts.layout, base)
    problems = [p for t in (tasks or TASK_NAMES) if (p := _check_one(t, layout, base))]
    if problems:
        raise SpecError("\n".join(problems))


# --------------------------------------------------------------------------- ZSCL readers


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _tv_source(ds: Any, labels: list[int], keys: list[str]) -> Source:
    return Source(_Torchvision(ds), [int(y) for y in labels], keys)


def _zscl_aircraft(root: Path, task: str) -> tuple[Source, Source]:
    from torchvision.datasets import FGVCAircraft

    out = []
    # ZSCL trains on FGVC's "train" split (not "trainval").
    for split in ("train", "test"):
        ds = FGVCAircraft(str(root), split=split, annotation_level="variant", download=False)
        out.append(_tv_source(ds, ds._labels, [Path(p).name for p in ds._image_files]))
    return out[0], out[1]


def _zscl_food(root: Path, task: str) -> tuple[Source, Source]:
    from torchvision.datasets import Food101

    out = []
    for split in ("train", "test"):
        ds = Food101(str(root), split=split, download=False)
        out.append(_tv_source(ds, ds._labels, [str(Path(p).relative_to(ds._images_folder)) for p in ds._image_files]))
    return out[0], out[1]


def _zscl_pets(root: Path, task: str) -> tuple[Source, Source]:
    from torchvision.datasets import OxfordIIITPet

    out = []
    for split in ("trainval", "test"):
        ds = OxfordIIITPet(str(root), split=split, target_types="category", download=False)
        out.append(_tv_source(ds, ds._labels, [Path(p).name for p in ds._images]))
    return out[0], out[1]


def _zscl_cars(root: Path, task: str) -> tuple[Source, Source]:
    from torchvision.datasets import StanfordCars

    out = []
    for split in ("train", "test"):
        ds = StanfordCars(str(root), split=split, download=False)
        out.append(_tv_source(ds, [y for _, y in ds._samples], [f"{split}/{Path(p).name}" for p, _ in ds._samples]))
    return out[0], out[1]


def _zscl_mnist(root: Path, task: str) -> tuple[Source, Source]:
    from torchvision.datasets import MNIST

    out = []
    for train in (True, False):
        ds = MNIST(str(root), train=train, download=False)
        out.append(Source(_Arrays(ds.data.numpy()), ds.targets.tolist(), [f"{train}:{i}" for i in range(len(ds))]))
    return out[0], out[1]


def _split_source(src: Source, opts: MtilOptions, task: str) -> tuple[Source, Source]:
    if opts.split_rule == "zscl":
        train, test = split_like_zscl(len(src.labels), opts.split_seed)
    else:
        train, test = split_per_class(src.labels, src.keys, opts.split_seed, task)

    def sub(idx: list[int]) -> Source:
        return Source(_Subset(src.load, idx), [src.labels[i] for i in idx], [src.keys[i] for i in idx])

    return sub(train), sub(test)


class _Subset:
    def __init__(self, load: Callable[[int], Any], idx: list[int]):
        self.load, self.idx = load, idx

    def __call__(self, i: int):
        return self.load(self.idx[i])


def _zscl_caltech(root: Path, task: str, opts: MtilOptions) -> tuple[Source, Source]:
    from torchvision.datasets import Caltech101

    ds = Caltech101(str(root), target_type="category", download=False)
    if len(ds.categories) != len(CLASSNAMES[task]):
        raise SpecError(_problem(task, "zscl", root, (
            f"{root / 'caltech101/101_ObjectCategories'} has {len(ds.categories)} class folders besides "
            f"BACKGROUND_Google, expected {len(CLASSNAMES[task])}")))
    keys = [f"{ds.categories[y]}/image_{i:04d}.jpg" for y, i in zip(ds.y, ds.index)]
    return _split_source(_tv_source(ds, ds.y, keys), opts, task)


def _zscl_sun(root: Path, task: str, opts: MtilOptions) -> tuple[Source, Source, list[str]]:
    from torchvision.datasets import SUN397

    ds = SUN397(str(root), download=False)
    if len(ds.classes) != 397:
        raise SpecError(_problem(task, "zscl", root, f"{root / 'SUN397/ClassName.txt'} lists {len(ds.classes)} classes, not 397"))
    # ZSCL's class names: torchvision's ("apse/indoor"), "_" -> " ".
    names = [c.replace("_", " ") for c in ds.classes]
    keys = [str(Path(p).relative_to(ds._data_dir)) for p in ds._image_files]
    # torchvision lists the files in the filesystem's order; sorted, the split is the same
    # on every machine.
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    src = Source(_Subset(_Torchvision(ds), order), [int(ds._labels[i]) for i in order], [keys[i] for i in order])
    train, test = _split_source(src, opts, task)
    return train, test, names


def _zscl_eurosat(root: Path, task: str, opts: MtilOptions) -> tuple[Source, Source]:
    from torchvision.datasets import EuroSAT, ImageFolder

    def check_folders(classes: list[str], where: Path) -> None:
        if sorted(classes) != sorted(EUROSAT_FOLDERS):
            raise SpecError(_problem(task, "zscl", root, (
                f"{where} has class folders {', '.join(classes)}; expected {', '.join(sorted(EUROSAT_FOLDERS))}")))

    if (root / "EuroSAT_splits/train").is_dir():
        out = []
        for split in ("train", "test"):
            ds = ImageFolder(str(root / "EuroSAT_splits" / split))
            check_folders(ds.classes, root / "EuroSAT_splits" / split)
            out.append(_tv_source(ds, ds.targets, [str(Path(p).relative_to(ds.root)) for p, _ in ds.samples]))
        return out[0], out[1]
    ds = EuroSAT(str(root), download=False)
    check_folders(ds.classes, root / "eurosat/2750")
    keys = [str(Path(p).relative_to(ds._data_folder)) for p, _ in ds.samples]
    return _split_source(_tv_source(ds, ds.targets, keys), opts, task)


def _read_cifar(folder: Path) -> tuple[Source, Source]:
    # The python pickles of cifar-100-python (torchvision's CIFAR100 would insist on the
    # archive's MD5 sums, so any re-packed copy fails there).
    out = []
    for split in ("train", "test"):
        with open(folder / split, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = entry["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = [int(y) for y in entry["fine_labels"]]
        out.append(Source(_Arrays(data), labels, [f"{split}:{i}" for i in range(len(labels))]))
    return out[0], out[1]


def _zscl_cifar(root: Path, task: str) -> tuple[Source, Source]:
    return _read_cifar(root / "cifar-100-python")


def _zscl_dtd(root: Path, task: str) -> tuple[Source, Source]:
    # ZSCL: torchvision's DTD, partition 1, split "train" / "test" (dtd/dtd/{images,labels}).
    # The archive unpacked at the root (dtd/{images,labels}) is read directly, same files.
    index = {c: i for i, c in enumerate(CLASSNAMES[task])}
    if (root / "dtd/dtd").is_dir():
        from torchvision.datasets import DTD

        base = root / "dtd/dtd"
        splits = []
        for split in ("train", "test"):
            ds = DTD(str(root), split=split, partition=1, download=False)
            splits.append([str(Path(p).relative_to(ds._images_folder)) for p in ds._image_files])
    else:
        base = root / "dtd"
        splits = [_read_lines(base / "labels" / f) for f in ("train1.txt", "test1.txt")]
    out = []
    for rels in splits:
        unknown = sorted({r.split("/")[0] for r in rels} - set(index))
        if unknown:
            raise SpecError(_problem(task, "zscl", root, f"{base / 'labels'} names unknown classes {', '.join(unknown)}"))
        out.append(Source(_Paths([str(base / "images" / r) for r in rels]), [index[r.split("/")[0]] for r in rels], rels))
    return out[0], out[1]


def _zscl_flowers(root: Path, task: str) -> tuple[Source, Source]:
    # Official 102flowers layout: jpg/image_00001.jpg ..., imagelabels.mat (labels 1..102),
    # setid.mat (trnid / valid / tstid, 1-based image ids). Train = trnid, test = tstid, as
    # torchvision's Flowers102 splits "train" / "test" (read here: it insists on MD5 sums).
    import numpy as np
    from scipy.io import loadmat

    base = root / "flowers-102"
    labels = np.atleast_1d(loadmat(str(base / "imagelabels.mat"), squeeze_me=True)["labels"])
    setid = loadmat(str(base / "setid.mat"), squeeze_me=True)
    out = []
    for key in ("trnid", "tstid"):
        ids = [int(i) for i in np.atleast_1d(setid[key])]
        names = [f"image_{i:05d}.jpg" for i in ids]
        out.append(Source(_Paths([str(base / "jpg" / n) for n in names]), [int(labels[i - 1]) - 1 for i in ids], names))
    return out[0], out[1]


# --------------------------------------------------------------------------- CoOp readers


def _coop_json(root: Path, task: str) -> tuple[Source, Source, list[str]]:
    lay = COOP[task]
    split = json.loads((root / lay.split_json).read_text())
    prefix = root / lay.image_prefix
    names: dict[int, str] = {}
    out = []
    for name in ("train", "test"):
        rels, labels = [], []
        for rel, y, cname in split[name]:
            rels.append(rel)
            labels.append(int(y))
            names.setdefault(int(y), cname)
        out.append(Source(_Paths([str(prefix / r) for r in rels]), labels, rels))
    n = max(names) + 1
    if sorted(names) != list(range(n)):
        missing = sorted(set(range(n)) - set(names))
        raise SpecError(_problem(task, "coop", root, f"{root / lay.split_json} has no sample of label(s) {missing}"))
    return out[0], out[1], [names[i] for i in range(n)]


def _coop_aircraft(root: Path, task: str) -> tuple[Source, Source, list[str]]:
    base = root / "fgvc_aircraft"
    classes = _read_lines(base / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for f in ("images_variant_train.txt", "images_variant_test.txt"):
        pairs = [line.split(" ", 1) for line in _read_lines(base / f)]
        out.append(Source(_Paths([str(base / "images" / f"{im}.jpg") for im, _ in pairs]),
                          [index[c] for _, c in pairs], [im for im, _ in pairs]))  # fmt: skip
    return out[0], out[1], classes


def _coop_mnist(root: Path, task: str, opts: MtilOptions) -> tuple[Source, Source, list[str]]:
    # DIKI's mnist/ folder holds the four idx files directly; torchvision's readers parse them.
    from torchvision.datasets.mnist import read_image_file, read_label_file

    base = root / "mnist"
    srcs = []
    for prefix in ("train", "t10k"):
        images = read_image_file(str(base / f"{prefix}-images-idx3-ubyte")).numpy()
        labels = read_label_file(str(base / f"{prefix}-labels-idx1-ubyte")).tolist()
        srcs.append(Source(_Arrays(images), labels, [f"{prefix}:{i}" for i in range(len(labels))]))
    train, _val = _split_source(srcs[0], opts, task)
    return train, srcs[1], list(CLASSNAMES[task])


def _coop_cifar(root: Path, task: str, opts: MtilOptions) -> tuple[Source, Source, list[str]]:
    trainval, test = _read_cifar(root / "cifar100")
    with open(root / "cifar100" / "meta", "rb") as f:
        classes = [c.replace("_", " ") for c in pickle.load(f, encoding="latin1")["fine_label_names"]]
    train, _val = _split_source(trainval, opts, task)
    return train, test, classes


# --------------------------------------------------------------------------- builder


def default_preprocess(image_size: int) -> Callable[[Any], Any]:
    """CLIP's eval transform, used when no backbone transform is given."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(_OPENAI_MEAN, _OPENAI_STD),
    ])  # fmt: skip


def _read(task: str, layout: str, root: Path, opts: MtilOptions) -> tuple[Source, Source, list[str]]:
    if layout == "zscl":
        if task == "SUN397":
            return _zscl_sun(root, task, opts)
        readers: dict[str, Callable[[], tuple[Source, Source]]] = {
            "Aircraft": lambda: _zscl_aircraft(root, task),
            "Caltech101": lambda: _zscl_caltech(root, task, opts),
            "CIFAR100": lambda: _zscl_cifar(root, task),
            "DTD": lambda: _zscl_dtd(root, task),
            "EuroSAT": lambda: _zscl_eurosat(root, task, opts),
            "Flowers": lambda: _zscl_flowers(root, task),
            "Food": lambda: _zscl_food(root, task),
            "MNIST": lambda: _zscl_mnist(root, task),
            "OxfordPet": lambda: _zscl_pets(root, task),
            "StanfordCars": lambda: _zscl_cars(root, task),
        }
        train, test = readers[task]()
        return train, test, list(CLASSNAMES[task])
    if task == "Aircraft":
        return _coop_aircraft(root, task)
    if task == "MNIST":
        return _coop_mnist(root, task, opts)
    if task == "CIFAR100":
        return _coop_cifar(root, task, opts)
    return _coop_json(root, task)


def _sample_file(load: Callable[[int], Any], j: int) -> str | None:
    """The file sample j of a source is read from, when the source is a list of files."""
    while isinstance(load, _Subset):
        load, j = load.load, load.idx[j]
    return load.paths[j] if isinstance(load, _Paths) else None


def _attach_cache(ds: MtilDataset, task: str, split: str, layout: str, root: Path, opts: MtilOptions) -> None:
    """Serve ``ds`` from the image cache (built here on first use) when its transform
    splits into pixel and tensor steps; otherwise leave it decoding (logged once)."""
    import hashlib
    import logging

    from mmcl.data import image_cache

    pixels = image_cache.split_transform(ds.preprocess)
    if pixels is None:
        logging.getLogger(__name__).info("MTIL %s: transform %r has steps the image cache does not freeze; "
                                         "images are decoded per sample", task, ds.preprocess)  # fmt: skip
        return
    files = [_sample_file(ds.source.load, j) for j in ds.indices]
    h = hashlib.sha256()
    if all(f is not None for f in files):
        # The files themselves: a copied-over or re-encoded image has another size / mtime.
        for f in files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        # Arrays and torchvision readers: the dataset's own files (archives, pickles, folders).
        lay = LAYOUTS[layout][task]
        for rel in [*lay.required, *(p for alt in lay.alternatives for p in alt)]:
            if (root / rel).exists():
                st = (root / rel).stat()
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update("\n".join(ds.keys).encode())
    identity = {"benchmark": "mtil", "task": task, "split": split, "layout": layout, "root": str(root),
                "n": len(ds), "samples": h.hexdigest()}  # fmt: skip
    ds.pixels = image_cache.open_or_build(image_cache.cache_root(opts.cache_dir), identity, ds.load, len(ds),
                                          pixels, f"MTIL {task} {split}")  # fmt: skip


def build_mtil(
    options: dict,
    image_size: int,
    seed: int,
    *,
    root: str | None = None,
    preprocess: Any = None,
    tasks: list[str] | None = None,
) -> Benchmark:
    """Builder of the ``mtil`` benchmark (see :class:`MtilOptions`).

    ``tasks``: the task names to read, in this order (default: the option's order); a run
    of three tasks neither needs nor opens the other eight datasets. ``seed`` is unused
    (splits have their own seeds, ``split_seed`` and ``shots_seed``).
    """
    del seed
    opts = MtilOptions.model_validate(options)
    names = list(tasks) if tasks is not None else list(ORDERS[opts.order])
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise SpecError(f"run.benchmark.order: unknown MTIL task(s) {unknown}; tasks: {', '.join(TASK_NAMES)}")
    check_data(options, root, names)
    base = Path(root).expanduser().resolve()  # type: ignore[arg-type]
    layout = resolve_layout(opts.layout, base)
    if opts.split_rule == "auto":
        opts = opts.model_copy(update={"split_rule": "zscl" if layout == "zscl" else "per_class"})
    transform = preprocess if preprocess is not None else default_preprocess(image_size)
    built = []
    for name in names:
        try:
            train_src, test_src, classnames = _read(name, layout, base, opts)
        except (OSError, RuntimeError, ValueError, KeyError, IndexError) as e:
            raise SpecError(_problem(name, layout, base, f"cannot be read ({type(e).__name__}: {e})")) from None
        bad = sorted({y for y in train_src.labels + test_src.labels if not 0 <= y < len(classnames)})
        if bad:
            raise SpecError(_problem(name, layout, base, f"labels {bad[:5]} are outside 0..{len(classnames) - 1}"))
        train_idx = list(range(len(train_src.labels)))
        if opts.shots is not None:
            train_idx = few_shot(train_src.labels, train_src.keys, train_idx, opts.shots, opts.shots_seed, name)
        train = MtilDataset(train_src, train_idx, transform)
        test = MtilDataset(test_src, list(range(len(test_src.labels))), transform)
        if opts.image_cache:
            for split_name, ds in (("train", train), ("test", test)):
                _attach_cache(ds, name, split_name, layout, base, opts)
        built.append(
            Task(
                name=name,
                classnames=list(classnames),
                templates=list(TEMPLATES[name]),
                train=train,
                test=test,
                info={"layout": layout, "n_train": len(train), "n_test": len(test), "shots": opts.shots},
            )
        )
    return Benchmark("mtil", built)
