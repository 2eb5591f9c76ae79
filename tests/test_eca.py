"""ECA mechanism tests on a tiny random BLIP-2 (real transformers modules, CPU, seconds).

The model: ViT 2 x 64 (32 px images, 8 px patches: 16 patches + CLS), Q-Former 2 x 64
with cross-attention in every layer, OPT 2 x 64, 8 query tokens. ``query_tokens`` are
randomised (BLIP-2 initialises them to zero, which would hide query mistakes).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cl_methods._eca_adapters import AdapterSizes, QFormerAdapters, install_adapters
from cl_methods._eca_dictionary import DictionarySettings, OnlineDictionary, lasso_objective, sparse_encode_nonneg
from cl_methods._eca_fisher import FeDEx, FisherSettings, GradStats, gradient_stats, interference
from cl_methods._eca_moq import MixtureOfQueries, MoQHook, install_moq
from cl_methods.base import MethodContext

N_QUERY, IMAGE_TOKEN, SEQ_TEXT = 8, 99, 5


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machines share two cores; tiny matmuls are slower multi-threaded.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_blip2(seed: int = 0):
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )

    vc = Blip2VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    qc = Blip2QFormerConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=64,
        cross_attention_frequency=1,
    )
    tc = OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    cfg = Blip2Config(
        vision_config=vc.to_dict(),
        qformer_config=qc.to_dict(),
        text_config=tc.to_dict(),
        num_query_tokens=N_QUERY,
        image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg).eval()  # eval: dropout off, outputs comparable
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.5)
    model.requires_grad_(False)
    return model


def samples(n: int, seed: int, shift: float = 0.0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(3, 90, (SEQ_TEXT,), generator=g)
        ids = torch.cat([torch.full((N_QUERY,), IMAGE_TOKEN), text])
        labels = ids.clone()
        labels[:N_QUERY] = -100
        out.append(
            {
                "pixel_values": torch.randn(3, 32, 32, generator=g) + shift,
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": labels,
            }
        )
    return out


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in items]) for k in items[0]}


@pytest.fixture(scope="module")
def model():
    return tiny_blip2()


# --------------------------------------------------------------------------- MoQ


def test_moq_with_one_task_gives_q_star_plus_v1(model):
    moq = MixtureOfQueries(N_QUERY, 64, 64)
    moq.add_task(torch.Generator().manual_seed(0))
    with torch.no_grad():
        moq.values[0].normal_()
    q_star = model.query_tokens
    e = torch.randn(5, 64)
    torch.testing.assert_close(moq.queries(q_star, e), (q_star + moq.values[0]).expand(5, -1, -1))

    # Through the real Q-Former: the hook's output is the Q-Former run on Q* + v_1.
    image = model.vision_model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state
    qf = model.qformer
    direct = qf(query_embeds=(q_star + moq.values[0]).expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
    plain = qf(query_embeds=q_star.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
    hook = MoQHook(lambda: moq)
    handle = install_moq(qf, hook)
    try:
        hooked = qf(query_embeds=q_star.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
    finally:
        handle.remove()
    torch.testing.assert_close(hooked, direct)
    assert not torch.allclose(hooked, plain)
    # e is the mean of the 16 patch tokens, CLS excluded.
    torch.testing.assert_close(hook.last_summary, image[:, 1:].mean(1))
    assert image.shape[1] == 17


def test_moq_mixes_by_softmax_of_cosines():
    moq = MixtureOfQueries(2, 3, 4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        moq.add_task(g)
    with torch.no_grad():
        for v in moq.values:
            v.normal_()
    e = torch.randn(6, 4)
    keys = torch.stack(list(moq.keys))
    a = torch.softmax(torch.nn.functional.cosine_similarity(e[:, None], keys[None], dim=-1), -1)
    expected = torch.einsum("bt,tnh->bnh", a, torch.stack(list(moq.values)))
    torch.testing.assert_close(moq.offset(e), expected)


def test_new_keys_orthogonal_at_mean_norm_and_old_frozen():
    moq = MixtureOfQueries(2, 3, 16)
    g = torch.Generator().manual_seed(0)
    moq.add_task(g)
    with torch.no_grad():
        moq.keys[0].mul_(3.0)
    moq.add_task(g)
    moq.add_task(g)
    keys = torch.stack([k.detach() for k in moq.keys])
    gram = keys @ keys.T
    off = gram - torch.diag(gram.diagonal())
    assert off.abs().max() < 1e-4
    # Each new key at the mean norm of the ones before it: 3, 3, 3.
    torch.testing.assert_close(keys.norm(dim=1), torch.full((3,), 3.0))
    assert [k.requires_grad for k in moq.keys] == [False, False, True]
    assert [v.requires_grad for v in moq.values] == [False, False, True]
    assert all(torch.equal(v, torch.zeros_like(v)) for v in moq.values)


def test_orth_loss_zero_for_orthogonal_keys_and_positive_otherwise():
    moq = MixtureOfQueries(2, 3, 4)
    moq.add_task()
    moq.add_task()
    with torch.no_grad():
        moq.keys[0].copy_(torch.tensor([1.0, 0, 0, 0]))
        moq.keys[1].copy_(torch.tensor([0, 2.0, 0, 0]))
        moq.values[0].copy_(torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
        moq.values[1].copy_(torch.tensor([[0, 1.0, 0], [0, 0, 5.0]]))
    assert moq.orth_loss().item() == 0.0
    with torch.no_grad():
        moq.keys[1].copy_(torch.tensor([0.5, 2.0, 0, 0]))  # k_1 . k_0 = 0.5
        moq.values[1][0, 0] = 2.0  # v_1 . v_0 = 2
    assert moq.orth_loss().item() == pytest.approx(0.5**2 + 2.0**2)


def test_key_loss_moves_the_key_not_the_image_summary():
    moq = MixtureOfQueries(2, 3, 4)
    moq.add_task(torch.Generator().manual_seed(0))
    e = torch.randn(3, 4, requires_grad=True)
    loss = moq.key_loss(e)
    loss.backward()
    assert e.grad is None
    assert moq.keys[0].grad is not None and moq.keys[0].grad.abs().sum() > 0
    expected = (1 - torch.nn.functional.cosine_similarity(e.detach(), moq.keys[0].detach()[None], dim=-1)).mean()
    torch.testing.assert_close(loss.detach(), expected)


# --------------------------------------------------------------------------- adapters


def test_untrained_adapters_reproduce_the_frozen_qformer(model):
    image = model.vision_model(pixel_values=torch.randn(3, 3, 32, 32)).last_hidden_state
    q = model.query_tokens.expand(3, -1, -1)
    before = model.qformer(query_embeds=q, encoder_hidden_states=image).last_hidden_state
    adapters = QFormerAdapters(model.qformer, AdapterSizes(attn_width=5, ffn_width=12))
    # 2 layers x (self, cross, ffn)
    assert adapters.site_names == ["L0.self", "L0.cross", "L0.ffn", "L1.self", "L1.cross", "L1.ffn"]
    adapters.expand(torch.Generator().manual_seed(0))
    handles = install_adapters(model.qformer, adapters.site_names, lambda: adapters)
    try:
        after = model.qformer(query_embeds=q, encoder_hidden_states=image).last_hidden_state
        assert torch.equal(after, before)
        # The hooks are live: a non-zero up-projection on one site changes the output.
        with torch.no_grad():
            adapters.bank("L1.cross").adapters[0].up.weight.normal_()
        changed = model.qformer(query_embeds=q, encoder_hidden_states=image).last_hidden_state
        assert not torch.allclose(changed, before)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(model.qformer(query_embeds=q, encoder_hidden_states=image).last_hidden_state, before)


def test_adapter_is_linear_parallel_branch_with_scale(model):
    """The site's block computes LayerNorm(dense(h) + x + 4 * A(x))."""
    adapters = QFormerAdapters(model.qformer, AdapterSizes(attn_width=5, ffn_width=12, scale=4.0))
    adapters.expand(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_()
    block = model.qformer.encoder.layer[0].output_query
    h, x = torch.randn(2, N_QUERY, 128), torch.randn(2, N_QUERY, 64)
    a = adapters.bank("L0.ffn").adapters[0]
    expected = block.LayerNorm(block.dense(h) + x + 4.0 * a.up(a.down(x)))
    handles = install_adapters(model.qformer, ["L0.ffn"], lambda: adapters)
    try:
        torch.testing.assert_close(block(h, x), expected)
        # Linear: A(2x) = 2 A(x) - A(0)
        torch.testing.assert_close(a(2 * x), 2 * a(x) - a(torch.zeros_like(x)))
    finally:
        for h_ in handles:
            h_.remove()


def test_new_adapter_is_the_average_and_old_ones_freeze(model):
    adapters = QFormerAdapters(model.qformer, AdapterSizes(attn_width=5, ffn_width=12))
    g = torch.Generator().manual_seed(0)
    adapters.expand(g)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_()
    adapters.expand(g)
    with torch.no_grad():
        for p in adapters.current_parameters():
            p.normal_()
    adapters.expand(g)
    bank = adapters.bank("L0.self")
    for name, p in bank.adapters[2].named_parameters():
        old = [dict(bank.adapters[i].named_parameters())[name] for i in range(2)]
        torch.testing.assert_close(p, (old[0] + old[1]) / 2)
    assert [a.up.weight.requires_grad for a in bank.adapters] == [False, False, True]
    # All active, averaged, scaled.
    x = torch.randn(4, 64)
    torch.testing.assert_close(bank(x), 4.0 * sum(a(x) for a in bank.adapters) / 3)


# --------------------------------------------------------------------------- FeDEx


def test_fedex_score_matches_the_sign_of_the_second_order_change_on_a_quadratic():
    """Old loss L(w) = 0.5 (w - a)^T H (w - a), H diagonal: its second-order expansion is
    exact, so the change after the step -g_new is known in closed form."""
    g = torch.Generator().manual_seed(0)
    seen_above = seen_below = 0
    for trial in range(400):
        d = 6
        h = torch.rand(d, generator=g, dtype=torch.float64) * 3
        a = torch.randn(d, generator=g, dtype=torch.float64)
        w = torch.randn(d, generator=g, dtype=torch.float64)
        g_new = torch.randn(d, generator=g, dtype=torch.float64) * float(torch.rand((), generator=g) * 2)
        loss = lambda v: 0.5 * ((v - a) ** 2 * h).sum()  # noqa: E731
        g_old = h * (w - a)
        change = loss(w - g_new) - loss(w)
        harm, gain, s = interference([g_old], [h], [g_new])
        torch.testing.assert_close(torch.tensor(harm - gain, dtype=torch.float64), change)
        assert (s <= 0.5) == (change.item() <= 0), (trial, s, change)
        seen_above += s > 0.5
        seen_below += s <= 0.5
        threshold = float(torch.rand((), generator=g))
        fedex = FeDEx(FisherSettings(threshold=threshold))
        fedex.record(0, GradStats(0, [g_old], [h], 1))
        fedex.record(1, GradStats(1, [-g_old], [h], 1))  # another adapter's task: not consulted
        assert fedex.should_expand([g_new], adapter_index=0) == (s > threshold)
        assert set(fedex.last_scores) == {0}
    assert seen_above > 50 and seen_below > 50  # both outcomes exercised


def test_fedex_expands_if_any_earlier_task_on_the_adapter_is_harmed():
    fedex = FeDEx(FisherSettings(threshold=0.5))
    g_new = [torch.tensor([1.0, 0.0])]
    fedex.record(0, GradStats(0, [torch.tensor([1.0, 0.0])], [torch.zeros(2)], 1))  # aligned: S = 0
    assert not fedex.should_expand(g_new, 0)
    fedex.record(1, GradStats(0, [torch.tensor([-1.0, 0.0])], [torch.zeros(2)], 1))  # opposed: S = 1
    assert fedex.should_expand(g_new, 0)
    assert fedex.last_scores == {0: 0.0, 1: 1.0}
    assert interference([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)])[2] == 0.0


