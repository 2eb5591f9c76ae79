"""Stages -> trials -> Parquet: the study driver, without Ray.

A study runs its stages in order. Each stage becomes a :class:`StagePlan` (the base run
with the stage's starting point applied, and either an Optuna search or a fixed list of
trials) that ``mmcl.tune.run_stage`` executes on Ray. When a stage ends its trials table
is written and its best config recorded in ``study_state.json``; later stages may start
from it (``base: <stage>``). ``resume_study`` skips finished stages and restores the
interrupted one from its Ray experiment.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmcl.spec import (
    AblationStage,
    OrdersStage,
    ResourcesSpec,
    RunSpec,
    SchedulerSpec,
    SearchStage,
    SpecError,
    StudySpec,
    TrackingSpec,
    TuneOnSpec,
    apply_overrides,
)

if TYPE_CHECKING:
    from mmcl.storage import Storage

log = logging.getLogger(__name__)


class StageInterrupted(RuntimeError):
    """Tune returned before every trial of a stage ended (Ctrl-C, a stopped driver)."""


class StageStarved(StageInterrupted):
    """A stage's trials waited ``resources.wait_timeout_s`` for resources with none running."""


class TrialConfig(BaseModel):
    """One fixed trial of an ablation or orders stage (the Tune config of that trial)."""

    model_config = ConfigDict(extra="forbid")
    variant: str
    order_id: str
    seed: int
    overrides: dict[str, Any] = Field(default_factory=dict)


