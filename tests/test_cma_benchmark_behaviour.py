"""On the generated audio-visual benchmark CMA forgets less than fine-tuning, class- and
domain-incrementally (the README's paired-track figures; studies/cma_quickstart.yaml's run)."""

from __future__ import annotations

import pytest

from mmcl.engine import run_continual
from mmcl.spec import apply_overrides, load_study

from .conftest import REPO

pytestmark = pytest.mark.slow


def _run(method: str, protocol: str, seed: int):
    run = load_study(REPO / "studies" / "cma_quickstart.yaml").run
    ov = {"torch_threads": 1, "seed": seed, "benchmark.options.protocol": protocol, "method.name": method,
          "method.config": {}}  # fmt: skip
    return run_continual(apply_overrides(run, ov))


# DIL forgets little on this benchmark and how much depends on the training seed: on one
# machine fine-tuning's forgetting was 4.0 / 12.7 / 10.4 points for seeds 0 / 1 / 2 (CMA's
# 3.3 / 0.0 / -0.4), so one seed could not carry a 3-point gap. The DIL claim is checked
# on the mean of three seeds, with CMA ahead on each; CIL's gap (> 20) needs one.
@pytest.mark.parametrize("protocol,margin,seeds", [("cil", 10.0, (0,)), ("dil", 3.0, (0, 1, 2))],
                         ids=["cil", "dil"])  # fmt: skip
def test_cma_forgets_less_than_finetuning(protocol, margin, seeds):
    chance = 50.0 if protocol == "cil" else 12.5
    ft_runs, cma_runs = [], []
    for seed in seeds:
        ft, cma = _run("pm_finetune", protocol, seed), _run("cma", protocol, seed)
        n = ft.matrix.shape[1]
        # Both learn each task when they train on it (well above the chance of its classes).
        assert min(cma.matrix[i + 1][i] for i in range(n)) > chance + 20, (seed, cma.matrix)
        assert min(ft.matrix[i + 1][i] for i in range(n)) > chance + 20, (seed, ft.matrix)
        assert cma.metrics["forgetting"] < ft.metrics["forgetting"], (seed, cma.metrics, ft.metrics)
        ft_runs.append(ft.metrics)
        cma_runs.append(cma.metrics)

    def mean(runs, key):
        return sum(r[key] for r in runs) / len(runs)

    detail = (cma_runs, ft_runs)
    assert mean(cma_runs, "forgetting") < mean(ft_runs, "forgetting") - margin, detail
    assert mean(cma_runs, "bwt") > mean(ft_runs, "bwt") + margin, detail
    assert mean(cma_runs, "last") >= mean(ft_runs, "last") - 1.0, detail
