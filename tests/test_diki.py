"""DIKI's mechanisms on the tiny open_clip CLIP (random init, CPU): residual prompts,
the Gaussian task identifier, capture mode, and the method inside the engine."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from cl_methods import build_method, get_method_class
from cl_methods._prompted_clip import LayerCapture, PromptedCLIP
from cl_methods._task_identifier import GaussianTaskIdentifier
from mmcl.backbones.clip import load_backbone
from mmcl.engine import prepare, run_continual
from mmcl.spec import BackboneSpec

from .helpers import tiny_run

# Tiny CLIP: image 1 + (32 / 8)^2 = 17 tokens of width 128, 2 heads, 3 blocks; text 20
# tokens of width 64, 2 heads, 2 blocks.
IMG_N, IMG_D, TXT_N, TXT_D, HEADS = 17, 128, 20, 64, 2


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone(BackboneSpec(model="mmcl-tiny-clip", pretrained=None))


@pytest.fixture
def slow_mha():
    """nn.MultiheadAttention's non-fused path, which the prompted blocks reproduce bit for bit
    (the fused inference kernel differs from it by float rounding)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def _inputs(backbone, n=6):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = backbone.tokenize([f"a photo of a {c}" for c in ["circle", "square", "red dog", "ring", "x", "y"][:n]])
    return images, tokens


def _prompted(backbone, depth=8, length=4, sets=2):
    p = PromptedCLIP(backbone.model, length=length, depth=depth)
    g = torch.Generator().manual_seed(0)
    for _ in range(sets):
        p.add_prompt_set(1.0, g)
    return p


@torch.no_grad()
def test_zero_values_give_the_frozen_model(backbone, slow_mha):
    p = _prompted(backbone)
    assert p.depth == {"image": 3, "text": 2}  # depth 8 clipped to each tower
    images, tokens = _inputs(backbone)
    ref_i, ref_t = backbone.encode_image(images), backbone.encode_text(tokens)
    per_sample = torch.tensor([0, 1, 1, 0, 1, 0])
    for sets in (0, per_sample):
        assert torch.equal(p.encode_image(images, sets, 1.0), ref_i)
        assert torch.equal(p.encode_image(images, sets, torch.rand(6)), ref_i)
        assert torch.equal(p.encode_text(tokens, sets, 1.0), ref_t)  # causal mask included
    with torch.enable_grad():  # the training path (prompts need grad) is the same function
        feats = p.encode_image(images, 1)
        assert feats.requires_grad and torch.equal(feats.detach(), ref_i)


