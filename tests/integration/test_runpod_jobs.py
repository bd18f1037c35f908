"""Jobs on RunPod, end to end: serverless endpoints for inference and transcription, pods for
training, through the real `runpod` SDK against the emulator of RunPod's REST and GraphQL APIs,
with our API, Postgres, Redis and Celery worker processes; and the beat's autoscaler setting an
endpoint's max workers from the jobs sent to it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.emulators.runpod import DEFAULT_ENDPOINTS, RunPodEmulator

from .conftest import KEY_A, Stack, isolated_stack, wait_for_status

RUNPOD_KEY = "rp-secret-key-" + "q" * 20
SCALED = "llm-scaled"  # the endpoint the beat autoscales: it starts with workersMax 0 (scaled to zero)
SCALED_MODEL = "qwen-2.5-7b"  # served only there (and by vllm-llama, which costs more)


def _providers_yaml(emulator: RunPodEmulator) -> str:
    return f"""
providers:
  runpod:
    api_key_env: GPUFLEET_TEST_RUNPOD_KEY
    api_base_url: "{emulator.url}"
    endpoint_base_url: "{emulator.serverless_url}"
    provisioning_timeout: 3
    start_timeout: 5
    endpoints:
      - {{endpoint_id: vllm-llama, gpu: A100, price_per_second: 0.00076, max_workers: 2, kinds: [inference]}}
      - {{endpoint_id: whisper, gpu: L4, price_per_second: 0.00031, max_workers: 1, kinds: [transcription]}}
      - {{endpoint_id: {SCALED}, gpu: A100, price_per_second: 0.0004, max_workers: 2, kinds: [inference],
          models: [{SCALED_MODEL}], autoscale: true, scale_cooldown_seconds: 1, scale_down_idle_seconds: 2}}
    pods:
      gpu_types: ["NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"]
      cloud_type: ALL
