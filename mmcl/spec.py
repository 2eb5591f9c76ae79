"""The study file, as typed pydantic models.

A study YAML has one ``run`` block (a single continual run: backbone, benchmark, method,
training, evaluation, seed) and a list of ``stages`` that run many variations of it.
Every model forbids unknown keys so that a typo fails at load time, not after an hour of
GPU time. :func:`load_study` turns every problem into a :class:`SpecError` whose message
names the file, the key path and what was expected; the CLI prints it without a traceback.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator


class SpecError(Exception):
    """A study file that cannot be used. ``str(err)`` is the whole user-facing message."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


# --------------------------------------------------------------------------- run block


class BackboneSpec(Strict):
    """A frozen pretrained model.

    ``kind: open_clip`` (default): ``pretrained`` is an open_clip tag (``openai``,
    ``laion2b_s34b_b88k`` ...) or, for the project's tiny offline model, ``synthetic``
    (pretrained here and cached on disk); ``checkpoint`` is a local file that wins over
    ``pretrained``.

    ``kind: blip2 | llava`` (the generation track, :mod:`mmcl.backbones.vlm`): a
    transformers model loaded with ``from_pretrained(path)``, offline: ``path`` is a
    local directory or a hub id already in the Hugging Face cache; ``mmcl:tiny`` builds
    (once, cached under ``cache_dir``) a tiny random model with a tokenizer of the
    generated benchmark's words, for CPU smoke runs; ``mmcl:tiny-pretrained`` trains it
    once on the generated base domain (:func:`mmcl.backbones.vlm.pretrain_tiny`).
    """

    kind: Literal["open_clip", "blip2", "llava"] = "open_clip"
    model: str = "mmcl-tiny-clip"
    pretrained: str | None = "synthetic"
    checkpoint: str | None = None
    # Where pretrained / generated weights are cached; default ~/.cache/mmcl (or $MMCL_CACHE).
    cache_dir: str | None = None
    # blip2 / llava only.
    path: str | None = None
    # Weights' dtype: auto = bfloat16 on a CUDA device that has it, float32 otherwise.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # How a sample's prompt is put to the language model ("{prompt}" is replaced by the
    # question, or by a caption task's prefix). BLIP-2 OPT: "Question: {prompt} Answer:";
    # LLaVA-1.5: "USER: <image>\n{prompt} ASSISTANT:" (the image tokens are inserted by
    # the backbone, so leave <image> out: "USER: {prompt} ASSISTANT:").
    prompt_format: str = "{prompt}"
    # blip2 / llava: build the model from path's config.json with random weights instead
    # of loading them (path then needs only config.json and the tokenizer's files). For
    # speed and memory benchmarks of a paper's model shape where its weights are not at
    # hand (benchmarks/vlm_shapes.py writes such directories); never for results.
    random_weights: bool = False

    @model_validator(mode="after")
    def _kind_fields(self) -> "BackboneSpec":
        if self.kind == "open_clip":
            if self.path is not None:
                raise ValueError("path: only for kind blip2 / llava; an open_clip checkpoint file goes in 'checkpoint'")
            if self.random_weights:
                raise ValueError("random_weights: only for kind blip2 / llava; an open_clip model is random with pretrained: null")
        else:
            if not self.path:
                raise ValueError(
                    f"path: kind {self.kind!r} needs a local model directory or a cached hub id "
                    "(or 'mmcl:tiny' for the tiny random model)"
                )
            if self.checkpoint is not None:
                raise ValueError(f"checkpoint: only for kind open_clip; kind {self.kind!r} loads from 'path'")
        if "{prompt}" not in self.prompt_format:
            raise ValueError("prompt_format: must contain '{prompt}'")
        return self

    @property
    def generative(self) -> bool:
        return self.kind != "open_clip"


class ClipVisionEncoderSpec(Strict):
    """A video encoder: the image tower of an open_clip CLIP, applied to every frame; the
    per-frame embeddings are averaged over time. Same weight options as :class:`BackboneSpec`."""

    kind: Literal["open_clip_vision"] = "open_clip_vision"
    model: str = "mmcl-tiny-clip"
    pretrained: str | None = "synthetic"
    checkpoint: str | None = None