class StagePlan(BaseModel):
    """Everything a stage's trials need, serialisable (it travels to Ray workers)."""

    model_config = ConfigDict(extra="forbid")
    study: str
    stage: str
    kind: Literal["search", "ablation", "orders"]
    metric: str
    mode: Literal["max", "min"]
    base_run: RunSpec
    base_overrides: dict[str, Any] = Field(default_factory=dict)
    n_tasks: int
    trials: list[TrialConfig] = Field(default_factory=list)
    search_space: str | None = None
    num_samples: int = 0
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    sampler_seed: int | None = None
    resources: ResourcesSpec
    max_concurrent_trials: int
    max_failures: int
    out_dir: str  # the study's storage: a local path or a URI (mmcl.storage)
    # The driver's token in that storage (mmcl.tune.check_storage_reachable); every
    # trial reads it back before it trains. Empty: no check.
    storage_token: str = ""
    # `mmcl run -v`: trials keep Ray Train's INFO lines (a "Checkpoint successfully
    # created" per task); off, the console shows mmcl's stage view only.
    verbose: bool = False
    # Experiment trackers the driver sends every trial's results to (mmcl.tune).
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @property
    def num_trials(self) -> int:
        return self.num_samples if self.kind == "search" else len(self.trials)

    def trial_overrides(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Tune config of one trial -> (its overrides of ``base_run``, its metadata)."""
        if self.kind == "search":
            return dict(config), {"variant": "search", "order_id": "default", "seed": self.base_run.seed}
        # Grid stages give Tune one parameter, "trial", whose values are TrialConfigs.
        tc = TrialConfig.model_validate(config["trial"])
        return {**tc.overrides, "seed": tc.seed}, {"variant": tc.variant, "order_id": tc.order_id, "seed": tc.seed}

    def resolve(self, config: dict[str, Any]) -> tuple[RunSpec, dict[str, Any]]:
        """Tune config of one trial -> (its run, its metadata for the results)."""
        overrides, meta = self.trial_overrides(config)
        return apply_overrides(self.base_run, overrides, where=f"stage {self.stage}"), meta


# --------------------------------------------------------------------------- checks


def _task_names(run: RunSpec) -> list[str]:
    from mmcl.data import benchmark_task_names

    names = benchmark_task_names(run.benchmark)
    if run.benchmark.order:
        names = list(run.benchmark.order)
    if run.benchmark.num_tasks:
        names = names[: run.benchmark.num_tasks]
    return names


def _sample_space(name: str, run: RunSpec, where: str) -> dict[str, Any]:
    """Draw one point of a search space (real Optuna, in memory) and apply it to the run,
    so a parameter that is not a key of the run / method config fails at load time."""
    import optuna

    from search_spaces import get_space

    try:
        fn = get_space(name)
    except KeyError as e:
        raise SpecError(f"{where}.search_space: {e.args[0]}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    consts = fn(trial) or {}
    point = {**trial.params, **consts}
    for key in point:
        try:
            apply_overrides(run, {key: point[key]}, where=f"{where} (search space {name!r}, parameter {key!r})")
        except SpecError as e:
            raise SpecError(
                f"{e}\n  fix: search_spaces/{name}.py names a parameter the run does not have; "
                f"method knobs are 'method.<field of {run.method.name}'s config>', others 'training.lr' etc."
            ) from None
    return point


def _variant_overrides(stage: AblationStage, run: RunSpec, where: str) -> dict[str, dict[str, Any]]:
    from cl_methods import get_method_class

    if isinstance(stage.variants, dict):
        return {name: dict(ov) for name, ov in stage.variants.items()}
    declared = get_method_class(run.method.name).ablations
    out = {}
    for v in stage.variants:
        if v not in declared:
            raise SpecError(
                f"{where}.variants: method {run.method.name!r} has no ablation variant {v!r}; "
                f"it declares: {', '.join(declared)} (or give name -> overrides)"
            )
        out[v] = {f"method.{k}": val for k, val in declared[v].items()}
    return out


def _orders(stage: OrdersStage, names: list[str], where: str) -> dict[str, list[str]]:
    orders: dict[str, list[str]] = {}
    if stage.include_default:
        orders["default"] = list(names)
    if stage.reverse:
        orders["reverse"] = list(reversed(names))
    for oid, order in stage.named.items():
        if sorted(order) != sorted(names):
            raise SpecError(
                f"{where}.named.{oid}: an order must list each task of the run exactly once; "
                f"tasks: {', '.join(names)}"
            )
        orders[oid] = list(order)
    rng = random.Random(stage.random_seed)
    for i in range(stage.random):
        perm = list(names)
        rng.shuffle(perm)
        orders[f"random-{i}"] = perm
    if not orders:
        raise SpecError(f"{where}: no order to run (include_default, reverse, named and random are all off)")
    return orders


def _check_method_run(run: RunSpec, where: str) -> None:
    """The method's own checks against the run's length (e.g. one value per task)."""
    from cl_methods import get_method_class

    cls = get_method_class(run.method.name)
    try:
        cls.check_run(cls.Config.model_validate(run.method.config), len(_task_names(run)))
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None


def tuning_run(tune_on: TuneOnSpec | None, run: RunSpec, where: str) -> RunSpec:
    """The run a search stage's trials execute: ``run`` itself, or ``run`` restricted to
    the tuning data of ``tune_on`` (see :class:`mmcl.spec.TuneOnSpec`). Only the benchmark
    changes; the search's best overrides stay overrides of the stage's base, so a later
    stage applies them to the whole sequence."""
    if tune_on is None:
        return run
    names = _task_names(run)
    if tune_on.first_k is not None:
        k = tune_on.first_k
        if k >= len(names):
            raise SpecError(
                f"{where}.tune_on.first_k: {k}, but the run has {len(names)} task(s), so nothing is "
                f"left to evaluate the tuned config on; fix: first_k below {len(names)}, or remove tune_on"
            )
        tuned = run.model_copy(deep=True)
        tuned.benchmark.order, tuned.benchmark.num_tasks = names[:k], None
        return tuned
    given = tune_on.benchmark
    assert given is not None  # TuneOnSpec holds exactly one of first_k / benchmark
    if "name" not in given.model_fields_set or given.name == run.benchmark.name:
        keys = set(given.model_fields_set)
        if keys & {"order", "num_tasks"}:
            keys |= {"order", "num_tasks"}  # the task list is one thing: the run's num_tasks cuts no other order
        bench = run.benchmark.model_copy(update={f: getattr(given, f) for f in keys}, deep=True)
    else:
        bench = given.model_copy(deep=True)
    tuned = run.model_copy(update={"benchmark": bench}, deep=True)
    from mmcl.data import _needed_tasks, benchmark_task_names, check_backbone_fits

    try:
        # An unknown benchmark, option or task name fails here, not in the first trial.
        _needed_tasks(bench, benchmark_task_names(bench))
        check_backbone_fits(bench, tuned.backbone.kind)
    except SpecError as e:
        raise SpecError(str(e).replace("run.benchmark.", f"{where}.tune_on.benchmark.")) from None
    return tuned


class TuningNote(BaseModel):
    """Where a stage's numbers were tuned, when not on its own trials' tasks."""

    data: str  # "the first 3 of the run's 6 tasks (a, b, c)", "benchmark x with tasks ..."
    from_stage: str | None = None  # None: this stage's own trials ran on ``data``

    def sentence(self) -> str:
        if self.from_stage is None:
            return f"tuned on {self.data}: its trials trained and were scored on these tasks only"
        return f"config from stage {self.from_stage}, tuned on {self.data}; this stage ran the run's own tasks"


def tuning_notes(study: StudySpec) -> dict[str, TuningNote]:
    """The :class:`TuningNote` of each stage whose numbers come from other data than the
    run's task stream: a search with ``tune_on``, and every stage that starts from one
    (directly or through another stage). For ``mmcl plan`` and the report."""
    notes: dict[str, TuningNote] = {}
    for i, st in enumerate(study.stages):
        base = getattr(st, "base", "run")
        if isinstance(st, SearchStage) and st.tune_on is not None:
            tuned = tuning_run(st.tune_on, study.run, f"stages[{i}] ({st.name})")
            names = _task_names(tuned)
            if st.tune_on.first_k is not None:
                data = f"the first {len(names)} of the run's {len(_task_names(study.run))} tasks ({', '.join(names)})"
            else:
                data = f"benchmark {tuned.benchmark.name} with tasks {', '.join(names)}"
            notes[st.name] = TuningNote(data=data)
        elif base in notes:
            notes[st.name] = TuningNote(data=notes[base].data, from_stage=notes[base].from_stage or base)
    return notes


def check_stages(study: StudySpec) -> None:
    """Load-time checks of every stage against the run (no data, no Ray, no GPU)."""
    from mmcl.data import check_backbone_fits

    names = _task_names(study.run)  # an unknown benchmark fails here
    check_backbone_fits(study.run.benchmark, study.run.backbone.kind)
    _check_method_run(study.run, "run")
    for i, st in enumerate(study.stages):
        where = f"stages[{i}] ({st.name})"
        apply_overrides(study.run, getattr(st, "overrides", {}), where=f"{where}.overrides")
        if isinstance(st, SearchStage):
            _sample_space(st.search_space, study.run, where)
            if st.tune_on is not None:
                _check_method_run(tuning_run(st.tune_on, study.run, where), f"{where}.tune_on")
        elif isinstance(st, AblationStage):
            for v, ov in _variant_overrides(st, study.run, where).items():
                varied = apply_overrides(study.run, {**st.overrides, **ov}, where=f"{where}.variants.{v}")
                _check_method_run(varied, f"{where}.variants.{v}")
        elif isinstance(st, OrdersStage):
            _orders(st, names, where)


# --------------------------------------------------------------------------- smoke


def smoke(study: StudySpec) -> StudySpec:
    """Shrink a study to seconds-to-minutes: few trials, 3 tasks, a few steps per task."""
    s = study.model_copy(deep=True)
    r = s.run
    n = len(_task_names(r))
    if r.benchmark.order:
        r.benchmark.order = r.benchmark.order[: min(3, n)]
    r.benchmark.num_tasks = min(3, r.benchmark.num_tasks or n)
    r.training.max_steps = min(r.training.max_steps or 4, 4)
    r.training.log_every = min(r.training.log_every, 2)
    r.evaluation.max_samples = min(r.evaluation.max_samples or 64, 64)
    for st in s.stages:
        if isinstance(st, SearchStage):
            st.num_samples = min(st.num_samples, 3)
            t = st.tune_on
            if t is not None and t.first_k is not None:
                # Keep at least one of the 3 smoke tasks out of the tuning.
                t.first_k = min(t.first_k, max(1, min(3, n) - 1))
            elif t is not None and t.benchmark is not None:
                t.benchmark.num_tasks = min(3, t.benchmark.num_tasks or 3)
                if t.benchmark.order:
                    t.benchmark.order = t.benchmark.order[:3]
        elif isinstance(st, AblationStage):
            st.seeds = st.seeds[:1]
            if isinstance(st.variants, dict):
                st.variants = dict(list(st.variants.items())[:2])
            else:
                st.variants = st.variants[:2]
        elif isinstance(st, OrdersStage):
            st.seeds = st.seeds[:1]
            st.random = min(st.random, 1)
            # Named orders list every task; smoke runs only the first 3, so drop them.
            st.named = {}
    return s


# --------------------------------------------------------------------------- plans


def plan_stage(study: StudySpec, index: int, out_dir: str | Path, best: dict[str, dict[str, Any]]) -> StagePlan:
    """The StagePlan of stage ``index``; ``best[name]`` = best overrides of earlier stages."""
    st = study.stages[index]
    where = f"stages[{index}] ({st.name})"
    base = getattr(st, "base", "run")
    base_ov = dict(best.get(base, {})) if base != "run" else {}
    base_ov.update(getattr(st, "overrides", {}))
    run = study.run.model_copy(deep=True)
    if run.torch_threads is None:
        # Match torch's threads to the CPUs Ray gives the trial, or two trials fight.
        run.torch_threads = max(1, int(study.resources.cpu))
    base_run = apply_overrides(run, base_ov, where=f"{where} base")
    if isinstance(st, SearchStage):
        base_run = tuning_run(st.tune_on, base_run, where)
    names = _task_names(base_run)
    common = dict(
        study=study.name,
        stage=st.name,
        kind=st.kind,
        metric=st.metric,
        mode=st.mode,
        base_run=base_run,
        base_overrides=base_ov,
        n_tasks=len(names),
        resources=study.resources,
        max_concurrent_trials=study.max_concurrent_trials,
        max_failures=study.failure.max_failures,
        out_dir=str(out_dir),
        tracking=study.tracking,
    )
    if isinstance(st, SearchStage):
        return StagePlan(
            **common,
            search_space=st.search_space,
            num_samples=st.num_samples,
            scheduler=st.scheduler,
            sampler_seed=st.sampler_seed,
        )
    trials = []
    if isinstance(st, AblationStage):
        for v, ov in _variant_overrides(st, base_run, where).items():
            for seed in st.seeds:
                trials.append(TrialConfig(variant=v, order_id="default", seed=seed, overrides=ov))
    else:
        for oid, order in _orders(st, names, where).items():
            for seed in st.seeds:
                trials.append(
                    TrialConfig(variant="full", order_id=oid, seed=seed, overrides={"benchmark.order": order})
                )
    return StagePlan(**common, trials=trials)


def _describe_backbone(b: Any) -> str:
    if b.kind == "paired":
        parts = []
        for m, e in b.encoders.items():
            if e.kind == "ast":
                parts.append(f"{m}: AST {e.path or 'random init'}")
            else:
                parts.append(f"{m}: {e.model} ({e.pretrained or e.checkpoint}) frames")
        return "paired [" + "; ".join(parts) + "]"
    if b.kind in ("blip2", "llava"):
        return f"{b.kind} ({b.path})"
    return f"{b.model} ({b.pretrained or b.checkpoint})"


def describe_plan(study: StudySpec, params: bool = False) -> str:
    """Text for ``mmcl plan``: stages, trial counts, resources (no Ray, no data).

    ``params``: also each method's trainable parameters per task and in all, on the
    study's backbone built from its config on the meta device (:mod:`mmcl.param_count`;
    seconds, no weights; off by default so that callers that only want the stages do not
    import torch and the models)."""
    lines = [f"study {study.name}: {len(study.stages)} stage(s)"]
    r = study.resources
    total = 0
    notes = tuning_notes(study)
    for i, st in enumerate(study.stages):
        plan = plan_stage(study, i, Path("."), best={})
        total += plan.num_trials
        run = plan.base_run
        detail = {
            "search": lambda: f"Optuna TPE over search space '{plan.search_space}', "
            f"{plan.num_samples} trials, {plan.scheduler.kind.upper()} on the task index",
            "ablation": lambda: "variants "
            + ", ".join(sorted({t.variant for t in plan.trials}))
            + f" x seeds {sorted({t.seed for t in plan.trials})}",
            "orders": lambda: "orders "
            + ", ".join(dict.fromkeys(t.order_id for t in plan.trials))
            + f" x seeds {sorted({t.seed for t in plan.trials})}",
        }[plan.kind]()
        base = getattr(st, "base", "run")
        lines.append(
            f"  [{i + 1}] {st.name} ({st.kind}): {plan.num_trials} trial(s); {detail}; "
            f"starts from {'the run block' if base == 'run' else 'best of ' + base}; ranks by {st.metric} ({st.mode})"
        )
        lines.append(
            f"      method {run.method.name}, backbone {_describe_backbone(run.backbone)}, "
            f"benchmark {run.benchmark.name} with {plan.n_tasks} tasks"
        )
        if st.name in notes:
            lines.append(f"      {notes[st.name].sentence()}")
    lines.append(
        f"  total {total} trial(s); each asks for {r.cpu:g} CPU and {r.gpu:g} GPU; "
        f"at most {study.max_concurrent_trials} at once; a failed trial is retried {study.failure.max_failures} time(s)"
    )
    t = study.tracking
    if t.enabled():
        where = {"mlflow": lambda: f"mlflow ({t.mlflow.tracking_uri})",
                 "wandb": lambda: f"wandb (project {t.wandb.project}{', ' + t.wandb.mode if t.wandb.mode else ''})",
                 "tensorboard": lambda: "tensorboard (event files under <output>/ray)"}  # fmt: skip
        lines.append("  tracking: " + ", ".join(where[n]() for n in t.enabled()) + "; one run per trial")
    if params:
        from mmcl.param_count import describe_counts

        lines += describe_counts(study)
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


def resolve_paths(study: StudySpec, cwd: Path) -> StudySpec:
    """Make every path absolute: Ray trials run in their own working directories."""
    s = study.model_copy(deep=True)
    b = s.run.backbone

    def absolute(p: str) -> str:
        return str((cwd / Path(p).expanduser()).resolve())

    if b.cache_dir:
        b.cache_dir = absolute(b.cache_dir)
    if b.kind == "paired":
        for e in b.encoders.values():
            if e.kind == "open_clip_vision" and e.checkpoint:
                e.checkpoint = absolute(e.checkpoint)
            # A hub id ("MIT/ast-...") stays as it is; a local directory becomes absolute.
            if e.kind == "ast" and e.path and (e.path.startswith((".", "~", "/")) or (cwd / e.path).exists()):
                e.path = absolute(e.path)
            if e.kind == "ast" and e.cache_dir:
                e.cache_dir = absolute(e.cache_dir)
    elif b.checkpoint:
        b.checkpoint = absolute(b.checkpoint)
    if b.kind in ("blip2", "llava") and not b.path.startswith("mmcl:") and (cwd / Path(b.path).expanduser()).exists():
        # A local model directory (a hub id such as "Salesforce/blip2-opt-2.7b" stays as is).
        b.path = absolute(b.path)
    if s.run.benchmark.root:
        s.run.benchmark.root = absolute(s.run.benchmark.root)
    # Paired benchmarks' decoded-clip store (a manifest path is relative to the root).
    store = s.run.benchmark.options.get("store_dir")
    if isinstance(store, str):
        s.run.benchmark.options["store_dir"] = absolute(store)
    from mmcl.storage import Storage

    # A bucket URI stays as it is (with its options); a local path becomes absolute.
    s.storage = Storage.open(s.storage, cwd).uri
    return s


STATE_KEY = "study_state.json"


def read_state(out: Storage) -> dict[str, Any]:
    return json.loads(out.read_text(STATE_KEY)) if out.is_file(STATE_KEY) else {"stages": {}}


def best_of_stage(plan: StagePlan, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the best final metric, or None."""
    import math

    done = [r for r in rows if r["status"] == "completed" and r.get(plan.metric) is not None]
    done = [r for r in done if not math.isnan(r[plan.metric])]
    if not done:
        return None
    return (max if plan.mode == "max" else min)(done, key=lambda r: r[plan.metric])


