"""Routing end to end: data residency from a policy file, per-job strategies, and the answer to
"why there?" over HTTP and the CLI — on a stack with offers in several regions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from .conftest import KEY_A, Stack, isolated_stack

PROVIDERS = """
providers:
  sandbox:
    time_scale: 0.05
    offers:
      - {offer_id: a100-us, gpu: A100, gpu_memory_gb: 80, region: us-east, price_per_hour: 1.00, capacity: 20}
      - {offer_id: a100-de, gpu: A100, gpu_memory_gb: 80, region: eu-de, price_per_hour: 1.60, capacity: 1}
      - {offer_id: a100-uk, gpu: A100, gpu_memory_gb: 80, region: uk-ldn, price_per_hour: 1.20, capacity: 20}
  local:
    slots: 4
"""
POLICY = """
default_class: public
classes:
  public: {}
  pii-eu: {regions: [EU], replication: false}
"""


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("routing")
    policy = data / "residency.yaml"
    policy.write_text(POLICY)
    with isolated_stack(data, 7, PROVIDERS, {"GPUFLEET_RESIDENCY_POLICY_FILE": str(policy)}) as running:
        yield running


@pytest.fixture()
def client(routed: Stack):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    with Client(routed.url, KEY_A) as c:
        yield c


def _train(client, seconds: float = 0.0, **requirements):  # type: ignore[no-untyped-def]
    spec = {"command": f"sleep {seconds}; echo done"} if seconds else {"command": "echo done"}
    return client.submit("command", spec, requirements={"gpu": ["A100"], **requirements})


def test_public_data_goes_to_the_cheapest_region_and_pii_stays_in_the_eu(client) -> None:
    public = client.wait(_train(client).id, timeout=60)
    assert public.status.value == "succeeded" and public.offer_id == "a100-us"
    pii = client.wait(_train(client, data_class="pii-eu").id, timeout=60)
    assert pii.status.value == "succeeded" and pii.offer_id == "a100-de"  # dearer, but in the EU
    why = client.placement(pii.id)
    assert why["data_class"] == "pii-eu" and why["strategy"] == "lowest_cost"
    assert "not allowed for data class 'pii-eu'" in why["rejected"]["sandbox/a100-us"]
    assert "not allowed for data class 'pii-eu'" in why["rejected"]["sandbox/a100-uk"]  # London is not in the EU
    assert [s["offer"] for s in why["scores"]] == ["sandbox/a100-de"]


def test_pii_waits_for_eu_capacity_rather_than_leaving_the_eu(client) -> None:
    first = _train(client, seconds=4, data_class="pii-eu")
    deadline = time.monotonic() + 30
    while client.get(first.id).status.value != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second = _train(client, data_class="pii-eu")
    while not (waiting := client.placement(second.id))["waiting_for"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "full" in waiting["waiting_for"] and client.get(second.id).status.value == "queued"
    done = client.wait(second.id, timeout=60)
    assert done.status.value == "succeeded" and done.offer_id == "a100-de"
    assert client.wait(first.id, timeout=60).status.value == "succeeded"


def test_strategy_per_job_and_unknown_data_class_refused(client) -> None:
    from orchestrator.sdk import ValidationError

    ordered = client.wait(_train(client, strategy="failover", failover_order=["local", "sandbox"],
                                 gpu=None).id, timeout=60)
    assert ordered.provider == "local"  # first in the job's order, though the sandbox has GPUs to spare
    with pytest.raises(ValidationError) as refused:
        _train(client, data_class="top-secret")
    assert "requirements.data_class" in str(refused.value) and "unknown data class 'top-secret'" in str(refused.value)
    with pytest.raises(ValidationError):
        _train(client, strategy="fastest-please")


def test_gpufleet_why_prints_the_ranking_and_the_rejections(client, routed: Stack) -> None:
    job = client.wait(_train(client, regions=["EU", "US"]).id, timeout=60)
    env = {**os.environ, "GPUFLEET_API_URL": routed.url, "GPUFLEET_API_KEY": KEY_A}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "why", str(job.id)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "placed with lowest_cost" in out.stdout and "sandbox/a100-us" in out.stdout
    assert "region uk-ldn not in" in out.stdout  # the UK offer's rejection, with its reason
    assert "score" in out.stdout and "cost" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "orchestrator.cli", "why", "not-a-job"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_round_robin_takes_turns_across_worker_processes(client, routed: Stack) -> None:
    """Two worker processes, each the only consumer of one job queue, place alternate jobs: the turns are
    the deployment's (a Redis counter), not each process's — per process, each worker would start its
    own rotation and the same provider would serve twice in a row."""
    from orchestrator.services.turns import KEY_PREFIX
    from orchestrator.settings import get_settings

    routed.kill_worker(signal.SIGTERM)  # the stack's worker serves every queue: make room for two narrower ones
    names = {"normal": "worker-default", "high": "worker-high"}
    try:
        for priority, name in names.items():
            queue = "default" if priority == "normal" else "high_priority"
            routed._spawn(name, "worker", "--queues", f"{queue},p.local,p.sandbox", "--pool", "threads",
                          "--concurrency", "4", "--hostname", f"{name}@%h", "--loglevel", "WARNING")
        placed = []
        for i in range(6):  # one at a time, alternately dispatched by each process
            priority = "normal" if i % 2 == 0 else "high"
            job = client.submit("command", {"command": f"echo {i}"}, priority=priority,
                                requirements={"strategy": "round_robin"})
            done = client.wait(job.id, timeout=60)
            assert done.status.value == "succeeded" and done.queue == ("default" if i % 2 == 0 else "high_priority")
            assert done.placement["strategy"] == "round_robin"
            placed.append(done.provider)
        assert set(placed) == {"local", "sandbox"}
        assert all(a != b for a, b in zip(placed, placed[1:], strict=False)), placed  # global turns
        turns = redis.Redis.from_url(get_settings().broker_url).get(KEY_PREFIX + "local,sandbox")
        assert turns is not None and int(turns) >= 6
    finally:
        for name in names.values():
            if (proc := routed.procs.pop(name, None)) is not None:
                proc.terminate()
                proc.wait(timeout=30)
        routed.start_worker()
