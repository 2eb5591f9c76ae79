"""The CLI tells the truth: one message and exit 2 for what a user can fix, exit 1 when
trials errored, exit 3 when stopped by a signal, and no wait without a bound.

Every case runs `mmcl` as its own process, as a user (or `ray job submit`) does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .conftest import REPO, mmcl_cmd, wait_for
from .helpers import tiny_study

# `mmcl` with a package made unimportable, as in an environment that lacks it.
_WITHOUT = (
    "import sys, importlib.abc\n"
    "class Hide(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == sys.argv[1]:\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Hide())\n"
    "from mmcl.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def _env(**kv: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for k, v in kv.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _missing_data_study(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "studies" / "mtil_dgg.yaml").read_text())
    data["run"]["benchmark"]["root"] = str(tmp_path / "no-such-mtil")
    p = tmp_path / "missing_data.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """name -> (mmcl arguments, environment, a phrase the message must hold)."""
    tiny = tiny_study(tmp_path / "tiny.yaml", [{"name": "abl", "kind": "ablation", "seeds": [0]}])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    empty_ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # no cluster recorded there
    return {
        "bad study file": (["run", str(REPO / "tests" / "malformed" / "unknown_top_key.yaml")], _env(), "unknown_top_key"),
        "missing data": (["run", str(_missing_data_study(tmp_path))], _env(), "run.benchmark.root"),
        "unreachable cluster": (["run", str(tiny)], _env(RAY_ADDRESS=f"127.0.0.1:{_dead_port()}"), "RAY_ADDRESS="),
        "no cluster for auto": (["run", str(tiny)], _env(RAY_ADDRESS="auto", RAY_TMPDIR=empty_ray_tmp), "RAY_ADDRESS=auto"),
        "unwritable storage": (["run", str(tiny), "--output", str(blocker / "out")], _env(), "storage: cannot write"),
        "not a results directory": (["resume", str(tmp_path)], _env(), "not a study output directory"),
        "missing package": (["validate", str(REPO / "studies" / "quickstart.yaml")], _env(), "'optuna' is not installed"),
    }


@pytest.mark.parametrize(
    "case",
    ["bad study file", "missing data", "unreachable cluster", "no cluster for auto", "unwritable storage",
     "not a results directory", "missing package"],
)  # fmt: skip
def test_a_fixable_problem_is_one_message_and_exit_2(tmp_path, case):
    args, env, phrase = _cases(tmp_path)[case]
    cmd = [sys.executable, "-c", _WITHOUT, "optuna", *args] if case == "missing package" else mmcl_cmd(*args)
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    # One message, at the end (it may span lines: a study file with two problems).
    lines = r.stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, r.stderr[-2000:]
    message = "\n".join(lines[starts[0]:])
    assert phrase in message, r.stderr[-2000:]
    assert not (tmp_path / "results").exists(), "an output directory was made for a study that cannot run"
    assert took < 90, f"{case}: {took:.0f} s"


def test_unreachable_cluster_message_names_the_address_and_the_fix(tmp_path):
    port = _dead_port()
    tiny = tiny_study(tmp_path / "tiny.yaml", [{"name": "abl", "kind": "ablation", "seeds": [0]}])
    r = subprocess.run(mmcl_cmd("run", str(tiny)), cwd=tmp_path, env=_env(RAY_ADDRESS=f"127.0.0.1:{port}"),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    msg = r.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}" in msg and "ray start --head" in msg and "unset it" in msg, msg


@pytest.mark.slow
def test_a_dead_recorded_head_is_not_attached_to(tmp_path):
    """A crashed `ray start --head` leaves its address in <ray tmp>/ray_current_cluster;
    without RAY_ADDRESS, `mmcl` starts its own local Ray instead of retrying that head."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # short: Ray's socket paths
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_dead_port()}")
        tiny = tiny_study(tmp_path / "tiny.yaml", [{"name": "abl", "kind": "ablation", "seeds": [0]}], num_tasks=2)
        r = subprocess.run(mmcl_cmd("run", str(tiny), "--output", str(tmp_path / "out")), cwd=tmp_path,
                           env=_env(RAY_TMPDIR=str(ray_tmp)), capture_output=True, text=True, timeout=400)  # fmt: skip
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert (pd.read_parquet(tmp_path / "out" / "trials.parquet").status == "completed").all()
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"],
                       env=_env(RAY_TMPDIR=str(ray_tmp)), capture_output=True, timeout=120)  # fmt: skip
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_errored_trials_give_exit_1_and_are_named_unless_the_study_allows_them(ray_cluster, tmp_path):
    variants = {"ok": {}, "diverge": {"training.lr": float("inf"), "training.grad_clip": None, "training.optimizer": "sgd"}}
    stages = [{"name": "abl", "kind": "ablation", "variants": variants, "seeds": [0]}]
    strict = tiny_study(tmp_path / "strict.yaml", stages, num_tasks=2)
    r = subprocess.run(mmcl_cmd("run", str(strict), "--output", str(tmp_path / "a")), capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "a" / "trials.parquet")
    bad = trials[trials.variant == "diverge"].iloc[0]
    assert f"abl/{bad.trial_id} (diverge, seed 0): loss became" in r.stderr, r.stderr[-2000:]
    assert "1 of 2 trial(s) errored" in r.stderr and "above failure.max_errored_fraction (0)" in r.stderr
    assert (tmp_path / "a" / "report.md").exists()  # the study ran to its end and wrote its results

    # Half the trials may error: the same study exits 0, still naming the trial.
    data = yaml.safe_load(strict.read_text())
    data["failure"]["max_errored_fraction"] = 0.5
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(yaml.safe_dump(data))
    r = subprocess.run(mmcl_cmd("run", str(lenient), "--output", str(tmp_path / "b")), capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(diverge, seed 0): loss became" in r.stderr and "within failure.max_errored_fraction" in r.stderr


def test_a_stage_whose_every_trial_errored_fails_whatever_the_threshold():
    from mmcl.cli import errored_verdict

    trials = pd.DataFrame(
        {"stage": ["a", "a", "b"], "trial_id": ["1", "2", "3"], "variant": ["full"] * 3, "seed": [0, 1, 0],
         "status": ["completed", "completed", "error"], "error": [None, None, "boom\ndetail"]}
    )  # fmt: skip
    code, lines = errored_verdict(trials, max_fraction=1.0)
    assert code == 1 and "every trial of stage(s) b errored" in lines[-1]
    assert lines[1] == "  b/3 (full, seed 0): boom"
    assert errored_verdict(trials[trials.stage == "a"], 0.0) == (0, [])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_mmcl_with_exit_3_and_resume_finishes(ray_cluster, tmp_path, sig):
    study = tiny_study(tmp_path / "s.yaml", [{"name": "abl", "kind": "ablation", "variants": ["full"], "seeds": [0, 1]}],
                       steps=12)  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.Popen(mmcl_cmd("run", str(study), "--output", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert wait_for(lambda: any((out / "parts" / "accuracy" / "abl").glob("*/step_001.parquet")), timeout=400)
        proc.send_signal(sig)
        t0 = time.monotonic()
        log, _ = proc.communicate(timeout=120)
        assert time.monotonic() - t0 < 90
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, log[-3000:]
    assert "mmcl resume" in log
    r = subprocess.run(mmcl_cmd("resume", str(out)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 2 and (trials.status == "completed").all()


@pytest.mark.slow
def test_a_second_signal_ends_mmcl_at_once(ray_cluster, tmp_path):
    # The trial hangs after its first report, so the graceful stop has to wait for Tune
    # to tear that trial down (about 10 s): the second signal must not wait for it.
    study = tiny_study(tmp_path / "s.yaml", [{"name": "abl", "kind": "ablation", "variants": ["full"], "seeds": [0]}])
    out, markers = tmp_path / "out", tmp_path / "markers"
    env = {**os.environ, "MMCL_FAULT_INJECT": f"hang:abl:0:{markers}"}
    proc = subprocess.Popen(mmcl_cmd("run", str(study), "--output", str(out)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert wait_for(lambda: markers.is_dir() and any(markers.iterdir()), timeout=400), "the trial never hung"
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # two pending SIGTERMs would be delivered as one
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, log[-3000:]
    assert "SIGTERM: stopping the stage" in log and "SIGTERM again: stopping now" in log, log[-3000:]
    assert took < 5, took