@torch.no_grad()
def test_zero_values_match_the_fused_inference_kernel(backbone):
    # Under no_grad PyTorch runs the frozen blocks through its fused kernel, which rounds
    # differently from the reference path: equal to float rounding (features ~1e-7; logits
    # are those times logit_scale, 1 / 0.07 at random init).
    p = _prompted(backbone)
    images, tokens = _inputs(backbone)
    for sets in (0, torch.tensor([0, 1, 1, 0, 1, 0])):
        img, txt = p.encode_image(images, sets), p.encode_text(tokens, sets)
        torch.testing.assert_close(img, backbone.encode_image(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(txt, backbone.encode_text(tokens), atol=1e-6, rtol=0)
    scale = backbone.logit_scale()
    ref = scale * backbone.encode_image(images) @ backbone.encode_text(tokens).T
    got = scale * p.encode_image(images, 0) @ p.encode_text(tokens, 1).T
    torch.testing.assert_close(got, ref, atol=1e-6 * float(scale), rtol=0)


@torch.no_grad()
def test_nonzero_values_change_only_the_prompted_layers(backbone, slow_mha):
    p = _prompted(backbone, depth=1)
    for ps in p.prompts:
        ps.image_values.normal_()
        ps.text_values.normal_()
    images, tokens = _inputs(backbone)
    for tower, x, blocks, encode, frozen in (
        ("image", images, backbone.model.visual.transformer.resblocks, p.encode_image, backbone.encode_image),
        ("text", tokens, backbone.model.transformer.resblocks, p.encode_text, backbone.encode_text),
    ):
        seen = []
        hooks = [b.register_forward_hook(lambda m, a, out, s=seen: s.append((m, a, out))) for b in blocks]
        try:
            feats = encode(x, 0, 1.0)
        finally:
            for h in hooks:
                h.remove()
        assert not torch.allclose(feats, frozen(x)), tower
        mask = backbone.model.attn_mask if tower == "text" else None
        for i, (blk, args, out) in enumerate(seen):
            assert "attention" not in blk.__dict__  # nothing stays installed after the call
            again = blk(args[0], attn_mask=mask)  # the frozen block on the same input
            assert torch.equal(again, out) == (i >= 1), f"{tower} block {i}"
        # weight 0 switches the prompts off again, per sample too
        assert torch.equal(encode(x, 0, 0.0), frozen(x))
        w = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
        mixed = encode(x, 0, w)
        assert torch.equal(mixed[w == 0], frozen(x)[w == 0])
        # per-sample sets: each sample as if its set served the whole batch
        sets = torch.tensor([0, 1, 1, 0, 1, 0])
        mixed = encode(x, sets, 1.0)
        for s in (0, 1):
            torch.testing.assert_close(mixed[sets == s], encode(x, s, 1.0)[sets == s], atol=1e-6, rtol=0)


@torch.no_grad()
def test_capture_shapes_and_softmax(backbone):
    p = _prompted(backbone, length=5)
    images, tokens = _inputs(backbone)
    plain_i, plain_t = p.encode_image(images, 0), p.encode_text(tokens, 1)
    with p.capture() as cap:
        # Capturing computes the attention from the logits it records instead of through the
        # fused kernel: the same model up to float round-off.
        torch.testing.assert_close(p.encode_image(images, 0), plain_i, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(p.encode_text(tokens, 1), plain_t, atol=1e-6, rtol=1e-5)
    for layers, n, d, depth in ((cap.image, IMG_N, IMG_D, 3), (cap.text, TXT_N, TXT_D, 2)):
        assert [c.layer for c in layers] == list(range(depth))
        for c in layers:
            assert isinstance(c, LayerCapture)
            assert c.tokens.shape == (6, n, d)
            assert c.attn_logits.shape == (6, HEADS, n, n)
            assert c.prompt_logits.shape == (6, HEADS, n, 5)
            probs = c.attn_logits.float().softmax(-1)
            torch.testing.assert_close(probs.sum(-1), torch.ones(6, HEADS, n))
            assert c.attn_probs.dtype == torch.float32 and torch.equal(c.attn_probs, probs)
            assert torch.isfinite(c.prompt_logits).all()
    causal = torch.triu(torch.ones(TXT_N, TXT_N, dtype=torch.bool), 1)
    for c in cap.text:
        assert torch.isneginf(c.attn_logits[..., causal]).all()
        assert torch.isfinite(c.attn_logits[..., ~causal]).all()
    assert torch.isfinite(cap.image[0].attn_logits).all()
    # A block's captured output tokens are what the next block receives.
    nxt = []
    h = backbone.model.visual.transformer.resblocks[1].register_forward_pre_hook(lambda m, a: nxt.append(a[0]))
    try:
        with p.capture() as cap3:
            p.encode_image(images, 0)
    finally:
        h.remove()
    assert torch.equal(cap3.image[0].tokens, nxt[0])
    # Without prompts the capture still records (P = 0); outside the block nothing is kept.
    with p.capture() as cap2:
        p.encode_image(images, None)
    assert cap2.image[0].prompt_logits.shape == (6, HEADS, IMG_N, 0) and cap2.text == []
    assert p._capture is None


def test_capture_keeps_the_graph(backbone):
    p = _prompted(backbone, sets=1)
    p.prompts[0].requires_grad_(True)
    images, _ = _inputs(backbone)
    with p.capture() as cap:
        p.encode_image(images, 0)
    cap.image[0].prompt_logits.sum().backward()
    assert p.prompts[0].image_keys.grad.abs().sum() > 0


def test_custom_blocks_are_rejected():
    import open_clip

    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 16, "patch_size": 8, "layers": 1, "width": 64, "head_width": 32},
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1, "qk_norm": True},
    )
    with pytest.raises(TypeError, match="CustomResidualAttentionBlock"):
        PromptedCLIP(model, length=2, depth=1)


# --------------------------------------------------------------------------- identifier


