"""The paired track's baselines do what their names promise (tiny generated benchmark)."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from mmcl.engine import prepare, run_continual

from .helpers import tiny_paired_run


def _batch(task, n=8):
    b = default_collate([task.train[i] for i in range(n)])
    return {**b, "task": torch.zeros(n, dtype=torch.long)}


def test_er_buffer_holds_past_tasks_only_within_capacity():
    prep = prepare(tiny_paired_run("pm_er", {"buffer_size": 12}, num_tasks=3, steps=2))
    sizes = []
    run_continual(prep.run, prepared=prep, on_task_end=lambda e: sizes.append((e.step, len(prep.method.buffer))))
    assert sizes == [(0, 0), (1, 12), (2, 12), (3, 12)]
    labels = prep.method.buffer.data["label"]
    assert set(prep.method.buffer.data["task"].tolist()) <= {0, 1, 2}
    assert set(labels.tolist()) <= set(range(6))  # CIL, 2 classes a task


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it():
    prep = prepare(tiny_paired_run("pm_ewc", {"ewc_lambda": 1e4}, num_tasks=2, steps=3))
    m = prep.method
    m.before_task(0, prep.tasks[0])
    m.after_task(0, prep.tasks[0])
    assert m.fisher and all((f >= 0).all() for f in m.fisher.values())
    assert sum(float(f.sum()) for f in m.fisher.values()) > 0
    m.before_task(1, prep.tasks[1])
    batch = _batch(prep.tasks[1])
    assert float(m.training_loss(batch, 1)["ewc"].detach()) == 0.0
    with torch.no_grad():
        for p in m.model.proj.parameters():
            p.add_(0.1)
    assert float(m.training_loss(batch, 1)["ewc"].detach()) > 0.0


def test_derpp_stores_logits_of_the_classes_seen_at_the_time():
    prep = prepare(tiny_paired_run("pm_derpp", {"buffer_size": 40}, num_tasks=2, steps=2))
    run_continual(prep.run, prepared=prep)
    buf = prep.method.buffer.data
    first = buf["task"] == 0
    # Task-0 clips were stored when only classes 0 and 1 existed; task-1 clips saw 0..3.
    assert buf["logit_mask"][first][:, :2].all() and not buf["logit_mask"][first][:, 2:].any()
    assert buf["logit_mask"][~first][:, :4].all() and not buf["logit_mask"][~first][:, 4:].any()
    terms = prep.method.training_loss(_batch(prep.tasks[1]), 1)
    assert {"ce", "logits", "replay"} <= set(terms) and all(torch.isfinite(v) for v in terms.values())


def test_lwf_distils_only_after_the_first_task():
    prep = prepare(tiny_paired_run("pm_lwf", num_tasks=2, steps=2))
    ends = []
    run_continual(prep.run, prepared=prep, on_task_end=ends.append)
    assert all("loss/distill" not in c for c in ends[1].curves)
    assert all("loss/distill" in c for c in ends[2].curves)
