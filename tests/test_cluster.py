"""cluster.yaml passes Ray's own checks; a study runs through `ray job submit`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from .conftest import REPO
from .helpers import run_notebook


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # The head runs the driver only: it offers nothing a trial could be placed on.
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "a GPU worker type is needed"
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert any("uv sync --locked" in c for c in config["setup_commands"])


def test_smoke_study_through_ray_job_submit(ray_cluster, tmp_path):
    out = tmp_path / "out"
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(REPO), "--",
        "mmcl", "run", "studies/quickstart.yaml", "--smoke", "--output", str(out),
    ]  # fmt: skip
    for _ in range(12):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        # The head's dashboard agent can come up after the head reports ready (seen on a
        # loaded machine); Ray's own answer then is to try again later.
        if "No available agent to submit job" not in r.stderr:
            break
        time.sleep(5)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "succeeded" in (r.stdout + r.stderr)
    from .test_shipped_studies import check_smoke_run

    check_smoke_run(REPO / "studies" / "quickstart.yaml", out)  # the shipped-study checks
    trials = pd.read_parquet(out / "trials.parquet")
    acc = pd.read_parquet(out / "accuracy.parquet")
    assert set(trials.stage) == {"search", "ablation", "orders"}
    assert not acc.duplicated(["stage", "trial_id", "step", "eval_task"]).any()
    assert (out / "report.md").exists() and (out / "report.html").exists()
    # The job printed the per-stage summary, and a log a researcher can read.
    assert "avg" in r.stdout.lower() and "bwt" in r.stdout.lower()
    from .test_shipped_studies import check_console

    # The driver's own output, without the job client's header and footer.
    check_console(r.stdout[r.stdout.index("== stage 1/") : r.stdout.rindex("report.html") + len("report.html")], out)
    # The quickstart notebook runs top to bottom on these results, every figure drawn.
    nb = run_notebook(REPO / "analysis" / "notebooks" / "quickstart.ipynb", out)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    n_stages = trials["stage"].nunique()
    assert len(images) >= 2 * n_stages + n_stages + 1, len(images)  # heatmap + curves per stage, a plot per stage, Avg vs Last


def _readme_cluster_command() -> str:
    """The `mmcl run ...` line of the README's "Running on a cluster" block."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running on a cluster") :]
    block = section[section.index("```bash") : section.index("```", section.index("```bash") + 7)]
    lines = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("mmcl run")]
    assert len(lines) == 1, block
    return lines[0]


def test_kuberay_rayjob_runs_the_readme_command_on_a_bucket():
    job = yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"] == _readme_cluster_command()
    # Pods share no disk: the entrypoint's output is a bucket, and the study it names exists.
    args = spec["entrypoint"].split()
    assert args[args.index("--output") + 1].startswith("s3://")
    from mmcl.spec import load_study

    load_study(REPO / args[2])
    cluster = spec["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    workers = cluster["workerGroupSpecs"]
    gpu = [w for w in workers if w["rayStartParams"].get("num-gpus", "0") != "0"]
    assert gpu, "a GPU worker group is needed"
    for group in [head, *workers]:
        for c in group["template"]["spec"]["containers"]:
            # Credentials from a Secret, never written into the manifest.
            assert any("secretRef" in e for e in c.get("envFrom", [])), c["name"]
            assert not any(e.get("name", "").startswith("AWS_") and "value" in e for e in c.get("env", []))
    for w in gpu:
        res = w["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == w["rayStartParams"]["num-gpus"]


def test_cluster_yaml_names_the_readme_command():
    assert _readme_cluster_command().split(" --output")[0] in (REPO / "cluster.yaml").read_text()
