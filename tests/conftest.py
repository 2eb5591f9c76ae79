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


_TERMINAL = {}


def pytest_configure(config):
    _TERMINAL["tr"] = config.pluginmanager.get_plugin("terminalreporter")


def pytest_runtest_logreport(report):
    # A failure's traceback as it happens, not only in the summary at the end: a later test
    # that hangs until the per-test timeout ends the process (timeout_method = thread)
    # would otherwise take the earlier failure's reason with it.
    tr = _TERMINAL.get("tr")
    if report.failed and tr is not None:
        tr.write_line("")
        tr.write_sep("-", f"FAILED {report.nodeid} ({report.when})", red=True)
        tr.write_line(report.longreprtext[-6000:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a process started with ``start_new_session=True`` and everything under it:
    SIGTERM to its process group (``ray start --block`` then stops its node cleanly),
    SIGKILL to whatever of its group or its descendants is left after ``grace_s``."""
    import signal

    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real Ray head on 127.0.0.1 with 2 CPUs and its dashboard (for job submission).

    It runs as `ray start --head --block` in its own process group with its own temp dir,
    and is stopped by that group at the end: never `ray stop`, which would stop every Ray
    node on the machine (another session's, a test's own loopback cluster)."""
    import tempfile

    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    logs = tmp_path_factory.mktemp("ray-head")
    # Ray's socket paths must stay short.
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    proc = None
    for attempt in range(2):
        port, dash = _free_port(), _free_port()
        cmd = [
            _ray_bin(), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
            "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        ]  # fmt: skip
        log = open(logs / f"head-{attempt}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # Up when both the GCS and the dashboard (job submission) accept connections.
        up = wait_for(lambda: proc.poll() is not None or (_listening(port) and _listening(dash)), timeout=180,
                      interval=1)  # fmt: skip
        if up and proc.poll() is None:
            break
        stop_process_tree(proc)
        proc = None
    if proc is None:
        text = "\n".join(f.name + ": " + f.read_text(errors="replace")[-3000:] for f in sorted(logs.glob("*.log")))
        pytest.fail(f"ray start --head did not come up on 127.0.0.1 within 180 s (twice):\n{text}")
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
            stop_process_tree(proc)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


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
        return _listening(port) or proc.poll() is not None  # stop waiting if it died

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
