"""Studies on a real 2-node Ray cluster on loopback: a head that offers no CPU (so no
trial runs where the driver is) and a worker node. Where the test is about a cluster
without a shared disk, the worker node runs in its own mount namespace with a tmpfs over
the driver's results directory: it sees its own empty disk there, as a node of a real
cluster without NFS does. Every process the tests start is stopped by its process group.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from mmcl.storage import Storage

from .conftest import mmcl_cmd, wait_for
from .helpers import tiny_study
from .loopback import LoopbackCluster

pytestmark = pytest.mark.slow

def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def cluster(tmp_path):
    c = LoopbackCluster(tmp_path)
    try:
        c.start_head()
        yield c
    finally:
        c.stop()


def _driver_env(cluster: LoopbackCluster, **extra: str) -> dict[str, str]:
    return {**cluster.env, "RAY_ADDRESS": cluster.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def _orders_study(path: Path, steps: int) -> Path:
    # Two fixed trials (default and reversed order), 3 tasks, random-init tiny CLIP.
    return tiny_study(path, [{"name": "orders", "kind": "orders", "seeds": [0]}], num_tasks=3, steps=steps)


def _free_cpus(address: str) -> float:
    """The cluster's available CPUs, asked from a short-lived driver of its own."""
    import sys

    code = f"import ray; ray.init(address={address!r}, log_to_driver=False); print(ray.available_resources().get('CPU', 0))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_ADDRESS": address})  # fmt: skip
    return float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else -1.0


def _assert_complete_rows(res, n_tasks: int = 3) -> None:
    acc, trials = res.accuracy, res.trials
    assert (trials.status == "completed").all(), trials[["trial_id", "status", "error"]]
    assert not acc.duplicated(["stage", "trial_id", "step", "eval_task"]).any()
    assert set(acc.trial_id) == set(trials.trial_id)
    for tid in trials.trial_id:
        rows = acc[acc.trial_id == tid]
        assert sorted(rows.step.unique()) == list(range(n_tasks + 1)) and len(rows) == (n_tasks + 1) * n_tasks


