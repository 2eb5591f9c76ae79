"""Ray Tune: the only module that imports ``ray``.

One Tune trial = one whole continual run (``mmcl.engine.run_continual``). After every
row of the accuracy matrix the trial writes its Parquet parts, then calls
``tune.report`` with the task index, the running metrics and a checkpoint holding the
engine's resumable state; a retried trial picks that checkpoint up from
``tune.get_checkpoint()`` and continues at the next task.

Search stages use Optuna (TPE) through :class:`ContinualOptunaSearch`, with a journal
file per stage under ``<out>/optuna/`` (optuna-dashboard opens it; a resumed study keeps
its history), and ASHA with ``time_attr="task"`` so poor trials stop after a task or two.
Ray's stock OptunaSearch tells Optuna such a stopped trial is COMPLETE with its partial
score; early-task scores are inflated (nothing forgotten yet), which would mislead TPE,
so the subclass tells PRUNED at the trial's last task instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Ray's own `uv run` integration (on by default since Ray 2.43) relaunches every worker with
# `uv run` inside an uploaded copy of the driver's working directory whenever the driver has
# a `uv run` ancestor, as `uv run mmcl run ...` and `uv run pytest` do. mmcl's workers need
# none of it: on a local Ray they use the driver's interpreter, on a cluster each node's own
# `uv sync --locked` environment (cluster.yaml) with the code `ray job submit --working-dir`
# ships. Left on, it uploaded whatever sits in the working directory (a local `results/`
# included) and built a second virtual environment in each new copy (~9 s; docs/cli.md). It must be set before Ray is imported (Ray reads it once);
# RAY_ENABLE_UV_RUN_RUNTIME_ENV=1 in the environment brings it back.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from mmcl import interrupt  # noqa: E402
from mmcl.results import ENV_PREFIX, METHOD_STAT_PREFIX, METRIC_COLUMNS, TrialWriter, git_sha, method_stat_columns  # noqa: E402
from mmcl.spec import SpecError  # noqa: E402
from mmcl.storage import Storage  # noqa: E402
from mmcl.study import StageInterrupted, StagePlan, StageStarved, _task_names  # noqa: E402

log = logging.getLogger(__name__)

# Keys of every tune.report (besides the metrics). ``task`` is ASHA's time attribute.
REPORT_META = ("task", "n_tasks", "objective", "variant", "order_id", "seed", "error")


# --------------------------------------------------------------------------- searcher


class ContinualOptunaSearch(OptunaSearch):
    """OptunaSearch that knows a trial is a sequence of tasks.

    - intermediate values are reported at step = task index (not Tune's iteration count),
      and only from task 1 on (row 0 is the untrained model);
    - a trial that ends before its last task (stopped by ASHA) is told PRUNED: Optuna
      then keeps its last intermediate value, at its step, out of TPE's "complete" set;
    - a trial that ended with an error (or reported one, e.g. a NaN loss) is told FAIL.
    """

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = result.get(self.metric)
        if result.get("task", 0) < 1 or value is None or not math.isfinite(value):
            return
        self._ot_trials[trial_id].report(float(value), step=int(result["task"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            # Told already by a driver that died before Tune saved that fact (the journal
            # is written first): restored, the trial ends again; telling twice would raise.
            self._completed_trials.add(trial_id)
            return
        state, value = optuna.trial.TrialState.COMPLETE, None
        if error or not result or result.get("error"):
            state = optuna.trial.TrialState.FAIL
        elif result.get("task", 0) < result.get("n_tasks", 0):
            state = optuna.trial.TrialState.PRUNED
            # The result that made ASHA stop the trial comes here, not to on_trial_result.
            step, v = int(result.get("task", 0)), result.get(self.metric)
            if step >= 1 and v is not None and math.isfinite(v):
                ot_trial.report(float(v), step=step)
        else:
            value = result.get(self.metric)
            if value is None or not math.isfinite(value):
                state, value = optuna.trial.TrialState.FAIL, None
        self._ot_study.tell(ot_trial, value, state=state)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's saved searcher, then the journal's trials it never heard of are failed.

        Tune saves its experiment state (this searcher included) every ~10 s, the journal
        at every ask / tell. A driver that dies between the two leaves journal trials
        RUNNING that no restored Tune trial will ever finish; optuna-dashboard would show
        them running forever. They are told FAIL with the user attribute
        ``lost_with_driver`` (their rows are left out of the tables: mmcl.results.consolidate).
        """
        import optuna

        super().restore(checkpoint_path)
        live = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in live:
                self._ot_study._storage.set_trial_user_attr(t._trial_id, "lost_with_driver", True)
                self._ot_study.tell(t.number, state=optuna.trial.TrialState.FAIL)


class ContinualASHA(tune.schedulers.AsyncHyperBandScheduler):
    """ASHA over the task index whose decisions survive ``mmcl resume``.

    Tune saves its searcher with the experiment but not its scheduler: a restored Tuner
    unpickles the scheduler as it was when the stage started (ray-project/ray#30838), so
    every score recorded at a rung is forgotten and a resumed search prunes against the
    new trials only (it keeps trials a finished run would have stopped). This one writes
    its rungs, each trial's bracket and the trials it stopped to
    ``<storage>/asha/<stage>.json`` whenever they change (one small write per task
    boundary) and reads them back the first time a restored Tuner adds a trial.

    A trial it stopped that the restored experiment still lists as unfinished (the driver
    died between the decision and Tune's next experiment snapshot) is stopped again at
    its first result instead of running on.
    """

    STATE_VERSION = 1

    def __init__(self, *, out_dir: str, stage: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._out_dir, self._stage = out_dir, stage
        self._stopped: set[str] = set()
        self._loaded = False
        # A fresh stage starts from nothing, whatever an earlier attempt left there.
        self._save()
        self._loaded = True

    @staticmethod
    def state_key(stage: str) -> str:
        return f"asha/{stage}.json"

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_store"}  # a filesystem client

    def __setstate__(self, state: dict) -> None:
        # Unpickled by Tuner.restore from the stage's start: load the saved state lazily
        # (on_trial_add), in the driver that restores, from the study's storage.
        self.__dict__.update(state)
        self._loaded = False

    @property
    def _storage(self) -> Storage:
        if "_store" not in self.__dict__:
            self._store = Storage.open(self._out_dir)
        return self._store

    def _state(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            "rungs": [[[m, dict(rec)] for m, rec in b._rungs] for b in self._brackets],
            "bracket_of": {tid: self._brackets.index(b) for tid, b in self._trial_info.items()},
            "stopped": sorted(self._stopped),
            "num_stopped": self._num_stopped,
        }

    def _save(self) -> None:
        self._storage.write_text(self.state_key(self._stage), json.dumps(self._state()))

    def _load(self) -> None:
        self._loaded = True
        store = self._storage
        if not store.is_file(self.state_key(self._stage)):
            return
        saved = json.loads(store.read_text(self.state_key(self._stage)))
        shape = [[m for m, _ in b._rungs] for b in self._brackets]
        if saved.get("version") != self.STATE_VERSION or [[m for m, _ in b] for b in saved["rungs"]] != shape:
            raise RuntimeError(
                f"{store.where(self.state_key(self._stage))}: ASHA state of another scheduler "
                f"(rungs {saved.get('rungs')!r}, this one {shape}); the stage's scheduler settings changed since it started"
            )
        for b, rungs in zip(self._brackets, saved["rungs"]):
            for (_, rec), (_, saved_rec) in zip(b._rungs, rungs):
                rec.update(saved_rec)
        self._saved_bracket_of = {tid: int(i) for tid, i in saved["bracket_of"].items()}
        self._stopped = set(saved["stopped"])
        self._num_stopped = int(saved["num_stopped"])

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._loaded:
            self._load()
        super().on_trial_add(tune_controller, trial)
        saved = getattr(self, "_saved_bracket_of", {})
        if trial.trial_id in saved:
            # The bracket it was in, not a new random one (its scores are recorded there).
            self._trial_info[trial.trial_id] = self._brackets[saved[trial.trial_id]]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self._stopped:
            return tune.schedulers.TrialScheduler.STOP
        before = self._state()
        action = super().on_trial_result(tune_controller, trial, result)
        if action == tune.schedulers.TrialScheduler.STOP:
            self._stopped.add(trial.trial_id)
        if self._state() != before:
            self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id not in self._trial_info:
            return  # a restored trial that had ended before and is told again
        before = self._state()
        super().on_trial_complete(tune_controller, trial, result)
        if self._state() != before:
            self._save()


class SyncedJournalBackend(BaseJournalBackend):
    """Optuna journal of a search stage whose study storage is a bucket.

    A journal file on an object store cannot be appended to atomically, and a journal on
    the driver's local disk is lost with the driver. So the driver, the only writer (the
    searcher lives in the driver), keeps the journal in a local mirror and uploads the
    whole file to ``<storage>/optuna/<stage>.journal`` after every append (one PUT: the
    stored copy is always a complete log of every tell so far). A driver on another
    machine (``mmcl resume s3://...``) downloads it when this object is built or
    unpickled (Tune restores the searcher by unpickling it), so the search continues
    with its whole history. The mirror path is recomputed on each machine, never pickled.
    """

    def __init__(self, storage_uri: str, stage: str):
        self.storage_uri, self.stage = storage_uri, stage
        self._setup()

    @property
    def key(self) -> str:
        return f"optuna/{self.stage}.journal"

    def _setup(self) -> None:
        from mmcl.storage import Storage

        self._store = Storage.open(self.storage_uri)
        mirror = Path(tempfile.gettempdir()) / "mmcl-optuna" / self._store.cache_key() / f"{self.stage}.journal"
        mirror.parent.mkdir(parents=True, exist_ok=True)
        # The stored copy is the truth: a mirror left by an earlier driver is replaced.
        mirror.write_bytes(self._store.read_bytes(self.key) if self._store.is_file(self.key) else b"")
        self._mirror = mirror
        self._file = JournalFileBackend(str(mirror))

    def __getstate__(self) -> dict[str, Any]:
        return {"storage_uri": self.storage_uri, "stage": self.stage}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def read_logs(self, log_number_from: int):
        return self._file.read_logs(log_number_from)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._file.append_logs(logs)
        self._store.upload_file(self._mirror, self.key)


def optuna_storage(study_dir: str, stage: str):
    """The Optuna storage of a search stage (a storage object: OptunaSearch rejects URLs):
    a journal file under ``<study>/optuna/`` on a local / NFS study storage (where
    optuna-dashboard opens it), a :class:`SyncedJournalBackend` on a bucket."""
    from optuna.storages import JournalStorage

    from mmcl.storage import Storage

    store = Storage.open(study_dir)
    if store.local_path is not None:
        path = store.local_path / "optuna" / f"{stage}.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    return JournalStorage(SyncedJournalBackend(store.uri, stage))


def optuna_study_name(plan: StagePlan) -> str:
    return f"{plan.study}.{plan.stage}"


# --------------------------------------------------------------------------- trial


def _fault_injection(moment: str, stage: str, trial_id: str, step: int) -> None:
    """Test hook, ``MMCL_FAULT_INJECT=<kind>:<stage>:<step>:<marker dir>``, acting once per
    trial of <stage> at <step> (a marker file per trial remembers it):

    - ``die``: exit right after writing the parts of <step>, before reporting them, the
      worst moment for duplicates (the retry recomputes and rewrites <step>);
    - ``hang``: after <step> was reported with its checkpoint, write the marker and wait
      (at most 10 minutes), so a test can interrupt the driver while the trial holds a
      checkpoint that Tune has not yet seen the end of (after the last task: a finished
      run that is not yet TERMINATED);
    - ``pause:<stage>:<step>:<seconds>``: every trial of <stage> sleeps <seconds> after
      reporting <step> (no marker), so a test sees whether two trials ran at once.
    """
    spec = os.environ.get("MMCL_FAULT_INJECT", "")
    kind, _, rest = spec.partition(":")
    if (kind, moment) == ("pause", "after_report"):
        f_stage, f_step, seconds = rest.split(":", 2)
        if f_stage == stage and int(f_step) == step:
            time.sleep(float(seconds))
        return
    if (kind, moment) not in (("die", "before_report"), ("hang", "after_report")):
        return
    f_stage, f_step, marker_dir = rest.split(":", 2)
    marker = Path(marker_dir) / f"{stage}-{trial_id}"
    if f_stage != stage or int(f_step) != step or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    if kind == "die":
        os._exit(17)
    time.sleep(600)


def _trial(config: dict[str, Any], plan_json: str) -> None:
    """The Tune function trainable: one continual run, reporting after every task."""
    from mmcl.engine import NonFiniteLossError, load_state_file, run_continual

    plan = StagePlan.model_validate_json(plan_json)
    if not plan.verbose:
        # One INFO line per task checkpoint from Ray Train, forwarded to the driver's console.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    _check_trial_storage(plan)
    run, meta = plan.resolve(config)
    trial_id = tune.get_context().get_trial_id()
    writer = TrialWriter(plan.out_dir, plan.study, plan.stage, trial_id, meta)

    resume, elapsed = None, 0.0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = load_state_file(Path(d) / "state.pt")
        resume, elapsed = saved["engine"], saved["elapsed_s"]
    resumed_from = resume["completed"] if resume else -1
    t_start = time.perf_counter()
    last: dict[str, Any] = {}

    def report(end) -> None:
        writer.write_step(end)
        _fault_injection("before_report", plan.stage, trial_id, end.step)
        value = end.metrics.get(plan.metric, math.nan) if end.step else math.nan
        metrics = {
            **{k: float(end.metrics.get(k, math.nan)) for k in METRIC_COLUMNS},
            "task": end.step,
            "n_tasks": end.n_tasks,
            # ASHA and Optuna need a number every time: NaN (e.g. BWT after one task) -> 0.
            "objective": float(value) if math.isfinite(value) else 0.0,
            **meta,
            "error": "",
            "trainable_params": end.trainable_params,
            # For the experiment trackers (driver-side callbacks below): this row of the
            # accuracy matrix as curves, and the matrix so far for the trial-end artifact.
            "acc": {name: float(v) for name, v in end.row.items()},
            "accuracy_matrix": _matrix_json(end),
            "peak_memory_mb": end.peak_memory_mb,
            "run_time_s": elapsed + time.perf_counter() - t_start,
            # -1 for a trial that never restarted; else the task its checkpoint held.
            "resumed_from_task": resumed_from,
            **method_stat_columns(end.method_stats),
            **{f"{ENV_PREFIX}{k}": v for k, v in end.environment.items()},
            f"{ENV_PREFIX}node_id": ray.get_runtime_context().get_node_id(),
        }
        last.clear()
        last.update(metrics)
        with tempfile.TemporaryDirectory() as d:
            torch.save({"engine": end.state, "elapsed_s": metrics["run_time_s"]}, Path(d) / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        _fault_injection("after_report", plan.stage, trial_id, end.step)

    try:
        run_continual(run, on_task_end=report, resume=resume)
    except NonFiniteLossError as e:
        # Deterministic: a retry would diverge again. Record it as the trial's error,
        # without a checkpoint, and let the study go on.
        tune.report({**last, "error": str(e), "objective": last.get("objective", 0.0)})


def _matrix_json(end) -> str:
    """The accuracy matrix so far, as the trackers store it: a table whose rows are
    labelled ("zero-shot", "after <task>") and whose columns are the tasks."""
    labels = ["zero-shot"] + [f"after {t}" for t in end.task_names]
    rows = [[labels[i], *(None if not math.isfinite(float(x)) else round(float(x), 6) for x in r)]
            for i, r in enumerate(end.matrix)]  # fmt: skip
    return json.dumps({"columns": ["after", *end.task_names], "rows": rows})


# --------------------------------------------------------------------------- trackers
# Ray Tune's logger callbacks do the work (one run per trial, metrics per result); they
# run on the driver, so only the machine running `mmcl` reaches a tracker. What they
# lack is written here: params = the trial's *resolved* run block (Tune's own config is a
# search sample or a grid index), step = the task index (Tune counts reports, and the
# zero-shot row is a report), names that say study / stage / variant, and the accuracy
# matrix at the trial's end.


def _by_task(result: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``result`` whose step (what the loggers read) is the task index."""
    out = {k: v for k, v in result.items() if k not in ("accuracy_matrix", "timesteps_total")}
    out["training_iteration"] = int(result.get("task", result.get("training_iteration", 0)))
    return out


def _trial_params(plan: StagePlan, config: dict[str, Any]) -> dict[str, Any]:
    """What a tracker shows as the trial's parameters: its whole run block and metadata."""
    try:
        run, meta = plan.resolve(config)
    except Exception:  # noqa: BLE001 - a bad sample errors in its trial, never in the driver's tracker
        return {"stage": plan.stage, **config}
    return {"stage": plan.stage, **meta, **run.model_dump(mode="json")}


def _matrix_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]] | None:
    """(columns, rows) of the accuracy matrix in ``result`` (see _matrix_json)."""
    raw = (result or {}).get("accuracy_matrix")
    if not raw:
        return None
    m = json.loads(raw)
    return m["columns"], m["rows"]


def _tracking_callbacks(plan: StagePlan) -> list[tune.Callback]:
    t = plan.tracking
    callbacks: list[tune.Callback] = []
    if t.mlflow:
        callbacks.append(_mlflow_callback(plan))
    if t.wandb:
        callbacks.append(_wandb_callback(plan))
    if t.tensorboard:
        callbacks.append(_tensorboard_callback(plan))
    return callbacks


def _never_fatal(cls: type, name: str) -> type:
    """``cls`` whose failures warn once and turn that tracker off for the stage: Tune
    re-raises a callback's exception and ends the stage, and a tracker is a view of the
    results, never a reason to lose them (an unreachable server, a full disk)."""

    class Guarded(cls):
        _mmcl_off = False

        def _guard(self, fn, *args, **kwargs):
            if self._mmcl_off:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self._mmcl_off = True
                print(f"warning: tracking.{name} is off for the rest of this stage after an error: "
                      f"{type(e).__name__}: {str(e)[:500]}", file=sys.stderr, flush=True)  # fmt: skip
                return None

    for hook in ("setup", "on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error",
                 "on_trial_save", "on_experiment_end"):  # fmt: skip
        def wrapped(self, *args, _hook=hook, **kwargs):
            return self._guard(getattr(super(Guarded, self), _hook), *args, **kwargs)

        setattr(Guarded, hook, wrapped)
    Guarded.__name__ = Guarded.__qualname__ = cls.__name__
    return Guarded


def _mlflow_callback(plan: StagePlan) -> tune.Callback:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    spec = plan.tracking.mlflow
    if spec.tracking_uri.startswith("file:") or "://" not in spec.tracking_uri:
        # MLflow 3 refuses its file store unless told otherwise ("maintenance mode"); a
        # study that names one asked for it [choice]. docs/tracking.md: `mlflow ui` on it
        # needs the same variable; sqlite or a server is MLflow's recommendation.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    # A tracking server that does not answer costs the driver's Tune loop each retry:
    # MLflow's defaults (7 retries with backoff) would stall scheduling for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

    class MlflowTrials(MLflowLoggerCallback):
        def log_trial_start(self, trial):
            if trial in self._trial_runs:  # a retried trial goes on in its own run
                return
            # A trial of a resumed study (`mmcl resume`) goes on in the run it had.
            client = self.mlflow_util._get_client()
            old = client.search_runs([self.mlflow_util.experiment_id], filter_string=f"tags.trial_id = '{trial.trial_id}'",
                                     max_results=1)  # fmt: skip
            if old:
                self._trial_runs[trial] = old[0].info.run_id
                client.update_run(old[0].info.run_id, status="RUNNING")
                return
            tags = {**self.tags, "trial_id": trial.trial_id, "mmcl.study": plan.study, "mmcl.stage": plan.stage}
            run = self.mlflow_util.start_run(tags=tags, run_name=f"{plan.stage}/{_trial_label(plan, trial.config)}")
            self._trial_runs[trial] = run.info.run_id
            self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=_trial_params(plan, trial.config))

        def log_trial_result(self, iteration, trial, result):
            if trial not in self._trial_runs:
                self.log_trial_start(trial)
            super().log_trial_result(iteration, trial, _by_task(result))

        def log_trial_end(self, trial, failed=False):
            if trial not in self._trial_runs:  # errored before it ever started
                return
            table = _matrix_table(trial.last_result)
            if table is not None:
                cols, rows = table
                client = self.mlflow_util._get_client()
                run_id = self._trial_runs[trial]
                client.log_dict(run_id, {"columns": cols, "rows": rows}, "accuracy_matrix.json")
                csv = "\n".join(",".join("" if v is None else str(v) for v in r) for r in [cols, *rows]) + "\n"
                client.log_text(run_id, csv, "accuracy_matrix.csv")
            super().log_trial_end(trial, failed=failed)

    return _never_fatal(MlflowTrials, "mlflow")(
        tracking_uri=spec.tracking_uri,
        experiment_name=spec.experiment or plan.study,
        tags={"mmcl.study": plan.study, "mmcl.stage": plan.stage, **spec.tags},
    )


def _wandb_callback(plan: StagePlan) -> tune.Callback:
    from ray.air.integrations.wandb import WandbLoggerCallback, _clean_log, _WandbLoggingActor

    spec = plan.tracking.wandb
    if spec.mode:
        # Read by Ray's API-key check on the driver (the logging actors get ``mode``).
        os.environ["WANDB_MODE"] = spec.mode

    class WandbMatrixActor(_WandbLoggingActor):
        """Ray's W&B logging process, which also turns the final matrix into a table."""

        def _handle_result(self, result):
            import json  # (json, not _matrix_table: the actor process stays free of mmcl.tune's torch)

            raw = result.pop("accuracy_matrix", None)
            log, config = super()._handle_result(result)
            if raw:
                m = json.loads(raw)
                log["accuracy_matrix"] = self._wandb.Table(columns=m["columns"], data=m["rows"])
            return log, config

    class WandbTrials(WandbLoggerCallback):
        _logger_actor_cls = WandbMatrixActor

        def log_trial_start(self, trial):
            # Ray's own start, with the resolved run block as the run's config and a name
            # that says which trial it is.
            kwargs = dict(
                # resume "allow": a trial of a resumed study (`mmcl resume`) goes on in its run.
                id=trial.trial_id, name=f"{plan.stage}/{_trial_label(plan, trial.config)}", resume="allow",
                reinit=True, allow_val_change=True, group=f"{plan.study}/{plan.stage}", project=self.project,
                config=_clean_log(_trial_params(plan, trial.config)), job_type=plan.stage,
            )  # fmt: skip
            kwargs.update(self.kwargs)
            self._start_logging_actor(trial, list(self._exclude_results) + list(self.excludes) + ["config"], **kwargs)

        def on_experiment_end(self, trials, **info):
            # Trials cut off (a signal, a stage error) never sent their end: tell their
            # logging processes, and wait briefly for them when interrupted.
            for trial in list(self._trial_queues):
                if trial in self._trial_logging_futures:
                    self._signal_logging_actor_stop(trial)
            if interrupt.interrupted():
                self._upload_timeout = min(self._upload_timeout, 10)
            super().on_experiment_end(trials, **info)  # waits (bounded) for W&B to finish
            # Tune synced the trial directories before the last runs finished writing:
            # copy each run's W&B directory to the study's storage once more, so that
            # `wandb sync <storage>/ray/<stage>/*/wandb/offline-run-*` has every run.
            import pyarrow.fs as pafs

            for trial in trials:
                if not getattr(trial.storage, "trial_dir_name", None):
                    continue  # never started (pending when the stage ended): no directory
                try:
                    local = Path(trial.storage.trial_driver_staging_path) / "wandb"
                    if not local.is_dir():
                        continue
                    dest, fs = f"{trial.storage.trial_fs_path}/wandb", trial.storage.storage_filesystem
                    if isinstance(fs, pafs.LocalFileSystem) and local.resolve() == Path(dest).resolve():
                        continue
                    pafs.copy_files(str(local), dest, destination_filesystem=fs)
                except Exception as e:  # noqa: BLE001 - the runs stay on this machine; say so
                    print(f"warning: could not copy the W&B runs of trial {trial.trial_id}: {e}", file=sys.stderr)

        def log_trial_result(self, iteration, trial, result):
            out = _by_task(result)
            if result.get("accuracy_matrix") and int(result.get("task", 0)) >= int(result.get("n_tasks", 1) or 1):
                out["accuracy_matrix"] = result["accuracy_matrix"]  # the actor makes it a table
            super().log_trial_result(iteration, trial, out)

    kwargs: dict[str, Any] = {"tags": [plan.study, plan.stage, *spec.tags]}
    if not plan.verbose:
        # W&B prints a run summary per trial into the driver's console; mmcl's stage
        # view is the console (`mmcl run -v` brings W&B's lines back).
        kwargs["settings"] = {"silent": True, "console": "off"}
    if spec.entity:
        kwargs["entity"] = spec.entity
    if spec.mode:
        kwargs["mode"] = spec.mode
    return _never_fatal(WandbTrials, "wandb")(project=spec.project, upload_timeout=spec.upload_timeout_s, **kwargs)


def _tensorboard_callback(plan: StagePlan) -> tune.Callback:
    from ray.tune.logger import TBXLoggerCallback

    class TensorboardTrials(TBXLoggerCallback):
        def log_trial_result(self, iteration, trial, result):
            super().log_trial_result(iteration, trial, _by_task(result))

        def log_trial_end(self, trial, failed=False):
            table = _matrix_table(trial.last_result)
            writer = self._trial_writer.get(trial)
            if table is not None and writer is not None:
                cols, rows = table
                md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                md += ["| " + " | ".join("" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |" for r in rows]
                writer.add_text("accuracy_matrix", "\n".join(md), global_step=len(rows) - 1)
            super().log_trial_end(trial, failed=failed)

    return _never_fatal(TensorboardTrials, "tensorboard")()


# --------------------------------------------------------------------------- stages


# Bounds on reaching a Ray cluster: nothing in `mmcl` waits on a cluster that is not there.
CONNECT_TIMEOUT_S = 20.0  # TCP probe of $RAY_ADDRESS (retried: a head may be starting)
INIT_TIMEOUT_S = 120.0  # ray.init itself (a local start on a loaded machine takes ~10 s)


def _cluster_address() -> tuple[str, str] | None:
    """(host:port to probe, where it came from) for $RAY_ADDRESS, or None when unset."""
    from ray._private.services import canonicalize_bootstrap_address

    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        return None
    source = f"RAY_ADDRESS={address}"
    if address == "auto":
        try:
            resolved = canonicalize_bootstrap_address("auto")
        except ConnectionError as e:
            raise SpecError(f"{source}: no running Ray cluster was found on this machine ({e}); fix: start one "
                            "(`ray start --head`), give its address, or unset RAY_ADDRESS so mmcl starts its own") from None
        source += " (the cluster recorded in the Ray temp directory)"
        address = resolved or address
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    return hostport, source


def _probe(hostport: str, source: str) -> None:
    """Fail within CONNECT_TIMEOUT_S, with the address and the fix, if nothing listens."""
    import socket

    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"{source}: not a Ray address (expected host:port, e.g. 127.0.0.1:6379)")
    deadline, err = time.monotonic() + CONNECT_TIMEOUT_S, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, CONNECT_TIMEOUT_S)):
                return
        except OSError as e:
            err = e
            time.sleep(1.0)
    raise SpecError(
        f"cannot reach the Ray cluster at {hostport} ({source}) within {CONNECT_TIMEOUT_S:.0f} s: {err}; fix: start "
        "the cluster (`ray start --head`), correct RAY_ADDRESS, or unset it so mmcl starts a local Ray"
    )