class ASTEncoderSpec(Strict):
    """An audio encoder: a transformers Audio Spectrogram Transformer (``ASTModel``).

    ``path`` is a local directory written by ``save_pretrained`` or a hub id already in the
    Hugging Face cache (nothing is downloaded: ``local_files_only``). ``path: null`` builds a
    randomly initialised model from ``config`` (an ``ASTConfig`` mapping), seeded by the run,
    for offline studies. The spectrogram settings come from the directory's
    ``preprocessor_config.json`` when there is one, else from the model config.
    """

    kind: Literal["ast"] = "ast"
    path: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    # Hugging Face cache directory for hub ids (default: HF_HOME's).
    cache_dir: str | None = None
    sampling_rate: int = Field(default=16000, ge=1000)

    @model_validator(mode="after")
    def _path_or_config(self) -> "ASTEncoderSpec":
        if self.path is None and not self.config:
            raise ValueError("give 'path' (a saved ASTModel directory or cached hub id) or 'config' (random init)")
        return self


EncoderSpec = Annotated[Union[ClipVisionEncoderSpec, ASTEncoderSpec], Field(discriminator="kind")]


class PairedBackboneSpec(Strict):
    """Frozen per-modality encoders for paired sensory streams (the paired-modality track).

    ``encoders`` maps a modality name (the key samples carry: ``video``, ``audio``) to its
    encoder. Two or more modalities.
    """

    kind: Literal["paired"]
    encoders: dict[str, EncoderSpec]
    cache_dir: str | None = None

    @field_validator("encoders")
    @classmethod
    def _two_or_more(cls, v: dict) -> dict:
        if len(v) < 2:
            raise ValueError(f"a paired backbone needs two or more modalities, got {list(v) or 'none'}")
        for name in v:
            if name in ("label", "task", "domain", "image"):
                raise ValueError(f"modality name {name!r} is reserved; use e.g. 'video', 'audio'")
        return v


def _backbone_kind(v: Any) -> str:
    # Existing studies leave `kind` out: they mean open_clip. open_clip, blip2 and llava
    # share BackboneSpec; paired has its own model.
    # Any other value is no tag, so pydantic reports the custom message below.
    kind = v.get("kind", "open_clip") if isinstance(v, dict) else getattr(v, "kind", "open_clip")
    return "open_clip" if kind in ("open_clip", "blip2", "llava") else str(kind)


AnyBackboneSpec = Annotated[
    Union[Annotated[BackboneSpec, Tag("open_clip")], Annotated[PairedBackboneSpec, Tag("paired")]],
    Discriminator(_backbone_kind, custom_error_type="invalid_backbone_kind",
                  custom_error_message="'kind' must be open_clip, blip2, llava or paired"),
]


class BenchmarkSpec(Strict):
    """Which task stream, in which order.

    ``order`` lists task names in training order (default: the benchmark's own order);
    ``num_tasks`` keeps the first N tasks of that order. ``options`` go to the
    benchmark's builder (for ``synthetic``: sizes per class, image size ...).
    """

    name: str = "synthetic"
    order: list[str] | None = None
    num_tasks: int | None = Field(default=None, ge=1)
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class MethodSpec(Strict):
    """A continual-learning method by registry name and its typed config.

    ``config`` is validated against the method's own pydantic ``Config`` model when the
    study is loaded (see :func:`validate_run`), so unknown knobs fail early.
    """

    name: str = "finetune"
    config: dict[str, Any] = Field(default_factory=dict)