def study_data_needs(study: StudySpec) -> list[tuple[Any, list[str]]]:
    """(benchmark spec, task names) pairs every trial of the study may read: the run's
    tasks, and those of each stage's base run (overrides may change the benchmark) and
    of each orders-stage trial. No data is touched."""
    needs: dict[str, tuple[Any, list[str]]] = {}

    def add(run: RunSpec) -> None:
        b = run.benchmark
        key = json.dumps([b.name, b.root, b.options], sort_keys=True, default=str)
        names = _task_names(run)
        seen = needs.setdefault(key, (b, []))[1]
        seen.extend(n for n in names if n not in seen)

    add(study.run)
    for i in range(len(study.stages)):
        plan = plan_stage(study, i, Path("."), best={})
        add(plan.base_run)
        for t in plan.trials:
            add(plan.resolve({"trial": t.model_dump()})[0])
    return list(needs.values())


def check_study_data(study: StudySpec) -> None:
    """Open every data root the study's trials will read (``mmcl validate --check-data``
    and the start of ``mmcl run``): a missing or incomplete dataset is one SpecError that
    names it, before Ray or any trial starts. Generated benchmarks pass at once."""
    from mmcl.data import check_benchmark_data

    for spec, names in study_data_needs(study):
        check_benchmark_data(spec, names)
    b = study.run.backbone
    if b.kind in ("blip2", "llava") and not (b.path or "").startswith("mmcl:"):
        # A BLIP-2 / LLaVA directory (or cached hub id) is data too: missing weights fail
        # here, not inside the first trial. (mmcl:tiny is built by preflight.)
        from mmcl.backbones.vlm import resolve_model_dir

        resolve_model_dir(b)