def ensure_ray(verbose: bool = False) -> None:
    """Connect to the cluster in $RAY_ADDRESS (``ray job submit`` sets it) or start a
    local one. Without $RAY_ADDRESS a new local Ray is started (``address="local"``):
    Ray's default would attach to the cluster recorded in ``/tmp/ray/ray_current_cluster``,
    and retry for ever when that head is dead. ``MMCL_*`` variables travel to the
    workers (the test fault hook)."""
    import threading

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith("MMCL_")}
    # Trials' own output reaches the driver; Ray's INFO lines only with `mmcl run -v`.
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.INFO if verbose else logging.WARNING}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    target = _cluster_address()
    if target is None:
        kwargs.update(address="local", include_dashboard=False)
        what = "starting a local Ray"
    else:
        _probe(*target)
        kwargs["address"] = os.environ["RAY_ADDRESS"].strip()
        what = f"connecting to the Ray cluster at {target[0]} ({target[1]})"

    # The probe bounds the usual failure; this bounds the rest (a head that accepts TCP
    # but never answers): ray.init cannot be interrupted from Python while it waits.
    def give_up() -> None:
        print(f"error: {what} did not finish within {INIT_TIMEOUT_S:.0f} s; check the cluster "
              "(`ray status`) or unset RAY_ADDRESS", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(2)

    # A local start on a machine whose cores are all busy can miss Ray's fixed 30 s for the
    # raylet to register ("The current node timed out during startup"); one more try, then
    # a message instead of Ray's traceback.
    attempts = 2 if target is None else 1
    for attempt in range(1, attempts + 1):
        watchdog = threading.Timer(INIT_TIMEOUT_S, give_up)
        watchdog.daemon = True
        watchdog.start()
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            if attempt == attempts:
                raise SpecError(
                    f"{what} failed {attempts} time(s): {e} Fix: retry when the machine is less busy, or start "
                    "Ray yourself (`ray start --head`) and set RAY_ADDRESS=auto"
                ) from None
            log.warning("%s timed out (the machine is busy); trying once more", what)
        finally:
            watchdog.cancel()


# --------------------------------------------------------------------------- storage

STORAGE_TOKEN_KEY = ".storage-token"  # written by the driver at every run / resume
STORAGE_CHECK_TIMEOUT_S = 120.0  # every trial node answers within this (a node may be busy)


class StorageNotShared(RuntimeError):
    """A trial runs on a node that does not see the driver's study storage."""


def _read_token(uri: str) -> tuple[bool, str]:
    """On a trial node: (read it, its content or why not)."""
    try:
        store = Storage.open(uri)
        if not store.is_file(STORAGE_TOKEN_KEY):
            return False, "sees no such file"
        return True, store.read_text(STORAGE_TOKEN_KEY)
    except Exception as e:  # credentials, endpoint, permissions: the message says which
        return False, f"{type(e).__name__}: {e}"


def _not_shared_message(out: Storage, where: str, detail: str) -> str:
    if out.local:
        return (
            f"storage: {out.where()} is a local path, and {where} does not see the driver's files there ({detail}): "
            "every trial placed there would leave its rows on that node's own disk. fix: set `storage:` (or --output) "
            "to a bucket, e.g. s3://bucket/prefix (credentials in every node's environment), or to a directory "
            "that every node mounts (NFS / EFS)"
        )
    return (
        f"storage: {where} cannot use {out.where()} ({detail}); fix: give every node access to the bucket "
        "(credentials in its environment, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance role; the "
        "same endpoint options in the URI)"
    )


def check_storage_reachable(out: Storage) -> str:
    """Write a fresh token into the study's storage and make every alive node that can
    run a trial read it back, before any trial starts; raise SpecError naming the first
    node that cannot. Returns the token (each trial checks it too: a node that joins
    later, e.g. an autoscaled GPU worker, is caught by its first trial).

    A local Ray that mmcl started itself is one machine: nothing to check there."""
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    out.write_text(STORAGE_TOKEN_KEY, token)
    if _cluster_address() is None:
        return token
    nodes = [
        n for n in ray.nodes()
        if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)
    ]  # fmt: skip
    probe = ray.remote(num_cpus=0, max_retries=0)(_read_token)
    refs = {
        n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            out.uri
        )
        for n in nodes
    }
    by_id = {n["NodeID"]: n for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=STORAGE_CHECK_TIMEOUT_S)
    for node_id, ref in refs.items():
        where = f"node {by_id[node_id]['NodeManagerAddress']} ({node_id[:12]})"
        if ref not in ready:
            raise SpecError(
                f"storage check: {where} did not answer within {STORAGE_CHECK_TIMEOUT_S:.0f} s (is it overloaded or "
                "failing? `ray status`); fix: bring the node back or remove it, then run again"
            )
        ok, text = ray.get(ref)
        if not ok:
            raise SpecError(_not_shared_message(out, where, text))
        if text != token:
            raise SpecError(_not_shared_message(out, where, "it sees another run's file at that path"))
    return token


