"""DAGR graph mathematics (cl_methods/_dagr_graph.py): mechanism tests on synthetic tensors.

The synthetic capture: every layer has tokens in K well-separated directions (token n
belongs to cluster n % K in every layer) and attention logits with a cluster-to-cluster
pattern plus noise, so nodes, edges and the old/new split are known by construction.
"""

from __future__ import annotations

import io

import pytest
import torch

from cl_methods import _dagr_graph as dg

B, N, D, H, L, K = 3, 30, 16, 2, 4, 6
NEW = (4, 5)  # clusters treated as new-class in the masking tests


def capture(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per-layer tokens [B, N, D], attention logits [B, H, N, N], and the K true directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:K]  # orthonormal rows
    label = torch.arange(N) % K
    tokens, attn = [], []
    for layer in range(L):
        tokens.append(3.0 * dirs[label].expand(B, N, D) + 0.05 * torch.randn(B, N, D, generator=g))
        # Cluster a attends mostly to cluster (a + layer) % K, on top of noise.
        target = (label[:, None] + layer) % K == label[None, :]
        attn.append(1.5 * torch.randn(B, H, N, N, generator=g) + 2.0 * target.float())
    return tokens, attn, dirs


def config(**kw) -> dg.GraphConfig:
    base = {"num_nodes": K, "topk": 4, "temperature": 0.05}
    return dg.GraphConfig(**{**base, **kw})


def stored_graph(tokens, attn, cfg: dg.GraphConfig) -> dg.TaskGraph:
    centroids = dg.fit_nodes([t.reshape(-1, D) for t in tokens], cfg)
    return dg.build_graph([(tokens, attn)], centroids, cfg)


def losses(tokens, attn, stored, **kw) -> dict[str, torch.Tensor]:
    return dg.graph_losses(dg.current_graph(tokens, attn, stored), stored, **kw)


def node_of(stored: dg.TaskGraph, layer: int, direction: torch.Tensor) -> int:
    c = stored.layers[layer].centroids.float()
    return int(torch.nn.functional.cosine_similarity(c, direction[None], dim=-1).argmax())


# --------------------------------------------------------------------------- kmeans
def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    centers = 10.0 * torch.eye(8)[:5]
    x = centers.repeat_interleave(40, 0) + 0.1 * torch.randn(200, 8, generator=g)
    x = x[torch.randperm(200, generator=g)]
    c = dg.kmeans(x, 5, seed=3, iters=50)
    assert c.shape == (5, 8)
    # Every true centre has exactly one centroid close to it.
    d = torch.cdist(centers, c)
    assert (d.min(1).values < 0.1).all()
    assert sorted(d.argmin(1).tolist()) == list(range(5))
    assert torch.equal(c, dg.kmeans(x, 5, seed=3, iters=50))
    with pytest.raises(ValueError, match="cannot give"):
        dg.kmeans(x[:3], 5)


# --------------------------------------------------------------------------- exact zero
@pytest.mark.parametrize("topk", [None, 4])
@pytest.mark.parametrize("path_similarity", ["centroids", "prototypes"])
def test_losses_exactly_zero_for_identical_inputs(topk, path_similarity):
    tokens, attn, _ = capture()
    cfg = config(topk=topk, path_similarity=path_similarity)
    stored = stored_graph(tokens, attn, cfg)
    # Through a checkpoint round trip, as a resumed run would see it.
    buf = io.BytesIO()
    torch.save(stored.state_dict(), buf)
    buf.seek(0)
    stored = dg.TaskGraph.from_state_dict(torch.load(buf, weights_only=True))
    current = dg.current_graph(tokens, attn, stored)
    # Not trivially zero: every node is matched as old, so every row is compared.
    for c, s in zip(current.layers, stored.layers):
        assert dg.old_node_mask(c.prototypes, s.prototypes, 0.8, c.mass, s.mass, 1e-4).all()
    out = dg.graph_losses(current, stored)
    assert set(out) == {"edge", "multi", "path"}
    for name, value in out.items():
        assert value.item() == 0.0, name