def test_minibatch_fisher_is_the_mean_of_squared_batch_gradients():
    # ECA's update_Q_fisher: one gradient per training mini-batch; g and F are running
    # means over the batches (a short last batch counts as one batch).
    w = torch.nn.Parameter(torch.randn(3))
    xs, ys = torch.randn(10, 3), torch.randn(10)
    batches = [(xs[i : i + 4], ys[i : i + 4]) for i in range(0, 10, 4)]  # 4, 4, 2
    loss_fn = lambda b: ((b[0] @ w - b[1]) ** 2).mean()  # noqa: E731
    mean, fisher, n = gradient_stats([w], batches, loss_fn, lambda b: len(b[0]))
    # d/dw mean_i (x_i.w - y_i)^2 = 2/|b| sum_i (x_i.w - y_i) x_i, written out by hand.
    per_batch = [2 * ((x @ w - y)[:, None] * x).sum(0).detach() / len(x) for x, y in batches]
    assert n == 10
    torch.testing.assert_close(mean[0], sum(per_batch) / 3)
    torch.testing.assert_close(fisher[0], sum(g**2 for g in per_batch) / 3)
    # Not the per-sample Fisher: batching shrinks its variance part.
    per_sample = torch.stack([2 * (xs[i] @ w - ys[i]) * xs[i] for i in range(10)]).detach()
    assert (fisher[0] < (per_sample**2).mean(0)).all()


