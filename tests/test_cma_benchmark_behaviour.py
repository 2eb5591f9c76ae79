"""On the generated audio-visual benchmark CMA forgets less than fine-tuning, class- and
domain-incrementally (the README's paired-track figures; studies/cma_quickstart.yaml's run)."""

from __future__ import annotations

import pytest

from mmcl.engine import run_continual
from mmcl.spec import apply_overrides, load_study

from .conftest import REPO

pytestmark = pytest.mark.slow


def _run(method: str, protocol: str):
    run = load_study(REPO / "studies" / "cma_quickstart.yaml").run
    ov = {"torch_threads": 1, "seed": 0, "benchmark.options.protocol": protocol, "method.name": method, "method.config": {}}
    return run_continual(apply_overrides(run, ov))


@pytest.mark.parametrize("protocol,margin", [("cil", 10.0), ("dil", 3.0)])
def test_cma_forgets_less_than_finetuning(protocol, margin):
    ft = _run("pm_finetune", protocol)
    cma = _run("cma", protocol)
    n = ft.matrix.shape[1]
    # Both learn each task when they train on it (well above the chance of its classes).
    chance = 50.0 if protocol == "cil" else 12.5
    assert min(cma.matrix[i + 1][i] for i in range(n)) > chance + 20, cma.matrix
    assert min(ft.matrix[i + 1][i] for i in range(n)) > chance + 20, ft.matrix
    assert cma.metrics["forgetting"] < ft.metrics["forgetting"] - margin, (cma.metrics, ft.metrics)
    assert cma.metrics["bwt"] > ft.metrics["bwt"] + margin
    assert cma.metrics["last"] >= ft.metrics["last"] - 1.0
