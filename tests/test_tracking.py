"""Experiment trackers (`tracking:` in a study): MLflow, W&B and TensorBoard for real,
fed by a search stage on the session's local Ray cluster, and read back with each
tracker's own client or files."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmcl.cli import main
from mmcl.spec import SpecError, load_study

from .helpers import tiny_study

N_TASKS = 3


def _with_tracking(path: Path, tracking: dict) -> Path:
    data = yaml.safe_load(path.read_text())
    data["tracking"] = tracking
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _matrix(acc: pd.DataFrame, trial_id: str, tasks: list[str]) -> list[list[float]]:
    rows = acc[acc.trial_id == trial_id]
    return [[float(rows[(rows.step == s) & (rows.eval_task == t)].value.iloc[0]) for t in tasks]
            for s in sorted(rows.step.unique())]  # fmt: skip


@pytest.fixture(scope="module")
def tracked(ray_cluster, tmp_path_factory, monkeypatch_module):
    """One ASHA search (some trials stopped early) logged to all three trackers."""
    tmp = tmp_path_factory.mktemp("tracking")
    # W&B offline: nothing leaves the machine; its files stay in each trial's directory.
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    study = tiny_study(
        tmp / "s.yaml",
        [{"name": "search", "kind": "search", "search_space": "finetune", "num_samples": 4,
          "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}, "sampler_seed": 3}],
        name="trk", num_tasks=N_TASKS, max_concurrent=1,
    )  # fmt: skip
    uri = (tmp / "mlruns").as_uri()
    _with_tracking(study, {"mlflow": {"tracking_uri": uri, "tags": {"team": "mmcl"}},
                           "wandb": {"project": "mmcl-test", "mode": "offline"}, "tensorboard": True})  # fmt: skip
    out = tmp / "out"
    assert main(["run", str(study), "--output", str(out)]) == 0
    trials = pd.read_parquet(out / "trials.parquet")
    acc = pd.read_parquet(out / "accuracy.parquet")
    assert (trials.status == "stopped").any() and (trials.status == "completed").any()
    tasks = trials.order.iloc[0].split(",")
    return {"out": out, "uri": uri, "trials": trials, "acc": acc, "tasks": tasks}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.slow
def test_mlflow_one_run_per_trial_with_resolved_params_task_steps_and_matrix(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked["uri"])
    exp = client.get_experiment_by_name("trk")  # the study's name by default
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([exp.experiment_id])}
    trials, acc, tasks = tracked["trials"], tracked["acc"], tracked["tasks"]
    assert set(runs) == set(trials.trial_id)
    for _, t in trials.iterrows():
        r = runs[t.trial_id]
        assert r.info.status == "FINISHED"
        assert r.data.tags["mmcl.stage"] == "search" and r.data.tags["team"] == "mmcl"
        # Params are the resolved run block: the method, the benchmark, the sampled lr.
        p = r.data.params
        assert p["method/name"] == "finetune" and p["benchmark/num_tasks"] == str(N_TASKS)
        assert math.isclose(float(p["training/lr"]), t["config/training.lr"], rel_tol=1e-9)
        # One point per task (step = task index, 0 = zero-shot) for every eval task,
        # equal to the results table; a stopped trial ends at its last task.
        want = _matrix(acc, t.trial_id, tasks)
        for j, name in enumerate(tasks):
            hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, f"acc/{name}"))
            assert [s for s, _ in hist] == list(range(t.n_tasks_trained + 1))
            assert [v for _, v in hist] == pytest.approx([row[j] for row in want], abs=1e-6)
        avg = client.get_metric_history(r.info.run_id, "avg")
        assert max(m.step for m in avg) == t.n_tasks_trained
        final = [m.value for m in avg if m.step == t.n_tasks_trained][0]
        assert final == pytest.approx(t.avg, abs=1e-6)
        # The accuracy matrix as an artifact, rows labelled.
        path = client.download_artifacts(r.info.run_id, "accuracy_matrix.json", str(tmp_path / t.trial_id))
        m = json.loads(Path(path).read_text())
        assert m["columns"] == ["after", *tasks]
        assert [row[0] for row in m["rows"]] == ["zero-shot", *[f"after {x}" for x in tasks]][: t.n_tasks_trained + 1]
        assert _flat(row[1:] for row in m["rows"]) == pytest.approx(_flat(want), abs=1e-5)


def _flat(rows) -> list[float]:
    return [float(v) for r in rows for v in r]


def wandb_records(path: Path) -> list:
    """The records of a W&B run log (``run-<id>.wandb``), decoded with W&B's own protos.

    The file is a LevelDB-style log (W&B's Python reader went with its Go core): a 7-byte
    header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each a 7-byte
    header (CRC32C, length little-endian u16, type 1 full / 2 first / 3 middle / 4 last)
    and its bytes; a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe" and data[6] == 0, "not a W&B log"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # padding up to the next block
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records


def _trial_dirs(out: Path) -> dict[str, Path]:
    """Tune's directory of each trial in the study's storage, by trial id."""
    dirs = {}
    for params in (out / "ray" / "search").glob("*/params.json"):
        result = (params.parent / "result.json").read_text().splitlines()
        dirs[json.loads(result[-1])["trial_id"]] = params.parent
    return dirs


@pytest.mark.slow
def test_wandb_offline_one_run_per_trial_grouped_with_the_matrix_table(tracked):
    trials, acc, tasks = tracked["trials"], tracked["acc"], tracked["tasks"]
    dirs = _trial_dirs(tracked["out"])
    assert set(dirs) == set(trials.trial_id)
    for _, t in trials.iterrows():
        runs = list((dirs[t.trial_id] / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # one run per trial
        run = runs[0]
        assert run.name.endswith(t.trial_id)  # the run id is the trial id
        recs = wandb_records(next(run.glob("run-*.wandb")))
        run_rec = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        # Grouped by study and stage; the config is the resolved run block.
        assert run_rec.run_group == "trk/search" and run_rec.job_type == "search"
        config = {u.key: json.loads(u.value_json) for u in run_rec.config.update}
        assert config["method"]["name"] == "finetune"
        assert math.isclose(config["training"]["lr"], t["config/training.lr"], rel_tol=1e-9)
        # One history row per task (step = task index), equal to the results table.
        history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                   for r in recs if r.WhichOneof("record_type") == "history"]  # fmt: skip
        want = _matrix(acc, t.trial_id, tasks)
        assert [h["_step"] for h in history] == list(range(t.n_tasks_trained + 1))
        assert _flat([h[f"acc/{x}"] for x in tasks] for h in history) == pytest.approx(_flat(want), abs=1e-6)
        # (W&B's log keeps a table as a reference to its file, key by key.)
        tables = [h["accuracy_matrix/path"] for h in history if "accuracy_matrix/path" in h]
        if t.status == "completed":
            # The matrix as a wandb.Table at the trial's end.
            assert len(tables) == 1
            table = json.loads((run / "files" / tables[0]).read_text())
            assert table["columns"] == ["after", *tasks]
            assert _flat(r[1:] for r in table["data"]) == pytest.approx(_flat(want), abs=1e-5)
        else:
            assert tables == []


@pytest.mark.slow
def test_tensorboard_event_files_per_trial_by_task(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trials, acc, tasks = tracked["trials"], tracked["acc"], tracked["tasks"]
    dirs = _trial_dirs(tracked["out"])
    for _, t in trials.iterrows():
        assert list(dirs[t.trial_id].glob("events.out.tfevents.*"))
        ea = EventAccumulator(str(dirs[t.trial_id]), size_guidance={"scalars": 0, "tensors": 0})
        ea.Reload()
        want = _matrix(acc, t.trial_id, tasks)
        for j, name in enumerate(tasks):
            ev = ea.Scalars(f"ray/tune/acc/{name}")
            assert [e.step for e in ev] == list(range(t.n_tasks_trained + 1))
            assert [e.value for e in ev] == pytest.approx([row[j] for row in want], abs=1e-4)
        text = ea.Tensors("accuracy_matrix/text_summary")[-1].tensor_proto.string_val[0].decode()
        assert text.splitlines()[0] == "| " + " | ".join(["after", *tasks]) + " |"
        assert len(text.splitlines()) == 2 + t.n_tasks_trained + 1


@pytest.mark.parametrize("tracker,module,extra", [("mlflow", "mlflow", "mlflow"), ("wandb", "wandb", "wandb"),
                                                  ("tensorboard", "tensorboardX", "tensorboard")])  # fmt: skip
def test_a_missing_tracker_package_is_named_at_validate(tmp_path, monkeypatch, capsys, tracker, module, extra):
    study = tiny_study(tmp_path / "s.yaml", [{"name": "a", "kind": "ablation", "seeds": [0]}])
    block = {"mlflow": {"tracking_uri": "file:///tmp/x"}, "wandb": {"project": "p"}, "tensorboard": True}[tracker]
    _with_tracking(study, {tracker: block})
    assert main(["validate", str(study)]) == 0  # installed here: fine
    assert main(["plan", "--no-params", str(study)]) == 0
    assert f"tracking: {tracker} (" in capsys.readouterr().out
    # As on a machine without the package: its import fails.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SpecError) as e:
        load_study(study)
    msg = str(e.value)
    assert str(study) in msg and f"tracking.{tracker}" in msg and f"uv sync --extra {extra}" in msg
    assert main(["validate", str(study)]) == 2
    assert f"uv sync --extra {extra}" in capsys.readouterr().err


def test_tracking_keys_are_checked(tmp_path):
    study = tiny_study(tmp_path / "s.yaml", [{"name": "a", "kind": "ablation", "seeds": [0]}])
    _with_tracking(study, {"mlflow": {"uri": "file:///tmp/x"}})
    with pytest.raises(SpecError, match=r"tracking\.mlflow\.tracking_uri"):
        load_study(study)


def _plan(tmp_path, tracking: dict):
    from mmcl.study import plan_stage

    study = _with_tracking(tiny_study(tmp_path / "s.yaml", [{"name": "a", "kind": "ablation", "seeds": [0]}], name="trk"),
                           tracking)  # fmt: skip
    return plan_stage(load_study(study), 0, tmp_path / "out", {})


class _Trial:
    """What a tracker callback reads of Tune's Trial (id, config, last result)."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config, self.last_result = trial_id, config, {}


def test_an_unreachable_tracker_warns_and_turns_off_instead_of_ending_the_stage(tmp_path, capsys):
    import socket

    from mmcl.tune import _tracking_callbacks

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = _plan(tmp_path, {"mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}})
    (cb,) = _tracking_callbacks(plan)
    cb.setup()  # MLflow cannot reach its server: no exception
    trial = _Trial("t0", {"trial": plan.trials[0].model_dump()})
    cb.on_trial_start(0, [trial], trial)
    cb.on_trial_complete(0, [trial], trial)
    err = capsys.readouterr().err
    assert err.count("warning: tracking.mlflow is off for the rest of this stage") == 1, err


def test_a_resumed_trial_goes_on_in_its_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from mmcl.tune import _tracking_callbacks

    uri = (tmp_path / "mlruns").as_uri()
    plan = _plan(tmp_path, {"mlflow": {"tracking_uri": uri}})
    trial = _Trial("t0", {"trial": plan.trials[0].model_dump()})
    ids = []
    for _ in range(2):  # the first driver, then the driver of `mmcl resume`
        (cb,) = _tracking_callbacks(plan)
        cb.setup()
        cb.on_trial_start(0, [trial], trial)
        ids.append(cb._trial_runs[trial])
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("trk").experiment_id])
    assert ids[0] == ids[1] and len(runs) == 1
    assert runs[0].data.params["seed"] == "0" and runs[0].data.params["method/name"] == "finetune"