def _blobs(n_per_task=300, d=16, tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(tasks, d, generator=g) * 3
    scales = [0.5, 1.0, 0.8][:tasks]
    train = [means[t] + scales[t] * torch.randn(n_per_task, d, generator=g) for t in range(tasks)]
    test = [means[t] + scales[t] * torch.randn(100, d, generator=g) for t in range(tasks)]
    return means, train, test


def test_identifier_picks_the_right_task_and_weights_in_distribution_higher():
    means, train, test = _blobs()
    ident = GaussianTaskIdentifier()
    for x in train:
        ident.fit_task(x)
    feats = torch.cat(test)
    truth = torch.arange(3).repeat_interleave(100)
    pred, w = ident.identify(feats)
    assert (pred == truth).float().mean() >= 0.99
    far = means[0] + 25.0 + torch.randn(100, 16, generator=torch.Generator().manual_seed(5))
    _, w_far = ident.identify(far)
    assert w.min() > w_far.max()
    # restricted to the tasks seen so far
    pred2, _ = ident.identify(feats, tasks=2)
    assert pred2.max() <= 1
    # exact state round trip
    buf = io.BytesIO()
    torch.save(ident.state_dict(), buf)
    buf.seek(0)
    other = GaussianTaskIdentifier()
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.log_likelihood(feats), ident.log_likelihood(feats))


def test_identifier_on_tiny_tasks_needs_shrinkage():
    # 20 samples per task in 64 dims: the sample covariance is singular.
    _, train, test = _blobs(n_per_task=20, d=64)
    feats, truth = torch.cat(test), torch.arange(3).repeat_interleave(100)
    shrunk = GaussianTaskIdentifier(shrinkage="auto")
    for x in train:
        shrunk.fit_task(x)
    assert all(a > 0 for a in shrunk.shrink_used)
    pred, w = shrunk.identify(feats)
    assert (pred == truth).float().mean() >= 0.95
    raw = GaussianTaskIdentifier(shrinkage=0.0)
    for x in train:
        raw.fit_task(x)
    _, w_raw = raw.identify(feats)
    assert w_raw.max() < 1e-6 < w.min()  # DIKI's 1e-7 ridge alone: w collapses to 0


# --------------------------------------------------------------------------- the method


def test_config_and_ablations():
    cls = get_method_class("diki")
    assert set(cls.ablations) >= {"full", "no_weighting", "oracle_task"}
    for overrides in cls.ablations.values():
        cls.Config.model_validate(overrides)
    with pytest.raises(ValueError):
        build_method("diki", {"prompt_lenght": 4})
    with pytest.raises(ValueError):
        build_method("diki", {"cov_shrinkage": 2.0})


def test_training_leaves_earlier_prompts_and_backbone_untouched():
    run = tiny_run(method="diki", config={"prompt_length": 4}, num_tasks=3, steps=4, optimizer="sgd", lr=1.0)
    prep = prepare(run)
    frozen = {n: p.detach().clone() for n, p in prep.backbone.named_parameters()}
    snaps = {}

    def on_end(end):
        snaps[end.step] = {k: v.clone() for k, v in end.state["method"]["modules"].items()}

    result = run_continual(run, on_task_end=on_end, prepared=prep)
    m = prep.method
    assert len(m.prompted) == 3 and len(m.identifier) == 3
    for s in range(3):  # every set trained (values left 0), then stayed bit-identical
        key = f"prompted.prompts.{s}.image_values"
        assert snaps[s + 1][key].abs().sum() > 0
        for step in range(s + 1, 4):
            for name in ("image_keys", "image_values", "text_keys", "text_values"):
                k = f"prompted.prompts.{s}.{name}"
                assert torch.equal(snaps[step][k], snaps[s + 1][k]), (k, step)
    for n, p in prep.backbone.named_parameters():
        assert torch.equal(p, frozen[n]), n
    per_set = 2 * 4 * (3 * IMG_D + 2 * TXT_D)  # keys + values, P = 4, 3 image / 2 text layers
    assert m.prompted.num_parameters_per_set() == per_set
    assert result.trainable_params == per_set
    assert result.matrix.shape == (4, 3)


