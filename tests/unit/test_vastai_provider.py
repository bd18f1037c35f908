"""The Vast.ai adapter through the real ``vastai`` SDK against the local API emulator: search and
normalisation, the rent → boot → run → report → destroy cycle with a real onstart process,
and every way renting goes wrong (taken offers, stuck hosts, rate limits, outages, preemption,
bad keys). Nothing of ours is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
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
from providers.vastai import VastAIProvider
from tests.emulators.callback import Receiver
from tests.emulators.vastai import VastEmulator

KEY = "vast-test-key-" + "k" * 24
TOKEN = "job-token-" + "t" * 16


@pytest.fixture
def emu() -> Iterator[VastEmulator]:
    with VastEmulator(api_key=KEY, boot_delay=0.2) as emulator:
        yield emulator


def make(emu: VastEmulator, **config: Any) -> VastAIProvider:
    base = {"api_key": KEY, "server_url": emu.url, "request_timeout": 5, "retry": 2, "max_retry_wait": 2}
    return VastAIProvider("vastai", {**base, **config})


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def job(command: Any = "echo hi", kind: str = "command", callback: str | None = None, **spec: Any) -> JobSpec:
    job_id = uuid.uuid4().hex[:8]
    env = {"GPUFLEET_JOB_ID": job_id, "GPUFLEET_JOB_TOKEN": TOKEN}
    if callback:
        env["GPUFLEET_CALLBACK_URL"] = callback
    if command is not None:
        spec["command"] = command
    return JobSpec(job_id=job_id, kind=kind, attempt=1, spec=spec, timeout_seconds=60, env=env,  # type: ignore[arg-type]
                   label=f"gpufleet-{job_id}-1")


def offer_for(provider: VastAIProvider, offer_id: str, req: Requirements | None = None) -> Offer:
    return next(o for o in provider.offers(req or Requirements(interruptible=True), "command", {}) if o.offer_id == offer_id)


def until(check: Callable[[], Any], seconds: float = 5.0, every: float = 0.05) -> Any:
    end = time.monotonic() + seconds
    while not (value := check()):
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(every)
    return value


def settle(provider: VastAIProvider, handle: RunHandle, seconds: float = 5.0) -> RunStatus:
    """Poll until the run leaves "running", as the pipeline's poller would."""
    end = time.monotonic() + seconds
    while (status := provider.poll(handle)).state == "running":
        assert time.monotonic() < end, f"still running: {status}"
        time.sleep(0.05)
    return status


def rent(provider: VastAIProvider, spec: JobSpec, offer_id: str = "1001") -> tuple[Lease, RunHandle]:
    lease = provider.reserve(offer_for(provider, offer_id), spec)
    return lease, provider.start(lease, spec)


def ids(offers: list[Offer]) -> set[str]:
    return {o.offer_id for o in offers}


# --- offers ------------------------------------------------------------------------------------


def test_offers_are_normalised_from_search_rows(emu: VastEmulator) -> None:
    offers = {o.offer_id: o for o in make(emu).offers(Requirements(), "command", {})}
    # Defaults: verified, reliability >= 0.95, one GPU, on-demand only.
    assert set(offers) == {"1001", "1003", "1005"}
    rtx = offers["1001"]
    assert (rtx.provider, rtx.gpu, rtx.gpu_count, rtx.gpu_memory_gb, rtx.region) == ("vastai", "RTX 4090", 1, 24.0, "SE")
    assert (rtx.price_per_hour, rtx.reliability, rtx.capacity, rtx.interruptible) == (0.40, 0.995, 1, False)
    assert rtx.kinds == ["training", "command"]
    assert rtx.data == {"ask_id": 1001, "machine_id": 501, "host_id": 91, "min_bid": 0.25, "verified": True,
                        "geolocation": "Sweden, SE"}
    assert offers["1005"].gpu_memory_gb == 80.0  # 81559 MiB rounds to the 80 GB card it is


