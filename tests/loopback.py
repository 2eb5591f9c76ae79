"""A Ray cluster of real `ray start` processes on loopback, for tests that are about
nodes (tests/test_multinode.py) or about what a node offers (tests/test_gpu.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import REPO, _free_port, wait_for

RAY = str(Path(sys.executable).parent / "ray")


class LoopbackCluster:
    """Head (0 CPU) + worker nodes, each `ray start --block` in its own process group."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's socket paths must stay short.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
        self.log_dir = tmp
        self.procs: list[subprocess.Popen] = []
        self.n_nodes = 0  # nodes started and not killed: what the GCS should report alive
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def _spawn(self, cmd: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start_head(self, cpus: int = 0, gpus: float = 0) -> None:
        """The head node; by default it offers nothing, so no trial runs where the driver is."""
        self._spawn(
            [RAY, "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}"],
            "head", {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        )  # fmt: skip
        self.n_nodes = 1
        self.wait_nodes(1)

    def add_worker(self, name: str, private_dir: Path | None = None, cpus: int = 2) -> subprocess.Popen:
        node = [sys.executable, str(REPO / "tests" / "ray_node.py"), "start", f"--address={self.address}",
                "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats",
                "--block"]  # fmt: skip
        if private_dir is not None:
            private_dir.mkdir(parents=True, exist_ok=True)
            # The node's own disk at the driver's results path (an empty tmpfs).
            node = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs tmpfs "$0" && exec "$@"', str(private_dir), *node]  # fmt: skip
        p = self._spawn(node, name, {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
        self.n_nodes += 1
        self.wait_nodes(self.n_nodes)
        return p

    def alive_nodes(self) -> list[dict]:
        """Alive nodes as the GCS reports them (asked from a short-lived driver)."""
        code = (
            "import json, ray; ray.init(address=%r, log_to_driver=False);"
            "print(json.dumps([{'id': n['NodeID'], 'cpu': n['Resources'].get('CPU', 0)} "
            "for n in ray.nodes() if n['Alive']]))" % self.address
        )
        r = subprocess.run([sys.executable, "-c", code], env={**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else []

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        if not wait_for(lambda: len(self.alive_nodes()) == n, timeout=timeout, interval=2):
            logs = "\n".join(f.name + ": " + f.read_text()[-1500:] for f in self.log_dir.glob("*.log"))
            pytest.fail(f"the cluster did not reach {n} alive node(s) within {timeout:.0f} s\n{logs}")

    def kill_node(self, proc: subprocess.Popen) -> None:
        """SIGKILL the node started as ``proc``, its raylet and every process on it (its
        trials' workers) at once: a machine lost, not a graceful stop."""
        import psutil

        procs = psutil.Process(proc.pid).children(recursive=True)
        assert any(c.name() == "raylet" for c in procs), "no raylet under that node's process"
        for c in sorted(procs, key=lambda c: c.name() != "raylet"):  # the raylet first
            try:
                c.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self._stop(proc)
        # Until the GCS has marked the node dead (its health checks take seconds), it still
        # counts as alive: a node added meanwhile would be miscounted.
        self.n_nodes -= 1
        self.wait_nodes(self.n_nodes, timeout=120)

    def _stop(self, p: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=15)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> None:
        for p in reversed(self.procs):
            self._stop(p)
