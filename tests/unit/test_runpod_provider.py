"""The RunPod adapter through the real ``runpod`` SDK against a local emulator of RunPod's serverless
and GraphQL APIs: offers, serverless requests, pods that really run the instance wrapper, failure
mapping, escaping, the reaper's listing, and keeping the API key out of every message."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

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
from providers.instance import instance_command
from providers.runpod import RunPodProvider
from providers.sandbox import models
from tests.emulators.callback import Receiver
from tests.emulators.runpod import RunPodEmulator, whisper_output

ROOT = Path(__file__).resolve().parents[2]
KEY = "rp-test-key-3f9a"
A100 = "NVIDIA A100 80GB PCIe"
RTX = "NVIDIA GeForce RTX 4090"
ENDPOINTS = {"llm": {"price_per_second": 0.0005, "workers": 2, "delay_seconds": 0.2},
             "asr": {"price_per_second": 0.0002, "workers": 1, "delay_seconds": 0.1, "worker": "faster_whisper"}}
INFER = {"model": "llama-3-8b", "prompt": "why is the sky blue?", "max_tokens": 16}


@pytest.fixture
def emu() -> Iterator[RunPodEmulator]:
    with RunPodEmulator(api_key=KEY, endpoints=ENDPOINTS, boot_delay=0.15) as emulator:
        yield emulator


def make(emu: RunPodEmulator, **overrides: Any) -> RunPodProvider:
    config: dict[str, Any] = {
        "api_key": KEY, "api_base_url": emu.url, "endpoint_base_url": emu.serverless_url,
        "request_timeout": 2, "retry_budget_seconds": 2, "health_cache_seconds": 0, "provisioning_timeout": 10,
        "endpoints": [
            {"endpoint_id": "llm", "gpu": "A100", "gpu_memory_gb": 80, "region": "US", "max_workers": 3,
             "price_per_second": 0.0005, "models": ["llama-3-8b", "llama-3-70b"]},
            {"endpoint_id": "asr", "gpu": "RTX 4090", "gpu_memory_gb": 24, "region": "EU-SE", "max_workers": 1,
             "price_per_hour": 0.72, "kinds": ["transcription"]},
        ],
        "pods": {"gpu_types": [A100, RTX], "image": "runpod/pytorch:test"},
    }
    config.update(overrides)
    return RunPodProvider("runpod", config)


def job(kind: str = "command", spec: dict[str, Any] | None = None, env: dict[str, str] | None = None,
        label: str = "gpufleet-res-1", job_id: str = "job-1", timeout: int = 60) -> JobSpec:
    return JobSpec(job_id=job_id, kind=kind, attempt=1, spec=spec if spec is not None else {"command": "true"},  # type: ignore[arg-type]
                   timeout_seconds=timeout, env=env or {}, label=label)


def offer(provider: RunPodProvider, offer_id: str, kind: str = "command", req: Requirements | None = None,
          spec: dict[str, Any] | None = None) -> Offer:
    offers = provider.offers(req or Requirements(), kind, spec if spec is not None else {"command": "true"})
    return next(o for o in offers if o.offer_id == offer_id)


def wait(provider: RunPodProvider, handle: RunHandle, seconds: float = 5.0, until: str | None = None) -> RunStatus:
    """Poll until the run leaves ``running`` (or reaches a running state that is not provisioning)."""
    end = time.monotonic() + seconds
    while True:
        status = provider.poll(handle)
        if status.state != "running" or (until == "booted" and not status.provisioning):
            return status
        assert time.monotonic() < end, f"still {status} after {seconds}s"
        time.sleep(0.03)


def run_request(provider: RunPodProvider, spec: JobSpec, endpoint: str = "llm") -> tuple[Lease, RunHandle]:
    lease = provider.reserve(offer(provider, f"endpoint:{endpoint}", spec.kind, spec=spec.spec), spec)
    return lease, provider.start(lease, spec)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# --- offers ----------------------------------------------------------------------------------------


def test_serverless_offers_follow_kinds_models_and_requirements(emu: RunPodEmulator) -> None:
    provider = make(emu, pods=None)
    [llm] = provider.offers(Requirements(), "inference", INFER)
    assert llm.offer_id == "endpoint:llm" and llm.gpu == "A100" and llm.gpu_count == 1 and llm.capacity == 3
    assert llm.price_per_hour == pytest.approx(0.0005 * 3600) and llm.region == "US"
    assert llm.kinds == ["inference", "transcription"] and llm.data["endpoint_id"] == "llm"
    # The asr endpoint is priced per hour in config; offers are still per hour.
    [asr] = provider.offers(Requirements(), "transcription", {"audio_url": "s3://a.wav"})
    assert asr.offer_id == "endpoint:asr" and asr.price_per_hour == pytest.approx(0.72)
    assert provider.offers(Requirements(), "inference", {**INFER, "model": "mistral-7b"}) == []  # model not served
    assert provider.offers(Requirements(), "training", {}) == []
    assert provider.offers(Requirements(gpu=["H100"]), "inference", INFER) == []
    assert provider.offers(Requirements(max_price_per_hour=1.0), "inference", INFER) == []
    assert provider.offers(Requirements(regions=["EU"]), "inference", INFER) == []
    assert provider.offers(Requirements(min_gpu_memory_gb=40), "transcription", {}) == []
    assert [o.offer_id for o in provider.offers(Requirements(regions=["SE"]), "transcription", {})] == ["endpoint:asr"]
    assert provider.offers(Requirements(providers=["vastai"]), "inference", INFER) == []
    assert not any(r["path"].startswith("/v2/") for r in emu.requests)  # offers cost no API call


def test_pod_offers_come_from_runpod_prices(emu: RunPodEmulator) -> None:
    provider = make(emu)
    offers = {o.offer_id: o for o in provider.offers(Requirements(), "command", {"command": "true"})}
    assert set(offers) == {f"pod:{A100}:secure", f"pod:{A100}:community", f"pod:{RTX}:secure", f"pod:{RTX}:community"}
    community = offers[f"pod:{A100}:community"]
    assert (community.gpu, community.gpu_memory_gb, community.price_per_hour) == ("A100 80GB PCIe", 80, 1.19)
    assert community.data == {"type": "pod", "gpu_type_id": A100, "cloud_type": "COMMUNITY", "gpu_count": 1,
                              "interruptible": False, "bid_per_gpu": None}
    assert not community.interruptible and community.kinds == ["training", "command"]

    two = provider.offers(Requirements(gpu=["4090"], gpu_count=2), "training", {"command": "true"})
    assert {(o.offer_id, o.gpu_count, o.price_per_hour) for o in two} == {
        (f"pod:{RTX}:secure", 2, 1.38), (f"pod:{RTX}:community", 2, 0.68)}
    assert {o.gpu for o in provider.offers(Requirements(min_gpu_memory_gb=40), "command", {"command": "x"})} == {"A100 80GB PCIe"}
    assert [o.offer_id for o in provider.offers(Requirements(max_price_per_hour=0.5), "command", {"command": "x"})] == [
        f"pod:{RTX}:community"]
    spot = [o for o in provider.offers(Requirements(interruptible=True, gpu=["A100"]), "command", {"command": "x"})
            if o.interruptible]
    assert {(o.offer_id, o.price_per_hour, o.data["bid_per_gpu"]) for o in spot} == {
        (f"pod:{A100}:secure:spot", 0.82, 0.82), (f"pod:{A100}:community:spot", 0.6, 0.6)}
    assert provider.offers(Requirements(regions=["EU"]), "command", {"command": "x"}) == []  # region not pinned
    assert provider.offers(Requirements(), "command", {}) == []  # nothing to run without a command
    assert provider.offers(Requirements(), "inference", INFER)[0].offer_id == "endpoint:llm"

    secure_eu = make(emu, pods={"gpu_types": [A100], "cloud_type": "SECURE", "country_code": "SE", "interruptible": True})
    assert sorted(o.offer_id for o in secure_eu.offers(Requirements(regions=["EU"]), "command", {"command": "x"})) == [
        f"pod:{A100}:secure", f"pod:{A100}:secure:spot"]
    emu.out_of_stock(A100)
    assert secure_eu.offers(Requirements(), "command", {"command": "x"}) == []


# --- serverless ------------------------------------------------------------------------------------


def test_serverless_request_succeeds_with_output_and_cost(emu: RunPodEmulator) -> None:
    provider = make(emu)
    spec = job("inference", INFER, env={"GPUFLEET_JOB_TOKEN": "secret-token"})
    lease, handle = run_request(provider, spec)
    assert lease.external_id == "" and lease.price_per_hour == 0.0  # nothing rented: poll reports the cost
    assert handle.data["request_id"]
    status = wait(provider, handle)
    assert status.state == "succeeded"
    assert status.result == models.complete("llama-3-8b", "why is the sky blue?", 16)
    [run] = [r for r in emu.requests if r["path"] == "/v2/llm/run"]
    assert run["authorized"] and run["body"]["input"] == {"kind": "inference", **INFER}
    assert run["body"]["policy"] == {"executionTimeout": 60_000}
    assert "secret-token" not in json.dumps(run["body"])  # the job's callback token stays home
    [emulated] = emu.jobs()
    assert status.cost == pytest.approx(emulated["executionTime"] / 1000 * 0.0005)
    assert status.cost == pytest.approx(emu.billing()["serverless"]["llm"])
    provider.release(lease, handle)  # finished: nothing to cancel
    assert not any("/cancel/" in r["path"] for r in emu.requests)


@pytest.mark.parametrize(("outcome", "error", "transient", "message"), [
    ("FAILED", "CUDA error: device-side assert triggered", False, "RunPod request failed: CUDA error"),
    ("FAILED", "worker died while handling the job", True, "worker died"),
    ("TIMED_OUT", None, True, "timed out"),
])
def test_serverless_failures_are_mapped(emu: RunPodEmulator, outcome: str, error: str | None, transient: bool,
                                        message: str) -> None:
    provider = make(emu)
    emu.fail_next("llm", outcome, error=error)
    _, handle = run_request(provider, job("inference", INFER))
    status = wait(provider, handle)
    assert status.state == "failed" and status.transient is transient
    assert message in (status.error or "")


AUDIO = {"audio_url": "https://media.example.test/talk.wav", "model": "whisper-large-v3", "language": "english",
         "formats": ["text", "srt"]}


def test_transcription_sends_the_whisper_workers_input_and_returns_the_uniform_shape(emu: RunPodEmulator) -> None:
    provider = make(emu)
    lease, handle = run_request(provider, job("transcription", AUDIO), endpoint="asr")
    [run] = [r for r in emu.requests if r["path"] == "/v2/asr/run"]
    # Only keys RunPod's faster-whisper worker knows (its validator fails a request with any other),
    # the model by the worker's name and the language as the code Whisper wants.
    assert run["body"]["input"] == {"audio": AUDIO["audio_url"], "model": "large-v3", "transcription": "plain_text",
                                    "language": "en"}
    stored = RunHandle(**handle.model_dump(mode="json"))  # as a restarted worker would load it
    status = wait(provider, stored)
    assert status.state == "succeeded", status.error
    result = status.result or {}
    assert set(result) == {"text", "language", "duration_seconds", "segments", "model", "usage", "formats"}
    assert result["language"] == "en" and result["model"] == "whisper-large-v3"
    [emulated] = [j for j in emu.jobs() if j["endpoint"] == "asr"]
    worker = whisper_output(emulated["input"])  # what the emulated worker answered (deterministic)
    assert worker["detected_language"] == "en" and worker["model"] == "large-v3" and worker["device"] == "cuda"
    # Segments keep start/end/text only, without faster-whisper's leading space; the text joins them.
    assert result["segments"] == [{"start": s["start"], "end": s["end"], "text": s["text"].strip()}
                                  for s in worker["segments"]]
    assert len(result["segments"]) > 3 and result["text"] == worker["transcription"]
    assert result["duration_seconds"] == worker["segments"][-1]["end"]
    assert result["usage"] == {"total_tokens": sum(len(s["tokens"]) for s in worker["segments"])}
    srt = result["formats"]["srt"]
    assert srt.startswith("1\n00:00:00,000 --> ") and f"\n{result['segments'][1]['text']}\n" in srt
    assert set(result["formats"]) == {"srt"}  # text and json are the result itself
    # The cost logic is unchanged: execution time × the endpoint's price.
    assert status.cost == pytest.approx(emulated["executionTime"] / 1000 * 0.72 / 3600)


def test_transcription_keeps_the_jobs_hints_and_asks_for_vtt(emu: RunPodEmulator) -> None:
    provider = make(emu)
    spec = {"audio_url": "https://media.example.test/de.mp3", "language": "de", "duration_seconds": 61.5,
            "formats": ["vtt"]}  # no model: the worker's default
    _, handle = run_request(provider, job("transcription", spec), endpoint="asr")
    result = wait(provider, handle).result or {}
    [run] = [r for r in emu.requests if r["path"] == "/v2/asr/run"]
    assert run["body"]["input"] == {"audio": spec["audio_url"], "transcription": "plain_text", "language": "de"}
    assert result["language"] == "de" and result["model"] == "base"
    assert result["duration_seconds"] == 61.5  # the worker reports no length: the job's own figure
    assert result["formats"]["vtt"].startswith("WEBVTT\n\n00:00:00.000 --> ") and "srt" not in result["formats"]


def test_a_worker_rejecting_the_input_fails_the_job_permanently(emu: RunPodEmulator) -> None:
    provider = make(emu)
    _, handle = run_request(provider, job("transcription", {**AUDIO, "model": "whisper-1"}), endpoint="asr")
    status = wait(provider, handle)
    assert status.state == "failed" and not status.transient
    assert "Model 'whisper-1' not found." in (status.error or "")


def test_transcription_of_local_audio_is_not_offered(emu: RunPodEmulator, tmp_path: Path) -> None:
    provider = make(emu, pods=None)
    asr = offer(provider, "endpoint:asr", "transcription", spec={})  # made before the job's audio was known
    for local in (str(tmp_path / "a.wav"), f"file://{tmp_path}/a.wav"):
        spec = job("transcription", {"audio_url": local})
        assert provider.offers(Requirements(), "transcription", spec.spec) == []  # a worker at RunPod cannot read it
        with pytest.raises(PermanentProviderError, match="local audio"):
            provider.start(provider.reserve(asr, spec), spec)
    assert not any(r["path"].startswith("/v2/") for r in emu.requests)
    assert [o.offer_id for o in provider.offers(Requirements(), "transcription", {"audio_url": "s3://b/a.wav"})] == [
        "endpoint:asr"]


def test_an_endpoint_answering_without_a_transcript_fails_the_job() -> None:
    with RunPodEmulator(api_key=KEY, endpoints={"echo": {"price_per_second": 0.0005, "worker": "echo",
                                                         "delay_seconds": 0.05}}) as other:
        provider = make(other, pods=None, endpoints=[{"endpoint_id": "echo", "price_per_second": 0.0005,
                                                      "kinds": ["transcription"]}])
        _, handle = run_request(provider, job("transcription", AUDIO), endpoint="echo")  # it echoes its input
        status = wait(provider, handle)
    assert status.state == "failed" and not status.transient and status.cost is not None
    assert "without a transcript" in (status.error or "") and "faster-whisper" in (status.error or "")


def test_request_cancelled_by_runpod_fails_and_is_not_cancelled_again(emu: RunPodEmulator) -> None:
    provider = make(emu)
    emu.set_delay("llm", 5)
    lease, handle = run_request(provider, job("inference", INFER))
    # Someone else (the RunPod console, a purge) cancels it.
    requests.post(f"{emu.serverless_url}/llm/cancel/{handle.data['request_id']}",
                  headers={"Authorization": f"Bearer {KEY}"}, timeout=2).raise_for_status()
    status = wait(provider, handle, seconds=1)
    assert (status.state, status.error, status.transient) == ("failed", "cancelled by RunPod", False)
    provider.release(lease, handle)
    assert sum("/cancel/" in r["path"] for r in emu.requests) == 1


def test_release_cancels_a_running_request(emu: RunPodEmulator) -> None:
    provider = make(emu)
    emu.set_delay("llm", 5)
    lease, handle = run_request(provider, job("inference", INFER))
    assert provider.poll(handle).state == "running"
    stored = RunHandle(**handle.model_dump(mode="json"))  # as a restarted worker would load it
    provider.release(lease, stored)
    assert [j["status"] for j in emu.jobs()] == ["CANCELLED"]
    provider.release(lease, RunHandle(**handle.model_dump(mode="json")))  # idempotent
    provider.release(lease, None)
    assert emu.jobs()[0]["executionTime"] < 1000  # billing stopped at the cancel


def test_rate_limits_are_retried_with_bounded_backoff(emu: RunPodEmulator) -> None:
    provider = make(emu)
    emu.fail(429, count=2, retry_after="0.2", paths=["/v2/llm/run"])  # fractional: the SDK's own retry would crash
    began = time.monotonic()
    _, handle = run_request(provider, job("inference", INFER))
    assert 0.35 < time.monotonic() - began < 2
    assert [r["status"] for r in emu.requests if r["path"] == "/v2/llm/run"] == [429, 429, 200]
    emu.fail(429, count=1, retry_after="0.1", paths=["/v2/llm/status"])  # GET: the SDK's urllib3 retry is unmounted
    emu.fail(503, count=1, paths=["/v2/llm/status"])
    assert wait(provider, handle).state == "succeeded"
    assert [r["status"] for r in emu.requests if r["path"].startswith("/v2/llm/status")][:3] == [429, 503, 200]

    emu.fail(429, count=100, retry_after="0.3", paths=["/v2/llm/run"])
    began = time.monotonic()
    with pytest.raises(TransientProviderError, match="429"):
        run_request(provider, job("inference", INFER))
    assert time.monotonic() - began < 2.5  # the retry budget bounds it


def test_api_down_is_transient_and_unhealthy(emu: RunPodEmulator) -> None:
    provider = make(emu, retry_budget_seconds=0.3)
    _, handle = run_request(provider, job("inference", {**INFER, "max_tokens": 4}))
    assert provider.health().ok
    emu.down()
    health = provider.health()
    assert not health.ok and "cannot connect" in health.detail
    with pytest.raises(TransientProviderError, match="cannot connect"):
        provider.offers(Requirements(), "command", {"command": "x"})
    with pytest.raises(TransientProviderError):
        run_request(provider, job("inference", INFER))
    with pytest.raises(TransientProviderError):
        provider.poll(handle)
    emu.up()  # same port: the provider's URLs still point at it
    assert provider.health().ok
    assert wait(provider, handle).state == "succeeded"


def test_health_is_cached_briefly(emu: RunPodEmulator) -> None:
    provider = make(emu, health_cache_seconds=30)
    assert provider.health().ok
    calls = len(emu.requests)
    assert provider.health().ok and len(emu.requests) == calls


# --- pods ------------------------------------------------------------------------------------------


def test_pod_runs_the_wrapper_reports_back_and_release_stops_billing(emu: RunPodEmulator, receiver: Receiver) -> None:
    provider = make(emu)
    command = ["python3", "-c", "print('working'); print('GPUFLEET_RESULT {\"loss\": 0.25}')"]
    spec = job("training", {"command": command}, env={"GPUFLEET_CALLBACK_URL": receiver.url, "GPUFLEET_JOB_TOKEN": "tok-123",
                                                        "GPUFLEET_JOB_ID": "job-1"})
    lease = provider.reserve(offer(provider, f"pod:{A100}:secure", "training"), spec)
    [pod] = emu.pods()
    assert (lease.external_id, lease.label, lease.price_per_hour) == (pod["id"], "gpufleet-res-1", 1.64)
    assert (pod["name"], pod["image"], pod["cloud"], pod["gpu_type_id"]) == ("gpufleet-res-1", "runpod/pytorch:test",
                                                                             "SECURE", A100)
    assert pod["docker_args"] == instance_command(spec)
    handle = provider.start(lease, spec)
    first = provider.poll(handle)
    assert first.state == "running" and first.provisioning

    assert receiver.got.wait(10), emu.pod_log(pod["id"])
    [report] = receiver.reports
    assert report["auth"] == "Bearer tok-123" and report["path"] == "/v1/jobs/job-1/report"
    assert report["body"]["state"] == "succeeded"
    assert report["body"]["result"]["loss"] == 0.25 and report["body"]["result"]["exit_code"] == 0
    assert "working" in report["body"]["result"]["stdout"]
    status = wait(provider, handle)
    assert status.state == "failed" and "exited" in (status.error or "") and not status.transient

    provider.release(lease, handle)
    assert emu.pods() == [] and emu.alive() == []
    billed = emu.billing()["pods"][pod["id"]]
    assert billed > 0
    time.sleep(0.1)
    assert emu.billing()["pods"][pod["id"]] == billed
    provider.release(lease, handle)  # already gone is fine


def test_env_and_names_survive_graphql_escaping(emu: RunPodEmulator) -> None:
    provider = make(emu)
    env = {"QUOTES": 'say "hi" and \'bye\'', "BACKSLASH": "C:\\path\\to\\", "NEWLINES": "line 1\nline 2\r\n",
           "INJECTION": '"} ] , name: "evil", env: [{ key: "X', "UNICODE": "tab\tü €  😀", "EMPTY": ""}
    spec = job("command", {"command": "printenv QUOTES", "image": 'img:"quoted"'}, env=env, label='gpufleet-we"ird\\name')
    lease = provider.reserve(offer(provider, f"pod:{RTX}:community"), spec)
    [pod] = emu.pods()
    assert pod["env"] == env
    assert pod["name"] == lease.label == 'gpufleet-we"ird\\name' and pod["image"] == 'img:"quoted"'
    assert pod["docker_args"] == instance_command(spec)
    provider.release(lease)


def test_spot_pod_uses_podRentInterruptable_with_the_bid(emu: RunPodEmulator) -> None:  # noqa: N802
    provider = make(emu)
    spot = offer(provider, f"pod:{A100}:community:spot", req=Requirements(interruptible=True))
    env = {"MSG": 'quote " backslash \\ newline \n'}
    lease = provider.reserve(spot, job(env=env))
    [pod] = emu.pods()
    assert pod["interruptible"] and pod["cost_per_hr"] == 0.6 and pod["env"] == env and pod["cloud"] == "COMMUNITY"
    assert lease.price_per_hour == 0.6 and lease.data["interruptible"]
    assert [r["op"] for r in emu.requests if (r.get("op") or "").startswith("pod")][-1] == "podRentInterruptable"
    handle = provider.start(lease, job())
    wait(provider, handle, until="booted")
    emu.preempt(lease.external_id)
    status = provider.poll(handle)
    assert status.state == "failed" and status.transient and "disappeared" in (status.error or "")
    provider.release(lease, handle)  # gone already: fine


def test_out_of_stock_is_no_capacity_and_leaves_no_pod(emu: RunPodEmulator) -> None:
    provider = make(emu)
    chosen = offer(provider, f"pod:{A100}:community")
    emu.out_of_stock(A100)
    with pytest.raises(NoCapacity, match="no longer any instances available"):
        provider.reserve(chosen, job())
    assert emu.pods(include_gone=True) == []
    ghost = chosen.model_copy(update={"data": {**chosen.data, "gpu_type_id": "NVIDIA B999"}})
    with pytest.raises(NoCapacity, match="does not know that GPU type"):
        provider.reserve(ghost, job())


def test_create_with_unknown_outcome_removes_the_half_created_pod(emu: RunPodEmulator) -> None:
    provider = make(emu, request_timeout=0.5)
    chosen = offer(provider, f"pod:{A100}:community")
    emu.hang(1.5, ops=["podFindAndDeployOnDemand"])  # created, but the answer never arrives in time
    with pytest.raises(TransientProviderError, match="terminated half-created pod"):
        provider.reserve(chosen, job())
    assert emu.pods() == []
    assert [p["name"] for p in emu.pods(include_gone=True)] == ["gpufleet-res-1"]


def test_pod_stuck_provisioning_fails_transiently(emu: RunPodEmulator) -> None:
    provider = make(emu, provisioning_timeout=1)
    emu.stick(A100)
    lease = provider.reserve(offer(provider, f"pod:{A100}:secure"), job())
    handle = provider.start(lease, job())
    assert provider.poll(handle).provisioning
    time.sleep(1.05)
    status = provider.poll(handle)
    assert status.state == "failed" and status.transient
    assert status.error == f"pod {lease.external_id} was not running after 1s"
    provider.release(lease, handle)
    assert emu.pods() == []


def test_preempted_pod_fails_transiently(emu: RunPodEmulator) -> None:
    provider = make(emu)
    lease = provider.reserve(offer(provider, f"pod:{RTX}:community"), job(spec={"command": "sleep 30"}))
    handle = provider.start(lease, job())
    assert wait(provider, handle, until="booted").state == "running"
    assert emu.alive() == [lease.external_id]
    emu.preempt(lease.external_id)
    status = provider.poll(handle)
    assert (status.state, status.transient) == ("failed", True)
    assert status.error == f"pod {lease.external_id} disappeared (preempted or host lost)"
    assert emu.alive() == []


def test_release_during_an_outage_asks_to_be_called_again(emu: RunPodEmulator) -> None:
    provider = make(emu, retry_budget_seconds=0.3)
    lease = provider.reserve(offer(provider, f"pod:{RTX}:community"), job(spec={"command": "sleep 30"}))
    emu.fail(503, count=50, paths=["/graphql"])
    with pytest.raises(NotYetReleased):
        provider.release(lease)
    emu.heal()
    provider.release(lease)
    assert emu.pods() == []


def test_owned_lists_only_our_labelled_pods(emu: RunPodEmulator) -> None:
    provider = make(emu)
    began = time.time()
    ours = [provider.reserve(offer(provider, f"pod:{RTX}:community"), job(label=f"gpufleet-res-{i}")) for i in (1, 2)]
    provider.reserve(offer(provider, f"pod:{RTX}:secure"), job(label="someone-elses-notebook"))
    owned = sorted(provider.owned(), key=lambda r: r.label)
    assert [(r.external_id, r.label) for r in owned] == [(lease.external_id, lease.label) for lease in ours]
    for resource in owned:
        assert resource.provider == "runpod" and resource.price_per_hour == 0.34
        assert resource.created_at is not None and began - 2 <= resource.created_at <= time.time() + 1
        provider.release(resource.as_lease())  # the reaper's path
    assert [p["name"] for p in emu.pods()] == ["someone-elses-notebook"]


# --- autoscaling: the endpoint's max workers ------------------------------------------------------


def scaled(emu: RunPodEmulator, state_dir: Path | None = None, provider: dict[str, Any] | None = None,
           **endpoint: Any) -> RunPodProvider:
    """The ``llm`` endpoint with ``autoscale: true`` (max 3 workers, cooldown 60 s, idle 30 s); ``asr`` not.
    ``endpoint`` overrides llm's keys, ``provider`` the provider's."""
    llm = {"endpoint_id": "llm", "gpu": "A100", "gpu_memory_gb": 80, "region": "US", "price_per_second": 0.0005,
           "models": ["llama-3-8b"], "kinds": ["inference"], "autoscale": True, "min_workers": 0, "max_workers": 3,
           "scale_cooldown_seconds": 60, "scale_down_idle_seconds": 30, **endpoint}
    asr = {"endpoint_id": "asr", "gpu": "RTX 4090", "gpu_memory_gb": 24, "region": "EU-SE", "max_workers": 1,
           "price_per_hour": 0.72, "kinds": ["transcription"]}
    extra: dict[str, Any] = {"state_dir": str(state_dir)} if state_dir is not None else {}
    return make(emu, endpoints=[llm, asr], **extra, **(provider or {}))


def test_autoscale_raises_max_workers_to_the_demand_within_max_workers(emu: RunPodEmulator) -> None:
    emu.set_workers("llm", workers_max=0, idleTimeout=17)  # scaled to zero, with a setting of its own
    provider = scaled(emu)
    assert provider.kinds == ["inference"]  # the autoscaler counts queued jobs of these kinds
    lease, handle = run_request(provider, job("inference", INFER))
    time.sleep(0.2)
    assert provider.poll(handle).provisioning  # no worker may start: RunPod holds the request IN_QUEUE
    t0 = time.time()
    # One job queued here, one request held at RunPod (its /health says so, whoever sent it).
    note = provider.autoscale(1, now=t0, in_flight=0)
    assert note == "endpoint llm: grow from 0 to 2 (queue 1, 1 in flight, target 0)"
    assert emu.workers_max("llm") == 2
    [save] = emu.saves()
    assert save["input"]["id"] == "llm" and (save["input"]["workersMin"], save["input"]["workersMax"]) == (0, 2)
    settings = emu.endpoint_settings("llm")
    assert settings["idleTimeout"] == 17 and settings["workersMin"] == 0  # sent back unchanged, not reset
    assert settings["templateId"] == "tpl-llm" and settings["gpuIds"] == "AMPERE_80"
    status = wait(provider, handle)  # the held request now runs
    assert status.state == "succeeded"
    provider.release(lease, handle)
    # Past the cooldown, ten queued jobs ask for ten workers: capped at max_workers.
    note = provider.autoscale(10, now=t0 + 61, in_flight=0)
    assert note and "grow from 2 to 3 (capped at max_size 3, 10 wanted)" in note
    assert emu.workers_max("llm") == 3
    # The endpoint without autoscale is never touched.
    assert emu.workers_max("asr") == 1 and all(s["input"]["id"] == "llm" for s in emu.saves())


def test_autoscale_respects_the_cooldown_unless_jobs_waited_longer(emu: RunPodEmulator) -> None:
    emu.set_workers("llm", workers_max=0)
    provider = scaled(emu, max_workers=8, worker_concurrency=2)
    t0 = time.time()
    assert provider.autoscale(2, now=t0, in_flight=0) == "endpoint llm: grow from 0 to 1 (queue 2, 0 in flight, target 0)"
    note = provider.autoscale(6, now=t0 + 10, in_flight=0, waited_seconds=5)
    assert note and "would grow to 3 but cooling down for 50s more" in note
    assert emu.workers_max("llm") == 1 and len(emu.saves()) == 1
    # Waiting time is a signal too: once the oldest job waited longer than the cooldown, grow now.
    note = provider.autoscale(6, now=t0 + 20, in_flight=0, waited_seconds=61)
    assert note and "grow from 1 to 3" in note and emu.workers_max("llm") == 3
    # Nothing more wanted: steady, nothing said and nothing sent.
    assert provider.autoscale(6, now=t0 + 21, in_flight=0) is None and len(emu.saves()) == 2


def test_autoscale_scales_to_zero_only_after_the_endpoint_was_idle(emu: RunPodEmulator, tmp_path: Path) -> None:
    assert emu.workers_max("llm") == 2  # the emulator's endpoint starts with its two workers allowed
    provider = scaled(emu, state_dir=tmp_path)
    t0 = time.time()
    # The first look starts the idle clock; it does not guess how long the endpoint has been idle.
    note = provider.autoscale(0, now=t0, in_flight=0)
    assert note and "idle for 0s of 30s before shrinking" in note
    # A request running at RunPod (sent by anyone) is work: no shrink while it runs.
    emu.set_delay("llm", 5)
    lease, handle = run_request(provider, job("inference", INFER))
    assert provider.autoscale(0, now=t0 + 40, in_flight=0) is None  # busy: steady at 2
    provider.release(lease, handle)  # cancelled: the endpoint is idle from t0 + 40
    assert provider.autoscale(0, now=t0 + 60, in_flight=0) == \
        "endpoint llm: idle for 20s of 30s before shrinking (queue 0, 0 in flight, target 2)"
    assert emu.workers_max("llm") == 2 and emu.saves() == []
    note = provider.autoscale(0, now=t0 + 71, in_flight=0)
    assert note and "shrink from 2 to min_size 0 after 31s idle" in note
    assert (emu.workers_max("llm"), emu.endpoint_settings("llm")["workersMin"]) == (0, 0)
    assert provider.autoscale(0, now=t0 + 80, in_flight=0) is None  # at zero: steady
    # From zero the cooldown does not hold work back: nothing else could serve it.
    note = provider.autoscale(1, now=t0 + 90, in_flight=0)
    assert note and "grow from 0 to 1" in note and emu.workers_max("llm") == 1
    # The decision's memory is in the state dir: a restarted beat keeps the cooldown of that resize.
    restarted = scaled(emu, state_dir=tmp_path)
    note = restarted.autoscale(2, now=t0 + 95, in_flight=1)
    assert note and "cooling down for 55s more" in note and emu.workers_max("llm") == 1
    # With min_workers 2 the floor is two warm workers, and workersMin is kept at it.
    warm = scaled(emu, min_workers=2, scale_cooldown_seconds=0)
    assert warm.autoscale(0, now=t0, in_flight=0) and emu.workers_max("llm") == 2  # raised to the floor
    assert emu.endpoint_settings("llm")["workersMin"] == 2


def test_autoscale_only_when_the_config_asks(emu: RunPodEmulator) -> None:
    provider = make(emu)
    before = len(emu.requests)
    assert provider.autoscale(50, in_flight=10, waited_seconds=600) is None
    assert len(emu.requests) == before and emu.workers_max("llm") == 2  # not even a read
    with pytest.raises(ValueError, match="min_workers <= max_workers"):
        scaled(emu, min_workers=4, max_workers=2)


def test_autoscale_errors_are_mapped(emu: RunPodEmulator) -> None:
    emu.set_workers("llm", workers_max=0)
    # An endpoint deleted on RunPod is permanent; the other endpoints are still scaled.
    gone = {"endpoint_id": "gone", "price_per_second": 0.001, "autoscale": True, "max_workers": 2}
    provider = make(emu, endpoints=[{**gone}, {"endpoint_id": "llm", "price_per_second": 0.0005, "autoscale": True,
                                               "max_workers": 3, "scale_cooldown_seconds": 0}])
    with pytest.raises(PermanentProviderError) as caught:
        provider.autoscale(2, in_flight=0)
    assert "endpoint llm: grow from 0 to 2" in str(caught.value)
    assert "endpoint gone failed" in str(caught.value) and "does not exist" in str(caught.value)
    assert emu.workers_max("llm") == 2
    # RunPod down: transient (retried within the budget first), nothing changed.
    provider = scaled(emu)
    emu.fail(503, count=100, paths=["/graphql"])
    with pytest.raises(TransientProviderError, match="503"):
        provider.autoscale(5, in_flight=0)
    emu.heal()
    assert emu.workers_max("llm") == 2
    # The mutation refused in the body (the endpoint vanished between our read and our write).
    real_read = provider.scaler._read_endpoints
    provider.scaler._read_endpoints = lambda: {"llm": {**real_read()["llm"], "id": "llm-deleted"}}  # type: ignore[method-assign]
    with pytest.raises(TransientProviderError, match="Endpoint llm-deleted not found"):
        provider.autoscale(9, in_flight=0)
    assert emu.saves()[-1]["errors"] == ["Endpoint llm-deleted not found"]
    # A wrong key is permanent and never shown.
    secret = "rp-WRONG-autoscale-key"
    with pytest.raises(PermanentProviderError) as refused:
        scaled(emu, provider={"api_key": secret}).autoscale(1, in_flight=0)
    assert "API key" in str(refused.value) and secret not in str(refused.value)


def test_emulator_validates_save_endpoint_like_runpod(emu: RunPodEmulator) -> None:
    def gql(query: str, key: str = KEY) -> requests.Response:
        return requests.post(emu.graphql_url, json={"query": query}, headers={"Authorization": f"Bearer {key}"}, timeout=5)

    required = 'name: "llm", gpuIds: "AMPERE_80", templateId: "tpl-llm"'
    ok = gql(f'mutation {{ saveEndpoint(input: {{id: "llm", {required}, workersMin: 0, workersMax: 5}}) '
             '{ id workersMax workersMin } }')
    assert ok.status_code == 200 and ok.json() == {"data": {"saveEndpoint": {"id": "llm", "workersMin": 0, "workersMax": 5}}}
    assert emu.workers_max("llm") == 5 and emu.endpoint_settings("llm")["idleTimeout"] == 5
    unknown = gql(f'mutation {{ saveEndpoint(input: {{id: "nope", {required}, workersMax: 1}}) {{ id }} }}')
    assert unknown.status_code == 200 and unknown.json()["errors"][0]["message"] == "Endpoint nope not found"
    assert unknown.json()["data"] == {"saveEndpoint": None}
    missing = gql('mutation { saveEndpoint(input: {id: "llm", workersMax: 1}) { id } }')
    assert missing.status_code == 400 and "String!" in missing.json()["errors"][0]["message"]
    inverted = gql(f'mutation {{ saveEndpoint(input: {{id: "llm", {required}, workersMin: 3, workersMax: 1}}) {{ id }} }}')
    assert "errors" in inverted.json() and emu.workers_max("llm") == 5
    listed = gql("query { myself { endpoints { id workersMax workersMin } } }").json()["data"]["myself"]["endpoints"]
    assert {e["id"]: e["workersMax"] for e in listed} == {"llm": 5, "asr": 1}
    assert gql("query { myself { endpoints { id } } }", key="wrong").status_code == 401


# --- credentials, config, SDK side effects ---------------------------------------------------------


def test_bad_key_is_permanent_and_never_shown(emu: RunPodEmulator, caplog: pytest.LogCaptureFixture) -> None:
    secret = "rp-WRONG-secret-123"
    provider = make(emu, api_key=secret)
    caplog.set_level(logging.DEBUG)
    failures: list[Exception] = []
    for call in (lambda: provider.offers(Requirements(), "command", {"command": "x"}),
                 lambda: provider.reserve(Offer(provider="runpod", offer_id=f"pod:{A100}:secure",
                                                data={"type": "pod", "gpu_type_id": A100, "cloud_type": "SECURE"}), job()),
                 lambda: run_request(provider, job("inference", INFER))):
        with pytest.raises(PermanentProviderError) as caught:
            call()
        failures.append(caught.value)
    health = provider.health()
    assert not health.ok
    texts = [str(f) for f in failures] + [health.detail, caplog.text, repr(provider.settings), repr(provider.api.settings),
                                          repr(provider.config)]
    assert all(secret not in text for text in texts)
    assert "API key" in str(failures[0])
    assert emu.pods() == []


def test_missing_key_is_permanent(emu: RunPodEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    provider = make(emu, api_key=None)
    with pytest.raises(PermanentProviderError, match="RUNPOD_API_KEY"):
        provider.offers(Requirements(), "command", {"command": "x"})
    monkeypatch.setenv("RP_KEY", KEY)
    assert make(emu, api_key=None, api_key_env="RP_KEY").health().ok


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="exactly one of price_per_second"):
        RunPodProvider("runpod", {"endpoints": [{"endpoint_id": "x"}]})
    with pytest.raises(ValueError, match="gpu_typo"):
        RunPodProvider("runpod", {"pods": {"gpu_types": [A100], "gpu_typo": 1}})


def test_sdk_globals_are_restored_after_each_call(emu: RunPodEmulator) -> None:
    provider = make(emu)
    before = os.environ.get("RUNPOD_API_BASE_URL")
    provider.offers(Requirements(), "command", {"command": "x"})
    import runpod

    assert os.environ.get("RUNPOD_API_BASE_URL") == before and runpod.api_key != KEY


def test_importing_the_sdk_leaves_logging_alone() -> None:
    code = ("import logging\n"
            "from providers.runpod.sdk import load_runpod\n"
            "before = (list(logging.getLogger().handlers), logging.getLogger().level, logging.getLogger('uvicorn').level)\n"
            "load_runpod()\n"
            "after = (list(logging.getLogger().handlers), logging.getLogger().level, logging.getLogger('uvicorn').level)\n"
            "assert before == after, (before, after)\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


def test_emulator_runs_from_a_shell_and_takes_http_controls() -> None:
    """Integration tests drive a separately started emulator over HTTP; the adapter never calls these."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.emulators.runpod", "--port", "0", "--key", KEY,
                             "--boot-delay", "0.1"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        url = info["url"]
        controls: list[tuple[str, dict[str, Any]]] = [
            ("fail", {"status": 503, "count": 1, "paths": ["/graphql"]}), ("out_of_stock", {"gpu_type_id": A100}),
            ("stick", {"gpu_type_id": RTX}), ("fail_next", {"endpoint": "vllm-llama", "status": "TIMED_OUT"}),
            ("set_delay", {"endpoint": "vllm-llama", "seconds": 0.1})]
        for path, body in controls:
            assert requests.post(f"{url}/_emulator/{path}", json=body, timeout=2).json() == {"ok": True}
        provider = RunPodProvider("runpod", {"api_key": KEY, "api_base_url": url, "endpoint_base_url": info["serverless"],
                                             "retry_budget_seconds": 1, "health_cache_seconds": 0,
                                             "pods": {"gpu_types": [A100, RTX]}})
        assert {o.offer_id for o in provider.offers(Requirements(), "command", {"command": "x"})} == {
            f"pod:{RTX}:secure", f"pod:{RTX}:community"}  # the 503 was retried; A100 is out of stock
        lease = provider.reserve(offer(provider, f"pod:{RTX}:community"), job())
        assert provider.poll(provider.start(lease, job())).provisioning  # stuck
        assert requests.post(f"{url}/_emulator/preempt", json={"pod_id": lease.external_id}, timeout=2).json() == {
            "preempted": True}
        state = requests.get(f"{url}/_emulator/state", timeout=2).json()
        assert [p["name"] for p in state["pods"]] == ["gpufleet-res-1"] and state["pods"][0]["desired_status"] == "TERMINATED"
        assert [r["status"] for r in state["requests"]][:2] == [503, 200]
        assert not any(r["path"].startswith("/_emulator") for r in state["requests"])
        assert state["billing"]["pods"][lease.external_id] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
