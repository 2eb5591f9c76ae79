"""Shared fixtures: one real local Ray head for the whole session, tiny runs.

Ray is started once with `ray start --head` on loopback (with its dashboard, so that
`ray job submit` works against it too); every test that needs Ray connects to it through
RAY_ADDRESS. Token auth is off and usage stats are off (see the architecture pitfalls).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep every Ray connection of the tests on loopback: on Linux Ray replaces a 127.0.0.1
# address by the machine's interface address (services.resolve_ip_for_localhost) unless
# clusters are "disabled", which only makes it use the loopback address for this node.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head on 127.0.0.1 with 2 CPUs and its dashboard (for job submission)."""
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    # A head left over from an interrupted session would clash (GCS session names).
    subprocess.run([_ray_bin(), "stop", "--force"], env=env, capture_output=True, timeout=120)
    for attempt in range(2):
        port, dash = _free_port(), _free_port()
        cmd = [
            _ray_bin(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", "--disable-usage-stats",
        ]  # fmt: skip
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if r.returncode == 0:
            break
        subprocess.run([_ray_bin(), "stop", "--force"], env=env, capture_output=True, timeout=120)
    else:
        pytest.fail(f"ray start failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    info = {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    try:
        yield info
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            os.environ.pop("RAY_ADDRESS", None)
            subprocess.run([_ray_bin(), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def mmcl_cache(tmp_path_factory) -> Path:
    """The on-disk model cache the tests share (the tiny CLIP is pretrained once)."""
    path = Path(os.environ.get("MMCL_CACHE", Path.home() / ".cache" / "mmcl"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def mmcl_cmd(*args: str) -> list[str]:
    """The `mmcl` console script of this environment, as a subprocess command."""
    exe = shutil.which("mmcl", path=str(Path(sys.executable).parent))
    return [exe, *args] if exe else [sys.executable, "-m", "mmcl.cli", *args]


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False
