"""A throwaway local Ray head for tests that need a real cluster (``ray start --head``), isolated from others.

Why not ``ray.init()``: the jobs and metrics tests must talk to a head the way a user does (job server,
Prometheus endpoint), and other tests (or other people on the machine) may run their own Ray at the same time.
So the head gets:

* free ports for every listener Ray lets us choose (GCS, dashboard, metrics export, node and object managers,
  the dashboard agent's HTTP and gRPC ports, the runtime-env agent, the Ray Client server), and a private
  ``--temp-dir``: ``ray.init()`` elsewhere looks for ``<default temp dir>/ray_current_cluster`` and therefore
  never joins this head by accident. The fixed defaults collided with any other local Ray: with another
  ``ray.init()`` running, its dashboard agent held port 52365, ours could not serve, and ``ray job submit``
  failed with "No available agent to submit job";
* a start that waits for the head's job agent, not only the dashboard (``wait_for_job_agent``): the dashboard
  answers seconds before the agent that runs submitted jobs is up and registered;
* its own token: Ray 2.60 turns token authentication on for ``ray start --head`` when a token is around
  (``~/.ray/auth_token`` appears after any local ``ray.init()``), and ``ray job submit`` then needs
  ``RAY_AUTH_MODE=token`` plus the token. We set ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` explicitly for
  the head and every client, so the outcome never depends on what is in ``~/.ray``;
* ``--block`` in a new session, so stopping it is one signal to the process group we started, never
  ``ray stop`` (which would kill every Ray on the machine). Draining on SIGTERM is turned off (it waits 30 s).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(token: str, **extra: str) -> dict[str, str]:
    """Environment for processes that talk to the head: the venv first on PATH, token auth, no usage stats."""
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               RAY_metrics_report_interval_ms="1000")
    env.update(extra)
    return env


class LocalHead:
    def __init__(self, *, num_cpus: int = 2, dashboard: bool = True) -> None:
        self.token = secrets.token_hex(16)
        self.gcs_port, self.dashboard_port, self.metrics_port = free_port(), free_port(), free_port()
        self.agent_http_port = free_port()
        ports = {"node-manager-port": free_port(), "object-manager-port": free_port(),
                 "dashboard-agent-listen-port": self.agent_http_port, "dashboard-agent-grpc-port": free_port(),
                 "runtime-env-agent-port": free_port(), "ray-client-server-port": free_port()}
        self.temp_dir = tempfile.mkdtemp(prefix="rmray-", dir="/tmp")  # short: Ray's socket paths are bounded
        self.env = client_env(self.token)
        self.log_path = Path(self.temp_dir) / "head.log"
        self._args = [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}", f"--metrics-export-port={self.metrics_port}", f"--num-cpus={num_cpus}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items()),
        ]
        if dashboard:
            self._args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            self._args.append("--include-dashboard=false")
        self.dashboard = dashboard
        self.process: subprocess.Popen | None = None

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 120.0) -> LocalHead:
        self.process = subprocess.Popen(self._args, env=self.env, cwd=REPO, start_new_session=True,
                                        stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        url = f"{self.dashboard_url}/api/version" if self.dashboard else self.metrics_url
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without a token: the server is up
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the head did not come up in {timeout_s} s:\n{self.log_tail()}") from None
                time.sleep(0.5)
        if self.dashboard:
            self.wait_for_job_agent(max(10.0, deadline - time.monotonic()))
        return self

    def wait_for_job_agent(self, timeout_s: float = 60.0) -> None:
        """Until the head's job agent answers HTTP on its own port, and the job API lists jobs (what
        ``ray job submit`` needs); a clear TimeoutError with the head's log otherwise."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.agent_http_port), timeout=2):
                    pass
                request = urllib.request.Request(f"{self.dashboard_url}/api/jobs/",
                                                 headers={"Authorization": f"Bearer {self.token}"})
                urllib.request.urlopen(request, timeout=5).read()
                return
            except OSError as exc:  # refused (not up yet), or the job API not ready
                last = exc
                time.sleep(0.5)
        raise TimeoutError(f"the head's job agent (127.0.0.1:{self.agent_http_port}) was not ready within "
                           f"{timeout_s:.0f} s (last: {last}); `ray job submit` would fail with 'No available "
                           f"agent':\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the process group of our ``ray start`` (GCS, raylet, dashboard, workers), then SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            pgid = self.process.pid  # start_new_session: the group id is the pid of the process we started
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait()
        if not os.environ.get("RAYMOE_KEEP_RAY_TEMP"):  # keep the logs for a post-mortem
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
