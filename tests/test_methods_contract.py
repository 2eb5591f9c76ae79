"""Every registered method, through two tiny tasks: the contract the engine relies on.

- hooks fire in the documented order;
- every logged loss is finite;
- parameters the method never trained are bit-identical afterwards;
- a state round trip (state_dict -> fresh model -> load_state_dict) predicts identically.

A new method is covered by registering it; add a case to METHOD_CONFIGS only when its
defaults need a tweak to run on two tiny tasks. Methods of other tracks run on their own
tiny runs: generation methods (``track = "generation"``) on the tiny random BLIP-2 and the
generated caption / VQA benchmark (their predictions are generated strings), paired
methods (``track = "paired"``) on the tiny generated audio-visual benchmark.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from cl_methods import get_method_class, registered_methods
from mmcl.engine import prepare, run_continual

from mmcl.data.base import collate

from .helpers import tiny_gen_run, tiny_paired_run, tiny_run

METHOD_CONFIGS: dict[str, dict] = {
    "er": {"buffer_size": 16},
    "gen_dgg": {"buffer_size": 4, "alpha": 1.0},
    "pm_er": {"buffer_size": 16},
    "pm_derpp": {"buffer_size": 16},
}
_TINY_RUNS = {"clip": tiny_run, "generation": tiny_gen_run, "paired": tiny_paired_run}


def _contract_run(name: str, cls):
    make = _TINY_RUNS[getattr(cls, "track", "clip")]
    return make(method=name, config=METHOD_CONFIGS.get(name, {}), num_tasks=2)


def _same(a, b) -> bool:
    return a == b if isinstance(a, list) else torch.equal(a, b)
HOOKS = ["setup", "before_task", "training_loss", "after_backward", "after_task", "predict"]


def _collapse(calls: list[str]) -> list[str]:
    out: list[str] = []
    for c in calls:
        if not out or out[-1] != c:
            out.append(c)
    return out


@pytest.mark.parametrize("name", registered_methods())
def test_method_contract(name, monkeypatch):
    cls = get_method_class(name)
    calls: list[str] = []
    for hook in HOOKS:
        original = getattr(cls, hook)

        def spy(self, *a, __orig=original, __hook=hook, **kw):
            calls.append(__hook)
            return __orig(self, *a, **kw)

        monkeypatch.setattr(cls, hook, spy)

    run = _contract_run(name, cls)
    prep = prepare(run)
    initial = {n: p.detach().clone() for n, p in prep.backbone.named_parameters()}
    trained_names: set[str] = set()
    ids = {id(p): n for n, p in prep.backbone.named_parameters()}
    ends = []

    def on_end(end):
        ends.append(end)

    original_before = cls.before_task

    def record_trainable(self, t, task):
        original_before(self, t, task)
        trained_names.update(ids[id(p)] for p in self.trainable_parameters() if id(p) in ids)

    monkeypatch.setattr(cls, "before_task", record_trainable)
    result = run_continual(run, on_task_end=on_end, prepared=prep)

    # Order: setup, row 0 (predict), then per task before -> (loss -> after_backward)* -> after -> predict.
    seq = _collapse(calls)
    assert seq[:2] == ["setup", "predict"], seq
    body = seq[2:]
    trains = bool(cls.trainable_parameters(prep.method))
    per_task = (
        ["before_task", "training_loss", "after_backward", "after_task", "predict"]
        if trains
        else ["before_task", "after_task", "predict"]
    )
    # training_loss / after_backward alternate; collapse their repetitions.
    compact = []
    for c in body:
        if compact[-2:] == ["training_loss", "after_backward"] and c in ("training_loss", "after_backward"):
            continue
        compact.append(c)
    assert compact == per_task * 2, compact

    assert [e.step for e in ends] == [0, 1, 2]
    assert result.matrix.shape == (3, 2)
    for end in ends:
        for row in end.curves:
            assert math.isfinite(row["loss"]), row

    # Frozen weights are bit-identical; trained ones changed (unless nothing trains).
    for n, p in prep.backbone.named_parameters():
        if n not in trained_names:
            assert torch.equal(p.detach(), initial[n]), f"{name}: frozen parameter {n} changed"
    if trains and trained_names:
        assert any(not torch.equal(prep.backbone.get_parameter(n).detach(), initial[n]) for n in trained_names)

    # State round trip, through a file read as a trial reads its checkpoint (no pickled
    # code: weights_only): a fresh model loaded from the state predicts identically.
    buf = io.BytesIO()
    torch.save(ends[-1].state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["method"]
    fresh = prepare(run)
    fresh.method.load_state_dict(state)
    batch = next(iter(torch.utils.data.DataLoader(prep.tasks[0].test, batch_size=8, collate_fn=collate)))
    for task in prep.tasks:
        a = prep.method.predict(batch, task)
        b = fresh.method.predict(batch, task)
        assert _same(a, b), f"{name}: predictions differ after a state round trip on {task.name}"


def test_zeroshot_rows_are_all_equal():
    result = run_continual(tiny_run(method="zeroshot", num_tasks=2))
    assert (result.matrix == result.matrix[0]).all()