class TrainingSpec(Strict):
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    batch_size: int = Field(default=32, ge=1)
    epochs: float = Field(default=1.0, gt=0)
    # A cap on optimisation steps per task (after epochs); None = no cap.
    max_steps: int | None = Field(default=None, ge=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    # Cosine ends at lr * min_lr_ratio.
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    # auto: bf16 autocast on a CUDA device that has it, fp16 + GradScaler on older GPUs,
    # full precision on CPU.
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # A fresh optimizer per task is the usual protocol (and the trainable parameter set
    # may change between tasks); false carries optimizer state across tasks.
    reset_optimizer: bool = True
    log_every: int = Field(default=10, ge=1)


class EvaluationSpec(Strict):
    batch_size: int = Field(default=256, ge=1)
    # Cap on test samples per task (None = all). Smoke runs set it.
    max_samples: int | None = Field(default=None, ge=1)
    # Text head: average the embeddings of all templates, or use the first one only.
    templates: Literal["all", "first"] = "all"
    # Text tasks (generation track): greedy decoding (num_beams 1) or beam search, up to
    # max_new_tokens tokens per answer / caption.
    max_new_tokens: int = Field(default=20, ge=1)
    num_beams: int = Field(default=1, ge=1)
    # How CIDEr tokenises captions (mmcl/metrics_text.py). "ptb": the Stanford PTB
    # tokenizer that pycocoevalcap runs (Java, one call per scored task), what published
    # COCO numbers use; "python": the project's pure-Python tokenizer (no Java; differs on
    # hyphens, contractions, numbers, symbols, non-ASCII letters); "auto": "ptb" where
    # `java` is on PATH, else "python". The trials table records which one ran
    # (env/caption_tokenizer).
    caption_tokenizer: Literal["auto", "ptb", "python"] = "auto"


class RunSpec(Strict):
    """One whole continual run: what a single trial executes."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backbone: AnyBackboneSpec = Field(default_factory=BackboneSpec)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    # Threads torch may use inside one trial (match it to resources.cpu).
    torch_threads: int | None = Field(default=None, ge=1)
    # DataLoader worker processes per loader (training, evaluation, and the passes methods
    # make over a task's data). 0 loads in the trial's own process: right for the generated
    # benchmarks, whose samples are tensors in memory. Real image / video data (MTIL, COCO,
    # AVE) decode and resize on the fly and leave a GPU waiting: give them a few workers
    # (and resources.cpu to match). Results do not depend on it.
    data_workers: int = Field(default=0, ge=0)


# --------------------------------------------------------------------------- stages

Metric = Literal["avg", "last", "transfer", "bwt", "fwt", "faa", "faa_weighted", "forgetting", "acc_seen"]


class SchedulerSpec(Strict):
    """ASHA over the task index: a trial is compared to others after the same task."""

    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1)


class StageBase(Strict):
    name: str
    # Which metric ranks trials (final value of the whole run) and in which direction.
    metric: Metric = "avg"
    mode: Literal["max", "min"] = "max"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("stage names use letters, digits, '-' and '_' only")
        return v


class TuneOnSpec(Strict):
    """Which data a search stage tunes on, when it is not the run's own task stream.

    Exactly one of:

    ``first_k``
        the first k tasks of the run's order (Chaudhry et al. 2019, "Efficient Lifelong
        Learning with A-GEM": hyperparameters chosen on the first 3 tasks). The search
        trials train and evaluate those k tasks only; a later stage with ``base: <this
        stage>`` runs the best config on the whole sequence.
    ``benchmark``
        another benchmark or another order of this one (the two-phase protocol of Cha &
        Cho 2024, "Hyperparameters in Continual Learning: A Reality Check": tune on one
        scenario, evaluate on another). Without ``name`` or with the run's own name, the
        keys given replace the run's (``{order: [...]}``, ``{options: {...}}``; ``order``
        and ``num_tasks`` go together: giving one resets the other); with another name it
        is a whole benchmark block (unset keys at their defaults).

    ``tune_on: first_k`` alone means ``{first_k: 3}``, Chaudhry et al.'s k.
    """

    first_k: int | None = Field(default=None, ge=1)
    benchmark: BenchmarkSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"first_k": 3} if v == "first_k" else v

    @model_validator(mode="after")
    def _exactly_one(self) -> "TuneOnSpec":
        if (self.first_k is None) == (self.benchmark is None):
            got = "both" if self.first_k is not None else "neither"
            raise ValueError(f"give exactly one of first_k and benchmark (got {got}); e.g. tune_on: {{first_k: 3}}")
        return self


class SearchStage(StageBase):
    kind: Literal["search"]
    # Name of a module in search_spaces/ (e.g. "lwf"); it defines the Optuna space.
    search_space: str
    num_samples: int = Field(default=8, ge=1)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    # Optuna sampler seed (TPE); None = random.
    sampler_seed: int | None = 0
    # Tune on other data than the run's task stream (TuneOnSpec); None = the run's own.
    tune_on: TuneOnSpec | None = None


class AblationStage(StageBase):
    kind: Literal["ablation"]
    # Start from the best config of an earlier stage (its name), or "run" for the run block.
    base: str = "run"
    # Explicit overrides (dotted keys such as "training.lr", "method.lambda") on top of base.
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Variant names the method declares (``Method.ablations``), or name -> overrides.
    variants: list[str] | dict[str, dict[str, Any]] = Field(default_factory=lambda: ["full"])
    seeds: list[int] = Field(default_factory=lambda: [0])


class OrdersStage(StageBase):
    kind: Literal["orders"]
    base: str = "run"
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Named task orders (lists of task names).
    named: dict[str, list[str]] = Field(default_factory=dict)
    include_default: bool = True
    reverse: bool = True
    random: int = Field(default=0, ge=0)
    random_seed: int = 0
    seeds: list[int] = Field(default_factory=lambda: [0])


Stage = Annotated[Union[SearchStage, AblationStage, OrdersStage], Field(discriminator="kind")]


class ResourcesSpec(Strict):
    """What one trial asks Ray for."""

    cpu: float = Field(default=1, gt=0)
    gpu: float = Field(default=0, ge=0)
    # How long a stage may have trials waiting for these resources with none of its trials
    # running (a GPU request on a cluster without GPUs, more CPUs than any node has) before
    # it ends, naming what it asks and what the cluster offers; `mmcl resume` continues it
    # once the cluster has the resources. An autoscaling cluster starts its nodes within
    # this time. [choice] 30 minutes: a cloud GPU node's usual start-up fits.
    wait_timeout_s: float = Field(default=1800, gt=0)


class FailureSpec(Strict):
    # How often Ray retries a trial whose process died; it resumes from its last task.
    max_failures: int = Field(default=2, ge=-1)
    # Share of a study's trials that may end errored (a NaN loss, retries used up) before
    # `mmcl run` / `resume` exit with status 1; 0 = any errored trial does. The study runs
    # to its end and writes its results either way. A stage whose every trial errored
    # always gives status 1.
    max_errored_fraction: float = Field(default=0.0, ge=0.0, le=1.0)


class MlflowSpec(Strict):
    """One MLflow run per trial: params = the trial's resolved run block, metrics after
    every task (step = the task index), the accuracy matrix as a JSON and CSV artifact."""

    # Where runs go: a local store (``file:///abs/mlruns``, ``sqlite:///mlflow.db``) or a
    # tracking server (``http://host:5000``). Only the driver talks to it (a trial never
    # does), so only the machine that runs ``mmcl`` needs to reach it.
    tracking_uri: str
    # The MLflow experiment; empty: the study's name.
    experiment: str = ""
    tags: dict[str, str] = Field(default_factory=dict)


class WandbSpec(Strict):
    """One W&B run per trial, grouped by ``<study>/<stage>``; the accuracy matrix is a
    ``wandb.Table`` at the trial's end."""

    project: str
    entity: str | None = None
    # online / offline (runs stay under the trial's directory: `wandb sync` them later) /
    # disabled. Empty: $WANDB_MODE, else W&B's own default (online).
    mode: Literal["", "online", "offline", "disabled"] = ""
    tags: list[str] = Field(default_factory=list)
    # How long the end of a stage waits for W&B to finish uploading (Ray's default: 30 min).
    upload_timeout_s: int = Field(default=300, ge=1)