# --------------------------------------------------------------------------- growth
@pytest.mark.parametrize("what", ["attn", "tokens"])
def test_losses_grow_with_perturbation_size(what):
    tokens, attn, _ = capture()
    # A softer assignment than elsewhere, so that moving tokens moves their node weights.
    stored = stored_graph(tokens, attn, config(temperature=0.2))
    g = torch.Generator().manual_seed(7)
    noise_a, noise_t = torch.randn(B, H, N, N, generator=g), torch.randn(B, N, D, generator=g)
    scales = (0.3, 1.0, 3.0) if what == "attn" else (0.1, 0.25, 0.5)
    previous = {"edge": 0.0, "multi": 0.0, "path": 0.0}
    for scale in scales:
        a, t = list(attn), list(tokens)
        if what == "attn":  # block 1: layer 1's edges and the transition 0 -> 1 run through it
            a[1] = a[1] + scale * noise_a
        else:
            t[1] = t[1] + scale * noise_t
        out = losses(t, a, stored)
        for name, value in out.items():
            assert value.item() > previous[name], (name, scale, value.item(), previous[name])
            previous[name] = value.item()


def test_shallow_layers_weigh_more():
    tokens, attn, _ = capture()
    # Identical layers, so a perturbation costs the same before weighting.
    tokens, attn = [tokens[0]] * L, [attn[0]] * L
    stored = stored_graph(tokens, attn, config())
    noise = torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(3))
    cost = {}
    for layer in (0, L - 1):
        a = list(attn)
        a[layer] = a[layer] + noise
        cost[layer] = losses(tokens, a, stored, decay=0.7)
    for name in ("edge", "multi"):
        assert cost[0][name] > cost[L - 1][name] > 0, name
        ratio = (cost[0][name] / cost[L - 1][name]).item()
        assert ratio == pytest.approx(0.7 ** -(L - 1), rel=1e-3)
    # decay = 1: equal weights
    w = dg.layer_weights(L, 1.0)
    assert torch.allclose(w, torch.full((L,), 1.0 / L))
    w = dg.layer_weights(L, 0.5)
    assert w.sum().item() == pytest.approx(1.0) and (w[:-1] > w[1:]).all()


# --------------------------------------------------------------------------- masking
def test_edges_of_new_nodes_contribute_nothing_graph_level():
    """Entries with mask 0 are never read: perturbing them leaves every loss at exactly 0."""
    tokens, attn, dirs = capture()
    stored = stored_graph(tokens, attn, config())
    current = dg.current_graph(tokens, attn, stored)
    g = torch.Generator().manual_seed(5)
    old = []
    for layer, lg in enumerate(current.layers):
        new = [node_of(stored, layer, dirs[c]) for c in NEW]
        protos = lg.prototypes.detach().clone()
        protos[new] = -protos[new]  # current prototype far from the stored one: new class
        is_old = torch.ones(K, dtype=torch.bool)
        is_old[new] = False
        old.append(is_old)
        edges = lg.edges.detach().clone()
        m = dg.edge_mask(is_old) == 0
        edges[m] = torch.rand(int(m.sum()), generator=g)  # all rows and columns of new nodes
        current.layers[layer] = dg.LayerGraph(lg.centroids, protos, lg.mass, edges)
    for layer, t in enumerate(current.transitions):
        t = t.detach().clone()
        m = dg.edge_mask(old[layer + 1], old[layer]) == 0
        t[m] = torch.rand(int(m.sum()), generator=g)
        current.transitions[layer] = t
    inferred = [dg.old_node_mask(c.prototypes, s.prototypes, 0.8) for c, s in zip(current.layers, stored.layers)]
    assert all(torch.equal(a, b) for a, b in zip(inferred, old))
    for name, value in dg.graph_losses(current, stored).items():
        assert value.item() == 0.0, name
    # Control: the same kind of change on a kept old-old edge is seen.
    kept = current.layers[0].edges * dg.edge_mask(old[0])
    i, j = divmod(int(kept.argmax()), K)
    current.layers[0].edges[i, j] *= 3.0
    out = dg.graph_losses(current, stored)
    assert out["edge"].item() > 0 and out["multi"].item() > 0


