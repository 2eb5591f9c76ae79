"""analysis/plots.py: each figure rendered to PNG from a results directory of real Parquet
files (the hand-built one of test_analysis, whose values are known), and its content checked."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

import analysis
from analysis import plots

from .test_analysis import ABLATION, ORDER_V, TASKS, build, matrix


@pytest.fixture()
def res(tmp_path: Path):
    return analysis.load(build().write(tmp_path / "demo"))


def _png(fig) -> np.ndarray:
    """Render as a user would save it, and read the pixels back."""
    from matplotlib.image import imread

    data = plots.png_bytes(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(io.BytesIO(data))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05  # not a blank canvas
    return img


def test_heatmap_has_a_cell_per_matrix_entry_and_marks_zero_shot(res):
    fig = plots.accuracy_heatmap(res, "ab_full_0")
    _png(fig)
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert shown.shape == (len(TASKS) + 1, len(TASKS))
    np.testing.assert_allclose(np.asarray(shown), matrix(ABLATION[("full", 0)]))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["zero-shot", "after 1", "after 2", "after 3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == TASKS
    assert ax.get_xlabel() == "evaluated task (training order)"
    assert len(ax.patches) == 1  # the frame around the zero-shot row
    assert sum(1 for t in ax.texts if t.get_text() == f"{ABLATION[('full', 0)]:.1f}") == 3  # the diagonal
    with pytest.raises(KeyError, match="no accuracy rows for trial 'nope'"):
        plots.accuracy_heatmap(res, "nope")


def test_task_curves_one_line_per_task_over_every_step(res):
    fig = plots.task_curves(res, "ab_full_0")
    _png(fig)
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in TASKS]
    assert [ln.get_label() for ln in lines] == TASKS
    want = matrix(ABLATION[("full", 0)])
    for j, ln in enumerate(lines):
        np.testing.assert_allclose(ln.get_xdata(), [0, 1, 2, 3])
        np.testing.assert_allclose(ln.get_ydata(), want[:, j])


def test_ablation_bars_mean_and_std_over_seeds(res):
    fig = plots.ablation_bars(res, metric="last")
    _png(fig)
    ax = fig.axes[0]
    bars = ax.patches
    assert len(bars) == 2  # variants full, no_distill
    # last of matrix(v) = v - 10; two seeds each
    full, nod = [ABLATION[("full", s)] - 10 for s in (0, 1)], [ABLATION[("no_distill", s)] - 10 for s in (0, 1)]
    assert [b.get_height() for b in bars] == pytest.approx([np.mean(full), np.mean(nod)])
    from matplotlib.container import ErrorbarContainer

    errorbar = next(c for c in ax.containers if isinstance(c, ErrorbarContainer))
    err = errorbar.lines[2][0].get_segments()
    assert [seg[1][1] - seg[0][1] for seg in err] == pytest.approx([2 * np.std(full, ddof=1), 2 * np.std(nod, ddof=1)])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full\n(n=2)", "no_distill\n(n=2)"]


def test_order_robustness_box_per_order_and_every_trial_as_a_point(res):
    fig = plots.order_robustness_plot(res, metric="last")
    _png(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["o1", "o2", "o3"]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(points) == len(ORDER_V)
    assert sorted(points[:, 1]) == pytest.approx(sorted(v - 10 for v in ORDER_V.values()))


def test_search_history_shows_stopped_trials_apart(res):
    fig = plots.search_history(res, metric="avg")
    _png(fig)
    ax = fig.axes[0]
    by_label = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert len(by_label["completed"]) == 1 and len(by_label["stopped (score after its last task)"]) == 1
    assert [t.get_text() for t in ax.texts] == ["task 2"]  # s1 stopped after task 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["s0", "s1", "s2"]  # the errored one has a slot too


def test_avg_vs_last_one_point_per_completed_trial(res):
    fig = plots.avg_vs_last(res)
    _png(fig)
    ax = fig.axes[0]
    n = sum(len(c.get_offsets()) for c in ax.collections)
    m = res.metrics()
    assert n == int((m["status"] == "completed").sum()) == 1 + len(ABLATION) + len(ORDER_V)
    assert {c.get_label() for c in ax.collections} == {"search", "ablation", "orders"}


def test_param_importance_reads_the_stage_journal(tmp_path):
    import optuna

    out = build(("search",)).write(tmp_path / "demo")
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str((out / "optuna").mkdir() or out / "optuna" / "search.journal"))
    )
    study = optuna.create_study(study_name="demo.search", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))  # fmt: skip

    def objective(trial):  # only lr matters; one value per task, as mmcl's searcher reports
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        trial.suggest_float("noise", 0.0, 1.0)
        for task in (1, 2, 3):
            trial.report(-abs(np.log10(lr) + 3) - 0.1 * task, step=task)
        return -abs(np.log10(lr) + 3) - 0.3

    study.optimize(objective, n_trials=24)
    fig = plots.param_importance(analysis.load(out), "search")
    _png(fig)
    ax = fig.axes[0]
    widths = {t.get_text(): b.get_width() for t, b in zip(ax.get_yticklabels(), ax.patches)}
    assert set(widths) == {"lr", "noise"} and widths["lr"] > 0.8 > widths["noise"]
    with pytest.raises(FileNotFoundError, match="no Optuna journal"):
        plots.param_importance(analysis.load(build(("search",)).write(tmp_path / "bare")), "search")