def test_search_sends_server_side_filters_through_the_sdk(emu: VastEmulator) -> None:
    make(emu).offers(Requirements(gpu=["H100"], regions=["DE"], max_price_per_hour=3, min_gpu_memory_gb=40), "training", {})
    body = next(r["body"] for r in emu.request_log if r["path"] == "/api/v0/bundles/")
    assert body["type"] == "on-demand" and body["order"] == [["dph_total", "asc"]] and body["limit"] == 64
    assert body["verified"] == {"eq": True} and body["rentable"] == {"eq": True} and body["num_gpus"] == {"eq": "1"}
    assert body["reliability"] == {"gte": "0.95"} and body["dph_total"] == {"lte": "3.0"}
    assert set(body["gpu_name"]["in"]) >= {"H100 SXM", "H100 PCIE"} and body["geolocation"] == {"in": ["DE"]}
    assert body["gpu_ram"] == {"gte": "40448"}
    assert all(not path.startswith("/_emulator") for _, path in emu.requests)


def test_gpu_names_match_vast_variants(emu: VastEmulator) -> None:
    provider = make(emu)
    assert ids(provider.offers(Requirements(gpu=["A100"]), "command", {})) == {"1003"}
    assert ids(provider.offers(Requirements(gpu=["4090", "h100"]), "command", {})) == {"1001", "1005"}
    # A model outside our catalog of Vast names is filtered client-side only, never excluded by the server.
    assert ids(provider.offers(Requirements(gpu=["MI300X"]), "command", {})) == set()
    assert "gpu_name" not in emu.request_log[-1]["body"]
    assert ids(make(emu, preferred_gpus=["H100"]).offers(Requirements(), "command", {})) == {"1005"}


def test_regions_match_continents_and_countries(emu: VastEmulator) -> None:
    provider = make(emu, verified_only=False, min_reliability=0)
    assert ids(provider.offers(Requirements(regions=["EU"]), "command", {})) == {"1001", "1003", "1005"}
    assert ids(provider.offers(Requirements(regions=["SE"]), "command", {})) == {"1001"}
    assert ids(provider.offers(Requirements(regions=["US"]), "command", {})) == {"1004"}


def test_price_reliability_memory_and_count_filters(emu: VastEmulator) -> None:
    provider = make(emu, max_price_per_hour=2.0)
    assert ids(provider.offers(Requirements(max_price_per_hour=1.5), "command", {})) == {"1001", "1003"}
    assert ids(provider.offers(Requirements(max_price_per_hour=5), "command", {})) == {"1001", "1003"}  # config caps it
    assert ids(provider.offers(Requirements(min_reliability=0.99), "command", {})) == {"1001", "1003"}
    assert ids(provider.offers(Requirements(min_gpu_memory_gb=80), "command", {})) == {"1003"}
    assert ids(make(emu).offers(Requirements(gpu_count=2), "command", {})) == {"1002"}
    assert ids(make(emu).offers(Requirements(gpu_count=8, min_gpu_memory_gb=80), "command", {})) == {"1006"}
    # The unverified, less reliable A100 appears only when the config allows both.
    assert "1004" in ids(make(emu, verified_only=False, min_reliability=0.8).offers(Requirements(), "command", {}))


def test_bid_offers_only_when_interruptible_is_allowed(emu: VastEmulator) -> None:
    assert all(not o.interruptible for o in make(emu).offers(Requirements(), "command", {}))
    bids = [o for o in make(emu).offers(Requirements(interruptible=True), "command", {}) if o.interruptible]
    assert ids(bids) == {"1001-bid", "1003-bid", "1005-bid"}
    rtx = next(o for o in bids if o.offer_id == "1001-bid")
    assert rtx.price_per_hour == pytest.approx(0.25 * 1.15) and rtx.data["bid"] == rtx.price_per_hour
    assert any(o.interruptible for o in make(emu, interruptible=True).offers(Requirements(), "command", {}))
    assert not any(o.interruptible for o in make(emu, interruptible=True).offers(Requirements(interruptible=False),
                                                                                   "command", {}))
    cheap = make(emu, bid_ratio=2).offers(Requirements(interruptible=True, max_price_per_hour=0.6), "command", {})
    assert ids(cheap) == {"1001", "1001-bid"}  # bid 0.25 × 2 = 0.50 fits, the A100's 1.40 does not