def test_resume_mid_sequence_is_exact():
    run = tiny_run(method="diki", config={"prompt_length": 2}, num_tasks=3, steps=3, optimizer="sgd", lr=1.0)
    ends = []
    full = run_continual(run, on_task_end=ends.append)
    resumed = run_continual(run, resume=ends[1].state)
    assert (resumed.matrix == full.matrix).all()

    fresh = prepare(run)
    fresh.method.load_state_dict(ends[-1].state["method"])
    again = prepare(run)
    run_continual(run, prepared=again)
    batch = next(iter(torch.utils.data.DataLoader(fresh.tasks[1].test, batch_size=16)))
    for task in fresh.tasks:
        assert torch.equal(fresh.method.predict(batch, task), again.method.predict(batch, task))
    for a, b in zip(fresh.method.identifier.chols, again.method.identifier.chols):
        assert torch.equal(a, b)


def test_predict_routes_per_sample_and_oracle():
    run = tiny_run(method="diki", config={"prompt_length": 2}, num_tasks=2, steps=3, optimizer="sgd", lr=1.0)
    prep = prepare(run)
    m = prep.method
    tasks = prep.tasks
    batch = next(iter(torch.utils.data.DataLoader(tasks[0].test, batch_size=8)))
    zero_shot = prep.backbone.logits(batch["image"], tasks[0])
    assert torch.equal(m.predict(batch, tasks[0]), zero_shot)  # row 0: the frozen CLIP
    run_continual(run, prepared=prep)
    sets, w = m.route(batch["image"], tasks[0])
    assert sets.shape == (8,) and ((w > 0) & (w < 1)).all()
    logits = m.predict(batch, tasks[0])
    assert logits.shape == (8, len(tasks[0].classnames))
    assert not torch.equal(logits, zero_shot)
    # the oracle uses each task's own set with w = 1
    m.config = m.config.model_copy(update={"task_id": "oracle"})
    sets, w = m.route(batch["image"], tasks[1])
    assert (sets == 1).all() and (w == 1).all()


def test_search_space_names_run_keys():
    from mmcl.study import _sample_space

    point = _sample_space("diki", tiny_run(method="diki"), "test")
    assert point["training.optimizer"] == "sgd"
    assert {"method.prompt_length", "method.prompt_depth", "training.lr"} <= set(point)


# --------------------------------------------------------------------------- routing


def test_majority_set_counts_and_breaks_ties_low():
    from cl_methods.diki import majority_set

    assert majority_set(torch.tensor([2, 0, 2, 1, 0, 2])) == 2  # 3 x set 2, 2 x set 0, 1 x set 1
    assert majority_set(torch.tensor([3, 3, 1, 0, 1, 0, 1])) == 1  # 3 x set 1 beats 2 x sets 0, 3
    assert majority_set(torch.tensor([1, 0, 0, 1])) == 0  # 2 : 2, the lower set
    assert majority_set(torch.tensor([4])) == 4


def _two_gaussian_routes(m, images):
    """Replace ``m``'s task Gaussians by two isotropic ones centred near the frozen
    features of two images of the batch, so that the batch's per-sample routes disagree,
    and order the batch so that its first sample is in the minority. Returns (images, the expected
    per-sample sets, the expected w), derived here from the Gaussian density itself:
    with equal isotropic covariances the most likely task is the nearest centre, and
    w = sigmoid(log N(f; mu, s2 I) / D - 1)."""
    f = m.backbone.encode_image(images, normalize=True).double()
    d = f.shape[1]
    near = torch.cdist(f, f[:2]).argmin(1)  # 0: nearer to image 0, 1: nearer to image 1
    assert near[0] == 0 and near[1] == 1  # each centre is its own image: the routes disagree
    major = int((near == 1).sum() > (near == 0).sum())  # odd batch: no tie
    # Set 0 = the minority's centre, set 1 = the majority's (so taking set 0 or the first
    # sample's set would be wrong). Both centres move by one vector u orthogonal to their difference, which keeps every
    # sample's nearest centre and adds |u|^2 to every squared distance. The tiny CLIP's
    # random-init features lie close together (squared distances 0.01-0.08), so s2 = 0.02
    # / D and |u|^2 = 0.1 put w in (0.1, 0.5), spread over the batch.
    g = torch.Generator().manual_seed(7)
    diff = F.normalize(f[major] - f[1 - major], dim=0)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u = math.sqrt(0.1) * F.normalize(u - (u @ diff) * diff, dim=0)
    centres = [f[1 - major] + u, f[major] + u]
    order = torch.cat([torch.nonzero(near != major).flatten(), torch.nonzero(near == major).flatten()])
    images, f = images[order], f[order]
    s2 = 0.02 / d
    m.identifier.load_state_dict({
        "means": centres,
        "chols": [math.sqrt(s2) * torch.eye(d, dtype=torch.float64)] * 2,
        "shrink_used": [0.0, 0.0],
    })
    dist2 = torch.cdist(f, torch.stack(centres)) ** 2  # [B, 2]
    sets = dist2.argmin(1)
    logp = -0.5 * (dist2.min(1).values / s2 + d * math.log(2 * math.pi * s2))
    w = torch.sigmoid(logp / d - 1.0).float()
    return images, sets, w


