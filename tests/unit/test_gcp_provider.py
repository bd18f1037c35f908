"""The GCP adapters through the real google-cloud-compute REST client against the local Compute
emulator: offers from the catalog, insert → boot → running, preemption, idempotent release, the
reaper's listing, every way an insert goes wrong, and the warm pool's serving and autoscaling.
Nothing of ours is mocked."""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from providers.base import (
    JobSpec,
    Lease,
    NoCapacity,
    NotYetReleased,
    Offer,
    PermanentProviderError,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.gcp import GCPPoolProvider, GCPProvider
from tests.emulators.gcp import GCPEmulator
from tests.emulators.openai_compat import OpenAICompatServer

PROJECT = "gpufleet-test"
US, EU = "us-central1-a", "europe-west4-a"
CATALOG = {
    "n1-standard-8-t4": {"gpu": "T4", "gpu_count": 1, "gpu_memory_gb": 16, "accelerator_type": "nvidia-tesla-t4",
                         "on_demand": {"us-central1": 0.73, EU: 0.80}, "spot": {"*": 0.25}},
    "a2-highgpu-1g": {"gpu": "A100 40GB", "gpu_count": 1, "gpu_memory_gb": 40, "on_demand": {US: 3.67}},
}


@pytest.fixture
def emu() -> Iterator[GCPEmulator]:
    with GCPEmulator(boot_delay=0.3, op_delay=0.05) as emulator:
        yield emulator


def make(emu: GCPEmulator, **config: Any) -> GCPProvider:
    base = {"project": PROJECT, "zones": [US, EU], "api_endpoint": emu.url, "anonymous": True,
            "machine_types": CATALOG, "request_timeout": 5, "retry_seconds": 0.5, "operation_wait": 2}
    return GCPProvider("gcp", {**base, **config})


def job(label: str | None = None, **spec: Any) -> JobSpec:
    job_id = uuid.uuid4().hex[:8]
    return JobSpec(job_id=job_id, kind="command", attempt=1, spec={"command": "echo hi", **spec}, timeout_seconds=600,
                   env={"GPUFLEET_JOB_ID": job_id, "GPUFLEET_JOB_TOKEN": "tok en'$x",
                        "GPUFLEET_CALLBACK_URL": "http://127.0.0.1:9/cb"},
                   label=label or f"gpufleet-{uuid.uuid4()}")


def offer(gcp: GCPProvider, offer_id: str) -> Offer:
    return next(o for o in gcp.offers(Requirements(), "command", {}) if o.offer_id == offer_id)


def poll_until(gcp: GCPProvider, handle: RunHandle, done: Any, seconds: float = 5.0) -> RunStatus:
    deadline = time.time() + seconds
    while True:
        status = gcp.poll(handle)
        if done(status) or time.time() > deadline:
            return status
        time.sleep(0.05)


# --- offers ------------------------------------------------------------------------------------


def test_offers_come_from_the_catalog_by_zone_and_pricing_model(emu: GCPEmulator) -> None:
    gcp = make(emu)
    ids = {o.offer_id: o for o in gcp.offers(Requirements(), "command", {})}
    assert set(ids) == {f"n1-standard-8-t4@{US}", f"n1-standard-8-t4@{US}:spot", f"n1-standard-8-t4@{EU}",
                        f"n1-standard-8-t4@{EU}:spot", f"a2-highgpu-1g@{US}"}
    assert ids[f"n1-standard-8-t4@{US}"].price_per_hour == 0.73  # the region's price applies to its zones
    assert ids[f"n1-standard-8-t4@{EU}:spot"].interruptible and ids[f"n1-standard-8-t4@{EU}:spot"].price_per_hour == 0.25
    assert gcp.offers(Requirements(), "inference", {}) == []  # not a served kind
    assert emu.requests == []  # planning asks no API


@pytest.mark.parametrize(("req", "expected"), [
    (Requirements(gpu=["A100"]), {f"a2-highgpu-1g@{US}"}),
    (Requirements(min_gpu_memory_gb=24), {f"a2-highgpu-1g@{US}"}),
    (Requirements(gpu=["T4"], interruptible=False), {f"n1-standard-8-t4@{US}", f"n1-standard-8-t4@{EU}"}),
    (Requirements(max_price_per_hour=0.5), {f"n1-standard-8-t4@{US}:spot", f"n1-standard-8-t4@{EU}:spot"}),
    (Requirements(gpu=["T4"], regions=["US"]), {f"n1-standard-8-t4@{US}", f"n1-standard-8-t4@{US}:spot"}),
    (Requirements(gpu=["T4"], regions=["us-central1"]), {f"n1-standard-8-t4@{US}", f"n1-standard-8-t4@{US}:spot"}),
    (Requirements(gpu_count=2), set()),
])
def test_offers_are_filtered_by_requirements(emu: GCPEmulator, req: Requirements, expected: set[str]) -> None:
    assert {o.offer_id for o in make(emu).offers(req, "command", {})} == expected


@pytest.mark.parametrize("wanted", [
    "EU", "NL", "EUROPE", "europe-west4"])
def test_european_zones_match_european_filters(emu: GCPEmulator, wanted: str) -> None:
    req = Requirements(gpu=["T4"], regions=[wanted], interruptible=False)
    assert {o.offer_id for o in make(emu).offers(req, "command", {})} == {f"n1-standard-8-t4@{EU}"}


# --- reserve, poll, release --------------------------------------------------------------------


def test_reserve_creates_a_labelled_spot_vm_that_boots_to_running(emu: GCPEmulator) -> None:
    gcp = make(emu)
    spec = job()
    lease = gcp.reserve(offer(gcp, f"n1-standard-8-t4@{EU}:spot"), spec)
    name = spec.label
    assert lease.external_id == f"{EU}/{name}" and lease.label == spec.label and lease.price_per_hour == 0.25
    inserted = next(r for r in emu.request_log if r["method"] == "POST" and r["path"].endswith("/instances"))
    body = inserted["body"]
    assert inserted["path"] == f"/compute/v1/projects/{PROJECT}/zones/{EU}/instances" and "requestId=" in inserted["query"]
    assert body["name"] == name and body["labels"] == {"gpufleet-label": spec.label}
    assert body["machineType"] == f"zones/{EU}/machineTypes/n1-standard-8-t4"
    assert body["scheduling"] == {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
                                  "onHostMaintenance": "TERMINATE", "automaticRestart": False}
    assert body["guestAccelerators"] == [{"acceleratorType": f"zones/{EU}/acceleratorTypes/nvidia-tesla-t4",
                                          "acceleratorCount": 1}]
    metadata = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    script = metadata["startup-script"]
    assert metadata["gpufleet-label"] == spec.label
    assert "export GPUFLEET_JOB_TOKEN='tok en'\"'\"'$x'" in script
    assert "export GPUFLEET_CALLBACK_URL=http://127.0.0.1:9/cb" in script
    encoded = re.search(r"b64decode\('([^']+)'\)", script).group(1)  # type: ignore[union-attr]
    assert "COMMAND = 'echo hi'" in base64.b64decode(encoded).decode()
    assert any("/operations/" in path for _, path in emu.requests)  # followed through our own ZoneOperationsClient

    handle = gcp.start(lease, spec)
    first = gcp.poll(handle)
    assert first.state == "running" and first.provisioning
    final = poll_until(gcp, handle, lambda s: not s.provisioning)
    assert final.state == "running" and not final.provisioning


def test_on_demand_vm_uses_standard_scheduling_and_a_retried_insert_reuses_the_vm(emu: GCPEmulator) -> None:
    gcp = make(emu)
    spec = job()
    first = gcp.reserve(offer(gcp, f"a2-highgpu-1g@{US}"), spec)
    again = gcp.reserve(offer(gcp, f"a2-highgpu-1g@{US}"), spec)  # a worker retried the task
    assert first.external_id == again.external_id
    assert len(emu.instances()) == 1
    body = emu.request_log[0]["body"]
    assert body["scheduling"]["provisioningModel"] == "STANDARD" and "guestAccelerators" not in body


def test_preemption_fails_the_run_transiently(emu: GCPEmulator) -> None:
    gcp = make(emu)
    spec = job()
    lease = gcp.reserve(offer(gcp, f"n1-standard-8-t4@{US}:spot"), spec)
    handle = gcp.start(lease, spec)
    poll_until(gcp, handle, lambda s: not s.provisioning)
    emu.preempt(US, lease.data["name"], gone_after=0.2)
    terminated = gcp.poll(handle)
    assert terminated.state == "failed" and terminated.transient and "preempted" in (terminated.error or "")
    time.sleep(0.25)
    gone = gcp.poll(handle)
    assert gone.state == "failed" and gone.transient and "preempted or deleted" in (gone.error or "")
    gcp.release(lease)  # already gone: fine


def test_provisioning_timeout_gives_up_on_a_vm_that_never_runs(emu: GCPEmulator) -> None:
    emu.boot_delay = 60
    gcp = make(emu, provisioning_timeout=0.2)
    spec = job()
    lease = gcp.reserve(offer(gcp, f"a2-highgpu-1g@{US}"), spec)
    handle = gcp.start(lease, spec)
    assert gcp.poll(handle).provisioning
    status = poll_until(gcp, handle, lambda s: s.state != "running", seconds=2)
    assert status.state == "failed" and status.transient and "not running after" in (status.error or "")


def test_release_deletes_and_is_idempotent(emu: GCPEmulator) -> None:
    gcp = make(emu)
    spec = job()
    lease = gcp.reserve(offer(gcp, f"a2-highgpu-1g@{US}"), spec)
    gcp.release(lease)
    assert emu.instances() == []
    gcp.release(lease)
    assert [m for m, p in emu.requests if m == "DELETE"] == ["DELETE", "DELETE"]


def test_owned_lists_only_labelled_instances_across_zones_and_pages(emu: GCPEmulator) -> None:
    emu.page_size = 2
    gcp = make(emu)
    leases = [gcp.reserve(offer(gcp, f"n1-standard-8-t4@{zone}{suffix}"), job())
              for zone in (US, EU) for suffix in ("", ":spot")]
    extra = [f"gpufleet-{uuid.uuid4()}" for _ in range(3)]
    for label in extra:
        emu.add_instance(PROJECT, US, label, {"gpufleet-label": label})
    emu.add_instance(PROJECT, US, "someone-elses-vm", {"team": "research"})
    emu.add_instance(PROJECT, US, "not-ours-either", {"gpufleet-label": "other-tool"})
    owned = {r.external_id: r for r in gcp.owned()}
    assert set(owned) == {lease.external_id for lease in leases} | {f"{US}/{label}" for label in extra}
    mine = owned[leases[1].external_id]
    assert mine.label == leases[1].label and mine.offer_id == f"n1-standard-8-t4@{US}:spot"
    assert mine.price_per_hour == 0.25 and mine.created_at and abs(mine.created_at - time.time()) < 30
    lists = [r for r in emu.request_log if r["method"] == "GET" and r["path"].endswith(f"/zones/{US}/instances")]
    assert len(lists) >= 3 and all("filter=labels.gpufleet-label" in r["query"] for r in lists)
    assert gcp.lists_all_leases


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "status"), [("http", 503), ("http", 429), ("operation", 503)])
def test_capacity_exhaustion_is_no_capacity(emu: GCPEmulator, mode: str, status: int) -> None:
    gcp = make(emu)
    emu.exhaust(zone=US, mode=mode, status=status)
    with pytest.raises(NoCapacity, match="ZONE_RESOURCE_POOL_EXHAUSTED|resources exhausted"):
        gcp.reserve(offer(gcp, f"a2-highgpu-1g@{US}"), job())
    assert emu.instances() == []


