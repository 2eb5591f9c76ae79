"""What the console shows while a study runs: one compact view per stage, and bars for
long one-off work. No Ray here: :mod:`mmcl.tune` feeds a :class:`StageProgress` from a
Tune callback, and the pretraining / decoding code calls :func:`work_bar`.

Two renderings of the same state, chosen by whether stdout is a terminal:

- **live** (a TTY): one block redrawn in place (rich), a header with the trial counts and
  a line per running trial: its task ``t/T``, last Avg and BWT, elapsed time and an ETA
  (the trial's mean time per task so far, times the tasks left);
- **plain** (a pipe or a file, e.g. ``ray job submit`` logs): one line per event (a trial
  starts, finishes a task, ends), nothing redrawn, so a log reads top to bottom.

Both end with the same final block: the counts and one line per trial with its status.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

STATUSES = ("pending", "running", "completed", "stopped", "errored")


@dataclass
class TrialView:
    """One trial as the console shows it."""

    trial_id: str
    label: str = ""
    status: str = "pending"
    task: int = 0
    n_tasks: int = 0
    avg: float = math.nan
    bwt: float = math.nan
    started: float | None = None
    ended: float | None = None
    error: str = ""

    def elapsed(self, now: float) -> float:
        if self.started is None:
            return 0.0
        return (self.ended if self.ended is not None else now) - self.started

    def eta(self, now: float) -> float | None:
        """Seconds left at the mean pace of the tasks done so far (None before the first)."""
        if self.status != "running" or not self.task or not self.n_tasks:
            return None
        return max(0.0, self.elapsed(now) / self.task * (self.n_tasks - self.task))


def _num(x: float, spec: str = ".1f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StageProgress:
    """The console view of one stage. Feed it events; it prints (plain) or redraws (live)."""

    def __init__(
        self,
        stage: str,
        n_trials: int,
        n_tasks: int,
        out: TextIO | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_s: float = 0.5,
    ):
        self.stage, self.n_trials, self.n_tasks = stage, n_trials, n_tasks
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self.clock = clock
        self.refresh_s = refresh_s
        self.trials: dict[str, TrialView] = {}
        self._live = None
        self._last_draw = -math.inf

    # ------------------------------------------------------------------ events
    def _trial(self, trial_id: str) -> TrialView:
        if trial_id not in self.trials:
            self.trials[trial_id] = TrialView(trial_id, n_tasks=self.n_tasks)
        return self.trials[trial_id]

    def started(self, trial_id: str, label: str = "") -> None:
        t = self._trial(trial_id)
        if label:
            t.label = label
        if t.status == "running":
            return
        t.status, t.ended = "running", None
        if t.started is None:
            t.started = self.clock()
        self._emit(f"  {trial_id} {t.label}: started".rstrip())

    def result(self, trial_id: str, task: int, metrics: dict[str, Any]) -> None:
        t = self._trial(trial_id)
        if t.started is None:
            t.started = self.clock()
        t.status = "running"
        t.task = int(task)
        t.n_tasks = int(metrics.get("n_tasks") or t.n_tasks or self.n_tasks)
        t.avg = float(metrics.get("avg", math.nan))
        t.bwt = float(metrics.get("bwt", math.nan))
        if task:  # row 0 is the zero-shot evaluation, not a finished task
            self._emit(self._line(t, self.clock()))
        else:
            self._redraw()

    def finished(self, trial_id: str, status: str, error: str = "") -> None:
        if status not in STATUSES[2:]:
            raise ValueError(f"a trial ends completed, stopped or errored, not {status!r}")
        t = self._trial(trial_id)
        if t.status in STATUSES[2:]:
            return  # told twice (a callback and the final sync)
        t.status, t.error, t.ended = status, error, self.clock()
        first = (error.strip().splitlines() or [""])[0][:200]
        self._emit(f"  {trial_id} {status} after task {t.task}/{t.n_tasks}: avg {_num(t.avg)}"
                   + (f" ({first})" if first else "") + f"  [{self.counts_line()}]")  # fmt: skip

    # ------------------------------------------------------------------ rendering
    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(STATUSES, 0)
        for t in self.trials.values():
            c[t.status] += 1
        # Trials Tune has not created yet are pending too.
        c["pending"] += max(0, self.n_trials - len(self.trials))
        return c

    def counts_line(self) -> str:
        c = self.counts()
        done = c["completed"] + c["stopped"] + c["errored"]
        return (f"{done}/{self.n_trials} done: {c['completed']} completed, {c['stopped']} stopped, "
                f"{c['errored']} errored; {c['running']} running, {c['pending']} pending")  # fmt: skip

    def _line(self, t: TrialView, now: float) -> str:
        eta = t.eta(now)
        return (f"  {t.trial_id} {t.label}  task {t.task}/{t.n_tasks}  avg {_num(t.avg)}  bwt {_num(t.bwt)}  "
                f"{_secs(t.elapsed(now))}" + (f"  ETA {_secs(eta)}" if eta is not None else ""))  # fmt: skip

    def lines(self) -> list[str]:
        """The live block: the counts, then one line per running trial."""
        now = self.clock()
        running = [t for t in self.trials.values() if t.status == "running"]
        return [f"{self.stage}: {self.counts_line()}"] + [self._line(t, now) for t in running]

    def final_lines(self) -> list[str]:
        """The block left on screen when the stage ends: every trial's final status."""
        now = self.clock()
        out = [f"{self.stage}: {self.counts_line()}"]
        for t in self.trials.values():
            out.append(f"  {t.trial_id} {t.status:<9} task {t.task}/{t.n_tasks}  avg {_num(t.avg)}  "
                       f"bwt {_num(t.bwt)}  {_secs(t.elapsed(now))}  {t.label}".rstrip())  # fmt: skip
        return out

    def _emit(self, line: str) -> None:
        if self.live:
            self._redraw(force=True)
        else:
            print(line, file=self.out, flush=True)

    def _redraw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = self.clock()
        if not force and now - self._last_draw < self.refresh_s:
            return
        self._last_draw = now
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        text = Text("\n".join(self.lines()))
        if self._live is None:
            self._live = Live(text, console=Console(file=self.out), auto_refresh=False, transient=True)
            self._live.start()
        self._live.update(text, refresh=True)

    def tick(self) -> None:
        """Redraw the live block (elapsed / ETA move on between events)."""
        self._redraw()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        print("\n".join(self.final_lines()), file=self.out, flush=True)


