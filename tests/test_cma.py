"""CMA's mechanisms, on the tiny generated audio-visual benchmark (real open_clip + AST)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from cl_methods.cma import alignment_loss, preservation_loss
from mmcl.engine import prepare, run_continual
from mmcl.spec import SpecError, apply_overrides

from .helpers import tiny_paired_run, tiny_run


def _batch(task, n=16):
    return default_collate([task.test[i] for i in range(min(n, len(task.test)))])


@pytest.fixture(scope="module")
def trained_cil():
    """CMA over 3 CIL tasks; the parameters of the experts frozen after task 1 are kept."""
    run = tiny_paired_run("cma", {"freeze_threshold": 0.1}, num_tasks=3, protocol="cil", steps=6)
    prep = prepare(run)
    snaps = {}

    def on_end(end):
        if end.step == 1:
            snaps["frozen"] = prep.method.frozen_experts()
            snaps["params"] = {
                (b, e): [p.detach().clone() for p in prep.method.model.blocks[b].experts[e].parameters()]
                for b, es in enumerate(snaps["frozen"]) for e in es
            }
        if end.step == 3:
            snaps["state"] = end.state

    result = run_continual(run, on_task_end=on_end, prepared=prep)
    return prep, result, snaps


def test_frozen_experts_are_bit_identical_after_later_tasks(trained_cil):
    prep, _, snaps = trained_cil
    assert any(snaps["frozen"]), "no expert was frozen after the first task"
    for (b, e), before in snaps["params"].items():
        after = list(prep.method.model.blocks[b].experts[e].parameters())
        assert all(torch.equal(x, y.detach()) for x, y in zip(before, after)), f"frozen expert {e} of block {b} moved"
        assert not any(p.requires_grad for p in after)
    # At least top_k experts per block stay trainable, and some trainable expert did move.
    for block in prep.method.model.blocks:
        assert int((~block.frozen).sum()) >= prep.method.config.top_k


def test_gate_mass_is_recorded_per_task_block_expert(trained_cil):
    prep, _, _ = trained_cil
    mass = torch.tensor(prep.method.gate_mass)
    assert mass.shape == (3, prep.backbone.num_blocks, prep.method.config.experts)
    torch.testing.assert_close(mass.sum(-1), torch.ones(3, prep.backbone.num_blocks))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gate_activates_exactly_k_experts(k):
    prep = prepare(tiny_paired_run("cma", {"experts": 5, "top_k": k}, num_tasks=1))
    batch = _batch(prep.tasks[0])
    out = prep.method.forward(batch)
    for w in out["gates"]:
        assert ((w > 0).sum(-1) == k).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(len(w)))
    # Only selected experts run: an expert no sample chose has no influence on the output.
    block = prep.method.model.blocks[0]
    unused = [e for e in range(5) if not (out["gates"][0][:, e] > 0).any()]
    if unused:
        with torch.no_grad():
            for p in block.experts[unused[0]].parameters():
                p.add_(1.0)
        torch.testing.assert_close(prep.method.forward(batch)["joint"], out["joint"])


def test_alignment_is_lower_for_true_pairs_than_shuffled(trained_cil):
    prep, _, _ = trained_cil
    with torch.no_grad():
        out = prep.method.forward(_batch(prep.tasks[2], 16))
        true = alignment_loss(out, 0.2)
        perm = torch.roll(torch.arange(len(out["joint"])), 1)
        shuffled = alignment_loss({**out, "u": {m: u[perm] for m, u in out["u"].items()}}, 0.2)
    assert true < shuffled - 0.1, (true, shuffled)


def test_preservation_is_zero_when_nothing_moved_and_positive_after_training():
    run = tiny_paired_run("cma", num_tasks=2, steps=4)
    prep = prepare(run)
    batch = _batch(prep.tasks[0])
    teacher = prep.method.snapshot()
    with torch.no_grad():
        assert float(preservation_loss(prep.method.forward(batch), prep.method.forward(batch, teacher))) == 0.0
    run_continual(run, prepared=prep)
    with torch.no_grad():
        assert float(preservation_loss(prep.method.forward(batch), prep.method.forward(batch, teacher))) > 0.0


def test_cil_head_grows_and_old_logits_stay_comparable():
    run = tiny_paired_run("cma", num_tasks=3, protocol="cil")
    prep = prepare(run)
    m = prep.method
    batch = _batch(prep.tasks[0])
    m.before_task(0, prep.tasks[0])
    logits0 = m.predict(batch, prep.tasks[0])
    assert logits0.shape == (len(batch["label"]), 8)
    assert torch.isfinite(logits0[:, [0, 1]]).all() and torch.isinf(logits0[:, 2:]).all()
    m.before_task(1, prep.tasks[1])
    logits1 = m.predict(batch, prep.tasks[1])
    assert len(m.model.head.chunks) == 2 and m.model.head.seen == [0, 1, 2, 3]
    # Growing adds columns; the old classes' logits are unchanged, column c = class c.
    assert torch.equal(logits1[:, :2], logits0[:, :2])
    assert torch.isfinite(logits1[:, :4]).all() and torch.isinf(logits1[:, 4:]).all()


def test_dil_head_is_shared():
    prep = prepare(tiny_paired_run("cma", num_tasks=3, protocol="dil", steps=2))
    run_continual(prep.run, prepared=prep)
    assert len(prep.method.model.head.chunks) == 1 and prep.method.model.head.seen == list(range(8))


def test_ablations_change_the_mechanism():
    prep = prepare(tiny_paired_run("cma", {"cross_modal": False}, num_tasks=2, steps=3))
    assert not hasattr(prep.method.model.blocks[0].experts[0], "q")
    prep = prepare(tiny_paired_run("cma", {"freeze": False}, num_tasks=2, steps=3))
    run_continual(prep.run, prepared=prep)
    assert not any(prep.method.frozen_experts())


def test_bad_configs_fail_before_training():
    with pytest.raises(SpecError, match=r"top_k .*must not exceed experts"):
        tiny = tiny_paired_run("cma", num_tasks=1)
        apply_overrides(tiny, {"method.top_k": 9, "method.experts": 4})
    with pytest.raises(SpecError, match=r"run.backbone.kind: paired"):
        apply_overrides(tiny_run("finetune"), {"method.name": "cma"})
    with pytest.raises(SpecError, match=r"paired method"):
        apply_overrides(tiny_paired_run("cma"), {"method.name": "finetune"})


@pytest.mark.parametrize("method,config", [("cma", {"freeze_threshold": 0.1}), ("pm_derpp", {"buffer_size": 12})])
def test_resume_from_a_task_boundary_is_exact(method, config):
    import numpy as np

    run = tiny_paired_run(method, config, num_tasks=3, steps=3)
    states = {}
    full = run_continual(run, on_task_end=lambda e: states.__setitem__(e.step, e.state))
    resumed = run_continual(run, resume=states[1])
    np.testing.assert_array_equal(resumed.matrix, full.matrix)