def test_eca_fisher_defaults_are_ecas():
    from cl_methods.eca import ECAConfig

    cfg = ECAConfig()
    assert cfg.fisher_batch_size == 16 and cfg.fisher_max_samples is None  # ECA: batch 16, whole loader
    assert cfg.fisher().batch_size == 16 and ECAConfig(fisher_batch_size=1).fisher().batch_size == 1


def test_gradient_stats_are_per_sample_mean_and_empirical_fisher():
    w = torch.nn.Parameter(torch.randn(3))
    xs, ys = torch.randn(7, 3), torch.randn(7)
    batches = [(xs[i : i + 1], ys[i : i + 1]) for i in range(7)]
    loss_fn = lambda b: ((b[0] @ w - b[1]) ** 2).mean()  # noqa: E731
    mean, fisher, n = gradient_stats([w], batches, loss_fn, lambda b: len(b[0]))
    per = torch.stack([2 * (xs[i] @ w - ys[i]) * xs[i] for i in range(7)]).detach()
    assert n == 7
    torch.testing.assert_close(mean[0], per.mean(0))
    torch.testing.assert_close(fisher[0], (per**2).mean(0))
    assert w.grad is None  # the engine's .grad is left alone


# --------------------------------------------------------------------------- dictionary


def test_every_atom_carries_data_with_fewer_samples_than_atoms():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(2, 12, generator=g)
    data = torch.rand(5, 2, generator=g) @ basis  # 5 samples in a 2-dim cone, 16 atoms
    d = OnlineDictionary(DictionarySettings(size=16, alpha=0.05, max_iter=300), dim=12)
    d._init_atoms(data, g)
    init = d.atoms.clone()  # 5 data atoms + 11 random unit vectors
    assert not d.fitted[5:].any()
    d.partial_fit(data, g)
    assert d.fitted.all()
    used = d.A.diagonal() > 1e-6
    assert (~used).any()  # the case that matters: some atoms no code touched
    cos = torch.nn.functional.normalize(d.atoms, dim=1) @ torch.nn.functional.normalize(data, dim=1).T
    for j in range(16):
        # An unused atom is re-drawn from a sample (1% noise); a used one moved by BCD.
        assert used[j] or cos[j].max() > 0.99, j
        if j >= 5:
            assert not torch.allclose(d.atoms[j], init[j], atol=1e-3), j
    assert (d.atoms.norm(dim=1) <= 1 + 1e-5).all()


