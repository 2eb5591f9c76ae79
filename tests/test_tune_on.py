"""``tune_on`` of a search stage: tune on the first k tasks (Chaudhry et al. 2019) or on
another benchmark / order (Cha & Cho 2024), then run the best config on the study's own
tasks. Plans without Ray; one real study on Ray."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mmcl.cli import main
from mmcl.spec import SpecError, StudySpec, load_study
from mmcl.study import describe_plan, plan_stage, smoke, tuning_notes

from .conftest import REPO
from .helpers import tiny_study

TASKS = ["shapes", "colors", "patterns", "positions"]


def _study(tmp_path, tune_on, num_tasks: int = 4, later: bool = True) -> StudySpec:
    stages = [{"name": "search", "kind": "search", "search_space": "finetune", "num_samples": 2,
               "scheduler": {"kind": "fifo"}, "tune_on": tune_on}]  # fmt: skip
    if later:
        stages.append({"name": "final", "kind": "ablation", "base": "search", "variants": ["full"], "seeds": [0]})
        stages.append({"name": "orders", "kind": "orders", "base": "final", "reverse": True, "seeds": [0]})
    return load_study(tiny_study(tmp_path / "s.yaml", stages, num_tasks=num_tasks))


def test_first_k_searches_the_first_tasks_and_later_stages_run_them_all(tmp_path):
    study = _study(tmp_path, {"first_k": 2})
    search, final, orders = (plan_stage(study, i, tmp_path, {}) for i in range(3))
    assert search.n_tasks == 2 and search.base_run.benchmark.order == TASKS[:2]
    assert final.n_tasks == 4 and final.base_run.benchmark.order is None
    assert orders.n_tasks == 4
    # The restriction is not an override of the search: its best config carries none of it.
    assert search.base_overrides == {}
    best = {"search": {"training.lr": 0.003}}
    final = plan_stage(study, 1, tmp_path, best)
    assert final.n_tasks == 4 and final.base_run.training.lr == 0.003
    notes = tuning_notes(study)
    assert notes["search"].data == "the first 2 of the run's 4 tasks (shapes, colors)"
    assert notes["search"].from_stage is None
    # Through another stage (orders starts from final, which starts from search).
    assert notes["final"].from_stage == "search" and notes["orders"].from_stage == "search"
    text = describe_plan(study)
    assert "tuned on the first 2 of the run's 4 tasks (shapes, colors): its trials trained" in text


def test_shorthand_is_chaudhrys_k_and_smoke_keeps_a_task_out(tmp_path):
    study = _study(tmp_path, "first_k", num_tasks=5)
    assert study.stages[0].tune_on.first_k == 3
    assert plan_stage(study, 0, tmp_path, {}).n_tasks == 3
    # Smoke runs 3 tasks; it tunes on 2 of them so that the later stages still test on one more.
    small = smoke(study)
    assert plan_stage(small, 0, tmp_path, {}).n_tasks == 2 and plan_stage(small, 1, tmp_path, {}).n_tasks == 3


def test_another_order_or_benchmark(tmp_path):
    # Same benchmark, keys given replace the run's (here the order).
    study = _study(tmp_path, {"benchmark": {"order": ["sizes", "counts"]}})
    plan = plan_stage(study, 0, tmp_path, {})
    assert plan.n_tasks == 2 and plan.base_run.benchmark.order == ["sizes", "counts"]
    # The run's own options stay (tiny sizes per class).
    assert plan.base_run.benchmark.options == study.run.benchmark.options
    assert tuning_notes(study)["search"].data == "benchmark synthetic with tasks sizes, counts"
    assert plan_stage(study, 1, tmp_path, {}).base_run.benchmark.order is None
    # Another benchmark: a whole block, unset keys at their defaults (not the run's options).
    study = _study(tmp_path, {"benchmark": {"name": "mtil", "root": "/data/mtil", "num_tasks": 2}})
    plan = plan_stage(study, 0, tmp_path, {})
    assert plan.base_run.benchmark.name == "mtil" and plan.base_run.benchmark.options == {} and plan.n_tasks == 2
    assert tuning_notes(study)["final"].data == "benchmark mtil with tasks Aircraft, Caltech101"
    assert plan_stage(study, 1, tmp_path, {}).base_run.benchmark.name == "synthetic"
    # One the backbone cannot run fails at load time, naming the key.
    with pytest.raises(SpecError, match=r"stages\[0\] \(search\)\.tune_on\.benchmark\.name: 'paired_synthetic' needs"):
        _study(tmp_path, {"benchmark": {"name": "paired_synthetic"}})


def test_no_tune_on_changes_nothing(tmp_path):
    stages = [{"name": "search", "kind": "search", "search_space": "finetune", "num_samples": 2}]
    study = load_study(tiny_study(tmp_path / "s.yaml", stages, num_tasks=3))
    assert plan_stage(study, 0, tmp_path, {}).n_tasks == 3 and tuning_notes(study) == {}


def test_shipped_schema_knows_tune_on():
    schema = json.loads((REPO / "studies" / "study.schema.json").read_text())
    assert "TuneOnSpec" in schema["$defs"] and "tune_on" in schema["$defs"]["SearchStage"]["properties"]


@pytest.mark.slow
def test_search_trials_only_see_the_tuning_tasks_and_the_next_stage_sees_all(ray_cluster, tmp_path):
    path = tiny_study(tmp_path / "s.yaml", [
        {"name": "search", "kind": "search", "search_space": "finetune", "num_samples": 2,
         "scheduler": {"kind": "fifo"}, "tune_on": {"first_k": 2}},
        {"name": "final", "kind": "ablation", "base": "search", "variants": ["full"], "seeds": [0]},
    ], num_tasks=3, steps=2)  # fmt: skip
    out = tmp_path / "out"
    assert main(["run", str(path), "--output", str(out)]) == 0
    acc = pd.read_parquet(out / "accuracy.parquet")
    trials = pd.read_parquet(out / "trials.parquet")
    s, f = acc[acc.stage == "search"], acc[acc.stage == "final"]
    # Every search row trained and scored one of the first two tasks, and nothing else.
    assert set(s.eval_task) == {"shapes", "colors"} and set(s.trained_task) - {""} <= {"shapes", "colors"}  # "" = zero-shot row
    assert (trials.loc[trials.stage == "search", "n_tasks"] == 2).all()
    assert set(f.eval_task) == {"shapes", "colors", "patterns"} and sorted(f.step.unique()) == [0, 1, 2, 3]
    # The final stage started from the search's best learning rate (its base overrides).
    state = json.loads((out / "study_state.json").read_text())
    best_lr = state["stages"]["search"]["best_overrides"]["training.lr"]
    assert state["stages"]["final"]["best_overrides"]["training.lr"] == best_lr
    # The report marks which numbers were tuned on which data (Markdown and HTML).
    md = (out / "report.md").read_text()
    assert "## Tuning data" in md and "**search**: tuned on the first 2 of the run's 3 tasks (shapes, colors)" in md
    assert "**final**: config from stage search, tuned on the first 2" in md
    assert "Search leaderboard: search (tuned on the first 2 of the run's 3 tasks" in md
    assert "<h2>Tuning data</h2>" in (out / "report.html").read_text()
