"""The console view of a stage (mmcl/progress.py): what a researcher reads while trials run."""

from __future__ import annotations

import io

import pytest

from mmcl.progress import StageProgress, WorkBar


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _stage(out, live=False, n_trials=4, n_tasks=3):
    clock = Clock()
    return StageProgress("search", n_trials, n_tasks, out=out, live=live, clock=clock), clock


def test_plain_view_prints_one_line_per_event_with_task_metrics_and_eta():
    out = io.StringIO()
    view, clock = _stage(out)
    view.started("t1", "lr=0.01")
    view.result("t1", 0, {"avg": 10.0, "n_tasks": 3})  # zero-shot row: no line
    clock.t += 20
    view.result("t1", 1, {"avg": 50.0, "bwt": float("nan"), "n_tasks": 3})
    clock.t += 10
    view.result("t1", 2, {"avg": 45.25, "bwt": -3.5, "n_tasks": 3})
    lines = out.getvalue().splitlines()
    assert lines == [
        "  t1 lr=0.01: started",
        "  t1 lr=0.01  task 1/3  avg 50.0  bwt -  20s  ETA 40s",
        # 30 s for 2 tasks: 15 s a task, one left.
        "  t1 lr=0.01  task 2/3  avg 45.2  bwt -3.5  30s  ETA 15s",
    ]


def test_counts_cover_trials_tune_has_not_created_and_every_end_state():
    out = io.StringIO()
    view, clock = _stage(out, n_trials=5)
    for i, status in enumerate(["completed", "stopped", "errored"]):
        view.started(f"t{i}")
        view.result(f"t{i}", 1, {"avg": 40.0 + i})
        view.finished(f"t{i}", status, error="boom\ntrace" if status == "errored" else "")
    view.started("t3")
    assert view.counts() == {"pending": 1, "running": 1, "completed": 1, "stopped": 1, "errored": 1}
    assert view.counts_line() == "3/5 done: 1 completed, 1 stopped, 1 errored; 1 running, 1 pending"
    text = out.getvalue()
    assert "  t2 errored after task 1/3: avg 42.0 (boom)" in text and "trace" not in text
    # Told twice (a Tune callback and the final sync): counted once.
    view.finished("t0", "completed")
    assert view.counts()["completed"] == 1
    with pytest.raises(ValueError, match="completed, stopped or errored"):
        view.finished("t3", "running")


def test_final_block_holds_every_trial_with_its_status():
    out = io.StringIO()
    view, clock = _stage(out, n_trials=2)
    view.started("a", "full seed 0")
    view.result("a", 3, {"avg": 61.0, "bwt": -2.0})
    view.finished("a", "completed")
    view.started("b", "no_graph seed 0")
    view.result("b", 1, {"avg": 30.0})
    view.finished("b", "stopped")
    view.close()
    final = out.getvalue().splitlines()[-3:]
    assert final[0] == "search: 2/2 done: 1 completed, 1 stopped, 0 errored; 0 running, 0 pending"
    assert final[1].startswith("  a completed task 3/3  avg 61.0  bwt -2.0") and final[1].endswith("full seed 0")
    assert final[2].startswith("  b stopped   task 1/3  avg 30.0")


def test_live_view_redraws_in_place_and_leaves_only_the_final_block():
    out = Tty()
    view, clock = _stage(out, live=None)  # decided by the stream: a TTY
    assert view.live
    view.started("t1", "lr=0.1")
    clock.t += 5
    view.result("t1", 1, {"avg": 50.0})
    assert view.lines() == [
        "search: 0/4 done: 0 completed, 0 stopped, 0 errored; 1 running, 3 pending",
        "  t1 lr=0.1  task 1/3  avg 50.0  bwt -  5s  ETA 10s",
    ]
    view.finished("t1", "completed")
    view.close()
    text = out.getvalue()
    assert "\x1b[" in text  # cursor movement: redrawn, not appended
    assert text.rstrip().splitlines()[-2].endswith("1/4 done: 1 completed, 0 stopped, 0 errored; 0 running, 3 pending")
    # A pipe (e.g. `ray job submit` logs) gets no escape codes at all.
    pipe = io.StringIO()
    plain, _ = _stage(pipe, live=None)
    plain.started("t1")
    plain.close()
    assert not plain.live and "\x1b[" not in pipe.getvalue()


def test_work_bar_plain_lines_every_tenth_with_eta():
    out = io.StringIO()
    clock = Clock()
    with WorkBar(200, "pretraining", out=out, live=False, clock=clock) as bar:
        for _ in range(200):
            clock.t += 0.5
            bar.update()
    lines = out.getvalue().splitlines()
    assert lines[0] == "pretraining: 0/200"
    assert lines[1] == "pretraining: 20/200 (10%, 10s, ETA 1m30s)"
    assert len(lines) == 1 + 9 + 1 and lines[-1] == "pretraining: done, 200/200 in 1m40s"
    failed = io.StringIO()
    with pytest.raises(RuntimeError), WorkBar(10, "decoding", out=failed, live=False, clock=clock) as bar:
        bar.update(3)
        raise RuntimeError("bad clip")
    assert failed.getvalue().splitlines()[-1].startswith("decoding: failed, 3/10")