def test_attention_among_new_tokens_contributes_nothing():
    """Token level: perturbing what new-class tokens attend to leaves the loss ~0 (only the
    soft-assignment tails leak), while the same perturbation on old tokens is seen."""
    tokens, attn, dirs = capture()
    stored = stored_graph(tokens, attn, config())
    label = torch.arange(N) % K
    old = []
    for layer in range(L):
        is_old = torch.ones(K, dtype=torch.bool)
        is_old[[node_of(stored, layer, dirs[c]) for c in NEW]] = False
        old.append(is_old)
    noise = 3.0 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(9))
    new_rows = torch.isin(label, torch.tensor(NEW))
    cost = {}
    for rows, name in ((new_rows, "new"), (~new_rows, "old")):
        a = [x + noise * rows[None, None, :, None].float() for x in attn]
        cost[name] = losses(tokens, a, stored, old=old)
    for term in ("edge", "multi", "path"):
        assert cost["old"][term].item() > 1e-3, term
        assert cost["new"][term].item() < 1e-6 * cost["old"][term].item(), term
    # The same perturbation is seen when those nodes count as old: the mask did the work.
    unmasked = losses(tokens, [x + noise * new_rows[None, None, :, None].float() for x in attn], stored)
    for term in ("edge", "multi", "path"):
        assert unmasked[term].item() > 1e-3, term


def test_old_node_mask_detects_moved_nodes():
    tokens, attn, dirs = capture()
    stored = stored_graph(tokens, attn, config())
    label = torch.arange(N) % K
    moved = [t.clone() for t in tokens]
    for t in moved:
        t[:, label == NEW[0]] = 3.0 * dirs[NEW[1]]  # cluster NEW[0]'s tokens now look like NEW[1]
    current = dg.current_graph(moved, attn, stored)
    lg, sg = current.layers[0], stored.layers[0]
    old = dg.old_node_mask(lg.prototypes, sg.prototypes, 0.8, lg.mass, sg.mass, 1e-4)
    gone = node_of(stored, 0, dirs[NEW[0]])
    assert not old[gone]  # its tokens left: no mass, no prototype
    assert old.sum().item() == K - 1


# --------------------------------------------------------------------------- pieces
def test_topk_keeps_exactly_k_per_row():
    tokens, attn, _ = capture()
    stored = stored_graph(tokens, attn, config(topk=3))
    for layer in stored.layers:
        assert ((layer.edges > 0).sum(-1) == 3).all()
        assert torch.allclose(layer.edges.sum(-1), torch.ones(K))
    for t in stored.transitions:
        assert ((t > 0).sum(-1) == 3).all()
    x = torch.rand(5, 9) + 0.01
    assert ((dg.topk_sparsify(x, 4) > 0).sum(-1) == 4).all()
    assert torch.equal(dg.topk_sparsify(x, None) > 0, torch.ones(5, 9, dtype=torch.bool))
    # The kept entries are the largest ones.
    kept = dg.topk_sparsify(x, 4)
    assert (kept.masked_fill(kept == 0, float("inf")).min(-1).values >= 0).all()
    assert torch.equal((kept > 0), dg.topk_mask(x, 4))
    assert (x.masked_fill(kept > 0, -1).max(-1).values <= x.masked_fill(kept == 0, 2).min(-1).values).all()


