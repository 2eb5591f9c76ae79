"""mmcl.storage: one contract over a local directory and a real S3-compatible server
(moto in server mode on loopback), and the parts of mmcl that read and write through it."""

from __future__ import annotations

import uuid

import pandas as pd
import pytest

from mmcl.storage import Storage, StorageError, is_uri


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    """An empty study directory on each medium."""
    if request.param == "local":
        return Storage.open(tmp_path / "results") / "study"
    bucket = request.getfixturevalue("s3_server")(f"b-{uuid.uuid4().hex[:12]}")
    return Storage.open(bucket) / "results" / "study"


def test_uri_grammar_and_local_paths(tmp_path):
    s = Storage.open("s3://bkt/a/b/?endpoint_override=127.0.0.1:9&scheme=http")
    assert not s.local and s.root == "bkt/a/b"
    # Joining keeps the options, so a child is reachable by its URI alone.
    child = s / "study"
    assert child.uri == "s3://bkt/a/b/study?endpoint_override=127.0.0.1:9&scheme=http"
    assert child.where("trials.parquet") == "s3://bkt/a/b/study/trials.parquet"
    assert Storage.open(child.uri).root == child.root
    local = Storage.open("results", cwd=tmp_path)
    assert local.local and local.local_path == tmp_path / "results" and local.uri == str(tmp_path / "results")
    assert Storage.open(f"file://{tmp_path}").local_path == tmp_path
    assert is_uri("gs://b/x") and not is_uri("/data/x") and not is_uri("file:///x") and not is_uri("C://x")
    with pytest.raises(StorageError, match="cannot use 'nosuch://b/x'.*fix"):
        Storage.open("nosuch://b/x")


def test_storage_contract(store):
    assert not store.exists()
    store.write_text("study.yaml", "name: x\n")
    df = pd.DataFrame({"trial_id": ["a", "b"], "value": [1.0, 2.0]})
    store.write_parquet(df, "parts/accuracy/s/a/step_000.parquet")
    store.write_parquet(df.iloc[:1], "parts/accuracy/s/a/step_001.parquet")
    assert store.exists() and store.is_file("study.yaml") and not store.is_file("parts")
    assert store.read_text("study.yaml") == "name: x\n"
    pd.testing.assert_frame_equal(store.read_parquet("parts/accuracy/s/a/step_000.parquet"), df)
    assert store.list_files("parts", suffix=".parquet") == [
        "parts/accuracy/s/a/step_000.parquet",
        "parts/accuracy/s/a/step_001.parquet",
    ]
    assert store.list_files("nothing-here") == []
    # A rewrite of the same key replaces it (a retried step), never adds a second file.
    store.write_parquet(df.iloc[1:], "parts/accuracy/s/a/step_001.parquet")
    assert len(store.list_files("parts")) == 2
    assert store.read_parquet("parts/accuracy/s/a/step_001.parquet").value.tolist() == [2.0]
    store.delete("study.yaml")
    store.delete("study.yaml")  # deleting what is gone is fine
    assert not store.is_file("study.yaml")
    store.check_writable()
    # The same location opened again from its URI (another process or machine) sees it.
    assert Storage.open(store.uri).list_files() == store.list_files()