class TrackingSpec(Strict):
    """Experiment trackers that receive every trial's results (docs/tracking.md).
    Each needs its package (`uv sync --extra mlflow|wandb|tensorboard`)."""

    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None
    # TensorBoard event files per trial, in the stage's Ray directory of the study's
    # storage (``<output>/ray/<stage>/<trial>/events.out.tfevents.*``).
    tensorboard: bool = False

    def enabled(self) -> list[str]:
        return [n for n in ("mlflow", "wandb", "tensorboard") if getattr(self, n)]


# The importable module each tracker needs, and the extra that installs it.
TRACKER_PACKAGES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb"), "tensorboard": ("tensorboardX", "tensorboard")}


def check_tracking_packages(tracking: TrackingSpec, source: str) -> None:
    """A clear error before any trial runs when a tracker's package is missing."""
    import importlib.util

    for name in tracking.enabled():
        module, extra = TRACKER_PACKAGES[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken install
            found = False
        if not found:
            raise SpecError(
                f"{source}: tracking.{name} needs the Python package {module!r}, which is not installed; "
                f"install it with `uv sync --extra {extra}` (pip: pip install 'mmcl-studies[{extra}]'), "
                f"or remove tracking.{name}"
            )


class StudySpec(Strict):
    name: str
    description: str = ""
    # Where results go: a directory every node sees (relative paths resolve against the
    # directory `mmcl` runs in), or a bucket URI (s3://bucket/prefix, gs://..., options
    # such as ?endpoint_override=host:port&scheme=http): see mmcl/storage.py.
    storage: str = "results"
    run: RunSpec = Field(default_factory=RunSpec)
    stages: list[Stage] = Field(min_length=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrent_trials: int = Field(default=2, ge=1)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("study names use letters, digits, '-', '_' and '.' only")
        return v

    @model_validator(mode="after")
    def _stage_references(self) -> "StudySpec":
        seen: list[str] = []
        for i, st in enumerate(self.stages):
            if st.name in seen:
                raise ValueError(f"stages[{i}].name: stage name {st.name!r} is used twice")
            base = getattr(st, "base", "run")
            if base != "run" and base not in seen:
                raise ValueError(
                    f"stages[{i}].base: {base!r} is not an earlier stage; "
                    f"use 'run' or one of {seen or '(no earlier stage)'}"
                )
            seen.append(st.name)
        return self


# --------------------------------------------------------------------------- overrides


def apply_overrides(run: RunSpec, overrides: dict[str, Any], where: str = "overrides") -> RunSpec:
    """Return a new RunSpec with dotted-key overrides applied and validated.

    ``method.X`` is shorthand for ``method.config.X`` (search spaces and ablation variants
    talk about a method's knobs, not about the nesting of the run block).
    """
    data = run.model_dump()
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] == "method" and len(parts) >= 2 and parts[1] not in ("name", "config"):
            parts = ["method", "config", *parts[1:]]
        node = data
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
                if isinstance(node, dict) and p not in node and parts[:2] == ["method", "config"]:
                    node[p] = {}
                else:
                    raise SpecError(f"{where}: {key!r} does not name a key of the run block")
            node = node[p]
        if not isinstance(node, dict):
            raise SpecError(f"{where}: {key!r} does not name a key of the run block")
        if parts[:2] != ["method", "config"] and parts[-1] not in node:
            raise SpecError(f"{where}: {key!r} does not name a key of the run block")
        node[parts[-1]] = copy.deepcopy(value)
    try:
        new = RunSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation(e, where)) from None
    validate_method_config(new, where)
    return new