def test_nonnegative_sparse_codes_match_sklearn():
    from sklearn.decomposition import sparse_encode

    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(24, 10, generator=g, dtype=torch.float64)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    x = torch.randn(20, 10, generator=g, dtype=torch.float64) * 2
    for alpha in (0.3, 1.0):
        ours = sparse_encode_nonneg(x, dictionary, alpha, max_iter=5000, tol=1e-10)
        ref = torch.from_numpy(
            sparse_encode(x.numpy(), dictionary.numpy(), algorithm="lasso_cd", alpha=alpha, positive=True, max_iter=10000)
        )
        assert (ours >= 0).all()
        assert (ours == 0).float().mean() > 0.4  # sparse
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=2e-4)
        assert torch.equal(ours > 1e-6, ref > 1e-6)  # same support
        obj_ours, obj_ref = lasso_objective(x, dictionary, ours, alpha), lasso_objective(x, dictionary, ref, alpha)
        assert (obj_ours <= obj_ref + 1e-6).all()


def test_online_dictionary_atoms_bounded_and_fit_improves():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 12, generator=g)
    data = torch.rand(400, 6, generator=g) ** 3 @ basis  # non-negative mixtures of 6 directions
    d = OnlineDictionary(DictionarySettings(size=16, alpha=0.05, max_iter=300), dim=12)
    d.partial_fit(data[:50], g)
    before = lasso_objective(data[300:], d.atoms, d.encode(data[300:]), 0.05).mean()
    for i in range(1, 6):
        d.partial_fit(data[i * 50 : (i + 1) * 50], g)
    after = lasso_objective(data[300:], d.atoms, d.encode(data[300:]), 0.05).mean()
    assert d.atoms.shape == (16, 12)
    assert (d.atoms.norm(dim=1) <= 1 + 1e-5).all()
    assert after < 0.9 * before
    assert d.n_seen == 300
    atoms = d.sample(5, torch.Generator().manual_seed(1))
    assert atoms.shape == (5, 12)


