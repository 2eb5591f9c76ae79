"""DGG's mechanism: gradient guidance toward the old optimum, replay, LoRA underneath.

What the paper says the method does, checked on real parts (peft LoRA in the real
open_clip CLIP, the real engine): alpha = 0 is plain LoRA fine-tuning step for step;
g_hat is zero at the old optimum and pulls toward it otherwise; the cap holds; the
Bernoulli rate is alpha; the buffer keeps its size and survives a checkpoint.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cl_methods._guidance import GradientGuidance, GuidanceSettings, add_guidance, guidance_terms
from cl_methods._lora import LoraSettings
from cl_methods._replay import ReplayBuffer
from mmcl.engine import prepare, run_continual
from mmcl.spec import SpecError, apply_overrides

from .helpers import tiny_run


def _params(*values: list[float]) -> list[nn.Parameter]:
    return [nn.Parameter(torch.tensor(v)) for v in values]


# ----------------------------------------------------------------------------- g_hat


def test_ghat_is_zero_at_the_old_optimum():
    params = _params([1.0, -2.0, 3.0], [[0.5, 0.5], [1.0, 2.0]])
    for p in params:
        p.grad = torch.randn_like(p)
    star = [p.detach().clone() for p in params]
    for norm in ("per_tensor", "global"):
        for gh in guidance_terms(params, star, scale=True, norm=norm):
            assert torch.equal(gh, torch.zeros_like(gh))
    grads = [p.grad.clone() for p in params]
    add_guidance(params, star)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_scaling_caps_ghat_at_the_gradient_norm():
    (p,) = _params([0.0, 0.0, 0.0, 0.0])
    star = [torch.tensor([3.0, 4.0, 0.0, 0.0])]  # ||theta - theta*|| = 5
    p.grad = torch.tensor([0.0, 0.0, 0.0, 2.0])  # ||g|| = 2 < 5: capped
    (gh,) = guidance_terms([p], star, scale=True)
    assert torch.allclose(torch.linalg.vector_norm(gh), torch.tensor(2.0))
    assert torch.allclose(gh, torch.tensor([-3.0, -4.0, 0.0, 0.0]) * 2 / 5)  # same direction as theta - theta*
    (raw,) = guidance_terms([p], star, scale=False)
    assert torch.equal(raw, torch.tensor([-3.0, -4.0, 0.0, 0.0]))  # no_scaling: the whole difference
    p.grad = torch.tensor([0.0, 0.0, 0.0, 10.0])  # ||g|| >= ||d||: not rescaled
    (gh,) = guidance_terms([p], star, scale=True)
    assert torch.equal(gh, torch.tensor([-3.0, -4.0, 0.0, 0.0]))


def test_norm_modes_differ_per_tensor_vs_global():
    a, b = _params([0.0, 0.0], [0.0, 0.0])
    star = [torch.tensor([4.0, 0.0]), torch.tensor([0.0, 0.1])]
    a.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    per = guidance_terms([a, b], star, norm="per_tensor")
    glob = guidance_terms([a, b], star, norm="global")
    # per tensor: a's pull (4) is capped at its own gradient (1); b's (0.1) is not capped.
    assert torch.allclose(torch.linalg.vector_norm(per[0]), torch.tensor(1.0))
    assert torch.allclose(per[1], torch.tensor([0.0, -0.1]))
    # global: ||d|| = sqrt(16.01) > ||g|| = sqrt(2): every tensor shrinks by the same factor.
    f = math.sqrt(2) / math.sqrt(16.01)
    assert torch.allclose(glob[0], torch.tensor([-4.0 * f, 0.0]))
    assert torch.allclose(glob[1], torch.tensor([0.0, -0.1 * f]))
    total = torch.sqrt(sum((g**2).sum() for g in glob))
    assert torch.allclose(total, torch.tensor(math.sqrt(2)))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _random_case(seed: int, d_scale: float):
    """Three tensors of different shapes with their own gradients and an old optimum; the
    first tensor's pull is large against its gradient, the others' small, so a per-tensor
    cap and the one-vector cap give different answers."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,), (2, 2, 2)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    scales = [d_scale * 10.0, d_scale * 0.1, d_scale * 0.1]
    star = [p.detach() - k * torch.randn(p.shape, generator=g) for p, k in zip(params, scales)]
    for p, k in zip(params, [0.1, 1.0, 1.0]):
        p.grad = k * torch.randn(p.shape, generator=g)
    return params, star