def test_unwritable_bucket_is_one_clear_error(s3_server):
    s3_server("b-exists")
    missing = Storage.open(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x?{s3_server.options}")
    with pytest.raises(StorageError, match=r"cannot write s3://no-such-bucket.*fix: .*credentials"):
        missing.check_writable()


def test_consolidate_and_analysis_load_on_both_media(store):
    """A trial's parts -> consolidated tables -> analysis.load(URI), duplicates dropped."""
    import analysis
    from mmcl.engine import TaskEnd
    from mmcl.results import TrialWriter, consolidate, write_trials

    names = ["t0", "t1"]

    def end(step, values):
        import numpy as np

        return TaskEnd(
            step=step, trained_task=names[step - 1] if step else None, task_names=names,
            row=dict(zip(names, values)), metric_names={n: "accuracy" for n in names},
            n_samples={n: 10 for n in names}, matrix=np.zeros((step + 1, 2)), metrics={}, curves=[], state={},
            trainable_params=1, peak_memory_mb=0.0, task_wall_time_s=0.0,
        )  # fmt: skip

    w = TrialWriter(store.uri, "tiny", "search", "tr1", {"variant": "search", "order_id": "default", "seed": 0})
    w.write_step(end(0, [10.0, 20.0]))
    w.write_step(end(1, [50.0, 20.0]))
    w.write_step(end(1, [50.0, 20.0]))  # a retry rewrites step 1
    write_trials(store, "search", [{"study": "tiny", "stage": "search", "trial_id": "tr1", "status": "completed"}])
    assert consolidate(store) == {"accuracy": 4, "curves": 0, "trials": 1, "lost_trials": []}
    res = analysis.load(store.uri)
    assert len(res.accuracy) == 4 and not res.accuracy.duplicated(["trial_id", "step", "eval_task"]).any()
    assert res.study == "tiny" and res.trials.trial_id.tolist() == ["tr1"]
    assert str(res.path) == (str(store.local_path) if store.local else store.uri)
    with pytest.raises(FileNotFoundError, match="not a results directory"):
        analysis.load(store / "elsewhere")


def test_rows_of_a_trial_the_restored_stage_never_knew_stay_out_of_the_tables(store):
    """A driver died after trial tr2 wrote a row but before Tune saved tr2: the restored
    stage's trials table lacks it. Its rows would be a trial that does not exist in the
    tables, so they stay in parts/ only; a stage still running keeps all its rows."""
    from mmcl.results import ACCURACY_COLUMNS, consolidate, write_trials

    def row(stage, trial_id):
        return pd.DataFrame([dict.fromkeys(ACCURACY_COLUMNS, 0) | {"stage": stage, "trial_id": trial_id, "eval_task": "t0"}])

    for stage, trial_id in (("search", "tr1"), ("search", "tr2"), ("orders", "tr9")):
        store.write_parquet(row(stage, trial_id), f"parts/accuracy/{stage}/{trial_id}/step_000.parquet")
    write_trials(store, "search", [{"study": "tiny", "stage": "search", "trial_id": "tr1", "status": "completed"}])
    counts = consolidate(store)
    assert counts["lost_trials"] == ["search/tr2"]
    acc = store.read_parquet("accuracy.parquet")
    assert sorted(zip(acc.stage, acc.trial_id)) == [("orders", "tr9"), ("search", "tr1")]
    assert store.is_file("parts/accuracy/search/tr2/step_000.parquet")  # nothing deleted


def test_search_journal_on_a_bucket_survives_a_new_driver_machine(s3_server, tmp_path, monkeypatch):
    """The Optuna journal of a bucket study is uploaded at every tell; a driver with an
    empty disk (another TMPDIR) that unpickles the searcher's storage sees every trial."""
    import pickle

    import optuna

    from mmcl.tune import optuna_storage

    study_dir = Storage.open(s3_server(f"b-{uuid.uuid4().hex[:12]}")) / "study"
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "driver-a"))
    (tmp_path / "driver-a").mkdir()
    storage = optuna_storage(study_dir.uri, "search")
    study = optuna.create_study(study_name="x.search", storage=storage, direction="maximize")
    for v in (1.0, 3.0):
        t = study.ask({"lr": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(t, v)
    assert study_dir.is_file("optuna/search.journal")
    # Another machine: nothing on its disk but what it unpickles (as Tune restores it).
    blob = pickle.dumps(storage)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "driver-b"))
    (tmp_path / "driver-b").mkdir()
    restored = pickle.loads(blob)
    again = optuna.load_study(study_name="x.search", storage=restored)
    assert [t.value for t in again.trials] == [1.0, 3.0] and again.best_value == 3.0
    assert list((tmp_path / "driver-b").rglob("search.journal"))
    # It keeps writing to the same stored journal.
    again.tell(again.ask({"lr": optuna.distributions.FloatDistribution(0, 1)}), 5.0)
    third = optuna.load_study(study_name="x.search", storage=optuna_storage(study_dir.uri, "search"))
    assert [t.value for t in third.trials] == [1.0, 3.0, 5.0]


def test_stale_local_mirror_is_replaced_by_the_stored_journal(s3_server, tmp_path, monkeypatch):
    import optuna

    from mmcl.tune import optuna_storage

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    study_dir = Storage.open(s3_server(f"b-{uuid.uuid4().hex[:12]}")) / "study"
    mirror = tmp_path / "mmcl-optuna" / study_dir.cache_key() / "search.journal"
    mirror.parent.mkdir(parents=True)
    mirror.write_text("left over by another study\n")
    study = optuna.create_study(study_name="x.search", storage=optuna_storage(study_dir.uri, "search"))
    assert study.trials == []


def test_a_trial_that_cannot_see_the_drivers_token_refuses_to_train(ray_cluster, tmp_path):
    """The check each trial makes before training (a node that joined after the driver's
    check, e.g. autoscaled): run in a Ray task, against a token it sees, a missing one and
    another run's."""
    import ray

    from mmcl.spec import load_study
    from mmcl.study import plan_stage
    from mmcl.tune import STORAGE_TOKEN_KEY, StorageNotShared, _check_trial_storage, ensure_ray

    from .helpers import tiny_study

    study = load_study(tiny_study(tmp_path / "s.yaml", [{"name": "o", "kind": "orders", "seeds": [0]}]))
    out = Storage.open(tmp_path / "out")
    plan = plan_stage(study, 0, out.uri, {})
    plan.storage_token = "abc"
    ensure_ray()

    @ray.remote(num_cpus=0, max_retries=0)
    def check(plan_json):
        from mmcl.study import StagePlan

        try:
            _check_trial_storage(StagePlan.model_validate_json(plan_json))
            return "ok"
        except StorageNotShared as e:
            return str(e)

    assert "sees no such file" in ray.get(check.remote(plan.model_dump_json()), timeout=120)
    out.write_text(STORAGE_TOKEN_KEY, "abc")
    assert ray.get(check.remote(plan.model_dump_json()), timeout=120) == "ok"
    out.write_text(STORAGE_TOKEN_KEY, "another run")
    msg = ray.get(check.remote(plan.model_dump_json()), timeout=120)
    assert f"storage: {out.where()} is a local path" in msg and "another run's token" in msg and "fix:" in msg