def test_kinds_outside_the_config_get_no_offers(emu: VastEmulator) -> None:
    assert make(emu).offers(Requirements(), "inference", {}) == []
    assert make(emu, kinds=["inference"]).offers(Requirements(), "inference", {})
    assert emu.requests == [("POST", "/api/v0/bundles/")]


def test_rented_offers_leave_the_search(emu: VastEmulator) -> None:
    provider = make(emu)
    lease = provider.reserve(offer_for(provider, "1001"), job())
    assert "1001" not in ids(provider.offers(Requirements(), "command", {}))
    provider.release(lease)
    assert "1001" in ids(provider.offers(Requirements(), "command", {}))


# --- the run -----------------------------------------------------------------------------------


def test_happy_path_runs_the_command_reports_and_stops_billing(emu: VastEmulator, receiver: Receiver) -> None:
    provider = make(emu)
    spec = job("echo hi; echo GPUFLEET_RESULT '{\"answer\": 42}'", callback=receiver.url)
    lease, handle = rent(provider, spec)
    assert provider.poll(handle) == RunStatus(state="running", provisioning=True)
    instance = emu.instance(int(lease.external_id))
    assert instance is not None
    assert (instance["label"], instance["image"], instance["disk"]) == (spec.label, provider.image, 20.0)
    assert instance["env"]["GPUFLEET_JOB_TOKEN"] == TOKEN and instance["env"]["GPUFLEET_GPU"] == "RTX 4090"
    assert lease.price_per_hour == 0.40 and lease.label == spec.label

    until(lambda: provider.poll(handle) == RunStatus(state="running"))
    report = until(lambda: receiver.reports)[0]
    assert report["authorization"] == f"Bearer {TOKEN}"
    assert report["body"]["state"] == "succeeded"
    assert report["body"]["result"]["answer"] == 42 and report["body"]["result"]["stdout"].startswith("hi")
    status = settle(provider, handle)
    assert status.state == "failed" and not status.transient and "exited" in (status.error or "")
    assert "code 0" in (status.error or "")

    provider.release(lease, handle)
    assert emu.alive() == [] and emu.destroyed() == [int(lease.external_id)]
    cost = emu.billing()["total"]
    assert cost > 0
    time.sleep(0.1)
    assert emu.billing()["total"] == cost


def test_failing_command_reports_failure_and_exits_nonzero(emu: VastEmulator, receiver: Receiver) -> None:
    provider = make(emu)
    _, handle = rent(provider, job("echo boom >&2; exit 3", callback=receiver.url))
    status = settle(provider, handle)
    assert status.state == "failed" and not status.transient and "code 3" in (status.error or "")
    body = until(lambda: receiver.reports)[0]["body"]
    assert body["state"] == "failed" and body["error"] == "exit code 3: boom"


def test_training_gets_default_command_and_checkpoint_interval(emu: VastEmulator, receiver: Receiver) -> None:
    provider = make(emu, default_command="echo every=$GPUFLEET_CHECKPOINT_INTERVAL", checkpoint_interval=600,
                    image="custom/image:1", disk_gb=50)
    spec = job(None, kind="training", callback=receiver.url, base_model="llama")
    lease, handle = rent(provider, spec)
    until(lambda: receiver.reports)
    assert receiver.reports[0]["body"]["result"]["stdout"].strip() == "every=600"
    instance = emu.instance(int(lease.external_id))
    assert instance is not None and (instance["image"], instance["disk"]) == ("custom/image:1", 50.0)
    with pytest.raises(PermanentProviderError, match="command"):
        make(emu).reserve(offer_for(provider, "1003"), job(None))
    assert emu.alive() == [int(lease.external_id)]  # the job without a command rented nothing


