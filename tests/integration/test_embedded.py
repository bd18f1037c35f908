"""The embedded default (SQLite + filesystem broker) as separate processes and as one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import free_port, wait_healthy


def _embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env.update({"GPUFLEET_DATA_DIR": str(tmp_path / "data"), "GPUFLEET_SWEEP_INTERVAL_SECONDS": "1",
                "GPUFLEET_SWEEP_GRACE_SECONDS": "2"})
    return env


def test_gpufleet_up_serves_the_api_and_runs_jobs_then_stops_on_sigint(tmp_path: Path) -> None:
    from orchestrator.sdk import Client

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "up", "--port", str(port)],
                            env=_embedded_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        key = (tmp_path / "data" / "local-api-key").read_text().strip()
        assert oct((tmp_path / "data" / "local-api-key").stat().st_mode & 0o777) == "0o600"
        with Client(f"http://127.0.0.1:{port}", key) as client:
            job = client.wait(client.submit("command", {"command": ["echo", "embedded"]}).id, timeout=30)
        assert job.status.value == "succeeded" and job.result["stdout"] == "embedded\n"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}" in out and "Traceback" not in out


def test_job_submitted_while_no_worker_runs_is_picked_up_later(tmp_path: Path) -> None:
    """API and worker as separate processes on the filesystem broker; the worker starts late."""
    from orchestrator.sdk import Client

    env = _embedded_env(tmp_path)
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "api", "--port", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        keyed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "keys", "create", "solo"], env=env,
                               capture_output=True, text=True, check=True)
        key = keyed.stdout.strip()
        wait_healthy(f"http://127.0.0.1:{port}")
        with Client(f"http://127.0.0.1:{port}", key) as client:
            job = client.submit("command", {"command": ["echo", "late"]})
            time.sleep(0.5)
            assert client.get(job.id).status.value == "queued"
            worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--loglevel", "WARNING"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            done = client.wait(job.id, timeout=60)
        assert done.status.value == "succeeded" and done.result["stdout"] == "late\n"
    finally:
        for proc in (api, worker):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