"""


@pytest.fixture(scope="module")
def runpod_api() -> Iterator[RunPodEmulator]:
    endpoints = {**DEFAULT_ENDPOINTS, SCALED: {"price_per_second": 0.0004, "workers": 2, "workers_max": 0,
                                               "delay_seconds": 0.3}}
    with RunPodEmulator(api_key=RUNPOD_KEY, boot_delay=0.3, endpoints=endpoints) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def market(runpod_api, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    with isolated_stack(tmp_path_factory.mktemp("runpod"), 12, _providers_yaml(runpod_api),
                        {"GPUFLEET_TEST_RUNPOD_KEY": RUNPOD_KEY, "GPUFLEET_AUTOSCALE_INTERVAL_SECONDS": "1"}) as running:
        yield running


@pytest.fixture()
def client(market: Stack, runpod_api: RunPodEmulator):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    runpod_api.heal()
    with Client(market.url, KEY_A) as c:
        yield c


def no_pods_left(emulator: RunPodEmulator, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while emulator.pods():
        assert time.monotonic() < deadline, f"pods still rented: {[p['id'] for p in emulator.pods()]}"
        time.sleep(0.1)


def test_inference_on_a_serverless_endpoint_is_priced_by_execution_time(client, runpod_api) -> None:
    job = client.submit("inference", {"model": "llama-3-8b", "prompt": "hello", "max_tokens": 8},
                        requirements={"providers": ["runpod"]})
    done = client.wait(job.id, timeout=60)
    assert done.status.value == "succeeded", done.error
    assert (done.provider, done.offer_id) == ("runpod", "endpoint:vllm-llama")
    assert done.result["text"] and done.result["usage"]["completion_tokens"] == 8
    request = next(j for j in runpod_api.jobs() if j["endpoint"] == "vllm-llama")
    assert done.cost == pytest.approx(request["executionTime"] / 1000 * 0.00076, rel=1e-3)
    assert RUNPOD_KEY not in str(done.model_dump())


def test_transcription_failure_on_the_endpoint_fails_the_job_with_its_error(client, runpod_api) -> None:
    runpod_api.fail_next("whisper", "FAILED", count=1, error="audio could not be decoded")
    done = client.wait(client.submit("transcription", {"audio_url": "s3://calls/1.wav"},
                                     requirements={"providers": ["runpod"]}).id, timeout=60)
    assert done.status.value == "failed" and "audio could not be decoded" in done.error


def test_cancel_stops_the_serverless_request(client, runpod_api) -> None:
    runpod_api.set_delay("vllm-llama", 30)
    try:
        job = client.submit("inference", {"model": "m", "prompt": "slow"}, requirements={"providers": ["runpod"]})
        wait_for_status(client, job.id, "running", timeout=30)
        client.cancel(job.id)
        deadline = time.monotonic() + 20
        while not any(j["status"] == "CANCELLED" for j in runpod_api.jobs()):
            assert time.monotonic() < deadline, "the RunPod request was never cancelled"
            time.sleep(0.1)
    finally:
        runpod_api.set_delay("vllm-llama", 0.2)


def test_training_on_a_pod_reports_back_and_the_pod_is_terminated(client, runpod_api) -> None:
    job = client.submit("training", {"base_model": "m-8b", "dataset_uri": "s3://d",
                                     "command": "echo 'GPUFLEET_RESULT {\"steps\": 7}'"},
                        requirements={"providers": ["runpod"], "gpu": ["A100"]})
    done = client.wait(job.id, timeout=60)
    assert done.status.value == "succeeded", done.error
    assert done.provider == "runpod" and done.offer_id.startswith("pod:NVIDIA A100") and done.result["steps"] == 7
    no_pods_left(runpod_api)
    assert done.cost > 0


def test_out_of_stock_gpu_fails_over_to_the_next_pod_offer(client, runpod_api) -> None:
    runpod_api.out_of_stock("NVIDIA A100 80GB PCIe", True)
    try:
        done = client.wait(client.submit("command", {"command": "echo ok"},
                                         requirements={"providers": ["runpod"], "gpu": ["A100", "H100"]}).id,
                           timeout=60)
    finally:
        runpod_api.out_of_stock("NVIDIA A100 80GB PCIe", False)
    assert done.status.value == "succeeded", done.error
    assert "H100" in done.offer_id
    no_pods_left(runpod_api)


def test_preempted_pod_fails_over(client, runpod_api) -> None:
    job = client.submit("command", {"command": "sleep 3; echo done"},
                        requirements={"providers": ["runpod"], "gpu": ["A100"]}, max_attempts=3)
    deadline = time.monotonic() + 30
    while not runpod_api.pods():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runpod_api.preempt(runpod_api.pods()[0]["id"])
    done = client.wait(job.id, timeout=60)
    assert done.status.value == "succeeded", done.error and done.attempt == 2
    assert any("disappeared" in e.reason for e in done.events)
    no_pods_left(runpod_api)


def _workers_max_becomes(emulator: RunPodEmulator, value: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := emulator.workers_max(SCALED)) != value:
        assert time.monotonic() < deadline, f"workersMax of {SCALED} is {now}, never {value}"
        time.sleep(0.1)


def test_the_beat_raises_max_workers_for_jobs_on_an_autoscaled_endpoint_and_scales_it_back_to_zero(
        client, runpod_api) -> None:  # type: ignore[no-untyped-def]
    _workers_max_becomes(runpod_api, 0)  # idle (other tests' inference may have raised it): at zero
    saves_before = len(runpod_api.saves())
    jobs = [client.submit("inference", {"model": SCALED_MODEL, "prompt": f"question {i}", "max_tokens": 4},
                          requirements={"providers": ["runpod"]}) for i in range(3)]
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while not all(client.get(j.id, events=False).done for j in jobs):
        seen.append(runpod_api.workers_max(SCALED))
        assert time.monotonic() < deadline, f"jobs not done; workersMax seen {seen[-5:]}"
        time.sleep(0.1)
    for job in jobs:
        done = client.get(job.id)
        assert done.status.value == "succeeded", done.error
        assert done.offer_id == f"endpoint:{SCALED}" and done.result["model"] == SCALED_MODEL
    # Held IN_QUEUE at zero workers until the beat raised the ceiling: grown for the three requests,
    # capped at max_workers 2, with workersMin kept at 0 — every change through saveEndpoint.
    assert max(seen) == 2
    grown = runpod_api.saves()[saves_before:]
    assert grown and all(s["status"] == 200 and s["input"]["workersMin"] == 0 and s["input"]["workersMax"] <= 2
                         for s in grown)
    held = [j for j in runpod_api.jobs() if j["endpoint"] == SCALED]
    assert len(held) >= 3 and all(j["status"] == "COMPLETED" for j in held)
    # Idle for scale_down_idle_seconds: back to zero workers.
    _workers_max_becomes(runpod_api, 0)
    assert runpod_api.endpoint_settings(SCALED)["workersMin"] == 0
