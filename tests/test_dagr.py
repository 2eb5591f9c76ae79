"""DAGR (cl_methods/dagr.py) on the tiny open_clip CLIP (random init, CPU): the graph terms
at method level, and the method inside the engine (prompts, graphs, resume, ablations)."""

from __future__ import annotations

import io

import pytest
import torch

from cl_methods import _dagr_graph as dg
from cl_methods import build_method, get_method_class
from cl_methods.dagr import DAGR
from mmcl.engine import prepare, run_continual

from .helpers import tiny_run

K = 4  # nodes per layer in these tests (the tiny tasks have few images)
EMBED, LAYERS, TEXT_LAYERS = 128, 3, 2  # tiny CLIP joint space; image / text blocks (all prompted)
PROMPTS = ("image_keys", "image_values", "text_keys", "text_values")


def test_config_and_ablations():
    cls = get_method_class("dagr")
    assert set(cls.ablations) == {"full", "no_graph", "edge_only", "multi_only", "path_only"}
    for overrides in cls.ablations.values():
        cls.Config.model_validate(overrides)
    assert cls.Config().init_from_previous  # DAGR starts each prompt from the previous one
    with pytest.raises(ValueError):
        build_method("dagr", {"lamda_edge": 1.0})
    with pytest.raises(ValueError):
        build_method("dagr", {"alpha": 1.5})
    with pytest.raises(ValueError):
        build_method("dagr", {"hops": [0]})
    with pytest.raises(ValueError):
        build_method("dagr", {"cross_weight": 2.0})


# --------------------------------------------------------------------------- method level


@pytest.fixture(scope="module")
def setup():
    """A DAGR in task 1 whose task-0 graph was stored on one batch (set 1 = copy of set 0),
    with task 1's target prepared on that same batch and classes: nothing has drifted."""
    run = tiny_run(method="dagr", config={"prompt_length": 2, "num_nodes": K, "tau": 0.5}, num_tasks=2)
    prep = prepare(run)
    m: DAGR = prep.method
    m.before_task(0, prep.tasks[0])
    with torch.no_grad():  # trained-looking prompts, so the prompted layers differ from the frozen model
        g = torch.Generator().manual_seed(0)
        for p in (m.prompted.prompts[0].image_values, m.prompted.prompts[0].text_values):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    batch = next(iter(torch.utils.data.DataLoader(prep.ctx.train_sets[0], batch_size=16, shuffle=False)))
    task0 = prep.tasks[0]
    with torch.no_grad():
        _, text = m.class_text(task0, 0)
        centroids = m.fit_nodes(0, 0, [batch], text)
        m.graphs = [m.build_task_graph(0, [batch["image"]], text, centroids)]
    m.before_task(1, prep.tasks[1])  # set 1 inherits set 0; its own target is replaced below
    with torch.no_grad():
        _, text1 = m.class_text(task0, 1)
        start = m.build_task_graph(1, [batch["image"]], text1, centroids)
    m._target = m.target_from(1, start)
    return prep, m, batch["image"]


def _terms(m: DAGR, images: torch.Tensor, prep) -> dict[str, torch.Tensor]:
    _, text = m.class_text(prep.tasks[0], 1)  # the stored batch's classes, through set 1
    _, tokens, attn, probs = m.graph_inputs(images, 1)
    return m.graph_terms(tokens, attn, text, 1, probs)


class _Perturbed:
    """Set 1's prompt tensor ``name`` moved at one block by ``scale`` * noise."""

    def __init__(self, m: DAGR, name: str, layer: int, scale: float):
        self.p, self.layer, self.scale = getattr(m.prompted.prompts[1], name), layer, scale

    def __enter__(self):
        self.saved = self.p.detach().clone()
        with torch.no_grad():
            noise = torch.randn(self.p[self.layer].shape, generator=torch.Generator().manual_seed(1))
            self.p[self.layer] += self.scale * noise

    def __exit__(self, *exc):
        with torch.no_grad():
            self.p.copy_(self.saved)


