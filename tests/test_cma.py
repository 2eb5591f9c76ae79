"""CMA's mechanisms, on the tiny generated audio-visual benchmark (real open_clip + AST)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from cl_methods._cma_model import info_nce
from cl_methods.cma import alignment_loss, preservation_loss
from mmcl.engine import prepare, run_continual
from mmcl.spec import SpecError, apply_overrides

from .helpers import tiny_paired_run, tiny_run


def _batch(task, n=16):
    return default_collate([task.test[i] for i in range(min(n, len(task.test)))])


# 3 experts, top-2, threshold 0.1: after a task most experts count as used (three masses
# summing to 1), so blocks must grow to keep top_k trainable experts.
GROW = {"experts": 3, "top_k": 2, "freeze_threshold": 0.1}


def _params(expert):
    return [p.detach().clone() for p in expert.parameters()]


@pytest.fixture(scope="module")
def trained_cil():
    """CMA over 4 CIL tasks (weight decay on, to show frozen experts get none). At the
    end of every task, each expert whose gate mass reached the threshold on that task is
    snapshotted; every later task end compares every snapshot with the live expert."""
    run = tiny_paired_run("cma", GROW, num_tasks=4, protocol="cil", steps=4, weight_decay=0.1)
    prep = prepare(run)
    m = prep.method
    snaps: dict = {"used": {}, "experts": [], "moved": [], "in_optimizer": []}

    def on_end(end):
        if end.step == 0:
            return
        blocks = m.model.blocks
        # Every expert used earlier is bit-identical to its state at the end of its task.
        snaps["moved"] += [
            (end.step, key) for key, before in snaps["used"].items()
            if not all(torch.equal(x, y) for x, y in zip(before, _params(blocks[key[0]].experts[key[1]])))
        ]
        # ... and the next task's optimizer (built from trainable_parameters) never sees it.
        ids = {id(p) for p in m.trainable_parameters()}
        snaps["in_optimizer"] += [
            (end.step, key) for key in snaps["used"] if any(id(p) in ids for p in blocks[key[0]].experts[key[1]].parameters())
        ]
        mass = m.gate_mass[end.step - 1]
        for b, row in enumerate(mass):
            for e, share in enumerate(row):
                if share >= GROW["freeze_threshold"] and (b, e) not in snaps["used"]:
                    snaps["used"][(b, e)] = _params(blocks[b].experts[e])
        snaps["experts"].append([blk.n_experts for blk in blocks])

    result = run_continual(run, on_task_end=on_end, prepared=prep)
    return prep, result, snaps


def test_used_experts_never_change_afterwards(trained_cil):
    prep, _, snaps = trained_cil
    assert len(snaps["used"]) > len(prep.method.model.blocks), "too few used experts to test anything"
    assert snaps["moved"] == [], f"(task end, (block, expert)) of used experts that changed: {snaps['moved']}"
    assert snaps["in_optimizer"] == []
    for b, e in snaps["used"]:
        assert bool(prep.method.model.blocks[b].frozen[e])
        assert not any(p.requires_grad for p in prep.method.model.blocks[b].experts[e].parameters())


def test_blocks_grow_to_keep_top_k_trainable_experts(trained_cil):
    prep, _, snaps = trained_cil
    # Some block grew past the 3 experts it started with, within the default cap
    # experts + top_k x (tasks - 1) = 3 + 2 x 3.
    assert max(max(n) for n in snaps["experts"]) > 3
    assert max(max(n) for n in snaps["experts"]) <= 9
    assert all(a <= b for x, y in zip(snaps["experts"], snaps["experts"][1:]) for a, b in zip(x, y))
    # Every task after the first started with top_k trainable experts in every block: the
    # gate mass of task t (measured after it) covers the experts it had.
    for t, mass in enumerate(prep.method.gate_mass[1:], start=1):
        assert [len(row) for row in mass] == snaps["experts"][t - 1]
    # Grown experts train: some new input selected one, and its up-projection (zero at
    # growth) moved.
    blocks = prep.method.model.blocks
    assert any(blk.experts[e].up["audio"].weight.abs().sum() > 0 for blk in blocks for e in range(3, blk.n_experts))
    # The trials table's method columns count them.
    assert prep.method.stats() == {"experts": float(sum(snaps["experts"][-1])), "frozen_experts": float(len(snaps["used"]))}


def test_gate_mass_is_recorded_per_task_block_expert(trained_cil):
    prep, _, snaps = trained_cil
    mass = prep.method.gate_mass
    assert len(mass) == 4 and all(len(m) == prep.backbone.num_blocks for m in mass)
    for m in mass:
        for row in m:
            assert abs(sum(row) - 1.0) < 1e-5


def _grown_after_first_task(config):
    """A fresh 2-task CMA with 2 experts, top-2: after task 0 both are used, so both freeze
    and each block must grow 2 experts. Returns the method and task 0's training batch."""
    prep = prepare(tiny_paired_run("cma", config, num_tasks=2, steps=1))
    m = prep.method
    m.before_task(0, prep.tasks[0])
    batch = next(iter(m.ctx.loader(m.ctx.train_sets[0], 64)))
    return prep, m, batch


