"""`gpufleet up` on a configured stack: API, worker and beat as a process tree on Postgres + Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import redis

from .conftest import free_port, wait_healthy

KEY = "up-test-key-" + "u" * 24


def test_up_runs_the_configured_stack_and_stops_its_children(database_url: str, tmp_path: Path) -> None:
    from orchestrator.sdk import Client

    url = "redis://127.0.0.1:6379/10"
    redis.Redis.from_url(url).flushdb()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env.update({"GPUFLEET_DATABASE_URL": database_url, "GPUFLEET_BROKER_URL": url,
                "GPUFLEET_DATA_DIR": str(tmp_path), "GPUFLEET_BOOTSTRAP_API_KEYS": f"up:{KEY}",
                "GPUFLEET_LOG_LEVEL": "WARNING"})
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "migrate"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "up", "--port", str(port), "--concurrency", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        with Client(f"http://127.0.0.1:{port}", KEY) as client:
            job = client.wait(client.submit("command", {"command": ["echo", "up"]}).id, timeout=60)
        assert job.status.value == "succeeded" and job.result["stdout"] == "up\n"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    with socket.socket() as s:  # the API child is gone too
        assert s.connect_ex(("127.0.0.1", port)) != 0