# --------------------------------------------------------------------------- the method


def make_method(model, n_tasks: int = 2, **overrides):
    from cl_methods import build_method

    cfg = {
        "adapter_attn_width": 4,
        "adapter_ffn_width": 8,
        "dictionary_size": 24,
        "sparsity": 0.1,
        "patches_per_image": 4,
        "dictionary_max_images": 16,
        "dictionary_batch_size": 32,
        "fisher_max_samples": 6,
        "replay_batch_size": 8,
        "sparse_max_iter": 100,
        **overrides,
    }
    method = build_method("eca", cfg)
    ctx = MethodContext(
        tasks=[f"t{i}" for i in range(n_tasks)],
        train_sets=[samples(12, seed=10 + i, shift=float(i)) for i in range(n_tasks)],
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    method.setup(model, None, ctx)
    return method


def train_task(method, t: int, steps: int = 3, lr: float = 5e-2):
    method.ctx.generator.manual_seed(100 + t)
    torch.manual_seed(200 + t)  # dropout draws from the global generator (as the engine reseeds it)
    method.before_task(t, None)
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=lr, weight_decay=0.05)
    data = method.ctx.train_sets[t]
    terms = {}
    for s in range(steps):
        terms = method.training_loss(collate(data[4 * s : 4 * s + 4]), t)
        sum(terms.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    method.after_task(t, None)
    return terms


@pytest.fixture()
def fresh_model():
    return tiny_blip2()


def test_untrained_method_equals_frozen_blip2(fresh_model):
    batch = collate(samples(3, seed=3))
    plain = fresh_model(**batch).logits
    method = make_method(fresh_model)
    method.before_task(0, None)  # first key + zero queries, first adapter (zero up-projection)
    assert method.adapters.num_adapters == 1 and method.moq.num_tasks == 1
    torch.testing.assert_close(fresh_model(**batch).logits, plain, rtol=0, atol=0)
    method.remove_hooks()


def test_old_parts_bit_identical_after_next_task_and_replay_zero_when_unchanged(fresh_model):
    method = make_method(fresh_model, expansion="always")
    terms0 = train_task(method, 0)
    assert "replay" not in terms0 and set(terms0) >= {"ce", "orth", "key"}
    # Right after a task the old model is the current one: nothing to replay against.
    assert method.replay_loss().item() == 0.0
    old_adapter = {n: p.detach().clone() for n, p in method.adapters.named_parameters()}
    old_key, old_v = method.moq.keys[0].detach().clone(), method.moq.values[0].detach().clone()
    assert not torch.equal(old_v, torch.zeros_like(old_v))  # task 0 trained its queries
    terms1 = train_task(method, 1)
    assert terms1["replay"].item() > 0
    assert method.expanded == [True, True] and method.adapter_of_task == [0, 1]
    assert torch.equal(method.moq.keys[0], old_key) and torch.equal(method.moq.values[0], old_v)
    for n, p in method.adapters.named_parameters():
        if n in old_adapter:
            assert torch.equal(p, old_adapter[n]), n
    # The new adapter did train.
    new = method.adapters.bank("L0.ffn").adapters[1].up.weight
    assert not torch.equal(new, method.adapters.bank("L0.ffn").adapters[0].up.weight)
    method.remove_hooks()


def test_replay_zero_for_an_unchanged_model_without_moq(fresh_model):
    method = make_method(fresh_model, moq=False, expansion="always")
    train_task(method, 0)
    method.before_task(1, None)  # a copy of the one old adapter: same function
    assert method.adapters.num_adapters == 2
    assert method.replay_loss().item() == 0.0
    with torch.no_grad():
        method.adapters.current_parameters()[1].add_(0.1)
    assert method.replay_loss().item() > 0
    method.remove_hooks()


def test_fedex_decides_expansion_from_the_stored_stats(fresh_model):
    method = make_method(fresh_model, fisher_threshold=0.5)
    train_task(method, 0)
    assert method.fedex.tasks[0].adapter_index == 0
    method.before_task(1, None)
    s = method.fedex.last_scores[0]
    assert 0.0 <= s <= 1.0
    assert method.expanded[1] == (s > 0.5)
    assert method.adapters.num_adapters == (2 if s > 0.5 else 1)
    method.remove_hooks()


@pytest.mark.parametrize("threshold, expected", [(0.0, True), (1.0, False)])
def test_fedex_threshold_extremes(fresh_model, threshold, expected):
    method = make_method(fresh_model, fisher_threshold=threshold)
    train_task(method, 0)
    method.before_task(1, None)
    assert method.expanded == [True, expected]
    method.remove_hooks()


def test_single_adapter_never_expands(fresh_model):
    method = make_method(fresh_model, n_tasks=3, expansion="never", replay=False)
    for t in range(3):
        train_task(method, t, steps=1)
    assert method.adapters.num_adapters == 1 and method.expanded == [True, False, False]
    assert method.fedex.tasks == {}  # no Fisher passes when nothing is decided
    method.remove_hooks()


def test_state_dict_round_trip_is_exact():
    model_a = tiny_blip2()
    a = make_method(model_a, n_tasks=3)
    train_task(a, 0)
    train_task(a, 1)
    state = copy.deepcopy(a.state_dict())

    model_b = tiny_blip2()
    b = make_method(model_b, n_tasks=3)
    b.load_state_dict(state)
    for (na, pa), (nb, pb) in zip(a.modules.state_dict().items(), b.modules.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    assert [p.requires_grad for p in a.modules.parameters()] == [p.requires_grad for p in b.modules.parameters()]
    assert torch.equal(a.dictionary.atoms, b.dictionary.atoms) and torch.equal(a.dictionary.A, b.dictionary.A)
    assert a.fedex.tasks.keys() == b.fedex.tasks.keys()
    for t in a.fedex.tasks:
        assert all(torch.equal(x, y) for x, y in zip(a.fedex.tasks[t].fisher, b.fedex.tasks[t].fisher))
    assert a.adapter_of_task == b.adapter_of_task
    # Continuing both gives the same losses (replay included: same old model, atoms, draws).
    ta, tb = train_task(a, 2), train_task(b, 2)
    assert ta.keys() == tb.keys() and "replay" in ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    a.remove_hooks()
    b.remove_hooks()


def test_ablations_are_valid_configs():
    from cl_methods import get_method_class

    cls = get_method_class("eca")
    assert set(cls.ablations) == {"full", "no_moq", "single_adapter", "adapter_per_task", "no_replay"}
    for overrides in cls.ablations.values():
        cls.Config.model_validate(overrides)
    with pytest.raises(ValueError):
        cls.Config.model_validate({"fisher_treshold": 0.3})


def test_replay_feeds_atoms_as_one_token_images_to_old_and_current_model(fresh_model):
    method = make_method(fresh_model, expansion="never")
    train_task(method, 0)
    method.before_task(1, None)
    gen_state = method.ctx.generator.get_state()
    atoms = method.dictionary.sample(method.config.replay_batch_size, method.ctx.generator)
    method.ctx.generator.set_state(gen_state)
    seen: list[torch.Tensor] = []
    handle = fresh_model.qformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True
    )
    try:
        loss = method.replay_loss()
    finally:
        handle.remove()
    assert len(seen) == 2  # the old model, then the current one
    for enc in seen:
        assert enc.shape == (len(atoms), 1, 64)
        torch.testing.assert_close(enc[:, 0], atoms)
    # The MoQ summary of a 1-token image is the token itself (there is no CLS to drop).
    torch.testing.assert_close(method.moq_hook.last_summary, atoms)
    with torch.no_grad(), method.using(method._old, has_cls=False):
        old = method.query_outputs(atoms[:, None])
    with torch.no_grad(), method.using(method._live, has_cls=False):
        new = method.query_outputs(atoms[:, None])
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(new, old))
    assert old.shape == (len(atoms), N_QUERY, 64)  # projected to the LM width
    method.remove_hooks()