def test_graph_terms_zero_when_nothing_drifted(setup):
    prep, m, images = setup
    for name in PROMPTS:
        assert torch.equal(getattr(m.prompted.prompts[1], name), getattr(m.prompted.prompts[0], name))
    stored = m.graphs[0]
    assert len(stored.layers) == LAYERS and stored.layers[0].centroids.shape == (K, EMBED)
    # Same nodes, same data, same prompts: the match is the identity and every node old
    # (not vacuous), and every term is exactly zero.
    assert all(int(o.sum()) == K for o in m._target.old)
    terms = _terms(m, images, prep)
    assert set(terms) == {"edge", "multi", "path"}
    assert all(v.detach().item() == 0.0 for v in terms.values()), terms


BLOCKS = [(n, layer) for n in PROMPTS for layer in range(LAYERS if n.startswith("image") else TEXT_LAYERS)]


@pytest.mark.parametrize("name,layer", BLOCKS, ids=[f"{n}-{layer}" for n, layer in BLOCKS])
def test_every_term_grows_with_drift_in_any_single_prompted_block(setup, name, layer):
    """Either tower, keys or values, the first block or the last: each graph term sees it."""
    prep, m, images = setup
    with torch.no_grad():
        with _Perturbed(m, name, layer, 0.3):
            small = {k: v.item() for k, v in _terms(m, images, prep).items()}
        with _Perturbed(m, name, layer, 3.0):
            large = {k: v.item() for k, v in _terms(m, images, prep).items()}
    for k in ("edge", "multi", "path"):
        assert 0.0 < small[k] < large[k], (k, small, large)


def test_gradient_reaches_every_prompt_tensor_of_both_towers(setup):
    prep, m, images = setup
    ps = m.prompted.prompts[1]
    with _Perturbed(m, "image_values", 1, 1.0):  # off the zero-loss point
        terms = _terms(m, images, prep)
        m.check_dependencies(terms, 1)  # the method's own check passes
        sum(terms.values()).backward()
    try:
        for name in PROMPTS:
            grad = getattr(ps, name).grad
            assert grad is not None, name
            for layer in range(len(grad)):  # every block of the tower, first and last
                assert grad[layer].abs().sum() > 0, (name, layer)
    finally:
        ps.zero_grad(set_to_none=True)
    # A term constant in the prompts is refused, not silently trained on.
    with pytest.raises(RuntimeError, match="constant in the trainable prompts"):
        m.check_dependencies({"edge": torch.zeros(())}, 1)


def test_new_class_nodes_contribute_nothing(setup):
    prep, m, images = setup
    saved = m._target

    def terms_with(stored: dg.TaskGraph, old: list[torch.Tensor]) -> dict[str, float]:
        m._target = type(saved)(1, saved.centroids, stored, old, saved.perm)
        with _Perturbed(m, "image_values", 0, 1.0), torch.no_grad():
            return {k: float(v) for k, v in _terms(m, images, prep).items()}

    def edited() -> dg.TaskGraph:
        """The target graph with node 0's edges (rows and columns, every layer) rescaled."""
        g = dg.TaskGraph.from_state_dict(saved.stored.state_dict())
        gen = torch.Generator().manual_seed(3)
        for layer in g.layers:
            for sl in ((0, slice(None)), (slice(None), 0)):
                layer.edges[sl] *= 1.0 + torch.rand(layer.edges[sl].shape, generator=gen)  # support kept
        for t in g.transitions:
            t[:, 0] *= 2.0
            t[0, :] *= 3.0
        return g

    node0_new = [torch.arange(K) != 0 for _ in range(LAYERS)]
    try:
        base_new = terms_with(saved.stored, node0_new)
        assert terms_with(edited(), node0_new) == base_new  # exactly: node 0's edges are ignored
        base_old = terms_with(saved.stored, saved.old)
        changed = terms_with(edited(), saved.old)
        assert changed["edge"] != base_old["edge"] and changed["path"] != base_old["path"]
    finally:
        m._target = saved


# --------------------------------------------------------------------------- in the engine