def validate_method_config(run: RunSpec, where: str = "run.method") -> Any:
    """Validate ``run.method.config`` against the registered method's Config; return it."""
    from cl_methods import get_method_class, registered_methods

    try:
        cls = get_method_class(run.method.name)
    except KeyError:
        raise SpecError(
            f"{where}.name: unknown method {run.method.name!r}; registered methods: "
            f"{', '.join(registered_methods())}"
        ) from None
    _check_track(cls, run, where)
    try:
        return cls.Config.model_validate(run.method.config)
    except ValidationError as e:
        raise SpecError(_format_validation(e, f"{where}.config")) from None


# --------------------------------------------------------------------------- loading


def _format_validation(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-after"))
        # Discriminated unions put the tag in the location ("stages.0.search.name").
        for tag in ("search.", "ablation.", "orders.", "open_clip.", "paired.", "open_clip_vision.", "ast."):
            loc = loc.replace(f".{tag}", ".")
        path = ".".join(p for p in (prefix, loc) if p)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; the README lists every key)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "union_tag_invalid":
            msg = "'kind' must be one of search, ablation, orders"
        elif e["type"] == "union_tag_not_found":
            msg = "a stage needs 'kind': search, ablation or orders"
        elif "input" in e and e["type"] not in ("value_error",):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {path or '(top level)'}: {msg}")
    return "\n".join(lines)


