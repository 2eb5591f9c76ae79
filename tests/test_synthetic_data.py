"""The offline ``synthetic`` benchmark: determinism, format, domains, spec handling."""

from __future__ import annotations

import pytest
import torch

from mmcl.data import benchmark_task_names, build_benchmark
from mmcl.data.synthetic import OPENAI_MEAN, OPENAI_STD, build_synthetic, pretraining_batch
from mmcl.spec import BenchmarkSpec, SpecError

SMALL = {"n_train_per_class": 8, "n_test_per_class": 4}


def _small(**kw) -> BenchmarkSpec:
    return BenchmarkSpec(name="synthetic", options={**SMALL, **kw.pop("options", {})}, **kw)


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN)[None, :, None, None]
    std = torch.tensor(OPENAI_STD)[None, :, None, None]
    return x * std + mean


def test_default_task_names_without_data():
    names = benchmark_task_names(BenchmarkSpec())
    assert len(names) == 6
    assert len(set(names)) == 6
    assert names == build_benchmark(_small()).task_names()


def test_deterministic_and_seed_dependent():
    # The builder directly: build_benchmark's in-process cache would hide a difference.
    a = build_synthetic(dict(SMALL), 32, 0)
    b = build_synthetic(dict(SMALL), 32, 0)
    c = build_synthetic({**SMALL, "data_seed": 1}, 32, 0)
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        assert torch.equal(ta.train.images, tb.train.images)
        assert torch.equal(ta.train.labels, tb.train.labels)
        assert torch.equal(ta.test.images, tb.test.images)
        assert not torch.equal(ta.train.images, tc.train.images)
        # Train and test are different draws.
        assert not torch.equal(ta.train.images[: len(ta.test)], ta.test.images)


def test_shapes_labels_and_normalisation():
    bench = build_benchmark(_small())
    for task in bench.tasks:
        assert 4 <= task.num_classes <= 8
        n = task.num_classes
        assert len(task.train) == 8 * n and len(task.test) == 4 * n
        sample = task.train[0]
        assert set(sample) >= {"image", "label"}
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        # Balanced classes.
        assert torch.bincount(task.train.labels, minlength=n).tolist() == [8] * n
        assert torch.bincount(task.test.labels, minlength=n).tolist() == [4] * n
        # CLIP-normalised: undoing OPENAI mean/std gives pixels in [0, 1].
        px = _denormalise(task.train.images)
        assert px.min() >= -1e-4 and px.max() <= 1 + 1e-4
        assert torch.isfinite(task.train.images).all()


def test_class_names_and_templates():
    bench = build_benchmark(_small())
    all_names: list[str] = []
    for task in bench.tasks:
        assert len(set(task.classnames)) == task.num_classes
        assert task.templates and all("{}" in t for t in task.templates)
        all_names += task.classnames
    # Every class name belongs to one task only: a prompt never means two things.
    assert len(all_names) == len(set(all_names))
    # Each task has its own prompt templates.
    assert len({tuple(t.templates) for t in bench.tasks}) == len(bench.tasks)


