"""Trainable-parameter counts of a study's methods on its real backbone, without weights.

``mmcl plan`` prints, for every distinct method config a study trains, how many
parameters train on each task and how many the method trains over the whole sequence,
for the backbone the study names (ViT-B/16, BLIP-2 OPT-2.7B, LLaVA-1.5-7B, ViT-B/16 + AST)
so that they can be checked against the papers' figures before any GPU time is spent.

How (and why this way): the backbone is built from its *config* on PyTorch's ``meta``
device (shapes, no storage: a 7B model costs no memory and about a second), and the
method's own ``setup`` and ``before_task`` run on it for every task, on tasks that carry
the benchmark's task names and class ids but no data. The counts are then the ones the
engine reports (``trainable_parameters()`` after ``before_task``), from the method's real
code, not from a second formula that could drift from it.

- per task: the elements of ``trainable_parameters()`` after ``before_task(t)`` (the
  engine's ``trainable_params`` is the largest of these);
- in all: the distinct parameters that trained on at least one task, i.e. what the method
  has trained and stores at the end (DIKI: 11 prompt sets on MTIL; ECA: its adapter bank,
  every task's key and queries, the projection; one LoRA: the LoRA itself).

Nothing is downloaded and no weights are read: ``pretrained`` tags and checkpoints are
ignored; open_clip configs are built in (and the project's ``mmcl-*`` ones); for
BLIP-2 / LLaVA / AST the model directory's ``config.json`` is read when the directory is
on this machine (or the hub id is in the Hugging Face cache), else the shipped config the
path names (:mod:`mmcl.backbones.shipped_configs`).

Data-dependent steps are not guessed. Where a method's parameters depend on the data, the
count leaves that part out and says so (``growth``): DIKI / DAGR fit a Gaussian per task
in ``before_task`` (no parameters: skipped here); ECA's FeDEx decides from gradients
whether a task start adds an adapter bank (counted as if it never did); CMA freezes the
experts a task used and grows new ones after a task (counted as if nothing froze or grew).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from mmcl.spec import ASTEncoderSpec, BackboneSpec, ClipVisionEncoderSpec, PairedBackboneSpec, SpecError

if TYPE_CHECKING:
    from cl_methods.base import Method
    from mmcl.data.base import Task
    from mmcl.spec import RunSpec, StudySpec

META = torch.device("meta")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ParamCount:
    """What one run's method trains, counted on the meta device."""

    method: str
    backbone: str  # where the backbone's config came from, in words
    backbone_params: int  # all parameters of the frozen backbone (before the method adds any)
    task_names: list[str]
    per_task: list[int]  # trainable after before_task(t), t = 0..T-1
    total: int  # distinct parameters that trained on at least one task
    growth: str | None = None  # what the count leaves out because it depends on the data

    @property
    def max_per_task(self) -> int:
        """The engine's ``trainable_params`` for this run."""
        return max(self.per_task, default=0)


# --------------------------------------------------------------------------- configs


def _read_config(path: Path, key: str) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"{key}: cannot read {path} ({e}); it must be the model's config.json") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{key}: {path} is not a config.json (a JSON object)")
    return cfg


def _cached_hub_config(repo: str, cache_dir: str | None) -> Path | None:
    """config.json of a hub id already in the Hugging Face cache (never downloads)."""
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir)
    return Path(hit) if isinstance(hit, str) else None


def hf_config(kind: str, path: str | None, cache_dir: str | None, key: str) -> tuple[dict[str, Any], str]:
    """(config.json dict, where it came from) of a transformers backbone.

    ``kind``: blip2, llava or ast; ``path``: the study's model path or hub id; ``key``: the
    study key that names it, for messages. Order: a local directory's config.json (it may
    hold only that file), a cached hub id, the shipped config the name matches.
    """
    from mmcl.backbones.shipped_configs import KIND_CONFIGS, match_shipped, shipped_config

    assert path is not None
    local = Path(path).expanduser()
    if local.is_dir():
        cfg_file = local / "config.json"
        if not cfg_file.is_file():
            raise SpecError(f"{key}: {local} has no config.json; copy the model's config.json there (no weights needed)")
        return _read_config(cfg_file, key), str(cfg_file)
    if local.is_file():
        raise SpecError(f"{key}: {local} is a file; give the model directory (the one holding config.json)")
    cached = _cached_hub_config(path, cache_dir)
    if cached is not None:
        return _read_config(cached, key), f"{path} (Hugging Face cache)"
    name = match_shipped(kind, path)
    if name is not None:
        return shipped_config(name), f"shipped config {name}.json"
    shipped = ", ".join(KIND_CONFIGS.get(kind, ())) or "none"
    raise SpecError(
        f"{key}: {path!r} is not a directory here, not a hub id in the Hugging Face cache, and names no shipped "
        f"config (for {kind}: {shipped}); to count parameters, put the model's config.json in a directory "
        "and give that directory (no weights needed)"
    )