def build_image_caches(study: StudySpec) -> list[str]:
    """Decode every image the study's trials read into this node's image cache
    (:mod:`mmcl.data.image_cache`), once, with a progress bar: the benchmarks that use it
    with the backbone's own transform (so the keys are the trials' keys). Returns what
    was built or found, one line per benchmark. Nothing for other benchmarks."""
    from mmcl.data import build_benchmark, uses_image_cache

    b = study.run.backbone
    needs = [(spec, names) for spec, names in study_data_needs(study) if uses_image_cache(spec)]
    if not needs or b.kind == "paired":
        return []
    if b.kind in ("blip2", "llava"):
        # The transform from the model's config files: no 3-7B weights loaded in the driver.
        from mmcl.backbones.vlm import image_transform

        preprocess = image_transform(b)
        size = preprocess.size
    else:
        # open_clip's transform from its configs: no CLIP weights read in the driver.
        from mmcl.backbones.clip import image_transform

        preprocess, size = image_transform(b)
    done = []
    for spec, names in needs:
        full = spec.model_copy(update={"order": list(names), "num_tasks": None})
        bench = build_benchmark(full, image_size=size, preprocess=preprocess)
        n = sum(len(t.train) + len(t.test) for t in bench.tasks)
        done.append(f"{spec.name}: {len(names)} task(s), {n} samples at {size} px")
    return done