def test_quota_exceeded_in_the_operation_is_no_capacity(emu: GCPEmulator) -> None:
    gcp = make(emu)
    emu.exhaust(mode="operation", status=403, code="QUOTA_EXCEEDED")
    with pytest.raises(NoCapacity, match="QUOTA_EXCEEDED"):
        gcp.reserve(offer(gcp, f"n1-standard-8-t4@{EU}"), job())


def test_rejected_credentials_are_a_clear_permanent_error(emu: GCPEmulator) -> None:
    gcp = make(emu)
    emu.fail(401, count=5)
    with pytest.raises(PermanentProviderError) as caught:
        gcp.reserve(offer(gcp, f"a2-highgpu-1g@{US}"), job())
    message = str(caught.value)
    assert "401" in message and "credentials" in message and "\n" not in message
    assert not gcp.health().ok


def test_forbidden_is_permanent_and_says_why(emu: GCPEmulator) -> None:
    emu.fail(403)
    with pytest.raises(PermanentProviderError, match="permission denied.*compute.instances.create"):
        make(emu).reserve(offer(make(emu), f"a2-highgpu-1g@{US}"), job())


def test_api_down_is_transient_and_short_blips_are_retried(emu: GCPEmulator) -> None:
    gcp = make(emu)
    spec = job()
    emu.fail(503, count=2, paths=["/instances"])
    lease = gcp.reserve(offer(gcp, f"a2-highgpu-1g@{US}"), spec)  # retried within retry_seconds
    emu.fail(503, count=50)
    with pytest.raises(TransientProviderError, match="unavailable"):
        gcp.reserve(offer(gcp, f"n1-standard-8-t4@{EU}"), job())
    emu.reset()
    emu.down()
    try:
        with pytest.raises(TransientProviderError, match="unreachable"):
            gcp.owned()
        with pytest.raises(NotYetReleased):
            gcp.release(lease)
        with pytest.raises(TransientProviderError):  # the pipeline reads this as "still running"
            gcp.poll(gcp.start(lease, spec))
        assert not gcp.health().ok
    finally:
        emu.up()
    assert gcp.poll(gcp.start(lease, spec)).state == "running"