def _check_model_type(cfg: dict[str, Any], expected: str, source: str, key: str) -> None:
    found = cfg.get("model_type")
    if found != expected:
        raise SpecError(f"{key}: {source} holds a {found!r} model, not {expected!r}; give a {expected} config.json")


# --------------------------------------------------------------------------- backbones


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """open_clip logs 'No pretrained weights loaded' for every model built without them,
    which is the point here."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _no_tokenizer(*_: Any, **__: Any) -> torch.Tensor:
    raise RuntimeError("a backbone built for parameter counting has no tokenizer")


def _meta_clip(model: str, key: str):
    """An open_clip CLIP of config ``model`` on the meta device (a ClipBackbone)."""
    import open_clip

    from mmcl.backbones.clip import ClipBackbone, register_model_configs

    register_model_configs()
    if model not in open_clip.list_models():
        raise SpecError(f"{key}: unknown open_clip model {model!r}; see open_clip.list_models()")
    # A text tower from the hub (roberta-, xlm-roberta-, mt5-, nllb- CLIPs) needs its
    # hub config even without weights: counting never downloads, so it says so.
    if (open_clip.get_model_config(model) or {}).get("text_cfg", {}).get("hf_model_name"):
        raise SpecError(f"{key}: open_clip {model!r} has a Hugging Face text tower whose config comes from the hub; "
                        "mmcl plan counts without downloading, so it cannot count this model (use --no-params)")  # fmt: skip
    try:
        with _quiet():
            clip = open_clip.create_model(model, pretrained=None, device=META)
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        raise SpecError(f"{key}: cannot build open_clip {model!r} from its config on the meta device: {e}") from None
    # [choice] No tokenizer: no method tokenizes while it sets up, and some open_clip
    # tokenizers come from the hub (a download, which this never does).
    return ClipBackbone(clip, _no_tokenizer, None, model).freeze()


def _tiny_vlm_config(spec: BackboneSpec) -> tuple[dict[str, Any], str]:
    """mmcl:tiny / mmcl:tiny-pretrained: the cached model's config.json when built, else
    the recipe's config (its tokenizer is trained on the generated corpus, a few seconds)."""
    from mmcl.backbones.vlm import IMAGE_TOKEN, tiny_config, tiny_model_dir, tiny_tokenizer

    cached = tiny_model_dir(spec) / "config.json"
    if cached.is_file():
        return _read_config(cached, "run.backbone.path"), f"{spec.path} ({cached})"
    with torch.device("cpu"):  # the corpus is generated with real tensors, not on the meta device
        tok = tiny_tokenizer()
    return tiny_config(spec.kind, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN)).to_dict(), f"{spec.path} (recipe)"


def _meta_vlm(spec: BackboneSpec):
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    from mmcl.backbones.vlm import TINY, TINY_PRETRAINED, VlmBackbone

    key = "run.backbone.path"
    if spec.path in (TINY, TINY_PRETRAINED):
        cfg, source = _tiny_vlm_config(spec)
    else:
        cfg, source = hf_config(spec.kind, spec.path, spec.cache_dir, key)
    expected = {"blip2": "blip-2", "llava": "llava"}[spec.kind]
    _check_model_type(cfg, expected, source, key)
    cls = Blip2ForConditionalGeneration if spec.kind == "blip2" else LlavaForConditionalGeneration
    try:
        config = cls.config_class.from_dict(cfg)
        with torch.device(META):
            model = cls._from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise SpecError(f"{key}: cannot build a {spec.kind} model from {source}: {e}") from None
    text = config.text_config
    # [choice] The special ids of the config stand in for the tokenizer (VlmBackbone reads
    # only these three from it while it is built; nothing is tokenized here).
    ids = SimpleNamespace(pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id)
    return VlmBackbone(model, ids, spec.kind, spec.prompt_format, (OPENAI_MEAN, OPENAI_STD)).freeze(), source