def test_no_moq_keeps_the_pretrained_queries(fresh_model):
    method = make_method(fresh_model, moq=False, replay=False, expansion="never")
    terms = train_task(method, 0)
    assert set(terms) == {"ce"} and method.moq is None
    seen: list[torch.Tensor] = []
    handle = fresh_model.qformer.layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        fresh_model(**collate(samples(2, seed=5)))
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], fresh_model.query_tokens.expand(2, -1, -1), rtol=0, atol=0)
    method.remove_hooks()


# --------------------------------------------------------------------------- what trains, and in which mode


def eca_trainable_count(qformer_layers, cross_every, hidden, attn_width, ffn_width, vision_width, n_query, lm_width):
    """ECA's trainable parameters from the model dims alone: one adapter per site
    (self and FFN on every Q-Former layer, cross on every ``cross_every``-th), one task's
    key and queries, and the Q-Former-to-LLM projection (weights and biases)."""
    adapter = lambda w: hidden * w + w + w * hidden + hidden  # noqa: E731 - down + up, with biases
    n_cross = len(range(0, qformer_layers, cross_every))
    adapters = qformer_layers * (adapter(attn_width) + adapter(ffn_width)) + n_cross * adapter(attn_width)
    return adapters + (vision_width + n_query * hidden) + (hidden * lm_width + lm_width)