def test_interruptible_offer_places_the_bid(emu: VastEmulator) -> None:
    provider = make(emu)
    bid_offer = offer_for(provider, "1003-bid")
    lease = provider.reserve(bid_offer, job())
    create = next(r["body"] for r in emu.request_log if r["method"] == "PUT" and r["path"] == "/api/v0/asks/1003/")
    assert create["price"] == pytest.approx(0.805) and create["onstart"].startswith("python3 -c")
    assert lease.data["interruptible"] and lease.price_per_hour == pytest.approx(0.805)
    row = emu.instance(int(lease.external_id))
    assert row is not None and row["is_bid"] and row["dph_total"] == pytest.approx(0.805)
    # A stored offer (JSON round trip) still rents the right ask.
    again = Offer(**json.loads(bid_offer.model_dump_json()))
    provider.release(lease)
    assert provider.reserve(again, job()).data["ask_id"] == 1003


def test_release_kills_the_process_and_is_idempotent(emu: VastEmulator) -> None:
    provider = make(emu)
    lease, handle = rent(provider, job("sleep 30"))
    until(lambda: provider.poll(handle).state == "running" and emu.instance(int(lease.external_id))["pid"])  # type: ignore[index]
    pid = emu.instance(int(lease.external_id))["pid"]  # type: ignore[index]
    provider.release(lease, handle)
    provider.release(lease, handle)
    provider.release(Lease(provider="vastai", offer_id="1", external_id="999", label="x", price_per_hour=0, reserved_at=0))
    assert emu.alive() == []
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: the emulator killed and waited for it


# --- failures ----------------------------------------------------------------------------------


def test_offer_taken_between_search_and_create(emu: VastEmulator) -> None:
    provider = make(emu)
    offer = offer_for(provider, "1003")
    emu.take(1003)
    with pytest.raises(NoCapacity, match="offer 1003 was taken"):
        provider.reserve(offer, job())
    assert emu.alive() == []
    with pytest.raises(NoCapacity):  # a bid below the (new) minimum is the offer's problem too
        provider.reserve(offer.model_copy(update={"offer_id": "1001-bid", "interruptible": True,
                                                  "data": {"ask_id": 1001, "bid": 0.01}}), job())
    assert emu.alive() == []


def test_stuck_provisioning_fails_over_after_the_timeout(emu: VastEmulator) -> None:
    provider = make(emu, provisioning_timeout=1)
    emu.stick(1001)
    lease, handle = rent(provider, job())
    assert provider.poll(handle).provisioning
    status = until(lambda: (s := provider.poll(handle)).state == "failed" and s, seconds=3)
    assert status.transient and status.error == f"vastai instance {lease.external_id} was not running after 1s (status loading)"
    provider.release(lease, handle)
    assert emu.alive() == []


@pytest.mark.parametrize("status", [429, 503])
def test_brief_throttling_is_retried_with_retry_after(emu: VastEmulator, status: int) -> None:
    provider = make(emu)
    emu.fail(status, count=1, retry_after=1)
    began = time.monotonic()
    assert provider.offers(Requirements(), "command", {})
    assert 0.9 <= time.monotonic() - began < 3


def test_persistent_throttling_raises_transient_quickly(emu: VastEmulator) -> None:
    provider = make(emu)
    emu.fail(503, count=2, retry_after=1)
    began = time.monotonic()
    with pytest.raises(TransientProviderError, match="503"):
        provider.offers(Requirements(), "command", {})
    lease, handle = rent(provider, job("sleep 5"))
    emu.fail(429, count=2, retry_after=600)  # the SDK alone would wait out up to 60 s per attempt
    with pytest.raises(TransientProviderError, match="429"):
        provider.poll(handle)
    assert time.monotonic() - began < 6
    emu.fail(503, count=2, paths=["/api/v0/instances/"])
    with pytest.raises(NotYetReleased):
        provider.release(lease, handle)
    provider.release(lease, handle)
    assert emu.alive() == []


