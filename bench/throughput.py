"""Throughput of gpufleet against plain Celery, measured in the same run on the same Redis.

(a) plain Celery: N no-op tasks, Redis broker + Redis result backend, a threads worker.
(b) gpufleet: N no-op jobs (sandbox inference at time_scale 0) end to end: SDK batch submit →
    HTTP API → Postgres → queues → worker (dispatch, execute, poll) → result in Postgres.
(c) the ratio b / a.
(d) SDK batch-submit rate (no worker running): jobs/s accepted and committed.

    python bench/throughput.py [--jobs 2000] [--concurrency 8] [--submit-jobs 10000]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PLAIN_REDIS = "redis://127.0.0.1:6379/13"
FLEET_REDIS = "redis://127.0.0.1:6379/14"
KEY = "bench-key-" + "k" * 24
PROVIDERS = """
providers:
  sandbox:
    time_scale: 0
    offers:
      - {offer_id: bench, gpu: L4, gpu_memory_gb: 24, price_per_hour: 0.5, price_per_1k_tokens: 0.0001,
         capacity: 1000000, boot_seconds: 0, kinds: [inference]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def stop(*procs: subprocess.Popen[bytes] | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
    for p in procs:
        if p is not None:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def bench_plain(n: int, concurrency: int, pool: str, logs: Path) -> float:
    redis.Redis.from_url(PLAIN_REDIS).flushdb()
    env = {**os.environ, "BENCH_PLAIN_REDIS": PLAIN_REDIS, "PYTHONPATH": str(ROOT)}
    worker = spawn([sys.executable, "-m", "celery", "-A", "bench.plain_celery_app", "worker", "-P", pool,
                    "-c", str(concurrency), "-l", "WARNING", "--without-mingle", "--without-gossip"], env, logs / "plain.log")
    try:
        sys.path.insert(0, str(ROOT))
        from bench.plain_celery_app import noop

        noop.delay().get(timeout=60)  # warm: the worker is up
        start = time.perf_counter()
        results = [noop.delay() for _ in range(n)]
        for r in results:
            r.get(timeout=300)
        return n / (time.perf_counter() - start)
    finally:
        stop(worker)


class Fleet:
    def __init__(self, concurrency: int, pool: str, logs: Path) -> None:
        self.concurrency = concurrency
        self.pool = pool
        self.logs = logs
        self.db = f"gpufleet_bench_{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = Path(tempfile.mkdtemp(prefix="gpufleet-bench-"))
        (data / "providers.yaml").write_text(PROVIDERS)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
        self.env.update({
            "GPUFLEET_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db}",
            "GPUFLEET_BROKER_URL": FLEET_REDIS, "GPUFLEET_DATA_DIR": str(data),
            "GPUFLEET_PROVIDERS_FILE": str(data / "providers.yaml"), "GPUFLEET_BOOTSTRAP_API_KEYS": f"bench:{KEY}",
            "GPUFLEET_LOG_LEVEL": "WARNING", "GPUFLEET_MAX_BATCH_SIZE": "10000",
        })
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Fleet:
        redis.Redis.from_url(FLEET_REDIS).flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        cli = [sys.executable, "-m", "orchestrator.cli"]
        subprocess.run([*cli, "migrate"], env=self.env, cwd=ROOT, check=True, capture_output=True)
        self.api = spawn([*cli, "api", "--port", str(self.port)], self.env, self.logs / "api.log")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/health")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        return self

    def start_worker(self) -> None:
        self.worker = spawn([sys.executable, "-m", "orchestrator.cli", "worker", "--pool", self.pool,
                             "--concurrency", str(self.concurrency), "--queues", "inference,p.sandbox",
                             "--loglevel", "WARNING"], self.env, self.logs / "worker.log")

    def stop_worker(self) -> None:
        stop(self.worker)
        self.worker = None

    def __exit__(self, *exc: object) -> None:
        stop(self.api, self.worker)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


def _bodies(client, n: int) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    return [client.job_body("inference", {"model": "bench-8b", "prompt": "x", "max_tokens": 1}) for _ in range(n)]


def submit_all(client, n: int, chunk: int = 1000) -> list[str]:  # type: ignore[no-untyped-def]
    batches = []
    for start in range(0, n, chunk):
        batches.append(str(client.submit_batch(_bodies(client, min(chunk, n - start))).batch_id))
    return batches


def wait_batches(client, batches: list[str], timeout: float = 900) -> dict[str, int]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    totals: dict[str, int] = {}
    pending = list(batches)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} batches unfinished")
        still = []
        for batch_id in pending:
            summary = client.batch(batch_id)
            if summary.done:
                for status, count in summary.counts.items():
                    totals[status] = totals.get(status, 0) + count
            else:
                still.append(batch_id)
        pending = still
        if pending:
            time.sleep(0.05)
    return totals


def bench_fleet(fleet: Fleet, n: int) -> float:
    from orchestrator.sdk import Client

    fleet.start_worker()
    with Client(fleet.url, KEY, timeout=300) as client:
        wait_batches(client, submit_all(client, 1))  # warm: worker up, first connections made
        start = time.perf_counter()
        totals = wait_batches(client, submit_all(client, n))
        elapsed = time.perf_counter() - start
    fleet.stop_worker()
    assert totals == {"succeeded": n}, totals
    return n / elapsed


def bench_submit(fleet: Fleet, m: int) -> float:
    from orchestrator.sdk import Client

    with Client(fleet.url, KEY, timeout=300) as client:
        bodies = _bodies(client, 1000)
        start = time.perf_counter()
        done = 0
        while done < m:
            size = min(1000, m - done)
            client.submit_batch(bodies[:size])
            done += size
        return m / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--submit-jobs", type=int, default=10_000)
    parser.add_argument("--pool", choices=["threads", "prefork"], default="prefork",
                        help="worker pool for both systems (prefork uses one process per slot)")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="gpufleet-bench-logs-"))
    plain = bench_plain(args.jobs, args.concurrency, args.pool, logs)
    with Fleet(args.concurrency, args.pool, logs) as fleet:
        fleet_rate = bench_fleet(fleet, args.jobs)
        submit_rate = bench_submit(fleet, args.submit_jobs)
    rows = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"),
        ("jobs / worker concurrency", f"{args.jobs} / {args.concurrency} {args.pool}"),
        ("plain Celery (no-op, Redis results)", f"{plain:,.0f} jobs/s"),
        ("gpufleet end to end (persisted)", f"{fleet_rate:,.0f} jobs/s"),
        ("ratio gpufleet / plain Celery", f"{fleet_rate / plain:.2f}"),
        (f"SDK batch submit ({args.submit_jobs:,} jobs, no worker)", f"{submit_rate:,.0f} jobs/s"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"\nlogs: {logs}")


if __name__ == "__main__":
    main()
