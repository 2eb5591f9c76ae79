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
# Credentials of the loopback S3 server (`s3_server`), in the environment as on a real
# cluster (mmcl reads none from code or study files). Set before any Ray node starts so
# its workers inherit them; with keys present the AWS SDK never asks the EC2 metadata
# address (disabled as well: nothing but loopback is addressed).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "mmcl-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mmcl-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, for the session.

    Yields a function ``bucket(name) -> URI`` that creates a bucket and returns the
    ``s3://`` URI (with the endpoint options) a study's ``storage:`` would hold. The server
    process is stopped by its pid at the end."""
    import signal

    port = _free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return proc.poll() is not None  # stop waiting if it died

    if not wait_for(listening, timeout=60) or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"the moto S3 server did not start on 127.0.0.1:{port} within 60 s (log: {log.name})")
    options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"

    def bucket(name: str) -> str:
        import pyarrow.fs as pafs

        fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?{options}&allow_bucket_creation=true")
        fs.create_dir(name)
        return f"s3://{name}?{options}"

    bucket.options = options
    try:
        yield bucket
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


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