def test_create_is_not_retried_blindly_on_server_errors(emu: VastEmulator) -> None:
    provider = make(emu)
    offer = offer_for(provider, "1001")
    emu.fail(502, count=1, paths=["/api/v0/asks/"])
    with pytest.raises(TransientProviderError, match="502"):
        provider.reserve(offer, job())
    assert [p for m, p in emu.requests if m == "PUT"] == ["/api/v0/asks/1001/"]
    emu.fail(429, count=1, retry_after=0.2, paths=["/api/v0/asks/"])
    assert provider.reserve(offer, job()).external_id  # a 429 did nothing: safe to repeat


def test_api_down(emu: VastEmulator) -> None:
    provider = make(emu)
    offer = offer_for(provider, "1001")
    lease, handle = rent(provider, job("sleep 5"), "1003")
    emu.down()
    began = time.monotonic()
    with pytest.raises(TransientProviderError, match="unreachable"):
        provider.reserve(offer, job())
    with pytest.raises(TransientProviderError):
        provider.poll(handle)
    with pytest.raises(TransientProviderError):
        provider.offers(Requirements(), "command", {})
    health = provider.health()
    assert not health.ok and health.detail.startswith("vastai API unreachable")
    with pytest.raises(NotYetReleased):
        provider.release(lease, handle)
    assert time.monotonic() - began < 8
    emu.up()
    assert provider.health().ok
    provider.release(lease, handle)
    assert emu.alive() == []


def test_create_with_unknown_outcome_destroys_what_it_made(emu: VastEmulator) -> None:
    provider = make(emu, request_timeout=0.5)
    offer = offer_for(provider, "1001")
    emu.lag(1.5, paths=["/api/v0/asks/"])  # created, but the answer comes after we gave up
    with pytest.raises(TransientProviderError, match="destroyed instance"):
        provider.reserve(offer, job())
    assert emu.alive() == [] and len(emu.destroyed()) == 1
    emu.half_create()
    with pytest.raises(TransientProviderError, match="half-succeeded.*destroyed instance"):
        provider.reserve(offer, job())
    assert emu.alive() == [] and len(emu.destroyed()) == 2


def test_preemption_and_outbidding_fail_transiently(emu: VastEmulator) -> None:
    provider = make(emu)
    lease, handle = rent(provider, job("sleep 5"))
    until(lambda: provider.poll(handle) == RunStatus(state="running"))
    emu.preempt(int(lease.external_id))
    status = provider.poll(handle)
    assert status.state == "failed" and status.transient
    assert status.error == f"vastai instance {lease.external_id} disappeared (preempted or host lost)"
    provider.release(lease, handle)  # already gone counts as released

    bid_lease, bid_handle = rent(provider, job("sleep 5"), "1003-bid")
    emu.outbid(int(bid_lease.external_id))
    status = provider.poll(bid_handle)
    assert status.state == "failed" and status.transient and "outbid" in (status.error or "")
    provider.release(bid_lease, bid_handle)

    host_lease, host_handle = rent(provider, job("sleep 5"), "1005")
    emu.patch(int(host_lease.external_id), {"actual_status": "offline", "status_msg": "host unreachable"})
    status = provider.poll(host_handle)
    assert status.state == "failed" and status.transient and "offline" in (status.error or "")
    provider.release(host_lease, host_handle)
    assert emu.alive() == []