def test_rollout_and_flow_rows_sum_to_one():
    g = torch.Generator().manual_seed(2)
    layers = [torch.softmax(torch.randn(2, 7, 7, generator=g), -1) for _ in range(4)]
    r = dg.rollout(layers)
    assert r.shape == (2, 7, 7)
    assert torch.allclose(r.sum(-1), torch.ones(2, 7), atol=1e-6)
    # One layer: exactly 0.5 A + 0.5 I.
    assert torch.allclose(dg.rollout(layers[:1])[0], 0.5 * layers[0][0] + 0.5 * torch.eye(7))
    tokens, attn, _ = capture()
    stored = stored_graph(tokens, attn, config(topk=None))
    s0 = dg.soft_assign(tokens[0], stored.layers[0].centroids, 0.05)
    s1 = dg.soft_assign(tokens[1], stored.layers[1].centroids, 0.05)
    flow = dg.layer_flow(dg.attention_probs(attn[0]), s0, s1)
    assert torch.allclose(flow.sum(-1), torch.ones(K), atol=1e-6)
    for t in stored.transitions:
        assert torch.allclose(t.sum(-1), torch.ones(K), atol=1e-6)
    e = stored.layers[0].edges
    for k in (2, 3):
        assert torch.allclose(dg.multi_hop(e, k).sum(-1), torch.ones(K), atol=1e-6)


def test_gradients_reach_attention_logits_and_tokens():
    tokens, attn, _ = capture()
    stored = stored_graph(tokens, attn, config())
    g = torch.Generator().manual_seed(4)
    a = [(x + 0.5 * torch.randn(x.shape, generator=g)).requires_grad_(True) for x in attn]
    t = [(x + 0.1 * torch.randn(x.shape, generator=g)).requires_grad_(True) for x in tokens]
    out = losses(t, a, stored)
    sum(out.values()).backward()
    for x in a + t:
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(x.grad.abs().sum() > 0 for x in a)
    assert all(x.grad.abs().sum() > 0 for x in t)
    for name, value in out.items():
        assert value.requires_grad, name


def test_stream_of_batches_equals_one_batch():
    """build_graph keeps running sums: two half batches give the graph of the whole batch."""
    tokens, attn, _ = capture()
    cfg = config()
    centroids = dg.fit_nodes([t.reshape(-1, D) for t in tokens], cfg)
    whole = dg.build_graph([(tokens, attn)], centroids, cfg)
    halves = [([t[:1] for t in tokens], [x[:1] for x in attn]), ([t[1:] for t in tokens], [x[1:] for x in attn])]
    split = dg.build_graph(iter(halves), centroids, cfg)
    for a, b in zip(whole.layers, split.layers):
        for key, value in a.tensors().items():
            assert torch.allclose(value.float(), b.tensors()[key].float(), atol=1e-5), key
    for a, b in zip(whole.transitions, split.transitions):
        assert torch.allclose(a, b, atol=1e-5)


def test_stored_size_vit_b16_like():
    """8 prompted layers, D = 512 (CLIP's joint space), default K: about the paper's 0.2 MB."""
    cfg = dg.GraphConfig()
    layers, n = 8, 12
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(2, n, 512, generator=g) for _ in range(layers)]
    attn = [torch.randn(2, 4, n, n, generator=g) for _ in range(layers)]
    feats = [torch.randn(64, 512, generator=g) for _ in range(layers)]
    graph = dg.build_graph([(tokens, attn)], dg.fit_nodes(feats, cfg), cfg)
    size = graph.nbytes()
    print(f"stored DAGR graph: K={cfg.num_nodes}, {layers} layers, D=512: {size} bytes ({size / 1e6:.3f} MB)")
    k = cfg.num_nodes
    expected = layers * (2 * k * 512 * 2 + k * 4 + k * k * 4) + (layers - 1) * k * k * 4
    assert size == expected
    assert 0.1e6 < size < 0.5e6
    moved = graph.to("cpu")
    assert moved.nbytes() == size and moved.layers[0].centroids.dtype == torch.float16


