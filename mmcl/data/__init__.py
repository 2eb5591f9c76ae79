"""Benchmarks by name: ``build_benchmark(spec)`` and ``benchmark_task_names(spec)``.

A benchmark registers a builder (see :class:`mmcl.data.base.BenchmarkBuilder`) and the
list of its task names in the default order; the names are known without generating or
reading any data, so a study can be validated before anything heavy runs. A benchmark
read from disk also registers a cheap data check (:func:`check_benchmark_data`), which
``mmcl validate --check-data`` and the start of ``mmcl run`` call. Built benchmarks are
cached in-process by (name, options, image size, root, transform, tasks): every trial of
a study running in one worker process builds the data once.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from mmcl.data.base import Benchmark, BenchmarkBuilder, Task, TensorTaskDataset
from mmcl.spec import BenchmarkSpec, SpecError

__all__ = [
    "Benchmark",
    "Task",
    "TensorTaskDataset",
    "build_benchmark",
    "benchmark_is_paired",
    "benchmark_task_names",
    "check_backbone_fits",
    "check_benchmark_data",
    "register_benchmark",
    "registered_benchmarks",
]

DEFAULT_IMAGE_SIZE = 32


@dataclass(frozen=True)
class _Entry:
    builder: BenchmarkBuilder
    # Default task names, without building anything.
    task_names: Callable[[dict[str, Any]], list[str]]
    # Validates options early (a pydantic model with extra="forbid"), or None.
    options_model: type[BaseModel] | None = None
    # Benchmarks read from disk: check_data(options, root, task_names) raises a SpecError
    # naming each missing dataset, its expected path and the fix, without decoding images.
    # Such builders also get root=, preprocess= and tasks= (the names the run needs), unless
    # they take_preprocess (paired: root= and preprocess= only).
    check_data: Callable[[dict[str, Any], str | None, list[str]], None] | None = None
    # Paired-modality benchmarks: the builder takes the backbone's ``preprocess`` (raw
    # clips converted to the encoders' input format) and ``root``.
    takes_preprocess: bool = False

    @property
    def reads_files(self) -> bool:
        return self.check_data is not None


_REGISTRY: dict[str, _Entry] = {}


def register_benchmark(
    name: str,
    builder: BenchmarkBuilder,
    task_names: Callable[[dict[str, Any]], list[str]],
    options_model: type[BaseModel] | None = None,
    check_data: Callable[[dict[str, Any], str | None, list[str]], None] | None = None,
    takes_preprocess: bool = False,
) -> None:
    """Make ``name`` usable as ``run.benchmark.name``."""
    _REGISTRY[name] = _Entry(builder, task_names, options_model, check_data, takes_preprocess)


def _ensure_builtin() -> None:
    # Registered lazily so importing mmcl.data does not import the generators.
    if "synthetic" in _REGISTRY:
        return
    from mmcl.data import synthetic

    register_benchmark(
        "synthetic", synthetic.build_synthetic, lambda _opts: list(synthetic.TASK_NAMES), synthetic.SyntheticOptions
    )

    # The paired-modality track (audio + video); modules import their heavy parts lazily.
    from mmcl.data import ave, paired_synthetic

    register_benchmark(
        "paired_synthetic",
        paired_synthetic.build_paired_synthetic,
        paired_synthetic.task_names,
        paired_synthetic.PairedSyntheticOptions,
        takes_preprocess=True,
    )
    register_benchmark("ave", ave.build_ave, ave.task_names, ave.AVEOptions, ave.check_ave_data, takes_preprocess=True)
    register_benchmark(
        "paired_manifest", ave.build_manifest, ave.manifest_task_names, ave.ManifestOptions, ave.check_manifest_data,
        takes_preprocess=True,
    )

    # mtil imports only pydantic and its class-name tables at module level; torchvision,
    # PIL and scipy load when a dataset is read.
    from mmcl.data import mtil

    register_benchmark("mtil", mtil.build_mtil, mtil.task_names, mtil.MtilOptions, mtil.check_data)

    # The generation track: a generated caption / VQA stream, and COCO captions / VQAv2
    # read from disk (json + PIL only when a dataset is read).
    from mmcl.data import coco, synthetic_text

    register_benchmark(
        "synthetic_text",
        synthetic_text.build_synthetic_text,
        lambda _opts: list(synthetic_text.TASK_NAMES),
        synthetic_text.SyntheticTextOptions,
    )
    register_benchmark("coco_caption", coco.build_coco_caption, coco.caption_task_names, coco.CocoCaptionOptions,
                       coco.check_caption_data)
    register_benchmark("vqav2", coco.build_vqav2, coco.vqa_task_names, coco.Vqav2Options, coco.check_vqa_data)


def registered_benchmarks() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def _entry(spec: BenchmarkSpec) -> _Entry:
    _ensure_builtin()
    try:
        return _REGISTRY[spec.name]
    except KeyError:
        raise SpecError(
            f"run.benchmark.name: unknown benchmark {spec.name!r}; registered benchmarks: "
            f"{', '.join(registered_benchmarks())}"
        ) from None


def _check_options(entry: _Entry, options: dict[str, Any]) -> None:
    if entry.options_model is None:
        return
    try:
        entry.options_model.model_validate(options)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] != "extra_forbidden" and "input" in err:
                msg = f"{msg} (got {err['input']!r})"
            lines.append(f"run.benchmark.options.{key}: {msg}")
        if entry.options_model is not None:
            lines.append(f"  valid options: {', '.join(entry.options_model.model_fields)}")
        raise SpecError("\n".join(lines)) from None


def benchmark_is_paired(name: str) -> bool:
    """Whether ``name`` is a paired-modality benchmark (needs a paired backbone)."""
    return _entry(BenchmarkSpec(name=name)).takes_preprocess


def uses_image_cache(spec: BenchmarkSpec) -> bool:
    """Whether ``spec``'s benchmark serves its images from the image cache
    (:mod:`mmcl.data.image_cache`): it has an ``image_cache`` option and it is on."""
    entry = _entry(spec)
    model = entry.options_model
    if model is None or "image_cache" not in model.model_fields:
        return False
    return bool(model.model_validate(spec.options).image_cache)


def check_backbone_fits(spec: BenchmarkSpec, backbone_kind: str) -> None:
    """A paired benchmark needs per-modality encoders; an image benchmark a CLIP."""
    paired = benchmark_is_paired(spec.name)
    if paired != (backbone_kind == "paired"):
        need = "paired (per-modality encoders)" if paired else "open_clip"
        raise SpecError(
            f"run.benchmark.name: {spec.name!r} needs run.backbone.kind: {need}, but the backbone is {backbone_kind!r}"
        )


def benchmark_task_names(spec: BenchmarkSpec) -> list[str]:
    """The benchmark's task names in its DEFAULT order (``spec.order`` is not applied)."""
    entry = _entry(spec)
    _check_options(entry, spec.options)
    return entry.task_names(spec.options)