def test_trainable_count_formula_gives_ecas_12_29m_on_blip2_opt_2_7b():
    # BLIP-2 OPT-2.7B: Q-Former 12 x 768 (cross-attention every 2nd layer), 32 queries,
    # ViT-g 1408, OPT 2560; ECA's widths 30 / 512. The paper's figures, term by term.
    assert eca_trainable_count(12, 2, 768, 30, 512, 1408, 32, 2560) == 12_290_972
    assert eca_trainable_count(12, 2, 768, 30, 512, 0, 0, 0) == 10_296_348  # the adapters alone


def test_trainable_parameters_include_the_projection_and_it_trains(fresh_model):
    method = make_method(fresh_model, expansion="never", replay=False)
    method.before_task(0, None)
    params = method.trainable_parameters()
    proj = fresh_model.language_projection
    assert all(p.requires_grad for p in proj.parameters())
    assert {id(p) for p in proj.parameters()} <= {id(p) for p in params}
    # The tiny model: Q-Former 2 x 64 with cross-attention on both layers, widths 4 / 8,
    # ViT 64, 8 queries, OPT 64.
    assert sum(p.numel() for p in params) == eca_trainable_count(2, 1, 64, 4, 8, 64, N_QUERY, 64)
    before = proj.weight.detach().clone()
    method.remove_hooks()
    method = make_method(tiny_blip2(), expansion="never", replay=False)
    train_task(method, 0)
    assert not torch.equal(method.model.language_projection.weight, before)
    frozen = make_method(tiny_blip2(), train_projection=False)
    frozen.before_task(0, None)
    assert not any(p.requires_grad for p in frozen.model.language_projection.parameters())
    method.remove_hooks()
    frozen.remove_hooks()


def test_replay_target_uses_the_old_projection(fresh_model):
    method = make_method(fresh_model, moq=False, expansion="always")
    train_task(method, 0)
    method.before_task(1, None)  # the new adapter copies the old one: same function
    assert method.replay_loss().item() == 0.0
    with torch.no_grad():
        method.model.language_projection.weight.add_(0.05)
    # Were the current projection the target's, the loss would stay 0.
    loss = method.replay_loss()
    assert loss.item() > 0
    old_proj = method._old.projection
    assert old_proj is not method.model.language_projection and not old_proj.weight.requires_grad
    method.remove_hooks()


