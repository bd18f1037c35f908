"""Real services for integration tests: a fresh Postgres database, a Redis DB, and our own
`gpufleet api`, `gpufleet worker` and `gpufleet beat` processes. Nothing here is mocked.

Fixtures fail (never skip) when Postgres or Redis is unreachable: scripts/services.sh
starts them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

PG_ADMIN = os.environ.get("GPUFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("GPUFLEET_TEST_REDIS", "redis://127.0.0.1:6379/9")
KEY_A = "acme-test-key-" + "a" * 24
KEY_B = "globex-test-key-" + "b" * 24

PROVIDERS_YAML = """
providers:
  local:
    slots: 64
  sandbox:
    time_scale: 0.2
    offers:
      - {offer_id: l4-serverless, gpu: L4, gpu_memory_gb: 24, region: us-east, price_per_hour: 0.48,
         price_per_1k_tokens: 0.0002, capacity: 500, kinds: [inference, transcription]}
      - {offer_id: rtx4090-se, gpu: RTX 4090, gpu_memory_gb: 24, region: eu-se, price_per_hour: 0.39, capacity: 100}
      - {offer_id: a100-us, gpu: A100, gpu_memory_gb: 80, region: us-east, price_per_hour: 1.29, capacity: 50}
      - {offer_id: h100-spot-us, gpu: H100, gpu_memory_gb: 80, region: us-west, price_per_hour: 1.89,
         capacity: 50, crash_rate: 1.0}
      - {offer_id: h100-de, gpu: H100, gpu_memory_gb: 80, region: eu-de, price_per_hour: 2.49, capacity: 50}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 40.0) -> None:
    """Wait until the API at ``url`` answers /health with 200 (database and broker reachable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never became healthy")


class Stack:
    """The processes of a production deployment, started from our own CLI."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._worker_n = 0

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_api(self) -> None:
        self._spawn("api", "api", "--port", str(self.port))
        wait_healthy(self.url)

    def start_worker(self) -> subprocess.Popen[bytes]:
        self._worker_n += 1
        return self._spawn("worker", "worker", "--pool", "threads", "--concurrency", "8",
                           "--hostname", f"test{self._worker_n}@%h", "--loglevel", "WARNING")

    def start_beat(self) -> None:
        self._spawn("beat", "beat", "--loglevel", "WARNING")

    def kill_worker(self, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop("worker")
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"gpufleet_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    client.flushdb()
    return client


@contextmanager
def launch_stack(data_dir: Path, database_url: str, redis_url: str, providers_yaml: str,
                 extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """API, worker and beat of our own CLI on ``database_url`` and ``redis_url``; this test process's
    settings point at the same database while the stack runs (restored afterwards)."""
    from orchestrator.db.engine import reset_engines
    from orchestrator.settings import get_settings
    from providers.registry import _cache

    providers_file = data_dir / "providers.yaml"
    providers_file.write_text(providers_yaml)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env.update({
        "GPUFLEET_DATABASE_URL": database_url,
        "GPUFLEET_BROKER_URL": redis_url,
        "GPUFLEET_DATA_DIR": str(data_dir),
        "GPUFLEET_PROVIDERS_FILE": str(providers_file),
        "GPUFLEET_BOOTSTRAP_API_KEYS": f"acme:{KEY_A},globex:{KEY_B}",
        "GPUFLEET_SWEEP_INTERVAL_SECONDS": "1",
        "GPUFLEET_SWEEP_GRACE_SECONDS": "3",
        "GPUFLEET_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    })
    running = Stack(env, data_dir)
    env["GPUFLEET_CALLBACK_URL"] = running.url  # rented instances report to this stack's API
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    get_settings.cache_clear()
    reset_engines()
    _cache.clear()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "migrate"], env=env, check=True, capture_output=True)
    try:
        running.start_api()
        running.start_worker()
        running.start_beat()
        yield running
    finally:
        running.stop()
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        reset_engines()
        _cache.clear()


@contextmanager
def isolated_stack(data_dir: Path, redis_db: int, providers_yaml: str, extra_env: dict[str, str]) -> Iterator[Stack]:
    """A second stack with its own database and Redis DB, so the session stack's workers never see its messages."""
    redis_url = REDIS_URL.rsplit("/", 1)[0] + f"/{redis_db}"
    redis.Redis.from_url(redis_url).flushdb()
    with fresh_database() as url, launch_stack(data_dir, url, redis_url, providers_yaml, extra_env) as running:
        yield running


@pytest.fixture(scope="session")
def stack(database_url: str, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with launch_stack(tmp_path_factory.mktemp("gpufleet-data"), database_url, REDIS_URL, PROVIDERS_YAML) as running:
        yield running


@pytest.fixture()
def client(stack: Stack):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    with Client(stack.url, KEY_A) as c:
        yield c


@pytest.fixture()
def other_tenant(stack: Stack):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    with Client(stack.url, KEY_B) as c:
        yield c


def count_jobs() -> int:
    from sqlalchemy import func, select

    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Job

    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def wait_for_status(client, job_id, status: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job.status.value == status:
            return job
        assert not job.done, f"job reached {job.status.value} while waiting for {status}: {job.error}"
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {status}")