def _check_trial_storage(plan: StagePlan) -> None:
    """In a trial: the driver's token is visible here, or the trial refuses to start."""
    if not plan.storage_token:
        return
    ok, text = _read_token(plan.out_dir)
    if not ok or text != plan.storage_token:
        where = f"node {ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]})"
        detail = text if not ok else "it sees another run's token there"
        raise StorageNotShared(_not_shared_message(Storage.open(plan.out_dir), where, detail))


def _trial_label(plan: StagePlan, config: dict[str, Any]) -> str:
    """A short name for a trial on the console: its sampled values, or variant / order / seed."""
    try:
        overrides, meta = plan.trial_overrides(config or {})
    except Exception:  # a config Tune has not filled yet
        return ""
    if plan.kind == "search":
        text = " ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                        for k, v in overrides.items())  # fmt: skip
    else:
        text = " ".join(str(x) for x in (meta["variant"], meta["order_id"] if meta["order_id"] != "default" else "",
                                         f"seed {meta['seed']}") if x)  # fmt: skip
    return text if len(text) <= 60 else text[:57] + "..."


class _ConsoleCallback(tune.Callback):
    """Feeds Tune's trial events to the stage's :class:`mmcl.progress.StageProgress`."""

    def __init__(self, plan: StagePlan, view):
        self.plan, self.view = plan, view

    # Tune pickles its run config (callbacks included) with the experiment; the view holds
    # the console stream, which is this driver's only: a restored stage gets a new one.
    def __getstate__(self):
        return {"plan": self.plan, "view": None}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _end(self, trial, errored: bool = False) -> None:
        last = trial.last_result or {}
        if errored or last.get("error"):
            error = str(last.get("error") or getattr(trial, "error_msg", "") or "error")
            self.view.finished(trial.trial_id, "errored", error)
        elif int(last.get("task", 0)) < self.plan.n_tasks:
            self.view.finished(trial.trial_id, "stopped")  # ASHA (or a stopper) ended it early
        else:
            self.view.finished(trial.trial_id, "completed")

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.view is None:
            return
        self.view.started(trial.trial_id, _trial_label(self.plan, trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.view is None:
            return
        self.view.result(trial.trial_id, int(result.get("task", 0)), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.view is None:
            return
        self._end(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.view is None:
            return
        self._end(trial, errored=True)

    def on_step_end(self, iteration, trials, **info):
        if self.view is None:
            return
        # Trials a restored stage finished before the interruption send no events.
        for trial in trials:
            if trial.trial_id not in self.view.trials and trial.status in ("TERMINATED", "ERROR"):
                self.view.started(trial.trial_id, _trial_label(self.plan, trial.config))
                self.view.result(trial.trial_id, int((trial.last_result or {}).get("task", 0)), trial.last_result or {})
                self._end(trial, errored=trial.status == "ERROR")
        self.view.tick()


class _ResourceWatch(tune.Callback, tune.stopper.Stopper):
    """Ends a stage whose trials have waited ``resources.wait_timeout_s`` with none of them
    running: Tune itself waits forever for resources the cluster may never offer (it only
    logs a warning). As a stopper it ends the run the way Ctrl-C does (state saved), so
    `mmcl resume` continues it; the driver then raises :class:`StageStarved`."""

    def __init__(self, plan: StagePlan):
        self.plan, self.timeout_s = plan, plan.resources.wait_timeout_s
        self.since: float | None = None  # set at the stage's first step
        self.starved = ""

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if self.starved:
            return
        waiting = sum(t.status == "PENDING" for t in trials)
        if self.since is None or not waiting or any(t.status == "RUNNING" for t in trials):
            self.since = now
        elif now - self.since > self.timeout_s:
            offered = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            r = self.plan.resources
            self.starved = (
                f"stage {self.plan.stage}: {waiting} trial(s) waited {self.timeout_s:.0f} s for resources with none "
                f"running; each asks for cpu={r.cpu:g}, gpu={r.gpu:g} (`resources:` in the study) and the cluster "
                f"offers {', '.join(f'{k}={v:g}' for k, v in sorted(offered.items())) or 'nothing'} in all. Fix: "
                f"lower `resources:` or add nodes, then `mmcl resume {shlex.quote(self.plan.out_dir)}`; on an "
                f"autoscaling cluster raise `resources.wait_timeout_s`"
            )

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return bool(self.starved)

    # Tune pickles its run config with the experiment; a restored stage gets a new watch.
    def __getstate__(self):
        return {**self.__dict__, "since": None, "starved": ""}


def _build_tuner(plan: StagePlan, restore: bool, callbacks: list | None = None, verbose: bool = False,
                 stopper: tune.stopper.Stopper | None = None) -> tune.Tuner:  # fmt: skip
    # reuse_actors: a trial's process (torch, open_clip, the benchmark cache) serves the
    # next trial too, instead of a fresh interpreter per trial.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, plan_json=plan.model_dump_json()),
        {"cpu": plan.resources.cpu, "gpu": plan.resources.gpu},
    )
    # Tune's experiments (trial checkpoints, searcher state) live in the study's own
    # storage, so any node can write a checkpoint and any driver machine can restore.
    ray_dir = Storage.open(plan.out_dir) / "ray"
    fs = None if ray_dir.local else ray_dir.fs
    exp_path = ray_dir.path(plan.stage)
    if restore and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        print(f"   restoring stage {plan.stage} from {ray_dir.where(plan.stage)}", flush=True)
        # A restored Tuner keeps the RunConfig it was saved with; the console callback and
        # verbosity are this driver's, so they are set on the restored run config.
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
        rc = tuner._local_tuner._run_config if getattr(tuner, "_local_tuner", None) else None
        if rc is not None:
            rc.callbacks = list(callbacks or [])
            rc.stop = stopper
            rc.verbose = 1 if verbose else 0
        return tuner

    run_config = tune.RunConfig(
        name=plan.stage,
        storage_path=ray_dir.path(),
        storage_filesystem=fs,
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        # Tune's own per-trial boxes and tables only with `mmcl run -v`: mmcl's stage view
        # (mmcl/progress.py, fed by the callback) says what a researcher needs.
        verbose=1 if verbose else 0,
        callbacks=list(callbacks or []),
        stop=stopper,
    )
    if plan.kind == "search":
        from search_spaces import get_space

        # With a define-by-run space, OptunaSearch ignores the metric TuneConfig would
        # pass on: both the searcher and ASHA get it directly.
        searcher = ContinualOptunaSearch(
            space=get_space(plan.search_space),
            metric="objective",
            mode=plan.mode,
            sampler=_sampler(plan),
            storage=optuna_storage(plan.out_dir, plan.stage),
            study_name=optuna_study_name(plan),
        )
        scheduler = None
        if plan.scheduler.kind == "asha":
            scheduler = ContinualASHA(
                out_dir=plan.out_dir,
                stage=plan.stage,
                time_attr="task",
                metric="objective",
                mode=plan.mode,
                max_t=plan.n_tasks,
                grace_period=min(plan.scheduler.grace_period, plan.n_tasks),
                reduction_factor=plan.scheduler.reduction_factor,
            )
        tune_config = tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=plan.num_samples,
            max_concurrent_trials=plan.max_concurrent_trials,
            reuse_actors=True,
        )
        return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
    param_space = {"trial": tune.grid_search([t.model_dump() for t in plan.trials])}
    tune_config = tune.TuneConfig(
        metric="objective", mode=plan.mode, max_concurrent_trials=plan.max_concurrent_trials, reuse_actors=True
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _sampler(plan: StagePlan):
    import optuna

    return optuna.samplers.TPESampler(seed=plan.sampler_seed)


def run_stage(plan: StagePlan, restore: bool = False, verbose: bool = False) -> list[dict[str, Any]]:
    """Run one stage on Ray; return one trials-table row per trial. The console shows the
    stage's live view (mmcl/progress.py); ``verbose`` brings Tune's own output back."""
    from mmcl.progress import StageProgress

    ensure_ray(verbose)
    if not verbose:
        # Tune warns on every stage that per-task checkpoints snapshot its state often;
        # that is by design here (a failed trial resumes from its last finished task).
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        # Tune's new output engine prints its configuration box and result paths even at
        # verbose=0; the legacy engine at verbosity 0 prints nothing (read at fit time).
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    view = StageProgress(plan.stage, plan.num_trials, plan.n_tasks)
    try:
        with interrupt.tune_run():
            watch = _ResourceWatch(plan)
            callbacks = [_ConsoleCallback(plan, view), watch, *_tracking_callbacks(plan)]
            grid = _build_tuner(plan, restore, callbacks, verbose, stopper=watch).fit()
    finally:
        view.close()
    if watch.starved:
        raise StageStarved(watch.starved)
    if interrupt.interrupted():
        # Tune marks the trials it cut off TERMINATED: only the signal tells.
        raise StageInterrupted(
            f"stage {plan.stage} was stopped by a signal; continue with: mmcl resume {shlex.quote(plan.out_dir)}"
        )
    return _trial_rows(plan, grid)


def _trial_rows(plan: StagePlan, grid) -> list[dict[str, Any]]:
    sha = git_sha()
    rows, unfinished = [], []
    # ResultGrid is built from these Trial objects in this order; only they know whether a
    # trial ended (TERMINATED / ERROR) or was cut off with the driver (PENDING / RUNNING).
    trials = grid._experiment_analysis.trials
    for trial, res in zip(trials, (grid[i] for i in range(len(grid)))):
        m = res.metrics or {}
        overrides, meta = plan.trial_overrides(res.config or {})
        n_done = int(m.get("task", 0))
        if trial.status == "ERROR":
            status, error = "error", _short_error(res.error)
        elif trial.status != "TERMINATED":
            unfinished.append(trial.trial_id)
            continue
        elif m.get("error"):
            status, error = "error", m["error"]
        elif n_done < plan.n_tasks:
            status, error = "stopped", None
        else:
            status, error = "completed", None
        run, _ = plan.resolve(res.config or {})
        rows.append(
            {
                "study": plan.study,
                "stage": plan.stage,
                "trial_id": trial.trial_id,
                "method": run.method.name,
                **meta,
                "order": ",".join(_task_names(run)),
                "status": status,
                "error": error,
                "config_json": json.dumps(overrides, sort_keys=True),
                **{f"config/{k}": json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in overrides.items()},
                **{k: m.get(k, math.nan) for k in METRIC_COLUMNS},
                "n_tasks_trained": n_done,
                "n_tasks": plan.n_tasks,
                "trainable_params": m.get("trainable_params"),
                "peak_memory_mb": m.get("peak_memory_mb"),
                "wall_time_s": m.get("run_time_s"),
                "resumed_from_task": m.get("resumed_from_task", -1),
                "git_sha": sha,
                # Method.stats() of the trial's last reported task (extra columns).
                **{k: v for k, v in m.items() if k.startswith(METHOD_STAT_PREFIX)},
                # Where and how it ran (hostname, node, GPU, CUDA, AMP dtype, batch size).
                **{k: v for k, v in m.items() if k.startswith(ENV_PREFIX)},
            }
        )
    # Tune returns normally after Ctrl-C: trials cut off keep a live status, and trials
    # not yet created are simply missing from the grid.
    missing = plan.num_trials - len(rows) - len(unfinished)
    if unfinished or missing > 0:
        raise StageInterrupted(
            f"stage {plan.stage}: {len(unfinished) + max(missing, 0)} of {plan.num_trials} trial(s) did not "
            f"finish; continue with: mmcl resume {shlex.quote(plan.out_dir)}"
        )
    return rows


def _short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    tail = [line for line in text if line.strip()][-3:]
    return " | ".join(tail)[:2000] or type(err).__name__