def test_training_prompts_graphs_size_and_resume():
    cfg = {"prompt_length": 2, "num_nodes": K, "tau": -1.0, "graph_samples": 16}
    run = tiny_run(method="dagr", config=cfg, num_tasks=3, steps=3, optimizer="sgd", lr=1.0)
    prep = prepare(run)
    m: DAGR = prep.method
    frozen = {n: p.detach().clone() for n, p in prep.backbone.named_parameters()}
    starts, targets, ends = {}, {}, []
    original_before = DAGR.before_task

    def spy(self, t, task):
        original_before(self, t, task)
        starts[t] = {k: v.detach().clone() for k, v in self.prompted.prompts[t].state_dict().items()}
        targets[t] = self._target

    DAGR.before_task = spy
    try:
        result = run_continual(run, on_task_end=ends.append, prepared=prep)
    finally:
        DAGR.before_task = original_before

    snaps = {e.step: e.state["method"]["modules"] for e in ends}
    for s in range(3):
        for name in PROMPTS:
            key = f"prompted.prompts.{s}.{name}"
            if s > 0:  # starts as the previous task's trained set
                assert torch.equal(starts[s][name], snaps[s][f"prompted.prompts.{s - 1}.{name}"]), key
            for step in range(s + 1, 4):  # and is bit-identical after its own task
                assert torch.equal(snaps[step][key], snaps[s + 1][key]), (key, step)
        assert not torch.equal(snaps[s + 1][f"prompted.prompts.{s}.image_values"], starts[s]["image_values"])
        assert not torch.equal(snaps[s + 1][f"prompted.prompts.{s}.text_values"], starts[s]["text_values"])
    for n, p in prep.backbone.named_parameters():
        assert torch.equal(p, frozen[n]), n

    # One graph per task, each on its own task's nodes; each later task's target is the
    # previous graph re-indexed by a one-to-one match (tau = -1: every node old).
    assert targets[0] is None
    for t in (1, 2):
        assert not torch.equal(m.graphs[t].layers[0].centroids, m.graphs[t - 1].layers[0].centroids)
        assert [int(o.sum()) for o in targets[t].old] == [K] * LAYERS
        for layer in range(LAYERS):
            perm = targets[t].perm[layer]
            assert sorted(perm.tolist()) == list(range(K))
            prev = m.graphs[t - 1].layers[layer]
            assert torch.equal(targets[t].stored.layers[layer].edges, prev.edges[perm][:, perm])

    # Graph terms in the curves from the second task on, finite, not all zero.
    for e in ends[1:]:
        keys = {k for row in e.curves for k in row if k.startswith("loss/")}
        assert keys == ({"loss/ce"} if e.step == 1 else {"loss/ce", "loss/edge", "loss/multi", "loss/path"}), keys
    later = [row for e in ends[2:] for row in e.curves]
    assert any(row["loss/edge"] > 0 for row in later) and any(row["loss/path"] > 0 for row in later)

    # Stored graph size: per layer K x E centroids + prototypes (fp16), K mass + K x K edges (fp32);
    # K x K transitions between consecutive layers.
    per_task = LAYERS * (2 * K * EMBED * 2 + K * 4 + K * K * 4) + (LAYERS - 1) * K * K * 4
    assert [g.nbytes() for g in m.graphs] == [per_task] * 3
    assert [e.method_stats["graph_bytes"] for e in ends] == [0, per_task, per_task, per_task]
    assert result.method_stats == {"graph_bytes": per_task, "graph_bytes_total": 3 * per_task}

    # Resume from the end of task 1: the same matrix and bit-identical stored graphs.
    resumed = prepare(run)
    again = run_continual(run, resume=ends[1].state, prepared=resumed)
    assert (again.matrix == result.matrix).all()
    for a, b in zip(m.graphs, resumed.method.graphs):
        for x, y in zip(a.state_dict()["layers"], b.state_dict()["layers"]):
            assert all(torch.equal(x[k], y[k]) for k in x)
        assert all(torch.equal(x, y) for x, y in zip(a.transitions, b.transitions))
    # State round trip through torch.save: graphs (nodes included) exact.
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = prepare(run)
    fresh.method.load_state_dict(torch.load(buf, weights_only=True))
    assert [g.state_dict()["config"] for g in fresh.method.graphs] == [g.state_dict()["config"] for g in m.graphs]
    for a, b in zip(fresh.method.graphs, m.graphs):
        assert torch.equal(a.layers[1].centroids, b.layers[1].centroids)
        assert torch.equal(a.layers[1].edges, b.layers[1].edges)