def test_default_ghat_is_one_vector_parallel_to_theta_minus_theta_star():
    """DGG's formula on the flattened parameter vector: g_hat = d * min(1, ||g|| / ||d||)."""
    assert GuidanceSettings().norm == "global"
    from cl_methods._dgg import DGGSettings

    assert DGGSettings().norm == "global" and DGGSettings().guidance().norm == "global"
    for d_scale, capped in ((1.0, True), (1e-3, False)):
        params, star = _random_case(0, d_scale)
        d = _flat([p.detach() for p in params]).double() - _flat(star).double()
        g = _flat([p.grad for p in params]).double()
        assert (d.norm() > g.norm()) == capped
        expected = d * min(1.0, float(g.norm() / d.norm()))
        got = _flat(guidance_terms(params, star)).double()  # the default
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        cos = torch.dot(got, d) / (got.norm() * d.norm())
        assert float(cos) > 1 - 1e-6  # parallel to theta - theta* as a whole
        if capped:
            assert math.isclose(float(got.norm()), float(g.norm()), rel_tol=1e-5)  # the cap: ||g_hat|| = ||g||
        # add_guidance adds exactly that vector to the gradients
        before = g.clone()
        add_guidance(params, star)
        torch.testing.assert_close(_flat([p.grad for p in params]).double(), before + expected, rtol=1e-5, atol=1e-7)


def test_per_tensor_option_caps_each_tensor_by_its_own_gradient():
    params, star = _random_case(1, 1.0)
    got = guidance_terms(params, star, norm="per_tensor")
    for p, s, gh in zip(params, star, got):
        d = (p.detach() - s).double()
        expected = d * min(1.0, float(p.grad.double().norm() / d.norm()))
        torch.testing.assert_close(gh.double(), expected, rtol=1e-5, atol=1e-7)
    # the large pull of the first tensor is cut to its small gradient, the others pass
    # whole: not parallel to theta - theta* as one vector
    d = _flat([p.detach() for p in params]) - _flat(star)
    flat = _flat(got)
    assert float(torch.dot(flat, d) / (flat.norm() * d.norm())) < 0.999
    with pytest.raises(ValueError, match="norm must be"):
        guidance_terms(params, star, norm="layer")


def test_guidance_is_added_after_clipping_the_real_gradient():
    """Through the real engine, one SGD step (lr 1, no momentum) of task 2 with a clip far
    below the gradient's norm. theta* is set to theta + delta with ||delta|| = c / 2, so
    g_hat = -delta whole (||d|| <= ||g||). Guidance after the clip: update = -(clip(g) -
    delta), so ||update - delta|| = c exactly. Guidance before the clip (the earlier order)
    would give update = -clip(g - delta): its norm is c and ||update - delta|| is about
    1.12 c for a random delta, and the pull would shrink to c / ||g|| of its size."""
    c, lr = 1e-2, 1.0
    run = tiny_run(method="dgg", config={"lora": {"rank": 4}, "alpha": 1.0, "buffer_size": 0}, num_tasks=2,
                   steps=1, optimizer="sgd", momentum=0.0, lr=lr, schedule="constant", grad_clip=c)
    prep = prepare(run)
    gen = torch.Generator().manual_seed(5)
    seen: dict[str, list[torch.Tensor]] = {}

    def on_end(e):
        if e.step == 1:  # task 1 done, theta* snapshotted; task 2 not started
            params = prep.method.guide.params
            seen["before"] = [p.detach().clone().double() for p in params]
            delta = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
            k = 0.5 * c / float(_flat(delta).norm())
            seen["delta"] = [k * x for x in delta]
            prep.method.guide.theta_star = [(p.detach().double() + x).float() for p, x in zip(params, seen["delta"])]

    run_continual(run, prepared=prep, on_task_end=on_end)
    assert prep.method.guide.injections == 1
    after = _flat([p.detach().double() for p in prep.method.guide.params])
    update = after - _flat(seen["before"])  # = -lr * (the gradient the step applied)
    delta = _flat(seen["delta"])
    clipped_real = -update / lr + delta  # the step's gradient minus g_hat (= -delta)
    assert math.isclose(float(clipped_real.norm()), c, rel_tol=2e-3), float(clipped_real.norm()) / c
    # the applied gradient is larger than the clip: the pull was not clipped with it
    assert float((update / lr).norm()) != pytest.approx(c, rel=2e-3)