def _mode_recorder(model):
    log: list[tuple[str, str, bool]] = []
    phase = {"now": ""}
    handles = []
    for m in model.qformer.modules():
        if isinstance(m, torch.nn.Dropout):
            handles.append(m.register_forward_hook(lambda mod, a, o: log.append((phase["now"], "qformer", mod.training))))
    # OPT and the ViT apply dropout functionally, gated by each layer's own .training.
    for name, layers in (("llm", model.language_model.model.decoder.layers), ("vision", model.vision_model.encoder.layers)):
        for layer in layers:
            handles.append(layer.register_forward_hook(lambda mod, a, o, n=name: log.append((phase["now"], n, mod.training))))
    return log, phase, handles


def _modes(log, phase):
    out: dict[str, set] = {}
    for p, part, training in log:
        if p == phase:
            out.setdefault(part, set()).add(training)
    return out


@pytest.mark.parametrize("dropout, fisher_dropout", [("lavis", True), ("qformer", False)])
def test_dropout_is_on_in_training_steps_and_off_in_eval_and_dictionary(fresh_model, dropout, fisher_dropout):
    method = make_method(fresh_model, dropout=dropout, fisher_dropout=fisher_dropout)
    log, phase, handles = _mode_recorder(fresh_model)
    try:
        train_task(method, 0, steps=1)
        method.before_task(1, None)
        phase["now"] = "train"
        method.training_loss(collate(method.ctx.train_sets[1][:4]), 1)
        phase["now"] = "fisher"
        method._grad_stats(1, with_fisher=True)
        phase["now"] = "dictionary"
        method._fit_dictionary(1)
        phase["now"] = "eval"
        method.predict(collate(samples(2, seed=7)), None)
    finally:
        for h in handles:
            h.remove()
    train = _modes(log, "train")
    # Q-Former on (the old model's replay forward off: both seen), LLM as LAVIS, ViT off.
    assert train["qformer"] == {True, False}
    assert train["llm"] == ({True} if dropout == "lavis" else {False})
    assert train["vision"] == {False}
    fisher = _modes(log, "fisher")
    assert fisher["qformer"] == {fisher_dropout} and fisher["vision"] == {False}
    assert fisher["llm"] == {fisher_dropout and dropout == "lavis"}
    assert _modes(log, "dictionary") == {"vision": {False}}  # the ViT alone, in eval
    assert all(v == {False} for v in _modes(log, "eval").values()) and _modes(log, "eval")
    method.remove_hooks()


def test_replay_old_forward_in_eval_current_in_train(fresh_model):
    method = make_method(fresh_model, expansion="never")
    train_task(method, 0, steps=1)
    method.before_task(1, None)
    seen: list[bool] = []
    drop = next(m for m in fresh_model.qformer.modules() if isinstance(m, torch.nn.Dropout))
    h = fresh_model.qformer.register_forward_pre_hook(lambda m, a, kw: seen.append(drop.training), with_kwargs=True)
    try:
        method.training_loss(collate(method.ctx.train_sets[1][:4]), 1)
    finally:
        h.remove()
    assert seen == [True, False, True]  # the step, the old model (eval), the current model
    method.remove_hooks()


def test_fedex_measures_the_new_gradient_before_the_new_key(fresh_model):
    method = make_method(fresh_model, fisher_threshold=0.0)
    train_task(method, 0, steps=1)
    keys_seen: list[int] = []
    orig = method._grad_stats
    method._grad_stats = lambda t, with_fisher: (keys_seen.append(method.moq.num_tasks), orig(t, with_fisher))[1]
    method.before_task(1, None)
    assert keys_seen == [1] and method.moq.num_tasks == 2
    method.remove_hooks()


def test_every_replayed_atom_was_fitted_on_data(fresh_model):
    method = make_method(fresh_model, dictionary_size=24, dictionary_max_images=2, patches_per_image=4)
    train_task(method, 0, steps=1)  # 2 images x 4 patches = 8 patches for 24 atoms
    d = method.dictionary
    assert d.fitted.all()
    # No atom is a random unit vector: each is a (re-drawn) patch or was updated by codes.
    used = d.A.diagonal() > 1e-6
    assert (~used).any()
    patches = method.image_embeds(collate(method.ctx.train_sets[0]))[:, 1:].reshape(-1, 64).float()
    cos = torch.nn.functional.normalize(d.atoms, dim=1) @ torch.nn.functional.normalize(patches, dim=1).T
    assert (used | (cos.max(1).values > 0.99)).all()
    method.remove_hooks()