def test_health_reports_latency(emu: GCPEmulator) -> None:
    health = make(emu).health()
    assert health.ok and re.search(r"answered in \d+ ms", health.detail)


def test_a_job_without_a_command_is_refused_before_renting(emu: GCPEmulator) -> None:
    gcp = make(emu)
    spec = job()
    spec.spec.pop("command")
    with pytest.raises(PermanentProviderError, match="command"):
        gcp.reserve(offer(gcp, f"a2-highgpu-1g@{US}"), spec)
    assert emu.requests == []


# --- the managed instance group pool -----------------------------------------------------------


def make_pool(emu: GCPEmulator, endpoint: str, tmp_path: Any = None, **config: Any) -> GCPPoolProvider:
    base = {"project": PROJECT, "zone": US, "instance_group_manager": "llm-pool", "api_endpoint": emu.url,
            "anonymous": True, "endpoint": endpoint, "min_size": 0, "max_size": 4, "member_concurrency": 2,
            "price_per_hour": 1.2, "gpu": "L4", "gpu_memory_gb": 24, "models": ["llama-3-8b"],
            "scale_down_idle_seconds": 60, "scale_cooldown_seconds": 30, "request_timeout": 5, "retry_seconds": 0.5}
    if tmp_path is not None:
        base["state_dir"] = str(tmp_path)
    return GCPPoolProvider("gcp-pool", {**base, **config})