def _expected_logits(m, images, task, sets, w, text_w):
    """Logits from the prompted towers directly: image j with set ``sets[j]`` and weight
    ``w[j]``; the class head of set s at weight ``text_w[s]`` (templates averaged)."""
    tmpls = list(task.templates) or ["{}"]
    tokens = m.backbone.tokenize([t.format(c) for c in task.classnames for t in tmpls])
    out = torch.empty(len(images), len(task.classnames))
    for s in sets.unique().tolist():
        sel = sets == s
        feats = m.prompted.encode_image(images[sel], sets=s, weight=w[sel]).float()
        emb = m.prompted.encode_text(tokens, sets=s, weight=text_w[s], normalize=True).float()
        head = F.normalize(emb.view(len(task.classnames), len(tmpls), -1).mean(1), dim=-1)
        out[sel] = m.backbone.logit_scale() * feats @ head.T
    return out


def _trained_diki(method="diki", config=None, n_images=7):
    run = tiny_run(method=method, config={"prompt_length": 2, **(config or {})}, num_tasks=2, steps=2,
                   optimizer="sgd", lr=1.0)
    prep = prepare(run)
    run_continual(run, prepared=prep)
    m = prep.method
    with torch.no_grad():  # strong, different prompts: which set and which w is used shows
        g = torch.Generator().manual_seed(3)
        for ps in m.prompted.prompts:
            for p in (ps.image_values, ps.text_values):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    batch = next(iter(torch.utils.data.DataLoader(prep.tasks[0].test, batch_size=n_images)))
    assert len(batch["image"]) == n_images
    return prep, m, batch["image"]


def test_batchwise_routing_gives_the_batch_the_majority_set_and_the_mean_weight():
    prep, m, images = _trained_diki()
    with torch.no_grad():
        _check_routing(prep, m, images)


def _check_routing(prep, m, images):
    assert m.config.routing == "per_sample"  # the default: today's per-sample routing
    images, sets, w = _two_gaussian_routes(m, images)
    task = prep.tasks[0]
    assert sets[0] == 0 and (sets == 1).sum() > (sets == 0).sum() > 0  # routes disagree, 1 is the majority
    assert 0.05 < float(w.min()) and float(w.max()) < 0.95 and float(w.max() - w.min()) > 0.01

    # per_sample (unchanged): own set each, text weight = the mean w of the set's samples
    got_sets, got_w = m.route(images, task)
    assert torch.equal(got_sets, sets)
    torch.testing.assert_close(got_w, w, atol=1e-5, rtol=0)
    per_set_w = {s: float(w[sets == s].mean()) for s in (0, 1)}
    per_sample = m.predict({"image": images}, task)
    torch.testing.assert_close(per_sample, _expected_logits(m, images, task, sets, w, per_set_w), atol=1e-4, rtol=0)

    # batchwise: every sample uses set 1 (the majority), keeps its own w; text weight = mean w
    m.config = m.config.model_copy(update={"routing": "batchwise"})
    got_sets, got_w = m.route(images, task)
    assert (got_sets == 1).all()
    torch.testing.assert_close(got_w, w, atol=1e-5, rtol=0)
    ones = torch.ones(len(images), dtype=torch.long)
    batchwise = m.predict({"image": images}, task)
    mean_w = {1: float(w.mean())}
    torch.testing.assert_close(batchwise, _expected_logits(m, images, task, ones, w, mean_w), atol=1e-4, rtol=0)
    # and the test can tell: the minority's own set, or text at w = 1, give other logits
    assert (batchwise[0] - per_sample[0]).abs().max() > 1e-2
    other = _expected_logits(m, images, task, ones, w, {1: 1.0})
    assert (batchwise - other).abs().max() > 1e-2


def test_routing_is_validated():
    with pytest.raises(ValueError, match="routing"):
        build_method("diki", {"routing": "majority"})