def _meta_ast(name: str, enc: ASTEncoderSpec):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    from mmcl.backbones.paired import ASTAudioEncoder

    key = f"run.backbone.encoders.{name}"
    if enc.path is None:
        cfg, source = {**ASTConfig().to_dict(), **enc.config}, f"{key}.config"
    else:
        cfg, source = hf_config("ast", enc.path, enc.cache_dir, f"{key}.path")
    _check_model_type(cfg, "audio-spectrogram-transformer", source, f"{key}.path")
    try:
        config = ASTConfig.from_dict(cfg)
        with torch.device(META):
            model = ASTModel(config)
    except (TypeError, ValueError, KeyError) as e:
        raise SpecError(f"{key}: cannot build an ASTModel from {source}: {e}") from None
    with warnings.catch_warnings():
        # 128 mel bins of a 16 kHz filterbank leave some filters empty: AST's own setting.
        warnings.simplefilter("ignore", UserWarning)
        fe = ASTFeatureExtractor(num_mel_bins=config.num_mel_bins, max_length=config.max_length,
                                 sampling_rate=enc.sampling_rate)  # fmt: skip
    return ASTAudioEncoder(model, fe, enc.sampling_rate), source


def _meta_paired(spec: PairedBackboneSpec):
    from mmcl.backbones.paired import ClipVideoEncoder, PairedBackbone

    encoders: dict[str, Any] = {}
    sources = []
    for name, enc in spec.encoders.items():
        if isinstance(enc, ClipVisionEncoderSpec):
            clip = _meta_clip(enc.model, f"run.backbone.encoders.{name}.model")
            encoders[name] = ClipVideoEncoder(clip.model.visual, OPENAI_MEAN, OPENAI_STD)
            sources.append(f"{name}: open_clip {enc.model} image tower")
        else:
            encoders[name], source = _meta_ast(name, enc)
            sources.append(f"{name}: AST from {source}")
    return PairedBackbone(encoders).freeze(), "; ".join(sources)


def meta_backbone(spec: Any) -> tuple[nn.Module, str]:
    """(the frozen backbone ``spec`` names, built on the meta device; where its config
    came from). The same wrapper classes the engine loads, so methods set up as in a run."""
    if spec.kind == "paired":
        return _meta_paired(spec)
    if spec.kind in ("blip2", "llava"):
        return _meta_vlm(spec)
    return _meta_clip(spec.model, "run.backbone.model"), f"open_clip {spec.model} config"


# --------------------------------------------------------------------------- tasks without data


class _NoData(Dataset):
    """A task's training set here: empty (no method's setup or before_task reads it once
    its data passes are taken out, see _patch_data_passes)."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> dict:
        raise IndexError(i)


def _paired_groups(run: "RunSpec", n_tasks: int) -> tuple[int, list[list[int]]]:
    """(number of classes, class ids of each task) of a paired benchmark, from its options.
    Ids only size the heads, so [choice] classes are numbered in class order."""
    opts = run.benchmark.options
    protocol = opts.get("protocol", "cil")
    if "classes" in opts and opts["classes"]:
        n = len(opts["classes"])
    elif run.benchmark.name == "ave":
        from mmcl.data.ave import AVEOptions

        n = AVEOptions.model_validate(opts).num_classes
    elif run.benchmark.name == "paired_synthetic":
        from mmcl.data.paired_synthetic import CLASS_NAMES

        n = len(CLASS_NAMES)
    else:
        raise SpecError(
            f"run.benchmark.options: cannot tell the classes of paired benchmark {run.benchmark.name!r} without "
            "its data; list them in run.benchmark.options.classes"
        )
    if protocol == "dil":
        return n, [list(range(n)) for _ in range(n_tasks)]
    from mmcl.data.paired import ProtocolOptions

    k = ProtocolOptions.model_validate({"classes_per_task": opts.get("classes_per_task", 2)}).classes_per_task
    if run.benchmark.name == "ave" and "classes_per_task" not in opts:
        k = 4  # AVEOptions' own default
    groups = [list(range(n))[i : i + k] for i in range(0, n, k)]
    return n, groups[:n_tasks]


def _text_metric(run: "RunSpec", name: str) -> str:
    if run.benchmark.name == "synthetic_text":
        from mmcl.data.synthetic_text import TEXT_TASKS

        return next((t.metric for t in TEXT_TASKS if t.name == name), "cider")
    return "vqa_acc" if run.benchmark.name == "vqav2" else "cider"


def stub_tasks(run: "RunSpec", track: str) -> list["Task"]:
    """The run's tasks in training order with their names, metrics and class ids, and no data."""
    from mmcl.data.base import Task
    from mmcl.study import _task_names

    names = _task_names(run)
    tasks = []
    if track == "paired":
        n, groups = _paired_groups(run, len(names))
        protocol = run.benchmark.options.get("protocol", "cil")
        for name, ids in zip(names, groups):
            info = {"protocol": protocol, "num_classes": n, "class_ids": ids}
            tasks.append(Task(name, [f"class-{i}" for i in ids], ["{}"], _NoData(), _NoData(), info=info))
    elif track == "generation":
        for name in names:
            tasks.append(Task(name, [], [], _NoData(), _NoData(), metric=_text_metric(run, name)))
    else:
        for name in names:
            tasks.append(Task(name, [], ["{}"], _NoData(), _NoData()))
    return tasks