def test_a_missing_gradient_gets_no_pull():
    for norm in ("global", "per_tensor"):
        (p,) = _params([1.0, 1.0])
        add_guidance([p], [torch.zeros(2)], norm=norm)  # p.grad is None: ||g|| = 0 caps g_hat to 0
        assert torch.equal(p.grad, torch.zeros(2))
    # per tensor, an unused tensor beside a used one is never moved
    a, b = _params([1.0, 1.0], [1.0, 1.0])
    a.grad = torch.tensor([3.0, 4.0])
    add_guidance([a, b], [torch.zeros(2), torch.zeros(2)], norm="per_tensor")
    assert torch.equal(b.grad, torch.zeros(2))


def test_guided_step_on_a_quadratic_moves_toward_the_old_optimum():
    """New-task loss 0.5 ||theta - c||^2; the old optimum theta* elsewhere. One SGD step
    with g + g_hat ends closer to theta* than the plain step, and still lowers the loss."""
    torch.manual_seed(0)
    c, star = torch.randn(16) + 3.0, torch.randn(16)
    theta0 = star + 0.5 * torch.randn(16)  # trained a little on the new task already
    lr = 0.1

    def step(guided: bool) -> torch.Tensor:
        p = nn.Parameter(theta0.clone())
        (0.5 * ((p - c) ** 2).sum()).backward()
        if guided:
            add_guidance([p], [star])
        with torch.no_grad():
            p -= lr * p.grad
        return p.detach()

    plain, guided = step(False), step(True)
    dist = lambda x: float(torch.linalg.vector_norm(x - star))  # noqa: E731
    assert dist(guided) < dist(plain)
    loss = lambda x: float(0.5 * ((x - c) ** 2).sum())  # noqa: E731
    assert loss(guided) < loss(theta0)


def test_injection_rate_matches_alpha_and_is_reproducible():
    def pattern(alpha: float, seed: int, n: int = 4000) -> list[bool]:
        g = torch.Generator().manual_seed(seed)
        guide = GradientGuidance(GuidanceSettings(alpha=alpha), g)
        (p,) = _params([0.0])
        guide.start_task(0, [p])
        guide.snapshot()
        guide.start_task(1, [p])
        out = []
        for _ in range(n):
            p.grad = torch.zeros(1)
            out.append(guide.apply())
        assert guide.steps == n and guide.injections == sum(out)
        return out

    for alpha in (0.05, 0.2, 0.5):
        rate = sum(pattern(alpha, 1)) / 4000
        sigma = math.sqrt(alpha * (1 - alpha) / 4000)
        assert abs(rate - alpha) < 4 * sigma, (alpha, rate)
    assert pattern(0.2, 7) == pattern(0.2, 7)
    assert pattern(0.2, 7) != pattern(0.2, 8)
    assert not any(pattern(0.0, 1, 500)) and all(pattern(1.0, 1, 500))


