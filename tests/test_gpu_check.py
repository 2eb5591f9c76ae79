"""benchmarks/gpu_check.sh --dry-run: the GPU check's every step, on the CPU at tiny
sizes, so the one command a lent GPU machine runs cannot rot where no GPU is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

STEPS = ["gpu_tier", "dagr_step", "dgg_overhead", "eca_blip2", "dgg_llava", "mtil_loader"]


def test_dry_run_runs_every_step_and_summarises_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and list(summary["steps"]) == STEPS
    assert all(s["status"] == "ok" for s in summary["steps"].values()), summary["steps"]
    tier = summary["gpu_tier"]
    # The tier ran on the CPU (not skipped): 3 methods x 2 precisions, 3 evaluations, the
    # loader, the Tune test.
    assert tier["failures"] == tier["errors"] == 0 and tier["tests"] - tier["skipped"] >= 11, tier
    figures = {row[0] for row in summary["figures"]}
    assert {"DAGR / floor throughput", "DAGR vs DIKI step time", "MTIL loader, 1 workers"} <= figures
    assert any(f.startswith("eca on tiny blip2") for f in figures) and any(f.startswith("gen_dgg on tiny llava") for f in figures)
    for name in ("dagr_step", "dgg_overhead", "eca_blip2", "dgg_llava", "mtil_loader"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["device"] == "cpu"
    assert "dry run" in (tmp_path / "summary.md").read_text()


def test_without_a_gpu_the_real_run_refuses_at_once(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO,
                       env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "no CUDA device visible: run with --dry-run" in r.stderr
