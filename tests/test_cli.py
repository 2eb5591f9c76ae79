"""`mmcl plan / validate / report` and the --smoke shrink, without Ray."""

from __future__ import annotations

import subprocess
import sys

from mmcl.cli import main
from mmcl.spec import load_study
from mmcl.study import describe_plan, plan_stage, smoke

from .conftest import REPO, mmcl_cmd

QUICKSTART = REPO / "studies" / "quickstart.yaml"


def test_plan_lists_stages_trials_and_resources():
    text = describe_plan(load_study(QUICKSTART))
    assert "search (search): 8 trial(s)" in text
    assert "ablation (ablation): 4 trial(s)" in text and "full, no_distill" in text
    assert "orders (orders): 4 trial(s)" in text and "default, reverse, random-0, random-1" in text
    assert "total 16 trial(s); each asks for 1 CPU and 0 GPU" in text


def test_plan_and_validate_do_not_start_ray():
    code = (
        "import sys; from mmcl.cli import main; rc = main(['plan', sys.argv[1]]); "
        "assert 'ray' not in sys.modules, 'plan imported ray'; sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(QUICKSTART)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(mmcl_cmd("validate", str(QUICKSTART)), capture_output=True, text=True)
    assert r.returncode == 0 and "ok (quickstart: 3 stage(s), 16 trial(s))" in r.stdout


def test_smoke_shrinks_every_stage():
    study = load_study(QUICKSTART)
    small = smoke(study)
    assert small.run.benchmark.num_tasks == 3 and small.run.training.max_steps <= 4
    plans = [plan_stage(small, i, REPO, {}) for i in range(len(small.stages))]
    assert [p.num_trials for p in plans] == [3, 2, 3]
    assert all(p.n_tasks == 3 for p in plans)
    # The original is untouched.
    assert study.stages[0].num_samples == 8 and study.run.benchmark.num_tasks is None


def test_run_refuses_to_overwrite_and_resume_needs_a_study_dir(tmp_path, capsys):
    (tmp_path / "study_state.json").write_text("{}")
    assert main(["run", str(QUICKSTART), "--output", str(tmp_path)]) == 2
    assert "mmcl resume" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "nothing")]) == 2
    assert "not a study output directory" in capsys.readouterr().err