def test_alpha_per_task_and_no_guidance_in_the_first_task():
    g = torch.Generator().manual_seed(0)
    settings = GuidanceSettings(alpha=[0.0, 1.0])
    guide = GradientGuidance(settings, g)
    (p,) = _params([0.0])
    settings.check_num_tasks(3)
    with pytest.raises(ValueError, match="method.alpha: 2 value"):
        settings.check_num_tasks(4)
    guide.start_task(0, [p])
    assert guide.alpha_now == 0.0 and not guide.apply()  # no theta* yet
    guide.snapshot()
    guide.start_task(1, [p])
    assert guide.alpha_now == 0.0
    guide.start_task(2, [p])
    assert guide.alpha_now == 1.0


# ----------------------------------------------------------------------------- replay buffer


def _samples(n: int, task: int):
    return [{"image": torch.full((3, 2, 2), float(task * 1000 + i)), "label": i % 3, "task": task} for i in range(n)]


SOURCES = [_samples(25, t) for t in range(4)]


@pytest.mark.parametrize("strategy", ["reservoir", "per_task"])
@pytest.mark.parametrize("size_per", ["total", "task"])
def test_buffer_respects_its_size(strategy, size_per):
    buf = ReplayBuffer(10, strategy, size_per, SOURCES)
    g = torch.Generator().manual_seed(0)
    for t in range(4):
        buf.add_task(t, g)
        cap = 10 * (t + 1) if size_per == "task" else 10
        assert len(buf) == cap
        assert set(buf.task.tolist()) <= set(range(t + 1))
        assert len(set(zip(buf.task.tolist(), buf.index.tolist()))) == cap  # no sample twice
        # every stored entry reads back a real sample of the task it is tagged with
        for i in range(len(buf)):
            s = buf[i]
            assert s["task"] == int(buf.task[i]) and int(s["image"][0, 0, 0]) // 1000 == s["task"]
        if strategy == "per_task":
            counts = torch.bincount(buf.task, minlength=t + 1)
            assert counts.max() - counts.min() <= (10 % (t + 1) if size_per == "total" else 0)
    batch = buf.sample(6, g)
    assert batch["image"].shape == (6, 3, 2, 2) and batch["label"].shape == (6,)


def test_buffer_state_round_trip_continues_identically():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = ReplayBuffer(8, "reservoir", sources=SOURCES)
    a.add_task(0, g1)
    b = ReplayBuffer(8, "reservoir", sources=SOURCES)
    b.load_state_dict(a.state_dict())
    g2.set_state(g1.get_state())
    a.add_task(1, g1)
    b.add_task(1, g2)
    assert torch.equal(a.task, b.task) and torch.equal(a.index, b.index) and a.seen == b.seen == 50
    assert (a.task == 1).any() and (a.task == 0).any()  # the reservoir replaced some, kept some


def test_zero_size_buffer_stays_empty():
    buf = ReplayBuffer(0, "reservoir", "task", SOURCES)
    buf.add_task(0, torch.Generator())
    assert len(buf) == 0


# ----------------------------------------------------------------------------- on the model


def _lora_params(prep) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in prep.backbone.named_parameters() if ".lora_" in n}


def test_untrained_lora_is_the_frozen_model_and_only_lora_trains():
    frozen = prepare(tiny_run(method="zeroshot"))
    prep = prepare(tiny_run(method="lora", config={"lora": {"towers": "both", "rank": 4}}))
    prep.backbone.load_state_dict(frozen.backbone.state_dict(), strict=False)  # same random init
    images = torch.stack([prep.tasks[0].test[i]["image"] for i in range(4)])
    assert torch.equal(prep.method.predict({"image": images}, prep.tasks[0]),
                       frozen.method.predict({"image": images}, frozen.tasks[0]))
    trainable = [n for n, p in prep.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert any(n.startswith("model.transformer.") for n in trainable)  # text tower too ("both")
    # rank 4 on c_fc (128 -> 512) and c_proj (512 -> 128) of 3 image blocks, and on the
    # text tower's (64 -> 256, 256 -> 64) of 2 blocks
    expected = 3 * 2 * 4 * (128 + 512) + 2 * 2 * 4 * (64 + 256)
    assert sum(p.numel() for p in prep.method.trainable_parameters()) == expected


def test_attention_targets_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="MultiheadAttention"):
        LoraSettings(targets=["attn"])
    with pytest.raises(SpecError, match=r"config\.lora\.targets: .*MultiheadAttention"):
        apply_overrides(tiny_run(method="lora"), {"method.lora.targets": ["attn", "mlp.c_fc"]})