def test_growth_keeps_old_routing_bit_identical():
    prep, m, batch = _grown_after_first_task({"experts": 2, "top_k": 2, "freeze_threshold": 0.1})
    with torch.no_grad():
        before = m.forward(batch)
    m.after_task(0, prep.tasks[0])
    assert [b.n_experts for b in m.model.blocks] == [4] * len(m.model.blocks)
    assert m.frozen_experts() == [[0, 1]] * len(m.model.blocks)
    with torch.no_grad():
        after = m.forward(batch)
    for w0, w1 in zip(before["gates"], after["gates"]):
        assert w1.shape == (len(w0), 4)
        assert torch.equal(w1[:, :2], w0) and torch.equal(w1[:, 2:], torch.zeros_like(w1[:, 2:]))
    assert torch.equal(after["joint"], before["joint"])
    # The new experts train, the old ones do not.
    for blk in m.model.blocks:
        assert [all(p.requires_grad for p in e.parameters()) for e in blk.experts] == [False, False, True, True]
    ids = {id(p) for p in m.trainable_parameters()}
    assert all(id(p) not in ids for blk in m.model.blocks for e in blk.experts[:2] for p in e.parameters())
    assert all(id(p) in ids for blk in m.model.blocks for p in blk.gate_growth.parameters())


def test_max_experts_reached_is_a_clear_error():
    prep, m, _ = _grown_after_first_task({"experts": 2, "top_k": 2, "freeze_threshold": 0.1, "max_experts": 3})
    with pytest.raises(SpecError, match=r"method\.config\.max_experts = 3.*raise method\.config\.max_experts"):
        m.after_task(0, prep.tasks[0])
    with pytest.raises(SpecError, match=r"max_experts \(1\) must be at least experts \(2\)"):
        apply_overrides(tiny_paired_run("cma", num_tasks=1), {"method.config": {"experts": 2, "top_k": 1, "max_experts": 1}})
    with pytest.raises(SpecError, match=r"training\.reset_optimizer: true"):
        prepare(tiny_paired_run("cma", num_tasks=2, reset_optimizer=False))


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
    # Each modality is aligned with the other one (no self term): after 16 tiny steps the
    # true pairs are only somewhat closer than broken ones, so compare with the mean
    # over several shifts rather than one.
    prep, _, _ = trained_cil
    with torch.no_grad():
        out = prep.method.forward(_batch(prep.tasks[2], 16))
        model = prep.method.model
        true = alignment_loss(out, 0.2, model)
        n = len(out["joint"])
        # Audio of sample i beside video of sample i - s: pairs broken.
        shuffled = [
            alignment_loss({**out, "u": {**out["u"], "audio": out["u"]["audio"][torch.roll(torch.arange(n), s)]}}, 0.2, model)
            for s in range(1, 6)
        ]
    assert true < torch.stack(shuffled).mean() - 0.03, (true, shuffled)


def test_alignment_target_is_not_the_modality_itself():
    """Copying the joint into a modality's embedding used to be (near) optimal: the joint
    of all modalities contains that embedding. Against the joint of the *other*
    modalities it is not: with every video embedding the same, nothing tells the pairs
    apart, and InfoNCE cannot go below log N (its value for logits equal across a row)."""
    import math

    prep = prepare(tiny_paired_run("cma", num_tasks=1))
    model = prep.method.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.fusion.parameters():  # a non-trivial interaction term
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    n, d, tau = 8, model.proj["audio"].out_features, 0.05
    video = 0.1 * torch.randn(1, d, generator=g).expand(n, d)
    audio = torch.randn(n, d, generator=g)
    with torch.no_grad():
        joint = model.fuse({"audio": audio, "video": video})
        copied = {"u": {"audio": joint, "video": video}, "joint": joint}
        # The old target, each modality toward the joint of all modalities: ~0 for the copy.
        old_audio = info_nce(joint, joint, tau)
        new = alignment_loss(copied, tau, model)
        # The target of audio depends on video only.
        assert torch.equal(model.joint_without(copied["u"], "audio"), model.joint_without({**copied["u"], "audio": audio}, "audio"))
    assert float(old_audio) < 0.05, old_audio
    assert float(new) >= math.log(n) - 1e-4, new


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


@pytest.mark.parametrize("method,config", [("cma", GROW), ("pm_derpp", {"buffer_size": 12})])
def test_resume_from_a_task_boundary_is_exact(method, config):
    import numpy as np

    run = tiny_paired_run(method, config, num_tasks=3, steps=3)
    states = {}
    full = run_continual(run, on_task_end=lambda e: states.__setitem__(e.step, e.state))
    if method == "cma":  # the state resumed from holds grown experts
        assert any(states[1]["method"]["growth"]), states[1]["method"]["growth"]
    resumed = run_continual(run, resume=states[1])
    np.testing.assert_array_equal(resumed.matrix, full.matrix)