class WorkBar:
    """Progress of long one-off work (pretraining, decoding): a redrawn bar on a TTY,
    a line every ``every`` of the way otherwise. Use as a context manager."""

    def __init__(self, total: int, what: str, out: TextIO | None = None, live: bool | None = None,
                 every: float = 0.1, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.total, self.what = max(1, int(total)), what
        self.out = out or sys.stderr
        self.live = self.out.isatty() if live is None else live
        self.every, self.clock = every, clock
        self.done = 0
        self._next = every
        self._t0 = clock()
        self._bar = None

    def __enter__(self) -> WorkBar:
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=self.out), transient=True)  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        else:
            print(f"{self.what}: 0/{self.total}", file=self.out, flush=True)
        return self

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        frac = self.done / self.total
        if frac + 1e-12 >= self._next and self.done < self.total:
            while self._next <= frac + 1e-12:
                self._next += self.every
            spent = self.clock() - self._t0
            left = spent / frac * (1 - frac)
            print(f"{self.what}: {self.done}/{self.total} ({frac:.0%}, {_secs(spent)}, ETA {_secs(left)})",
                  file=self.out, flush=True)  # fmt: skip

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
        spent = self.clock() - self._t0
        state = "done" if exc[0] is None else "failed"
        print(f"{self.what}: {state}, {self.done}/{self.total} in {_secs(spent)}", file=self.out, flush=True)


class _SilentBar:
    """What :func:`work_bar` hands out when nothing is to be shown: same calls, no output."""

    def __enter__(self) -> _SilentBar:
        return self

    def update(self, n: int = 1) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        pass


def work_bar(total: int, what: str, show: bool = True) -> WorkBar | _SilentBar:
    """A :class:`WorkBar` on stderr (stdout stays for results); silent when ``show`` is off."""
    return WorkBar(total, what) if show else _SilentBar()


__all__ = ["STATUSES", "StageProgress", "TrialView", "WorkBar", "work_bar"]
