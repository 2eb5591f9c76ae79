"""The generation track end to end: the engine scores generated strings with each task's
metric, and the baselines (zero-shot, adapter / LoRA fine-tuning, LwF, DGG) run through
``run_continual`` on the tiny random BLIP-2 / LLaVA and the generated benchmark."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from cl_methods.base import Method
from mmcl.data.base import collate
from mmcl.engine import evaluate, prepare, run_continual

from .helpers import tiny_gen_run


class _Oracle(Method):
    """Answers with each sample's first reference (not registered: a test instrument)."""

    name = "oracle"
    track = "generation"

    def __init__(self, wrong: bool = False):
        super().__init__(self.Config())
        self.wrong = wrong

    def predict(self, batch, task):
        if self.wrong:
            return torch.zeros(len(batch["refs"]), 3)
        return [r[0] for r in batch["refs"]]


def test_engine_scores_generated_strings_with_the_task_metric():
    prep = prepare(tiny_gen_run("gen_zeroshot", num_tasks=3))
    scores, names, sizes = evaluate(_Oracle(), prep.tasks, prep.run, prep.device, None)
    assert names == {"captions": "cider", "color_qa": "vqa_acc", "shape_qa": "vqa_acc"}
    assert scores["color_qa"] == 100.0 and scores["shape_qa"] == 100.0
    assert scores["captions"] > 100.0  # CIDEr-D x 100 of an exact reference copy is well above 1.0 x 100
    assert sizes["captions"] == 6
    with pytest.raises(TypeError, match="one generated string per sample"):
        evaluate(_Oracle(wrong=True), prep.tasks, prep.run, prep.device, None)


def test_zeroshot_rows_equal_and_metric_names_recorded():
    ends = []
    result = run_continual(tiny_gen_run("gen_zeroshot", num_tasks=2), on_task_end=ends.append)
    assert (result.matrix == result.matrix[0]).all()
    assert ends[-1].metric_names == {"captions": "cider", "color_qa": "vqa_acc"}
    assert result.trainable_params == 0
    # Which caption tokenizer scored CIDEr lands in the trials table (env/caption_tokenizer).
    assert ends[-1].environment["caption_tokenizer"] == ("ptb" if shutil.which("java") else "python")


def _test_loss(prep, task_index: int) -> float:
    data = prep.tasks[task_index].test
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        return float(prep.method.lm_loss(batch))


@pytest.mark.parametrize("kind, params", [("blip2", "adapters"), ("llava", "lora"), ("blip2", "lora")])
def test_finetuning_lowers_the_lm_loss_of_the_trained_task(kind, params):
    run = tiny_gen_run("gen_adapter", {"params": params}, kind=kind, num_tasks=1, steps=24, n_train=24, epochs=4, lr=1e-2)
    run.benchmark.order = ["color_qa"]
    prep = prepare(run)
    before = _test_loss(prep, 0)
    result = run_continual(run, prepared=prep)
    assert _test_loss(prep, 0) < before - 0.2
    if params == "lora":
        assert result.matrix[1, 0] > result.matrix[0, 0]  # VQA accuracy rises above the random model's
    n_expected = sum(p.numel() for p in prep.method.trainable_parameters())
    assert result.trainable_params == n_expected > 0


def test_lwf_distills_from_the_second_task_on_generated_answers():
    run = tiny_gen_run("gen_lwf", {"params": "lora"}, kind="llava", num_tasks=2, steps=3)
    result = run_continual(run)
    first = [c for c in result.curves if c["task"] == 0]
    second = [c for c in result.curves if c["task"] == 1]
    assert all("loss/distill" not in c for c in first)
    # At the first step of task 2 the student is the teacher: zero divergence; then it moves.
    assert second[0]["loss/distill"] == pytest.approx(0.0, abs=1e-6)
    assert second[-1]["loss/distill"] > 1e-6
    assert all(math.isfinite(c["loss"]) for c in result.curves)


def _lora_state(prep):
    return {n: p.detach().clone() for n, p in prep.backbone.named_parameters() if ".lora_" in n}


def test_dgg_without_guidance_or_replay_is_plain_lora_finetuning():
    cfg = {"params": "lora"}
    a = prepare(tiny_gen_run("gen_adapter", cfg, kind="llava", num_tasks=2, steps=3))
    ra = run_continual(a.run, prepared=a)
    b = prepare(tiny_gen_run("gen_dgg", {**cfg, "alpha": 0.0, "buffer_size": 0}, kind="llava", num_tasks=2, steps=3))
    rb = run_continual(b.run, prepared=b)
    assert [c["loss"] for c in ra.curves] == [c["loss"] for c in rb.curves]
    sa, sb = _lora_state(a), _lora_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_dgg_on_llava_lora_guides_every_step_and_replays_text():
    def run(alpha):
        prep = prepare(tiny_gen_run("gen_dgg", {"params": "lora", "alpha": alpha, "buffer_size": 4}, kind="llava",
                                    num_tasks=2, steps=6, lr=1e-2))  # fmt: skip
        run_continual(prep.run, prepared=prep)
        return prep

    prep0, prep1 = run(0.0), run(1.0)
    # alpha = 1: every step of task 2 is guided; alpha = 0: none.
    assert prep1.method.guide.injections == prep1.method.guide.steps > 0
    assert prep0.method.guide.injections == 0
    lora = {id(p) for n, p in prep1.backbone.named_parameters() if ".lora_" in n}
    assert {id(p) for p in prep1.method.guide.params} == lora
    buf = prep1.method.buffer
    assert len(buf) == 8 and {int(t) for t in buf.task} == {0, 1}
    sample = buf[0]
    assert isinstance(sample["prompt"], str) and isinstance(sample["refs"], list)
    batch = buf.sample(3, torch.Generator().manual_seed(0))
    assert len(batch["refs"]) == 3 and batch["image"].shape[0] == 3


def test_dgg_guidance_reduces_drift_on_blip2_adapters():
    def drift(alpha):
        prep = prepare(tiny_gen_run("gen_dgg", {"alpha": alpha, "buffer_size": 0}, kind="blip2", num_tasks=2,
                                    steps=6, lr=1e-2))  # fmt: skip
        snaps = {}

        def on_end(end):
            snaps[end.step] = [p.detach().clone() for p in prep.method.trainable_parameters()]

        run_continual(prep.run, on_task_end=on_end, prepared=prep)
        names = {id(p) for p in prep.method.modules["adapters"].parameters()}
        assert all(id(p) in names for p in prep.method.trainable_parameters())  # DGG guides the adapters
        return sum(float((a - b).norm() ** 2) for a, b in zip(snaps[2], snaps[1])) ** 0.5

    assert drift(1.0) < drift(0.0)