def preflight(study: StudySpec) -> None:
    """Work done once before any trial: pretrained weights cached (the data were checked
    at the start of :func:`run_study`)."""
    from mmcl.backbones import ensure_pretrained

    from mmcl.spec import BackboneSpec

    b = study.run.backbone
    if b.kind in ("blip2", "llava"):
        from mmcl.backbones.vlm import resolve_model_dir

        resolve_model_dir(b)  # a missing directory / uncached hub id fails before any trial
        build_image_caches(study)  # COCO / VQAv2 images, decoded once on this node
        return
    clips = [(f"run.backbone.encoders.{m}", e) for m, e in b.encoders.items() if e.kind == "open_clip_vision"] \
        if b.kind == "paired" else [("run.backbone", b)]
    for key, c in clips:
        if c.checkpoint:
            if not Path(c.checkpoint).exists():
                raise SpecError(f"{key}.checkpoint: no such file {c.checkpoint}")
        elif c.pretrained == "synthetic":
            ensure_pretrained(BackboneSpec(model=c.model, pretrained="synthetic", cache_dir=b.cache_dir))
    # Image benchmarks: decoded once on this node before the first trial (other nodes'
    # first trials build their own, node-local copy).
    build_image_caches(study)
    if b.kind == "paired":
        # Load the encoders once (a missing AST directory fails here, before any trial);
        # building the benchmark with their preprocess fills any decoded-clip store.
        from mmcl.backbones import load_backbone
        from mmcl.data import build_benchmark

        backbone = load_backbone(b, "cpu")
        build_benchmark(study.run.benchmark, image_size=backbone.image_size, preprocess=backbone.preprocess)