def test_layers_computed_together_equal_the_per_layer_definitions():
    """The accumulator and the losses run all layers stacked (one op per step of the maths,
    not one per layer); each layer must still be exactly what the per-layer definitions
    (node_edges, layer_flow, inter_layer_edges, masked KL per layer) give."""
    tokens, attn, _ = capture(0)
    cfg = config(beta=0.7, residual=0.4, gamma=0.3)
    stored = stored_graph(tokens, attn, cfg)
    cents = [layer.centroids.float() for layer in stored.layers]
    assign = [dg.soft_assign(t, c, cfg.temperature) for t, c in zip(tokens, cents)]
    for layer in range(L):
        ref = dg.node_edges(attn[layer], assign[layer], cfg.beta, cfg.topk)
        torch.testing.assert_close(stored.layers[layer].edges, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stored.layers[layer].prototypes.float(),
                                   dg.prototypes(tokens[layer], assign[layer]).to(cfg.dtype).float())  # fmt: skip
    protos = [layer.prototypes.float() for layer in stored.layers]  # path_similarity="prototypes"
    for layer in range(L - 1):
        # The transition l -> l + 1 runs through block l + 1's attention.
        probs = dg.attention_probs(attn[layer + 1], cfg.beta)
        flow = dg.layer_flow(probs, assign[layer], assign[layer + 1], cfg.residual)
        ref = dg.inter_layer_edges(protos[layer + 1], protos[layer], flow, cfg.gamma, cfg.topk)
        torch.testing.assert_close(stored.transitions[layer], ref, rtol=1e-5, atol=1e-6)

    # Losses of a drifted batch against the per-layer sums of the masked KLs.
    g = torch.Generator().manual_seed(1)
    drifted = [t + 0.5 * torch.randn(t.shape, generator=g) for t in tokens]
    current = dg.current_graph(drifted, attn, stored)
    got = dg.graph_losses(current, stored, lambdas=(1.0, 1.0, 1.0), decay=0.7, hops=(2, 3), tau=0.0)
    old = [dg.old_node_mask(c.prototypes, s.prototypes, 0.0, c.mass, s.mass, 1e-4)
           for c, s in zip(current.layers, stored.layers)]  # fmt: skip
    w, wp = dg.layer_weights(L, 0.7), dg.layer_weights(L - 1, 0.7)

    def masked_kl(p, q, m):
        return dg.kl_rows(dg.row_norm(m * p), dg.row_norm(m * q)).sum() / p.shape[0]

    edge = multi = path = 0.0
    for layer in range(L):
        m = dg.edge_mask(old[layer])
        p, q = stored.layers[layer].edges, current.layers[layer].edges
        edge += w[layer] * masked_kl(p, q, m)
        pm, qm = dg.row_norm(m * p), dg.row_norm(m * q)
        multi += w[layer] * torch.stack([dg.kl_rows(dg.multi_hop(pm, k), dg.multi_hop(qm, k)).sum() / K
                                         for k in (2, 3)]).mean()  # fmt: skip
    for layer in range(L - 1):
        m = dg.edge_mask(old[layer + 1], old[layer])
        path += wp[layer] * masked_kl(stored.transitions[layer], current.transitions[layer], m)
    assert float(got["edge"]) > 0 and float(got["multi"]) > 0 and float(got["path"]) > 0
    torch.testing.assert_close(got["edge"], edge, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["multi"], multi, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["path"], path, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- cross-modal
def class_text(dirs: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Per layer, one class text feature per cluster direction (plus noise): [K, D]."""
    g = torch.Generator().manual_seed(100 + seed)
    return [dirs + 0.1 * torch.randn(K, D, generator=g) for _ in range(L)]


def test_class_text_enters_every_term_and_gets_gradient():
    tokens, attn, dirs = capture()
    text = class_text(dirs)
    cfg = config(temperature=0.2)
    centroids = dg.fit_nodes([dg.fuse(t.reshape(-1, D), t.reshape(-1, D), cfg.alpha) for t in tokens], cfg)
    stored = dg.build_graph([(tokens, attn, text)], centroids, cfg)
    same = dg.graph_losses(dg.current_graph(tokens, attn, stored, text=text), stored)
    assert all(v.item() == 0.0 for v in same.values())
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(K, D, generator=g)
    previous = {"edge": 0.0, "multi": 0.0, "path": 0.0}
    for scale in (0.1, 0.5):  # the text of one layer only (layer 1: in an edge and both transitions)
        z = list(text)
        z[1] = z[1] + scale * noise
        for name, value in dg.graph_losses(dg.current_graph(tokens, attn, stored, text=z), stored).items():
            assert value.item() > previous[name], (name, scale)
            previous[name] = value.item()
    # Gradient reaches the class features of every layer.
    z = [(x + 0.3 * torch.randn(x.shape, generator=g)).requires_grad_(True) for x in text]
    sum(dg.graph_losses(dg.current_graph(tokens, attn, stored, text=z), stored).values()).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in z)
    # Without text the graph is the image-only one: cross_weight plays no part.
    a = dg.build_graph([(tokens, attn)], centroids, cfg)
    b = dg.build_graph([(tokens, attn)], centroids, config(temperature=0.2, cross_weight=0.9))
    assert torch.equal(a.layers[0].edges, b.layers[0].edges)
    assert not torch.equal(a.layers[0].edges, stored.layers[0].edges)


def test_match_recovers_permuted_nodes_and_the_aligned_graph_compares_equal():
    """A later task whose nodes are the same clusters in another order: the match finds the
    order, the stored graph re-indexed by it equals the current graph, the losses are ~0;
    a drifted batch still costs."""
    tokens, attn, dirs = capture()
    text = class_text(dirs)
    cfg = config()
    centroids = dg.fit_nodes([t.reshape(-1, D) for t in tokens], cfg)
    stored = dg.build_graph([(tokens, attn, text)], centroids, cfg)
    order = torch.randperm(K, generator=torch.Generator().manual_seed(4))
    permuted = [c[order] for c in centroids]
    current = dg.build_graph([(tokens, attn, text)], permuted, cfg)
    perm, old, cos = dg.match_nodes(current, stored, tau=0.8)
    assert all(torch.equal(p, order) for p in perm) and all(o.all() for o in old)
    assert all((c > 0.99).all() for c in cos)  # the same clusters: matched prototypes agree
    aligned = stored.aligned(perm)
    for a, b in zip(aligned.layers, current.layers):
        torch.testing.assert_close(a.edges, b.edges, rtol=0, atol=1e-6)
    cur = dg.current_graph(tokens, attn, aligned, text=text, centroids=torch.stack(permuted))
    same = dg.graph_losses(cur, aligned, old=old)
    assert all(v.item() < 1e-6 for v in same.values()), same
    drifted = [t + 0.5 * torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) for t in tokens]
    cur = dg.current_graph(drifted, attn, aligned, text=text, centroids=torch.stack(permuted))
    drift = dg.graph_losses(cur, aligned, old=old)
    assert all(drift[k].item() > max(1e-5, 100 * same[k].item()) for k in drift), (drift, same)


def test_match_marks_nodes_without_a_stored_counterpart_new():
    tokens, attn, dirs = capture()
    cfg = config()
    stored = stored_graph(tokens, attn, cfg)
    label = torch.arange(N) % K
    # A later task where cluster NEW[0] is replaced by a direction the stored task never had.
    fresh_dir = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(8)))[0][0]
    fresh_dir = fresh_dir - (dirs.T @ (dirs @ fresh_dir))  # orthogonal to every old cluster
    moved = [t.clone() for t in tokens]
    for t in moved:
        t[:, label == NEW[0]] = 3.0 * torch.nn.functional.normalize(fresh_dir, dim=0)
    current = stored_graph(moved, attn, cfg)  # its own nodes, fitted on its own tokens
    perm, old, _ = dg.match_nodes(current, stored, tau=0.8, min_mass=1e-4)
    for layer in range(L):
        new_node = node_of(current, layer, torch.nn.functional.normalize(fresh_dir, dim=0))
        assert not old[layer][new_node]
        assert int(old[layer].sum()) == K - 1