# --------------------------------------------------------------------------- methods without data


def _patch_data_passes(method: "Method") -> None:
    """Take the data passes that create no parameters out of ``method``'s before_task
    (after setup); everything else stays the method's own code."""
    from cl_methods.diki import DIKI

    if isinstance(method, DIKI):  # DAGR too
        # The task Gaussian of before_task: statistics over the task's images, no parameters.
        method.identifier.fit_task = lambda features: None  # type: ignore[method-assign]
        method._features = lambda task_index: None  # type: ignore[method-assign]
    from cl_methods.dagr import DAGR

    if isinstance(method, DAGR):
        # Matching the task's graph nodes with the previous task's: a data pass, no parameters.
        method.prepare_target = lambda task_index, task: None  # type: ignore[method-assign]


def _growth_note(method: "Method", fedex: bool) -> str | None:
    """What the count leaves out because it is decided on the data, sized from the
    method's own modules; None when nothing is."""
    from cl_methods.cma import CMA
    from cl_methods.eca import ECA

    if isinstance(method, ECA) and fedex:
        bank = sum(p.numel() for p in method.adapters.current_parameters())
        return f"FeDEx may add an adapter bank of {bank:,} at a task start (decided on the data)"
    if isinstance(method, CMA) and method.config.freeze:
        block = method.model.blocks[0]
        expert = sum(p.numel() for p in block.experts[0].parameters()) + block.gate.in_features + 1
        return (
            "experts a task used freeze after it (no longer trainable) and blocks may grow new experts of "
            f"{expert:,} each, gate row included (decided on the data)"
        )
    return None


def _config_without_data(name: str, config: Any) -> tuple[Any, bool]:
    """ECA's FeDEx decides expansion from gradients on the task's data: counted as
    ``expansion: never`` (one bank, no growth), with the growth named in the result."""
    if name == "eca" and getattr(config, "expansion", None) == "fedex":
        return config.model_copy(update={"expansion": "never"}), True
    return config, False


def count_run(run: "RunSpec") -> ParamCount:
    """Count what ``run``'s method trains per task and in all (see the module docstring)."""
    from cl_methods import get_method_class
    from cl_methods.base import MethodContext

    cls = get_method_class(run.method.name)
    config, fedex = _config_without_data(run.method.name, cls.Config.model_validate(run.method.config))
    tasks = stub_tasks(run, cls.track)
    generator = torch.Generator()
    with torch.device(META):
        backbone, source = meta_backbone(run.backbone)
        backbone_params = sum(p.numel() for p in backbone.parameters())
        method = cls(config)
        ctx = MethodContext(tasks=tasks, train_sets=[_NoData() for _ in tasks], device=META, generator=generator,
                            templates=run.evaluation.templates)  # fmt: skip
        where = f"method {run.method.name!r}"
        try:
            method.setup(backbone, run, ctx)
            method.modules.to(META)
            _patch_data_passes(method)
            per_task: list[int] = []
            trained: dict[int, nn.Parameter] = {}  # by identity: a parameter counts once
            for t, task in enumerate(tasks):
                generator.manual_seed(t)
                method.before_task(t, task)
                params = method.trainable_parameters()
                per_task.append(sum(p.numel() for p in params))
                trained.update((id(p), p) for p in params)
        except SpecError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError, AssertionError) as e:
            # A method whose setup / before_task reads data or values cannot run on the
            # meta device; say so rather than print a count that is not the method's.
            raise SpecError(
                f"{where}: its parameters cannot be counted without data ({type(e).__name__}: {e}); "
                "its setup / before_task reads training data or tensor values"
            ) from None
    growth = _growth_note(method, fedex)
    return ParamCount(run.method.name, source, backbone_params, [t.name for t in tasks], per_task,
                      sum(p.numel() for p in trained.values()), growth)  # fmt: skip


# --------------------------------------------------------------------------- a study