def run_study(study: StudySpec, out: Storage, resume: bool = False, verbose: bool = False) -> Storage:
    """Run (or continue) every stage into ``out`` (a local directory or a bucket prefix).
    ``verbose`` shows Ray's and Tune's own output beside mmcl's stage view."""
    # Data first: a missing dataset stops here, before an output directory, Ray or a
    # minutes-long pretraining exists.
    check_study_data(study)
    from mmcl import results
    from mmcl.storage import StorageError
    from mmcl.tune import check_storage_reachable, ensure_ray, run_stage

    # Then the cluster: an unreachable one stops here too, before anything is written.
    ensure_ray(verbose)
    try:
        out.check_writable()
    except StorageError as e:
        raise SpecError(str(e)) from None
    # Every node a trial may run on must see what the driver writes here (a local path
    # on a cluster without a shared disk would strand each trial's rows on its node).
    token = check_storage_reachable(out)
    if not resume:
        import yaml

        out.write_text("study.yaml", yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
        results.write_json(results.versions(), out, "versions.json")
    state = read_state(out)
    preflight(study)
    best: dict[str, dict[str, Any]] = {
        name: s.get("best_overrides", {}) for name, s in state["stages"].items() if s.get("done")
    }
    for i, st in enumerate(study.stages):
        if state["stages"].get(st.name, {}).get("done"):
            log.info("stage %s finished earlier; not rerun", st.name)
            continue
        plan = plan_stage(study, i, out.uri, best)
        plan.storage_token = token
        plan.verbose = verbose
        print(f"== stage {i + 1}/{len(study.stages)}: {st.name} ({st.kind}, {plan.num_trials} trials)", flush=True)
        restore = resume and state["stages"].get(st.name, {}).get("started", False)
        _mark(out, st.name, started=True)
        rows = run_stage(plan, restore=restore, verbose=verbose)
        results.write_trials(out, st.name, rows)
        _consolidate(out)
        top = best_of_stage(plan, rows)
        entry = {"done": True, "started": True, "n_trials": len(rows)}
        if top is not None:
            # config_json holds the trial's overrides of the stage's base run.
            ov = {**plan.base_overrides, **json.loads(top["config_json"])}
            entry.update(best_trial=top["trial_id"], best_value=top[plan.metric], best_overrides=ov)
            best[st.name] = ov
        else:
            best[st.name] = dict(plan.base_overrides)
            entry["best_overrides"] = best[st.name]
        _mark(out, st.name, **entry)
    _consolidate(out)
    return out


def _consolidate(out: Storage) -> None:
    from mmcl.results import consolidate

    lost = consolidate(out)["lost_trials"]
    if lost:
        print(
            f"   {len(lost)} trial(s) started by a driver that was lost before Tune saved them "
            f"({', '.join(lost)}): their partial rows stay in {out.where('parts')} and are not in "
            "the tables (the resumed stage ran other trials in their place)",
            flush=True,
        )


def _mark(out: Storage, stage: str, **fields: Any) -> None:
    from mmcl.results import write_json

    state = read_state(out)
    state["stages"].setdefault(stage, {}).update(fields)
    write_json(state, out, STATE_KEY)