def test_pool_offers_capacity_from_running_members_and_serves_a_chat(emu: GCPEmulator) -> None:
    emu.add_group(PROJECT, US, "llm-pool", size=3)
    with OpenAICompatServer() as server:
        pool = make_pool(emu, server.url)
        req = Requirements(gpu=["L4"])
        [found] = pool.offers(req, "inference", {"model": "llama-3-8b"})
        assert found.capacity == 6 and found.gpu == "L4" and found.price_per_1k_tokens and found.price_per_hour == 0
        assert pool.offers(req, "inference", {"model": "other"}) == []
        assert pool.offers(Requirements(gpu=["H100"]), "inference", {"model": "llama-3-8b"}) == []
        spec = JobSpec(job_id="j1", kind="inference", attempt=1, spec={"model": "llama-3-8b", "prompt": "hello"},
                       timeout_seconds=60, label="gpufleet-x")
        lease = pool.reserve(found, spec)
        status = pool.poll(pool.start(lease, spec))
        assert status.state == "succeeded" and status.result and status.result["text"] == "echo: hello"
        assert status.cost is not None and status.cost > 0
        pool.release(lease)


def test_pool_without_running_members_offers_no_capacity_so_jobs_wait(emu: GCPEmulator) -> None:
    emu.add_group(PROJECT, US, "llm-pool", size=2, running=False)
    pool = make_pool(emu, "http://127.0.0.1:9")
    [empty] = pool.offers(Requirements(), "inference", {"model": "llama-3-8b"})
    assert empty.capacity == 0 and empty.data["members"] == []  # placement keeps the job queued; autoscale grows
    assert make_pool(emu, "http://127.0.0.1:9", min_size=0, max_size=0).offers(
        Requirements(), "inference", {"model": "llama-3-8b"}) == []  # a group that may never grow offers nothing


def test_pool_member_url_template_picks_a_running_member(emu: GCPEmulator) -> None:
    emu.add_group(PROJECT, US, "llm-pool", size=1)
    pool = make_pool(emu, "", member_url="http://{name}.{zone}.c.{project}.internal:8000")
    [found] = pool.offers(Requirements(), "inference", {"model": "llama-3-8b"})
    lease = pool.reserve(found, JobSpec(job_id="j", kind="inference", attempt=1, spec={}, timeout_seconds=5))
    member = emu.group(US, "llm-pool")["members"][0]["name"]
    assert lease.data["url"] == f"http://{member}.{US}.c.{PROJECT}.internal:8000"
    assert pool.offers(Requirements(), "inference", {"model": "llama-3-8b"})[0].capacity == 1  # held from reserve
    pool.release(lease)
    assert pool.offers(Requirements(), "inference", {"model": "llama-3-8b"})[0].capacity == 2