@pytest.mark.parametrize(
    "variant,terms",
    [("no_graph", set()), ("edge_only", {"edge"}), ("multi_only", {"multi"}), ("path_only", {"path"})],
)
def test_ablations_switch_terms_off(variant, terms):
    cfg = {"prompt_length": 2, "num_nodes": K, "tau": -1.0, "graph_samples": 16}
    cfg.update(get_method_class("dagr").ablations[variant])
    run = tiny_run(method="dagr", config=cfg, num_tasks=3, steps=2, optimizer="sgd", lr=1.0)
    prep = prepare(run)
    result = run_continual(run, prepared=prep)
    logged = {k.split("/", 1)[1] for row in result.curves if row["task"] == 2 for k in row if k.startswith("loss/")}
    assert logged == {"ce"} | terms
    for row in result.curves:
        for t in terms:
            assert row.get(f"loss/{t}", 0.0) >= 0.0
    if not terms:  # nothing to regularise: no graph is built or stored
        assert prep.method.graphs == [] and result.method_stats["graph_bytes"] == 0


def test_stats_reach_the_trials_table_columns():
    from mmcl.results import METHOD_STAT_PREFIX, method_stat_columns

    cols = method_stat_columns({"graph_bytes": 10, "graph_bytes_total": 30.0})
    assert cols == {"method/graph_bytes": 10.0, "method/graph_bytes_total": 30.0}
    assert all(k.startswith(METHOD_STAT_PREFIX) for k in cols)


def test_stat_columns_survive_the_trials_table(tmp_path):
    import pandas as pd

    from mmcl.results import method_stat_columns, write_trials

    write_trials(tmp_path, "s", [{"trial_id": "a", **method_stat_columns({"graph_bytes": 29888})}])
    df = pd.read_parquet(tmp_path / "parts" / "trials" / "s.parquet")
    assert df.loc[0, "method/graph_bytes"] == 29888.0


def test_search_space_names_run_keys():
    from mmcl.study import _sample_space

    point = _sample_space("dagr", tiny_run(method="dagr"), "test")
    names = {"alpha", "beta", "gamma", "num_nodes", "topk", "tau", "lambda_edge", "lambda_multi", "lambda_path",
             "lambda_decay", "prompt_length", "prompt_depth"}
    assert {f"method.{n}" for n in names} | {"training.lr"} <= set(point)
    assert point["training.optimizer"] == "sgd"


def test_batchwise_routing_reaches_dagr():
    # DAGR inherits DIKI's test-time routing: the option set in the run's method config
    # routes a whole test batch to its majority set, with the batch mean of w for text.
    from .test_diki import _expected_logits, _trained_diki, _two_gaussian_routes

    prep, m, images = _trained_diki("dagr", {"num_nodes": K, "graph_samples": 16, "routing": "batchwise"})
    assert isinstance(m, DAGR) and m.config.routing == "batchwise"
    with torch.no_grad():
        images, sets, w = _two_gaussian_routes(m, images)
        assert (sets == 1).sum() > (sets == 0).sum() > 0  # the per-sample routes disagree
        got_sets, _ = m.route(images, prep.tasks[1])
        assert (got_sets == 1).all()
        ones = torch.ones(len(images), dtype=torch.long)
        want = _expected_logits(m, images, prep.tasks[1], ones, w, {1: float(w.mean())})
        torch.testing.assert_close(m.predict({"image": images}, prep.tasks[1]), want, atol=1e-4, rtol=0)
