"""The tiny open_clip CLIP: loading paths, freezing, text heads, offline pretraining."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from mmcl.backbones import ensure_pretrained, load_backbone
from mmcl.data import build_benchmark
from mmcl.spec import BackboneSpec, BenchmarkSpec, SpecError

SMALL = BenchmarkSpec(options={"n_train_per_class": 8, "n_test_per_class": 4})


def _random(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return load_backbone(BackboneSpec(model="mmcl-tiny-clip", pretrained=None, **kw))


@pytest.fixture(scope="module")
def tasks():
    return build_benchmark(SMALL, image_size=32).tasks


def test_random_init_roundtrip_through_checkpoint(tmp_path, tasks):
    bb = _random(0)
    assert bb.image_size == 32 and bb.model_name == "mmcl-tiny-clip"
    path = tmp_path / "tiny.pt"
    torch.save(bb.model.state_dict(), path)
    loaded = load_backbone(BackboneSpec(model="mmcl-tiny-clip", pretrained=None, checkpoint=str(path)))
    images = tasks[0].test.images[:8]
    with torch.no_grad():
        assert torch.equal(bb.logits(images, tasks[0]), loaded.logits(images, tasks[0]))
        assert torch.equal(bb.text_head(tasks[1]), loaded.text_head(tasks[1]))
    # Random init follows the caller's torch seed.
    same, other = _random(0), _random(1)
    p = "model.visual.conv1.weight"
    assert torch.equal(dict(same.named_parameters())[p], dict(bb.named_parameters())[p])
    assert not torch.equal(dict(other.named_parameters())[p], dict(bb.named_parameters())[p])


def test_frozen_eval_and_shapes(tasks):
    bb = _random()
    assert not any(p.requires_grad for p in bb.parameters())
    assert not bb.training and not bb.model.training
    task = tasks[0]
    images = task.test.images[:5]
    with torch.no_grad():
        feats = bb.encode_image(images)
        head = bb.text_head(task)
        logits = bb.logits(images, task)
    assert feats.shape[0] == 5 and head.shape == (task.num_classes, feats.shape[1])
    assert torch.allclose(feats.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(head.norm(dim=-1), torch.ones(task.num_classes), atol=1e-5)
    assert logits.shape == (5, task.num_classes)
    scale = bb.logit_scale()
    assert 0 < float(scale) <= 100
    assert torch.allclose(logits, scale * feats @ head.T, atol=1e-5)
    first = bb.text_head(task, "first")
    tokens = bb.tokenize([task.templates[0].format(c) for c in task.classnames])
    with torch.no_grad():
        assert torch.allclose(first, bb.encode_text(tokens), atol=1e-5)
    # open_clip's own transformer blocks (methods hook their attention).
    from open_clip.transformer import ResidualAttentionBlock

    assert any(isinstance(m, ResidualAttentionBlock) for m in bb.model.visual.modules())


def test_text_head_cached_only_while_text_is_frozen(tasks):
    bb = _random()
    task = tasks[0]
    a = bb.text_head(task)
    assert bb.text_head(task) is a  # cached
    assert bb.text_head(task, "first") is not a  # per template mode
    # An in-place change of a text weight invalidates the cache even without clear_text_cache().
    with torch.no_grad():
        bb.model.text_projection.mul_(2.0).div_(2.0).add_(0.01)
    b = bb.text_head(task)
    assert b is not a and not torch.equal(a, b)
    # Training the image tower only: still cached.
    for p in bb.model.visual.parameters():
        p.requires_grad_(True)
    assert bb.text_head(task) is bb.text_head(task)
    # A trainable text parameter: recomputed each call, with grad.
    bb.model.ln_final.weight.requires_grad_(True)
    h1, h2 = bb.text_head(task), bb.text_head(task)
    assert h1 is not h2 and h1.requires_grad
    h1.sum().backward()
    assert bb.model.ln_final.weight.grad is not None
    with torch.no_grad():
        assert not bb.text_head(task).requires_grad
    bb.freeze()
    c = bb.text_head(task)
    assert bb.text_head(task) is c
    bb.clear_text_cache()
    assert bb.text_head(task) is not c


def test_loading_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(SpecError, match=r"run\.backbone\.checkpoint") as e:
        load_backbone(BackboneSpec(pretrained=None, checkpoint=str(missing)))
    assert str(missing) in str(e.value)
    with pytest.raises(SpecError, match=r"run\.backbone\.model.*mmcl-tiny-clip"):
        load_backbone(BackboneSpec(model="mmcl-huge-clip", pretrained=None))
    with pytest.raises(SpecError, match=r"run\.backbone\.pretrained"):
        load_backbone(BackboneSpec(model="mmcl-tiny-clip", pretrained="laion2b_no_such_tag"))
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, bad)
    with pytest.raises(SpecError, match=r"run\.backbone\.checkpoint"):
        load_backbone(BackboneSpec(pretrained=None, checkpoint=str(bad)))


def test_ensure_pretrained_trains_once_under_concurrency(tmp_path, monkeypatch):
    """Two concurrent callers: one trains, the other waits on the lock and reuses the file."""
    import time

    import open_clip

    from mmcl.backbones import pretrain

    calls: list[str] = []

    def fake_pretrain(name: str, recipe: dict, *args, **kwargs) -> dict:
        calls.append(name)
        time.sleep(0.5)  # long enough for the second caller to block on the lock
        return open_clip.create_model(name).state_dict()

    monkeypatch.setattr(pretrain, "pretrain", fake_pretrain)
    spec = BackboneSpec(pretrained="synthetic", cache_dir=str(tmp_path / "cache"))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_pretrained(spec))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 2 and results[0] == results[1] and results[0].is_file()
    assert results[0].parent == tmp_path / "cache"
    assert not [p for p in results[0].parent.iterdir() if ".tmp" in p.name]
    # The file is what open_clip's own loader takes, and load_backbone uses it.
    open_clip.create_model_and_transforms("mmcl-tiny-clip", pretrained=str(results[0]))
    load_backbone(spec)
    assert len(calls) == 1
    # MMCL_CACHE is the default cache root.
    monkeypatch.setenv("MMCL_CACHE", str(tmp_path / "env"))
    assert pretrain.checkpoint_path(BackboneSpec()).parent == tmp_path / "env"


# In CI (an empty MMCL_CACHE) this is the first test that needs the tiny CLIP, so it pays
# for the one-off pretraining: ~4 min on 2 idle cores, more on a loaded machine.
@pytest.mark.timeout(1800)
def test_synthetic_pretraining_gives_zero_shot(mmcl_cache):
    """The offline-pretrained tiny CLIP recognises the tasks' concepts without training."""
    spec = BackboneSpec(model="mmcl-tiny-clip", pretrained="synthetic", cache_dir=str(mmcl_cache))
    bb = load_backbone(spec)
    bench = build_benchmark(BenchmarkSpec(options={"n_train_per_class": 1, "n_test_per_class": 30}), bb.image_size)
    above = []
    with torch.no_grad():
        for task in bench.tasks:
            acc = 100 * (bb.logits(task.test.images, task).argmax(-1) == task.test.labels).float().mean().item()
            chance = 100 / task.num_classes
            above.append(acc > chance + 10)
    assert sum(above) >= 4, above