def test_autoscale_grows_with_the_queue_respects_cooldown_and_max(emu: GCPEmulator, tmp_path: Any) -> None:
    emu.add_group(PROJECT, US, "llm-pool", size=0)
    pool = make_pool(emu, "http://127.0.0.1:9", tmp_path)
    t = 1_000.0
    assert pool.autoscale(0, now=t) is None  # idle at min_size: nothing to do
    grew = pool.autoscale(3, now=t + 1)
    assert grew and "grow from 0 to 2" in grew and emu.resizes() == [2]
    # a fresh provider object (a restarted beat worker) keeps the cooldown through the state file
    held = make_pool(emu, "http://127.0.0.1:9", tmp_path).autoscale(20, now=t + 10)
    assert held and "cooling down" in held and emu.resizes() == [2]
    capped = pool.autoscale(20, now=t + 40)
    assert capped and "to 4" in capped and "max_size" in capped and emu.resizes() == [2, 4]
    assert emu.group(US, "llm-pool")["target_size"] == 4
    # busy members count: 1 queued + 3 in flight (2 members) needs 3 members, but never shrink while busy
    assert pool.autoscale(1, now=t + 80, in_flight=3) is None
    assert emu.resizes() == [2, 4]


def test_autoscale_scales_to_min_size_after_idle_seconds(emu: GCPEmulator, tmp_path: Any) -> None:
    emu.add_group(PROJECT, US, "llm-pool", size=3)
    pool = make_pool(emu, "http://127.0.0.1:9", tmp_path, scale_down_idle_seconds=60, scale_cooldown_seconds=10)
    t = 5_000.0
    waiting = pool.autoscale(0, now=t)
    assert waiting and "idle for 0s" in waiting
    assert "idle for 30s" in (pool.autoscale(0, now=t + 30) or "")
    assert pool.autoscale(2, now=t + 40) is None  # work arrived: 1 member wanted, but shrinking waits for idle
    assert "idle for 50s" in (pool.autoscale(0, now=t + 90) or "")  # the idle clock restarted at t + 40
    down = pool.autoscale(0, now=t + 101)
    assert down and "shrink from 3 to min_size 0" in down and emu.resizes() == [0]
    time.sleep(0.2)
    assert emu.group(US, "llm-pool")["members"] == []
    assert pool.offers(Requirements(), "inference", {"model": "llama-3-8b"})[0].capacity == 0


def test_autoscale_members_appear_after_a_resize(emu: GCPEmulator) -> None:
    emu.add_group(PROJECT, US, "llm-pool", size=0)
    pool = make_pool(emu, "http://127.0.0.1:9", scale_cooldown_seconds=0)
    pool.autoscale(4)
    assert pool.offers(Requirements(), "inference", {"model": "llama-3-8b"})[0].capacity == 0  # still booting
    time.sleep(emu.member_boot_delay + 0.05)
    [found] = pool.offers(Requirements(), "inference", {"model": "llama-3-8b"})
    assert found.capacity == 4 and len(found.data["members"]) == 2
    health = pool.health()  # the group is fine, the endpoint in front of it is not (nothing listens there)
    assert not health.ok and "target size 2" in health.detail and "unreachable" in health.detail


def test_pool_config_errors_are_clear(emu: GCPEmulator) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        make_pool(emu, "http://a", member_url="http://{name}:8000")
    with pytest.raises(ValueError, match="min_size"):
        make_pool(emu, "http://a", min_size=5, max_size=2)


def test_pool_missing_group_is_a_permanent_error(emu: GCPEmulator) -> None:
    pool = make_pool(emu, "http://127.0.0.1:9")
    with pytest.raises(PermanentProviderError, match="not found|refused"):
        pool.autoscale(1)
    assert not pool.health().ok


def _lease(external_id: str) -> Lease:
    return Lease(provider="gcp", offer_id="", external_id=external_id, label="", price_per_hour=0, reserved_at=0)


def test_releasing_an_unknown_instance_is_fine(emu: GCPEmulator) -> None:
    make(emu).release(_lease(f"{US}/gpufleet-never-existed"))