@dataclass
class _Entry:
    run: "RunSpec"
    labels: list[str] = field(default_factory=list)


def study_runs(study: "StudySpec") -> list[tuple["RunSpec", list[str]]]:
    """The distinct method configs a study trains, each with where it is used: the run
    block (and search stages, which start from it), every ablation variant. [choice] A
    search stage is counted at the run block's values although its trials draw their own
    method keys; orders stages train the stages' method on other task orders (same
    parameters, other tasks' order), so they add nothing."""
    from mmcl.spec import AblationStage, SearchStage
    from mmcl.study import plan_stage

    entries: dict[str, _Entry] = {}

    def add(run: "RunSpec", label: str) -> None:
        key = json.dumps([run.method.model_dump(mode="json"), run.backbone.model_dump(mode="json"),
                          run.benchmark.model_dump(mode="json")], sort_keys=True, default=str)  # fmt: skip
        entries.setdefault(key, _Entry(run)).labels.append(label)

    add(study.run, "run block")
    for i, st in enumerate(study.stages):
        plan = plan_stage(study, i, Path("."), best={})
        if isinstance(st, SearchStage):
            add(plan.base_run, f"{st.name} (search, at the run block's values)")
        elif isinstance(st, AblationStage):
            seen = set()
            for trial in plan.trials:
                if trial.variant not in seen:
                    seen.add(trial.variant)
                    add(plan.resolve({"trial": trial.model_dump()})[0], f"{st.name}: {trial.variant}")
    return [(e.run, e.labels) for e in entries.values()]


def _per_task_text(c: ParamCount) -> str:
    if len(set(c.per_task)) == 1:
        return f"{c.per_task[0]:,} a task"
    steps = {b - a for a, b in zip(c.per_task, c.per_task[1:])}
    if len(steps) == 1:  # a head that grows by the same chunk every task (CIL)
        n = len(c.per_task)
        return f"{c.per_task[0]:,} on task 1, +{steps.pop():,} a task, {c.per_task[-1]:,} on task {n}"
    runs: list[tuple[int, int, int]] = []  # (first task, last task, count), 1-based
    for i, n in enumerate(c.per_task, 1):
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], i, n)
        else:
            runs.append((i, i, n))
    return "per task " + ", ".join(f"{a}: {n:,}" if a == b else f"{a}-{b}: {n:,}" for a, b, n in runs)


def _labels_text(labels: list[str]) -> str:
    """"ablation: full", "ablation: no_graph" -> "ablation: full, no_graph"."""
    out: dict[str, list[str]] = {}
    for label in labels:
        stage, sep, variant = label.partition(": ")
        out.setdefault(stage if sep else label, []).extend([variant] if sep else [])
    return "; ".join(f"{k}: {', '.join(v)}" if v else k for k, v in out.items())


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, SpecError) else f"{type(e).__name__}: {e}"


def describe_counts(study: "StudySpec") -> list[str]:
    """The lines ``mmcl plan`` prints (indented two spaces); configs with the same counts
    share a line. A count that cannot be taken is one line with the reason and the fix,
    not a failed plan."""
    lines = ["  trainable parameters (model configs on the meta device: no weights, no data):"]
    # Any failure is one "not counted" line ([choice] broad: counting is a plan's extra,
    # and the plan itself must still print).
    try:
        runs = study_runs(study)
    except Exception as e:  # noqa: BLE001
        return lines + [f"    not counted: {_reason(e)}"]
    rows: dict[tuple, list[str]] = {}  # (method, backbone, per task, total, growth) -> labels
    counts: dict[tuple, ParamCount] = {}
    failed: list[str] = []
    for run, labels in runs:
        try:
            c = count_run(run)
        except Exception as e:  # noqa: BLE001
            failed.append(f"    {run.method.name} [{_labels_text(labels)}]: not counted: {_reason(e)}")
            continue
        key = (c.method, c.backbone, tuple(c.per_task), c.total, c.growth)
        rows.setdefault(key, []).extend(labels)
        counts[key] = c
    shown: set[str] = set()
    for key, labels in rows.items():
        c = counts[key]
        if c.backbone not in shown:
            shown.add(c.backbone)
            lines.append(f"    backbone {c.backbone}: {c.backbone_params:,} parameters (frozen)")
        text = f"{_per_task_text(c)}; {c.total:,} in all over the {len(c.per_task)} task(s)"
        if c.growth:
            text += f"; + data-dependent growth: {c.growth}"
        lines.append(f"    {c.method} [{_labels_text(labels)}]: {text}")
    return lines + failed
