"""Flower shows the Celery side live, and only behind basic auth."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from .conftest import free_port


def test_flower_serves_behind_basic_auth(stack) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    env = {**stack.env, "GPUFLEET_FLOWER_BASIC_AUTH": "admin:s3cret-pass"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "flower", "--port", str(port),
                             "--address", "127.0.0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                anonymous = httpx.get(f"http://127.0.0.1:{port}/api/workers")
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "Flower did not start"
                time.sleep(0.2)
        assert anonymous.status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/", auth=("admin", "wrong")).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/", auth=("admin", "s3cret-pass")).status_code == 200
        with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
            assert b"s3cret-pass" not in fh.read()  # never on the command line
    finally:
        proc.terminate()
        proc.wait(timeout=30)
