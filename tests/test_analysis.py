"""analysis.load / tables / report on a hand-built results directory of real Parquet files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis.metrics import cl_metrics, matrix_metrics
from analysis.report import build_report, markdown_table, write_report
from analysis.tables import (
    ablation_table,
    order_breakdown,
    order_robustness,
    search_leaderboard,
    summary_table,
)

TASKS = ["A", "B", "C"]
ORDERS = {"o1": ["A", "B", "C"], "o2": ["B", "C", "A"], "o3": ["C", "A", "B"]}


def matrix(v: float, trained: int = 3) -> np.ndarray:
    """Rows = steps 0..trained, columns in training order; v sets the level."""
    full = np.array([
        [10.0, 10.0, 10.0],
        [v, 20.0, 20.0],
        [v - 10, v, 30.0],
        [v - 20, v - 10, v],
    ])  # fmt: skip
    return full[: trained + 1]


def avg_of(v: float) -> float:
    """avg of matrix(v): the 9 cells of rows 1..3 sum to 6v + 30."""
    return (6 * v + 30) / 9


def last_of(v: float) -> float:
    return v - 10


class Builder:
    def __init__(self) -> None:
        self.acc: list[dict] = []
        self.trials: list[dict] = []
        self.curves: list[dict] = []

    def add(self, stage: str, trial_id: str, *, v: float | None, status: str = "completed", variant: str = "full",
            order_id: str = "o1", seed: int = 0, trained: int = 3, config: dict | None = None) -> None:  # fmt: skip
        order = ORDERS[order_id]
        mat = matrix(v if v is not None else 0.0, trained)
        if v is None:  # an error before any evaluation
            mat = mat[:0]
        for step, values in enumerate(mat):
            for pos, (task, value) in enumerate(zip(order, values)):
                self.acc.append({
                    "study": "demo", "stage": stage, "trial_id": trial_id, "variant": variant,
                    "order_id": order_id, "seed": seed, "step": step,
                    "trained_task": order[step - 1] if step else "", "eval_task": task,
                    "eval_position": pos, "metric_name": "top1", "value": float(value), "n_samples": 50 + 10 * pos,
                })  # fmt: skip
            if step:
                self.curves.append({
                    "study": "demo", "stage": stage, "trial_id": trial_id, "task": step - 1,
                    "task_name": order[step - 1], "step": 10 * step, "loss": 1.0 / step, "lr": 1e-5,
                    "samples_per_s": 100.0, "loss/ce": 1.0 / step,
                })  # fmt: skip
        metrics = matrix_metrics(mat, zero_shot=True, n_samples=np.array([50, 60, 70]))
        row = {
            "study": "demo", "stage": stage, "trial_id": trial_id, "method": "lwf", "variant": variant,
            "order_id": order_id, "order": ",".join(order), "seed": seed, "status": status,
            "error": "RuntimeError: boom" if status == "error" else None,
            "config_json": json.dumps(config or {}), **metrics, "n_tasks": 3,
            "trainable_params": 1000, "peak_memory_mb": 10.0, "wall_time_s": 1.0, "git_sha": "abc",
        }  # fmt: skip
        row.update({f"config/{k}": val for k, val in (config or {}).items()})
        self.trials.append(row)

    def write(self, out: Path, tables: tuple[str, ...] = ("accuracy", "trials", "curves")) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        frames = {"accuracy": self.acc, "trials": self.trials, "curves": self.curves}
        for name in tables:
            pd.DataFrame(frames[name]).to_parquet(out / f"{name}.parquet", index=False)
        return out


SEARCH = [  # trial_id, v, status, trained, config
    ("s0", 70.0, "completed", 3, {"optimizer.lr": 1e-5, "method.distill_weight": 0.5}),
    ("s1", 90.0, "stopped", 2, {"optimizer.lr": 3e-5, "method.distill_weight": 1.0}),
    ("s2", None, "error", 0, {"optimizer.lr": 1e-3, "method.distill_weight": 2.0}),
]
ABLATION = {("full", 0): 60.0, ("full", 1): 64.0, ("no_distill", 0): 50.0, ("no_distill", 1): 51.0}
ORDER_V = {("o1", 0): 60.0, ("o1", 1): 62.0, ("o2", 0): 70.0, ("o2", 1): 72.0, ("o3", 0): 80.0, ("o3", 1): 82.0}


def build(stages: tuple[str, ...] = ("search", "ablation", "orders")) -> Builder:
    b = Builder()
    if "search" in stages:
        for tid, v, status, trained, cfg in SEARCH:
            b.add("search", tid, v=v, status=status, variant="search", trained=trained, config=cfg)
    if "ablation" in stages:
        for (variant, seed), v in ABLATION.items():
            b.add("ablation", f"ab_{variant}_{seed}", v=v, variant=variant, seed=seed)
    if "orders" in stages:
        for (oid, seed), v in ORDER_V.items():
            b.add("orders", f"or_{oid}_{seed}", v=v, order_id=oid, seed=seed)
    return b


@pytest.fixture()
def results_dir(tmp_path: Path) -> Path:
    return build().write(tmp_path / "demo")


def pm(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def test_load_shapes(results_dir: Path) -> None:
    res = analysis.load(results_dir)
    # search: 3 + 2 steps + 0 rows; ablation 4 and orders 6 trials of 4 steps; 3 tasks each
    assert len(res.accuracy) == 3 * (4 + 3 + 0) + 3 * 4 * (4 + 6)
    assert len(res.trials) == 13
    assert len(res.curves) == 3 + 2 + 3 * 10
    assert res.path == results_dir and res.study == "demo"
    m = res.metrics()
    assert len(m) == 13 and m["trial_id"].is_unique
    assert list(pd.unique(m["stage"])) == ["search", "ablation", "orders"]
    s = m.set_index("trial_id")
    assert s.loc["s0", "avg"] == pytest.approx(avg_of(70))
    assert s.loc["s1", "n_tasks_trained"] == 2
    assert np.isnan(s.loc["s2", "avg"]) and s.loc["s2", "status"] == "error"
    assert s.loc["or_o2_1", "last"] == pytest.approx(last_of(72))
    assert "config/optimizer.lr" in m.columns


def test_metrics_prefer_recomputed_values(tmp_path: Path) -> None:
    b = build(("ablation",))
    for row in b.trials:
        row["avg"] = -1.0  # a stale stored value must not win over the accuracy rows
    res = analysis.load(b.write(tmp_path / "r"))
    assert (res.metrics()["avg"] > 0).all()


def test_load_errors_and_missing_tables(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a results directory"):
        analysis.load(tmp_path / "nope")
    only_trials = build(("search",)).write(tmp_path / "t", tables=("trials",))
    res = analysis.load(only_trials)
    assert res.accuracy.empty and "eval_task" in res.accuracy.columns
    assert res.curves.empty and "loss" in res.curves.columns
    # metrics fall back to the values stored in trials.parquet
    assert res.metrics().set_index("trial_id").loc["s0", "avg"] == pytest.approx(avg_of(70))
    assert analysis.cl_metrics is cl_metrics


def test_search_leaderboard(results_dir: Path) -> None:
    res = analysis.load(results_dir)
    lb = search_leaderboard(res, stage="search")
    # stopped s1 (2 rows of 3 columns) has avg (3*90 + 60) / 6 = 55 > s0's 50, but a
    # partial run's score is inflated: the completed s0 ranks first; error last
    assert list(lb["trial_id"]) == ["s0", "s1", "s2"]
    assert list(lb.columns[:8]) == ["trial_id", "status", "n_tasks_trained", "avg", "last", "transfer", "bwt",
                                    "optimizer.lr"]  # fmt: skip
    assert "method.distill_weight" in lb.columns and not any(c.startswith("config/") for c in lb.columns)
    assert lb.loc[1, "avg"] == 55.0 and lb.loc[0, "avg"] == round(avg_of(70), 1)
    assert lb.loc[0, "optimizer.lr"] == pytest.approx(1e-5)
    assert list(search_leaderboard(res, metric="last", top=1)["trial_id"]) == ["s0"]
    assert "stage" in search_leaderboard(res).columns


def test_ablation_table_mean_std(results_dir: Path) -> None:
    res = analysis.load(results_dir)
    tab = ablation_table(res, stage="ablation")
    assert list(tab.index) == ["full", "no_distill"]
    assert list(tab.columns) == ["avg", "last", "transfer", "bwt", "forgetting", "n"]
    assert tab.loc["full", "avg"] == pm([avg_of(60), avg_of(64)]) == "44.7 ± 1.9"
    assert tab.loc["no_distill", "last"] == pm([last_of(50), last_of(51)]) == "40.5 ± 0.7"
    # bwt = ((v-20 - v) + (v-10 - v)) / 2 and forgetting = (20 + 10) / 2 for every v
    assert tab.loc["full", "bwt"] == "-15.0 ± 0.0"
    assert tab.loc["full", "forgetting"] == "15.0 ± 0.0"
    assert tab.loc["full", "n"] == 2
    num = ablation_table(res, stage="ablation", formatted=False)
    assert num.loc["full", ("avg", "mean")] == pytest.approx(statistics.mean([avg_of(60), avg_of(64)]))
    assert num.loc["full", ("avg", "std")] == pytest.approx(statistics.stdev([avg_of(60), avg_of(64)]))
    assert num.loc["no_distill", ("n", "count")] == 2
    # stage=None picks the single-order non-search stages only
    assert list(ablation_table(res).index) == ["full", "no_distill"]


def test_order_robustness(results_dir: Path) -> None:
    res = analysis.load(results_dir)
    tab = order_robustness(res)
    assert list(tab.index) == ["orders"]
    avgs = [avg_of(v) for v in ORDER_V.values()]
    assert tab.loc["orders", "avg"] == pm(avgs)
    assert tab.loc["orders", "n"] == 6 and tab.loc["orders", "n_orders"] == 3
    num = order_robustness(res, formatted=False)
    assert num.loc["orders", ("avg", "std")] == pytest.approx(statistics.stdev(avgs))
    assert num.loc["orders", ("last", "std")] == pytest.approx(statistics.stdev([last_of(v) for v in ORDER_V.values()]))
    per = order_breakdown(res, "orders")
    assert len(per) == 3
    assert per.loc[("o2", "B,C,A"), "last"] == pm([last_of(70), last_of(72)])


def test_summary_table(results_dir: Path) -> None:
    tab = summary_table(analysis.load(results_dir)).set_index("stage")
    assert list(tab.index) == ["search", "ablation", "orders"]
    assert tab["kind"].tolist() == ["search", "ablation", "orders"]
    assert tab.loc["search", ["n_trials", "n_completed", "n_stopped", "n_error"]].tolist() == [3, 1, 1, 1]
    assert tab.loc["ablation", ["n_trials", "n_completed", "n_stopped", "n_error"]].tolist() == [4, 4, 0, 0]
    # best/mean over completed trials only: the stopped s1 (avg 55) is not counted
    assert tab.loc["search", "best_avg"] == round(avg_of(70), 1)
    assert tab.loc["ablation", "best_avg"] == round(avg_of(64), 1)
    assert tab.loc["orders", "mean_last"] == round(statistics.mean(last_of(v) for v in ORDER_V.values()), 1)
    assert tab.loc["orders", "best_bwt"] == -15.0


def test_report(results_dir: Path) -> None:
    path = write_report(results_dir)
    assert path == results_dir / "report.md"
    text = path.read_text()
    assert text.startswith("# Study report: demo")
    for needle in ("## Summary", "## Search leaderboard: search", "## Ablations", "## Task-order robustness",
                   "### search: s0", "### ablation: ab_full_1", "### orders: or_o3_1", "(zero-shot)",
                   "44.7 ± 1.9", "| no_distill |"):  # fmt: skip
        assert needle in text, needle
    # the best orders trial trained C, A, B: its matrix columns follow that order
    block = text.split("### orders: or_o3_1")[1]
    header = next(line for line in block.splitlines() if line.startswith("| step"))
    assert header == "| step | trained | C | A | B |"
    assert "| 3 | B | 62.0 | 72.0 | 82.0 |" in block


def test_report_partial_and_empty(tmp_path: Path) -> None:
    text = build_report(build(("search",)).write(tmp_path / "s"))
    assert "Search leaderboard" in text and "Ablations" not in text and "robustness" not in text
    errors_only = Builder()
    errors_only.add("search", "x", v=None, status="error", variant="search")
    assert "_No completed trial._" in build_report(errors_only.write(tmp_path / "e"))
    empty = tmp_path / "empty"
    empty.mkdir()
    res = analysis.load(empty)
    assert res.accuracy.empty and res.trials.empty and res.curves.empty and res.metrics().empty
    assert summary_table(res).empty and search_leaderboard(res).empty
    assert ablation_table(res).empty and order_robustness(res).empty
    assert "No trials recorded" in write_report(empty).read_text()


def test_cl_metrics_shuffle_invariance(results_dir: Path) -> None:
    acc = analysis.load(results_dir).accuracy
    ref = cl_metrics(acc).set_index(["stage", "trial_id"]).sort_index()
    for seed in range(3):
        shuffled = acc.sample(frac=1.0, random_state=seed)
        got = cl_metrics(shuffled).set_index(["stage", "trial_id"]).sort_index()
        pd.testing.assert_frame_equal(got, ref)
    no_pos = cl_metrics(acc.drop(columns=["eval_position"]).sample(frac=1.0, random_state=9))
    pd.testing.assert_frame_equal(no_pos.set_index(["stage", "trial_id"]).sort_index(), ref)


def test_markdown_table_escapes_and_formats() -> None:
    df = pd.DataFrame({"name": ["a|b", None], "x": [1e-5, float("nan")]})
    assert markdown_table(df).splitlines() == ["| name | x |", "| --- | ---: |", "| a\\|b | 1e-05 |", "| – | – |"]


def test_running_study_without_trials_table(tmp_path: Path) -> None:
    # Only accuracy.parquet so far: trials are listed as running, with their metadata and metrics.
    res = analysis.load(build(("ablation", "orders")).write(tmp_path / "run", tables=("accuracy",)))
    m = res.metrics().set_index("trial_id")
    assert len(m) == 10 and (m["status"] == "running").all()
    assert m["seed"].dtype == "Int64" and m.loc["or_o2_1", "seed"] == 1
    assert m.loc["or_o2_1", "order_id"] == "o2" and m.loc["or_o2_1", "last"] == pytest.approx(last_of(72))
    tab = summary_table(res).set_index("stage")
    assert tab.loc["orders", "kind"] == "orders" and tab.loc["orders", "n_completed"] == 0
    assert "### orders" in build_report(res.path)