def _needed_tasks(spec: BenchmarkSpec, default: list[str]) -> list[str]:
    """The task names a run of ``spec`` trains and evaluates, in order (errors as
    :func:`_apply_order` gives them, before any data is read)."""
    stub = Benchmark(spec.name, [Task(n, [], [], None, None) for n in default])  # type: ignore[arg-type]
    return _apply_order(stub, spec).task_names()


def check_benchmark_data(spec: BenchmarkSpec, task_names: list[str] | None = None) -> None:
    """Open the data roots of ``spec``'s tasks (default: the tasks the run uses): a missing
    or incomplete dataset is a SpecError naming it, its expected path and the fix.
    Generated benchmarks have nothing to check."""
    entry = _entry(spec)
    _check_options(entry, spec.options)
    if entry.check_data is None:
        return
    names = task_names if task_names is not None else _needed_tasks(spec, entry.task_names(spec.options))
    entry.check_data(dict(spec.options), spec.root, list(names))


def _apply_order(bench: Benchmark, spec: BenchmarkSpec) -> Benchmark:
    tasks = list(bench.tasks)
    if spec.order is not None:
        by_name = {t.name: t for t in tasks}
        dup = sorted({n for n in spec.order if spec.order.count(n) > 1})
        if dup:
            raise SpecError(f"run.benchmark.order: task names must be distinct; repeated: {', '.join(dup)}")
        unknown = [n for n in spec.order if n not in by_name]
        if unknown:
            raise SpecError(
                f"run.benchmark.order: unknown task(s) {', '.join(map(repr, unknown))} for benchmark "
                f"{spec.name!r}; valid names: {', '.join(by_name)}"
            )
        if not spec.order:
            raise SpecError("run.benchmark.order: is empty; list task names or leave it out")
        tasks = [by_name[n] for n in spec.order]
    if spec.num_tasks is not None:
        if spec.num_tasks > len(tasks):
            raise SpecError(
                f"run.benchmark.num_tasks: {spec.num_tasks} but the benchmark (in this order) has "
                f"{len(tasks)} tasks"
            )
        tasks = tasks[: spec.num_tasks]
    return Benchmark(bench.name, tasks)


# Small LRU of built benchmarks: (name, options json, image size, root, transform, tasks) -> Benchmark.
_CACHE: OrderedDict[tuple, Benchmark] = OrderedDict()
_CACHE_SIZE = 4


def clear_cache() -> None:
    _CACHE.clear()


def build_benchmark(spec: BenchmarkSpec, image_size: int | None = None, preprocess: Any = None) -> Benchmark:
    """Build (or fetch from the in-process cache) the tasks of ``spec`` in training order.

    ``image_size`` is the backbone's input size (None: the benchmark's default);
    ``preprocess`` is the backbone's image transform (open_clip's), applied to every image
    a benchmark reads from files; generated benchmarks produce normalised tensors directly
    and ignore it. Benchmarks read from files get ``spec.root``, the transform and the
    task names the run needs (only those datasets are opened).
    """
    entry = _entry(spec)
    _check_options(entry, spec.options)
    opt_size = spec.options.get("image_size")
    if opt_size is not None and image_size is not None and int(opt_size) != int(image_size):
        raise SpecError(
            f"run.benchmark.options.image_size: {opt_size} but the backbone takes {image_size}-pixel images; "
            "leave it out to use the backbone's size"
        )
    size = int(image_size or opt_size or DEFAULT_IMAGE_SIZE)
    extra: dict[str, Any] = {}
    key: tuple = (spec.name, json.dumps(spec.options, sort_keys=True, default=str), size)
    if entry.takes_preprocess:
        # Paired benchmarks (files on disk or generated) convert raw clips with
        # ``preprocess``; its settings key the cache. They build every task of their listing.
        extra = {"preprocess": preprocess, "root": spec.root}
        key = (*key, spec.root, getattr(preprocess, "cache_key", None))
    elif entry.reads_files:
        needed = _needed_tasks(spec, entry.task_names(spec.options))
        extra = {"root": spec.root, "preprocess": preprocess, "tasks": needed}
        # A transform's repr lists its steps and sizes: two backbones with the same
        # preprocessing share the built benchmark.
        key = (*key, spec.root, repr(preprocess), tuple(needed))
    bench = _CACHE.get(key)
    if bench is None:
        bench = entry.builder(dict(spec.options), size, 0, **extra)
        _CACHE[key] = bench
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return _apply_order(bench, spec)