def test_owned_lists_only_our_labelled_instances(emu: VastEmulator) -> None:
    emulator = VastEmulator(api_key=KEY, max_page=2).start()  # pages of two: owned() must follow next_token
    try:
        provider = make(emulator)
        ours = [provider.reserve(offer_for(provider, o), job()) for o in ("1001", "1003", "1005")]
        from vastai import VastAI

        foreign = VastAI(api_key=KEY, server_url=emulator.url).create_instance(1002, image="x", label="someone-else")
        emulator.patch(int(ours[0].external_id), {"start_date": None, "extra_env": {"odd": "shape"}})
        owned = {r.external_id: r for r in provider.owned()}
        assert set(owned) == {lease.external_id for lease in ours} and str(foreign["new_contract"]) not in owned
        second = owned[ours[1].external_id]
        assert second.label == ours[1].label and second.price_per_hour == 1.10 and second.created_at is not None
        assert owned[ours[0].external_id].created_at is None  # tolerated, unlike the SDK's show_instances
        assert provider.poll(provider.start(ours[0], job())).state == "running"  # the odd row polls fine too
        provider.release(ours[0])
        assert len(provider.owned()) == 2
    finally:
        emulator.stop()


def test_bad_key_is_permanent_and_never_echoed(emu: VastEmulator) -> None:
    secret = "sk-wrong-" + "s3cr3t" * 4
    provider = make(emu, api_key=None, api_key_env="GPUFLEET_TEST_VAST_KEY")
    os.environ["GPUFLEET_TEST_VAST_KEY"] = secret
    try:
        errors = []
        for call in (lambda: provider.offers(Requirements(), "command", {}),
                     lambda: provider.reserve(Offer(provider="vastai", offer_id="1001", data={"ask_id": 1001}), job()),
                     lambda: provider.poll(RunHandle(provider="vastai", started_at=0, lease=Lease(
                         provider="vastai", offer_id="1001", external_id="7000001", label="x", price_per_hour=0,
                         reserved_at=time.time())))):
            with pytest.raises(PermanentProviderError, match=r"vastai rejected the API key \(401\)") as info:
                call()
            errors.append(info.value)
        health = provider.health()
    finally:
        del os.environ["GPUFLEET_TEST_VAST_KEY"]
    assert not health.ok and health.detail == "vastai rejected the API key (401)"
    for exc in errors:
        assert secret not in str(exc) and secret not in repr(exc.__cause__) and exc.__suppress_context__
    assert emu.alive() == []
    missing = make(emu, api_key=None, api_key_env="GPUFLEET_TEST_NO_SUCH_VAR")
    with pytest.raises(PermanentProviderError, match="no API key"):
        missing.offers(Requirements(), "command", {})
    assert not missing.health().ok


def test_health_reports_a_reachable_api(emu: VastEmulator) -> None:
    health = make(emu).health()
    assert health.ok and emu.url in health.detail
    assert emu.requests == [("GET", "/api/v0/users/current")]


# --- the emulator's own control surface (integration tests drive it over HTTP) -------------------


def _control(url: str, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/_emulator/{name}", data=data, method="POST" if data else "GET",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_emulator_runs_from_the_shell_and_obeys_http_controls() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.emulators.vastai", "--port", "0", "--key", KEY,
                             "--boot-delay", "0.1"], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        provider = VastAIProvider("vastai", {"api_key": KEY, "server_url": url, "request_timeout": 5})
        offer = offer_for(provider, "1001")
        assert _control(url, "take", {"offer_id": 1001}) == {"ok": True}
        with pytest.raises(NoCapacity):
            provider.reserve(offer, job())
        lease = provider.reserve(offer_for(provider, "1003"), job("sleep 5"))
        assert _control(url, "preempt", {"instance_id": int(lease.external_id)}) == {"ok": True}
        state = _control(url, "state")
        assert state["alive"] == [] and state["destroyed"] == [int(lease.external_id)]
        assert state["billing"]["total"] > 0
        _control(url, "fail", {"status": 503, "count": 1})
        assert not provider.health().ok
        _control(url, "down", {"seconds": 0.3})
        assert not provider.health().ok
        until(lambda: provider.health().ok, seconds=3)
    finally:
        proc.terminate()
        proc.wait(timeout=5)