def test_alpha_zero_matches_plain_lora_finetuning_step_for_step():
    cfg = {"lora": {"rank": 4, "dropout": 0.1}}
    lora = prepare(tiny_run(method="lora", config=cfg, num_tasks=3, steps=4))
    dgg = prepare(tiny_run(method="dgg", config={**cfg, "alpha": 0.0, "buffer_size": 0}, num_tasks=3, steps=4))
    ra = run_continual(lora.run, prepared=lora)
    rb = run_continual(dgg.run, prepared=dgg)
    assert [c["loss"] for c in ra.curves] == [c["loss"] for c in rb.curves]
    assert (ra.matrix == rb.matrix).all()
    a, b = _lora_params(lora), _lora_params(dgg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_guidance_changes_training_only_after_the_first_task():
    base = {"lora": {"rank": 4}, "buffer_size": 0}
    ends = {}
    for alpha in (0.0, 1.0):
        prep = prepare(tiny_run(method="dgg", config={**base, "alpha": alpha}, num_tasks=2, steps=4, lr=1e-2))
        rows = []
        run_continual(prep.run, prepared=prep, on_task_end=lambda e, rows=rows: rows.append(e))
        ends[alpha] = rows
        assert prep.method.guide.steps == 4  # the second task's steps all counted
        assert prep.method.injection_rate == alpha
    # task 1 (no theta* yet) trains identically; task 2 differs once the pull is on
    assert [c["loss"] for c in ends[0.0][1].curves] == [c["loss"] for c in ends[1.0][1].curves]
    assert [c["loss"] for c in ends[0.0][2].curves] != [c["loss"] for c in ends[1.0][2].curves]


def test_dgg_resume_from_a_task_boundary_is_exact():
    """theta*, the buffer and the LoRA weights travel in the checkpoint: stopping after
    task 2 and resuming gives the numbers of an uninterrupted run."""
    run = tiny_run(method="dgg", config={"lora": {"rank": 4}, "alpha": 0.5, "buffer_size": 6}, num_tasks=3, steps=4)
    states = []
    full = run_continual(run, on_task_end=lambda e: states.append(e.state))
    assert len(states[2]["method"]["buffer"]["task"]) == 12  # 6 per task, 2 tasks done
    assert states[2]["method"]["guidance"]["theta_star"] is not None
    resumed = prepare(run)
    res = run_continual(run, resume=states[2], prepared=resumed)
    assert (res.matrix == full.matrix).all()
    assert len(resumed.method.buffer) == 18


def test_replay_mixes_stored_samples_into_the_task_data():
    prep = prepare(tiny_run(method="dgg", config={"buffer_size": 5, "lora": {"rank": 2}}, num_tasks=3, steps=2))
    run_continual(prep.run, prepared=prep)
    m = prep.method
    assert len(m.train_dataset(0)) == len(prep.ctx.train_sets[0]) + len(m.buffer)
    assert torch.bincount(m.buffer.task).tolist() == [5, 5, 5]


def test_short_alpha_list_fails_when_the_study_loads(tmp_path):
    from mmcl.spec import load_study

    from .helpers import tiny_study

    path = tiny_study(tmp_path / "s.yaml", [{"name": "a", "kind": "ablation", "variants": ["full"]}],
                      method="dgg", config={"alpha": [0.1]}, num_tasks=3)
    with pytest.raises(SpecError, match=r"method.alpha: 1 value\(s\) for a run of 3 tasks"):
        load_study(path)