def _line_of(text: str, path: tuple) -> int | None:
    """Best-effort YAML line (1-based) of a key path, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    for p in path:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == str(p):
                    nxt = v if p != path[-1] else k
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(p, int) and p < len(node.value):
            node = node.value[p]
        else:
            return None
        if node is None:
            return None
    return node.start_mark.line + 1


def parse_study(data: Any, source: str = "<study>", text: str | None = None) -> StudySpec:
    """Validate an already-parsed study mapping, with file-naming errors."""
    if data is None:
        raise SpecError(f"{source}: the file is empty; a study needs at least 'name' and 'stages'")
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: expected a mapping of study keys (name, run, stages ...) at the top "
            f"level, got a {type(data).__name__}"
        )
    try:
        study = StudySpec.model_validate(data)
    except ValidationError as e:
        detail = []
        for err in e.errors():
            loc = tuple(x for x in err["loc"] if x not in ("search", "ablation", "orders", "open_clip", "paired", "open_clip_vision", "ast"))
            line = _line_of(text, loc) if text else None
            if line:
                detail.append(f"line {line}")
        where = f" (near {detail[0]})" if detail else ""
        raise SpecError(f"{source}: invalid study{where}:\n{_format_validation(e)}") from None
    try:
        validate_run(study)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    check_tracking_packages(study.tracking, source)
    return study


# Which backbone kinds each method track (``Method.track``) runs on, and how to name
# the methods of a track in an error message.
TRACK_BACKBONES: dict[str, tuple[str, ...]] = {
    "clip": ("open_clip",),
    "generation": ("blip2", "llava"),
    "paired": ("paired",),
}
_TRACK_LABEL = {"clip": "classification (CLIP)-track", "generation": "generation-track", "paired": "paired-track"}
_TRACK_METHODS = {
    "clip": "a CLIP method (finetune, lwf, er, joint, lora, dgg, diki, dagr)",
    "generation": "a generation method (gen_zeroshot, gen_adapter, gen_lwf, gen_dgg, eca)",
    "paired": "a paired method (cma, pm_finetune, pm_lwf, pm_ewc, pm_er, pm_derpp)",
}
_TRACK_FIX = {
    "clip": "set run.backbone.kind: open_clip",
    "generation": "set run.backbone.kind: blip2 or llava with a model path",
    "paired": "set run.backbone.kind: paired with per-modality encoders (README)",
}


def _check_track(cls: Any, run: RunSpec, where: str) -> None:
    track = getattr(cls, "track", "clip")
    kind = run.backbone.kind
    if kind in TRACK_BACKBONES[track]:
        return
    have = next(t for t, kinds in TRACK_BACKBONES.items() if kind in kinds)
    raise SpecError(
        f"{where}.name: {run.method.name!r} is a {_TRACK_LABEL[track]} method; it runs on backbone kind "
        f"{' / '.join(TRACK_BACKBONES[track])}, not {kind!r}: {_TRACK_FIX[track]}, or use {_TRACK_METHODS[have]}"
    )


def check_track(run: RunSpec, where: str = "run") -> None:
    """A method runs on its track's backbones only (CLIP, generation, paired): say so
    before anything loads."""
    from cl_methods import get_method_class

    _check_track(get_method_class(run.method.name), run, f"{where}.method")


def validate_run(study: StudySpec) -> None:
    """Checks that need the method registry and the search spaces (no data, no Ray)."""
    validate_method_config(study.run, "run.method")
    check_track(study.run)
    from mmcl.study import check_stages  # stages know how to check themselves

    check_stages(study)


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study YAML; every problem is a SpecError naming the file."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"{p}: no such study file")
    if p.is_dir():
        raise SpecError(f"{p}: is a directory; give the path of a study YAML file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read the file ({e})") from None
    if not text.strip():
        raise SpecError(f"{p}: the file is empty; a study needs at least 'name' and 'stages'")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{p}: YAML syntax error at {where}: {problem}") from None
    return parse_study(data, str(p), text)
