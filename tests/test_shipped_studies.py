"""Every shipped study, through the CLI as a user runs it (found by globbing `studies/`).

Offline studies (no GPU asked for) run `mmcl run --smoke` to the end with no errored
trial; GPU / data studies validate and plan here, and `mmcl validate --check-data` answers
their missing data with one clear message and exit status 2, never a traceback.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from mmcl.spec import load_study
from mmcl.study import plan_stage, smoke

from .conftest import REPO, mmcl_cmd

STUDIES = sorted((REPO / "studies").glob("*.yaml"))
OFFLINE = [p for p in STUDIES if load_study(p).resources.gpu == 0]
CLUSTER = [p for p in STUDIES if p not in OFFLINE]
# The quickstart's smoke run goes through `ray job submit` in test_cluster.py, with the
# same checks (check_smoke_run): not run a second time here.
SMOKED_HERE = [p for p in OFFLINE if p.stem != "quickstart"]


def test_the_glob_finds_both_kinds():
    assert len(OFFLINE) >= 6 and len(CLUSTER) >= 5, (OFFLINE, CLUSTER)
    # An offline study reads no data from disk: it runs on any laptop and in CI.
    for p in OFFLINE:
        assert load_study(p).run.benchmark.root is None, p


def check_smoke_run(study: Path, out: Path) -> None:
    """Every trial of the shrunk study has a row, none errored, every stage ran."""
    trials = pd.read_parquet(out / "trials.parquet")
    small = smoke(load_study(study))
    expected = sum(plan_stage(small, i, out, {}).num_trials for i in range(len(small.stages)))
    assert len(trials) == expected, trials[["stage", "trial_id", "status"]]
    assert not (trials.status == "error").any(), trials[["stage", "trial_id", "status", "error"]]
    assert set(trials.stage) == {st.name for st in small.stages}


# Lines a smoke run may print, per trial (start, one per task, end, its line in the final
# block) and for the rest (stage headers and counts, the summary table, Ray's few lines).
CONSOLE_LINES_PER_TRIAL = 8
CONSOLE_LINES_FIXED = 60


def check_console(output: str, out: Path) -> None:
    """The run's console output is short and names every trial's final status (mmcl's
    stage view, not Tune's per-trial boxes), and ends with the path of report.html."""
    trials = pd.read_parquet(out / "trials.parquet")
    lines = output.splitlines()
    budget = CONSOLE_LINES_FIXED + CONSOLE_LINES_PER_TRIAL * len(trials)
    assert len(lines) <= budget, f"{len(lines)} lines > {budget}:\n" + "\n".join(lines[:200])
    assert "Trial status" not in output and "╭" not in output  # Tune's own tables and boxes
    assert "Experiment state snapshotting" not in output
    shown = {"completed": "completed", "stopped": "stopped", "error": "errored"}
    for _, t in trials.iterrows():
        final = f"  {t['trial_id']} {shown[t['status']]}"
        assert any(ln.startswith(final) for ln in lines), (final, output[-3000:])
    assert [ln for ln in lines if ln.strip()][-1].strip().endswith("report.html"), lines[-5:]


@pytest.mark.slow
@pytest.mark.parametrize("study", SMOKED_HERE, ids=[p.stem for p in SMOKED_HERE])
def test_offline_study_runs_in_smoke_mode_without_an_errored_trial(ray_cluster, tmp_path, study: Path):
    out = tmp_path / "out"
    r = subprocess.run(mmcl_cmd("run", str(study), "--smoke", "--output", str(out)), cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_smoke_run(study, out)
    check_console(r.stdout, out)


@pytest.mark.parametrize("study", CLUSTER, ids=[p.stem for p in CLUSTER])
def test_cluster_study_validates_plans_and_names_its_missing_data(tmp_path, study: Path):
    r = subprocess.run(mmcl_cmd("validate", str(study)), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and ": ok (" in r.stdout, r.stdout + r.stderr
    # The plan counts each method's trainable parameters on the paper's backbone (meta device).
    r = subprocess.run(mmcl_cmd("plan", str(study)), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "total" in r.stdout and "GPU" in r.stdout, r.stdout + r.stderr
    assert " a task" in r.stdout and "not counted" not in r.stdout, r.stdout + r.stderr
    r = subprocess.run(mmcl_cmd("validate", "--check-data", str(study)), cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    message = r.stderr.strip().splitlines()
    assert message[-1].startswith("error: run.benchmark.root: "), r.stderr
    assert load_study(study).run.benchmark.root in message[-1]