@pytest.mark.skipif(not _can_unshare(), reason="needs mount namespaces (unshare -m) to give a node its own disk")
def test_worker_with_its_own_disk_local_storage_refused_bucket_brings_every_row(cluster, tmp_path, s3_server):
    """One cluster, two studies: a local --output the worker cannot see is refused before
    any trial; the same study on a bucket (named by the study's `storage:`) brings every
    row to the driver's tables and leaves nothing on the driver's disk."""
    import yaml

    disk = tmp_path / "driver-disk"
    cluster.add_worker("worker", private_dir=disk)
    study = _orders_study(tmp_path / "s.yaml", steps=2)

    out = disk / "results" / "tiny"
    t0 = time.monotonic()
    r = subprocess.run(mmcl_cmd("run", str(study), "--output", str(out)), env=_driver_env(cluster),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"storage: {out} is a local path" in r.stderr and "does not see the driver's files" in r.stderr
    assert "fix: set `storage:`" in r.stderr and "s3://" in r.stderr
    assert "Traceback" not in r.stderr
    # Refused before any trial: no part, no Tune experiment.
    assert not (out / "parts").exists() and not (out / "ray").exists()
    assert time.monotonic() - t0 < 120

    bucket = s3_server(f"b-{uuid.uuid4().hex[:12]}")
    out = Storage.open(bucket) / "studies" / "tiny"
    spec = yaml.safe_load(study.read_text())
    spec["storage"] = (Storage.open(bucket) / "studies").uri
    study.write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run(mmcl_cmd("run", str(study)), env=_driver_env(cluster), cwd=disk,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import analysis

    res = analysis.load(out.uri)
    assert len(res.trials) == 2
    _assert_complete_rows(res)
    # Every trial ran on the worker node (the head offers no CPU), none on the driver's.
    assert res.trials["env/node_id"].nunique() == 1
    assert out.is_file("report.md") and out.list_files("ray/orders")  # Tune's checkpoints too
    assert not list(disk.rglob("*.parquet"))
    rep = subprocess.run(mmcl_cmd("report", out.uri), capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and "Study report: tiny" in rep.stdout, rep.stderr[-2000:]


def test_worker_node_lost_mid_stage_resumes_on_a_replacement(cluster, tmp_path):
    """Shared storage (one disk here, as with NFS); the worker node (raylet and trial
    processes) is SIGKILLed after a trial finished a task; a replacement node joins; the
    retried trials resume from their checkpoints."""
    first = cluster.add_worker("worker-a")
    study = _orders_study(tmp_path / "s.yaml", steps=50)
    out = tmp_path / "results" / "tiny"
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(mmcl_cmd("run", str(study), "--output", str(out)), env=_driver_env(cluster),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        # Kill once the driver has taken a task-1 result (its checkpoint comes with it): a
        # trial's part file for task 1 is written before it reports, so waiting for the
        # file alone let the kill land before that checkpoint existed (a CI rehearsal
        # resumed both trials from task 0).
        assert wait_for(lambda: re.search(r"  task [1-9]\d*/3  avg", (tmp_path / "driver.log").read_text()) is not None,
                        timeout=400, interval=0.2), (tmp_path / "driver.log").read_text()[-3000:]  # fmt: skip
        cluster.kill_node(first)
        cluster.add_worker("worker-b")
        rc = driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    assert rc == 0, (tmp_path / "driver.log").read_text()[-4000:]
    import analysis

    res = analysis.load(out)
    _assert_complete_rows(res)
    # The lost trials went on from their checkpoints (a finished task), not from scratch.
    assert (res.trials["resumed_from_task"] >= 1).any(), res.trials[["trial_id", "resumed_from_task"]]


def test_driver_killed_then_resumed_from_another_machine_keeps_the_search(ray_cluster, tmp_path, s3_server):
    """Bucket storage; the driver is SIGKILLed mid-search; `mmcl resume s3://...` from
    another working directory with another temp dir (another machine's empty disk)
    finishes the study with every Optuna trial of the first driver still in the journal."""
    import optuna

    from mmcl.tune import optuna_storage

    bucket = s3_server(f"b-{uuid.uuid4().hex[:12]}")
    out = Storage.open(bucket) / "tiny"
    study = tiny_study(
        tmp_path / "s.yaml",
        [{"name": "search", "kind": "search", "search_space": "finetune", "num_samples": 3,
          "scheduler": {"kind": "fifo"}, "sampler_seed": 1}],
        num_tasks=3, steps=12, max_concurrent=1,
    )  # fmt: skip
    first_disk, second_disk = tmp_path / "machine-a", tmp_path / "machine-b"
    for d in (first_disk, second_disk):
        (d / "tmp").mkdir(parents=True)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(mmcl_cmd("run", str(study), "--output", out.uri), cwd=first_disk,
                              env={**env, "TMPDIR": str(first_disk / "tmp")}, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip

    def told() -> list:
        if not out.is_file("optuna/search.journal"):
            return []
        s = optuna.load_study(study_name="tiny.search", storage=optuna_storage(out.uri, "search"))
        return [t for t in s.trials if t.state.is_finished()]

    try:
        # A finished trial in the stored journal and Tune's experiment state in the bucket.
        assert wait_for(lambda: told() and out.list_files("ray/search", suffix=".json"), timeout=400, interval=2), (
            (tmp_path / "driver.log").read_text()[-3000:]
        )
        before = {t.number: t.value for t in told()}
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    # Ray ends a dead driver's trial actors; until it has, their CPUs are not free.
    assert wait_for(lambda: _free_cpus(ray_cluster["address"]) == 2, timeout=180, interval=3), (
        f"180 s after the driver was killed its trials still hold CPUs: {_free_cpus(ray_cluster['address'])} of 2 free"
    )
    r = subprocess.run(mmcl_cmd("resume", out.uri), cwd=second_disk, env={**env, "TMPDIR": str(second_disk / "tmp")},
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"restoring stage search from {out.where('ray/search')}" in r.stdout  # Tune's state, from the bucket
    import analysis

    res = analysis.load(out.uri)
    assert len(res.trials) == 3
    _assert_complete_rows(res)
    after = {t.number: t for t in optuna.load_study(study_name="tiny.search", storage=optuna_storage(out.uri, "search")).trials}
    for number, value in before.items():
        assert after[number].value == value  # the first driver's history is kept
    done = [t for t in after.values() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 3 and {t.user_attrs["ray_trial_id"] for t in done} >= set(res.trials.trial_id)
    # A trial the first driver started after Tune's last save (if the kill fell there) is
    # failed in the journal, not left running; its rows are out of the tables.
    assert not [t for t in after.values() if t.state == optuna.trial.TrialState.RUNNING]
    # (A kill between Optuna's ask and the searcher's note of the Ray trial id leaves a
    # lost trial with no id: it never reached Ray, so it can have no rows.)
    lost = {t.user_attrs.get("ray_trial_id") for t in after.values() if t.user_attrs.get("lost_with_driver")} - {None}
    assert not lost & set(res.trials.trial_id)
    # Nothing of this study is on either machine's disk but the journal mirrors.
    assert not list(first_disk.rglob("*.parquet")) and not list(second_disk.rglob("*.parquet"))
