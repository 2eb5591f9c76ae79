"""The offline benchmark behaves like a real CLIP on a task stream (README figures).

With the quickstart's run block and the pretrained tiny CLIP: zero-shot is above chance
on most tasks, sequential fine-tuning forgets (BWT <= -5 points) and LwF forgets less.
"""

from __future__ import annotations

from mmcl.engine import run_continual
from mmcl.spec import apply_overrides, load_study

from .conftest import REPO


def _run(method: str):
    run = load_study(REPO / "studies" / "quickstart.yaml").run
    # LwF keeps the quickstart's own config (distill_weight 5); finetune has no knobs here.
    ov = {"torch_threads": 2, "seed": 0}
    if method != run.method.name:
        ov.update({"method.name": method, "method.config": {}})
    run = apply_overrides(run, ov)
    return run_continual(run)


def test_finetune_forgets_and_lwf_forgets_less():
    ft = _run("finetune")
    lwf = _run("lwf")
    zero_shot = ft.matrix[0]
    chance = [100.0 / 6, 100.0 / 6, 25, 25, 25, 25]  # classes per task in the default order
    assert sum(z > c + 10 for z, c in zip(zero_shot, chance)) >= 5, zero_shot
    assert ft.metrics["bwt"] <= -5.0, ft.metrics
    assert lwf.metrics["bwt"] > ft.metrics["bwt"] + 2.0, (lwf.metrics, ft.metrics)
    # Each task was learned when trained: the diagonal is not below zero-shot on average.
    diag = [ft.matrix[i + 1][i] for i in range(6)]
    assert sum(diag) / 6 >= sum(zero_shot) / 6