def _pixel_stats(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean((0, 2, 3))
    std = x.std((0, 2, 3))
    high_freq = (x[..., 1:] - x[..., :-1]).abs().mean()  # noise / pattern / blur
    colourfulness = x.std(1).mean()  # saturation
    return torch.cat([mean, std, high_freq[None], colourfulness[None]])


def test_every_task_is_its_own_domain():
    bench = build_benchmark(BenchmarkSpec(options={"n_train_per_class": 30, "n_test_per_class": 4}))
    stats = torch.stack([_pixel_stats(t.train.images) for t in bench.tasks])
    dist = torch.cdist(stats, stats)
    off = dist[~torch.eye(len(stats), dtype=torch.bool)]
    assert off.min() > 0.2, dist
    # The pretraining (base) domain differs from every task's domain too.
    base = _pixel_stats(pretraining_batch(torch.Generator().manual_seed(0), 256).images)
    assert (torch.cdist(base[None], stats) > 0.1).all()


def test_pretraining_captions_name_the_task_concepts():
    batch = pretraining_batch(torch.Generator().manual_seed(0), 512)
    assert batch.images.shape == (512, 3, 32, 32)
    assert len(batch.captions) == 512
    text = " ".join(batch.captions)
    bench = build_benchmark(_small())
    for task in bench.tasks:
        for name in task.classnames:
            assert name in text, f"{task.name}: class {name!r} never appears in pretraining captions"


def test_order_and_num_tasks():
    names = benchmark_task_names(BenchmarkSpec())
    order = [names[3], names[0], names[5]]
    bench = build_benchmark(_small(order=order))
    assert bench.task_names() == order
    bench = build_benchmark(_small(order=order, num_tasks=2))
    assert bench.task_names() == order[:2]
    bench = build_benchmark(_small(num_tasks=2))
    assert bench.task_names() == names[:2]
    # Reordering reuses the generated tasks (in-process cache): same tensors.
    again = build_benchmark(_small(order=list(reversed(names))))
    assert again.tasks[-1].train.images is build_benchmark(_small()).tasks[0].train.images


def test_spec_errors_name_the_key():
    with pytest.raises(SpecError, match=r"run\.benchmark\.order.*repeated: shapes"):
        build_benchmark(_small(order=["shapes", "shapes"]))
    with pytest.raises(SpecError, match=r"run\.benchmark\.order") as e:
        build_benchmark(_small(order=["shapes", "nope"]))
    assert "'nope'" in str(e.value)
    for n in benchmark_task_names(BenchmarkSpec()):
        assert n in str(e.value)  # the valid names are listed
    with pytest.raises(SpecError, match=r"run\.benchmark\.num_tasks"):
        build_benchmark(_small(num_tasks=7))
    with pytest.raises(SpecError, match=r"run\.benchmark\.options\.n_train"):
        build_benchmark(BenchmarkSpec(options={"n_train": 3}))
    with pytest.raises(SpecError, match=r"run\.benchmark\.options\.n_test_per_class"):
        build_benchmark(BenchmarkSpec(options={"n_test_per_class": 0}))
    with pytest.raises(SpecError, match=r"run\.benchmark\.options\.image_size"):
        build_benchmark(_small(options={"image_size": 64}), image_size=32)
    with pytest.raises(SpecError, match=r"run\.benchmark\.name.*synthetic"):
        build_benchmark(BenchmarkSpec(name="mtil-typo"))
    with pytest.raises(SpecError, match=r"run\.benchmark\.name"):
        benchmark_task_names(BenchmarkSpec(name="mtil-typo"))
    with pytest.raises(SpecError, match=r"run\.benchmark\.options\.bogus"):
        benchmark_task_names(BenchmarkSpec(options={"bogus": 1}))


def test_other_image_size():
    bench = build_benchmark(_small(options={"image_size": 48}))
    assert bench.tasks[0].train.images.shape[-2:] == (48, 48)


def _routing_accuracy(mix: float) -> float:
    """Share of test images whose task a Gaussian per task (DIKI's identifier) over simple
    pixel statistics gets right."""
    from cl_methods._task_identifier import GaussianTaskIdentifier

    opts = {"n_train_per_class": 30, "n_test_per_class": 10, "domain_mix": mix}
    bench = build_benchmark(BenchmarkSpec(options=opts))

    def feats(x: torch.Tensor) -> torch.Tensor:  # per-image channel means and stds
        x = _denormalise(x)
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)

    ident = GaussianTaskIdentifier(shrinkage="auto")
    for t in bench.tasks:
        ident.fit_task(feats(t.train.images))
    right = total = 0
    for i, t in enumerate(bench.tasks):
        pred, _ = ident.identify(feats(t.test.images))
        right += int((pred == i).sum())
        total += len(pred)
    return right / total


def test_domain_mix_makes_task_identity_ambiguous():
    # Own domains: a task's images say which task they belong to. domain_mix 1: every
    # task draws from all six looks, so routing by image statistics is near chance (1/6).
    assert _routing_accuracy(0.0) > 0.9
    assert _routing_accuracy(1.0) < 0.35
    mixed = build_synthetic({**SMALL, "domain_mix": 0.5}, 32, 0)
    plain = build_synthetic(SMALL, 32, 0)
    for a, b in zip(mixed.tasks, plain.tasks):
        assert torch.equal(a.train.labels, b.train.labels)  # same labels, other pixels
        assert not torch.equal(a.train.images, b.train.images)
        assert a.info["domain_mix"] == 0.5
