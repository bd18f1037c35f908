"""Self-hosted pools: request signing, the shared ``PoolClient`` and ``PoolProvider`` against a local
emulator that verifies signatures: pricing from measured throughput, capacity while requests are in
flight, failure mapping, and keeping the shared secret out of every message."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from orchestrator.scheduling.placement import rejection, usage_priced
from providers.base import (
    JobSpec,
    NoCapacity,
    PermanentProviderError,
    Requirements,
    RunHandle,
    TransientProviderError,
)
from providers.pools import PoolClient, PoolProvider
from providers.pools.signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, Verifier, sign
from providers.sandbox import models as fake_models
from tests.emulators.pool_server import PoolServer

SECRET = "pool-secret-4b8d1f"
WRONG = "not-the-secret-93ac"
ENV = "GPUFLEET_TEST_POOL_SECRET"
BODY = b'{"model": "llama-3-8b"}'
CHAT = {"model": "llama-3-8b", "prompt": "why is the sky blue?", "max_tokens": 16}
AUDIO = {"audio_url": "https://example.test/a.wav", "model": "whisper-large-v3", "language": "en", "duration_seconds": 8}


# --- signing -------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_signed_request_verifies_whatever_the_header_case() -> None:
    clock = Clock()
    headers = sign(SECRET, "post", "/v1/chat/completions", BODY, now=clock.now)
    assert set(headers) == {TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER}
    assert SECRET not in "".join(headers.values())
    Verifier(SECRET, clock=clock).verify("POST", "/v1/chat/completions", BODY, headers)
    lower = {k.lower(): v for k, v in sign(SECRET, "GET", "/health", b"", now=clock.now).items()}
    Verifier(SECRET, clock=clock).verify("GET", "/health", b"", lower)


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/chat/completions", b'{"model": "llama-3-70b"}'),  # tampered body
    ("POST", "/v1/audio/transcriptions", BODY),  # another path
    ("GET", "/v1/chat/completions", BODY),  # another method
])
def test_anything_changed_after_signing_is_refused(method: str, path: str, body: bytes) -> None:
    clock = Clock()
    headers = sign(SECRET, "POST", "/v1/chat/completions", BODY, now=clock.now)
    with pytest.raises(SignatureError, match="bad signature"):
        Verifier(SECRET, clock=clock).verify(method, path, body, headers)


def test_another_secret_or_no_signature_is_refused() -> None:
    clock = Clock()
    with pytest.raises(SignatureError, match="bad signature"):
        Verifier(SECRET, clock=clock).verify("POST", "/p", BODY, sign(WRONG, "POST", "/p", BODY, now=clock.now))
    with pytest.raises(SignatureError, match="missing"):
        Verifier(SECRET, clock=clock).verify("POST", "/p", BODY, {})


@pytest.mark.parametrize("offset", [-301, 301])
def test_a_stale_or_future_timestamp_is_refused(offset: float) -> None:
    clock = Clock()
    headers = sign(SECRET, "POST", "/p", BODY, now=clock.now + offset)
    with pytest.raises(SignatureError, match="stale"):
        Verifier(SECRET, max_skew_seconds=300, clock=clock).verify("POST", "/p", BODY, headers)


def test_a_replayed_nonce_is_refused() -> None:
    clock = Clock()
    verifier = Verifier(SECRET, clock=clock)
    headers = sign(SECRET, "POST", "/p", BODY, now=clock.now)
    verifier.verify("POST", "/p", BODY, headers)
    with pytest.raises(SignatureError, match="replayed"):
        verifier.verify("POST", "/p", BODY, headers)


def test_nonce_memory_is_bounded_and_forgetting_never_reopens_a_replay() -> None:
    clock = Clock()
    verifier = Verifier(SECRET, max_skew_seconds=300, max_nonces=3, clock=clock)
    signed = [sign(SECRET, "POST", "/p", BODY, now=clock.now - 10 + i) for i in range(5)]
    for headers in signed:
        verifier.verify("POST", "/p", BODY, headers)
    assert len(verifier._seen) == 3
    for forgotten in signed[:2]:
        with pytest.raises(SignatureError, match="stale"):
            verifier.verify("POST", "/p", BODY, forgotten)
    verifier.verify("POST", "/p", BODY, sign(SECRET, "POST", "/p", BODY, now=clock.now))  # fresh requests still pass
    clock.now += 400  # every remembered nonce is now past the window: forgotten, and refused as stale
    verifier.verify("POST", "/p", BODY, sign(SECRET, "POST", "/p", BODY, now=clock.now))
    assert len(verifier._seen) == 1
    with pytest.raises(SignatureError, match="stale"):
        verifier.verify("POST", "/p", BODY, signed[-1])


# --- the client ----------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[PoolServer]:
    with PoolServer(secret=SECRET, models=["llama-3-8b", "whisper-large-v3"]) as emulator:
        yield emulator


def client(server: PoolServer, secret: str | None = SECRET, timeout: float = 5.0) -> PoolClient:
    return PoolClient(server.url + "/v1", secret=secret, timeout=timeout, name="onprem")


def test_client_chat_is_signed_and_returns_text_usage_and_model(server: PoolServer) -> None:
    with client(server) as pool:
        out = pool.chat({**CHAT, "messages": [{"role": "user", "content": "hello"}]})
    assert out["model"] == "llama-3-8b" and out["text"]
    usage = out["usage"]
    assert usage["completion_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    (request,) = server.work_requests()
    assert request["status"] == 200 and request["path"] == "/v1/chat/completions"
    assert {h.lower() for h in request["headers"]} >= {"x-gpufleet-signature", "x-gpufleet-nonce", "x-gpufleet-timestamp"}


def test_client_transcribes_by_sending_the_audio_url_as_json(server: PoolServer) -> None:
    with client(server) as pool:
        out = pool.transcribe(AUDIO)
    assert out["text"] and out["model"] == "whisper-large-v3" and out["duration_seconds"] == 8
    assert out["usage"]["total_tokens"] == 20
    (request,) = server.work_requests()
    assert json.loads(request["body"]) == {**AUDIO, "response_format": "verbose_json"}


def test_client_returns_the_uniform_transcription_shape_with_subtitles(server: PoolServer) -> None:
    expected = fake_models.transcribe("whisper-large-v3", "https://example.test/de.wav", 12.5, "de")
    with client(server) as pool:
        out = pool.transcribe({**AUDIO, "audio_url": "https://example.test/de.wav", "language": "german",
                               "duration_seconds": 12.5, "formats": ["text", "srt", "vtt"]})
    assert set(out) == {"text", "language", "duration_seconds", "segments", "model", "usage", "formats"}
    # verbose_json's "german" becomes "de"; the segments lose the engine's extras and leading spaces.
    assert out["language"] == "de" and json.loads(server.work_requests()[0]["body"])["language"] == "de"
    assert out["segments"] == expected["segments"] and len(out["segments"]) > 2
    assert out["text"] == expected["text"] and out["duration_seconds"] == 12.5 and out["model"] == "whisper-large-v3"
    assert out["usage"] == {"total_tokens": expected["usage"]["total_tokens"]}
    first = out["segments"][0]
    assert out["formats"]["srt"].startswith(f"1\n00:00:00,000 --> {render_time(first['end'], ',')}\n{first['text']}\n")
    assert out["formats"]["vtt"].startswith(f"WEBVTT\n\n00:00:00.000 --> {render_time(first['end'], '.')}\n")


def test_a_shim_answering_text_only_still_gives_the_uniform_shape() -> None:
    with PoolServer(secret=SECRET, verbose_json=False, transcription_usage="duration") as plain, client(plain) as pool:
        out = pool.transcribe({**AUDIO, "formats": ["srt"]})
    assert out["segments"] == [] and out["text"] and out["language"] == "en" and out["duration_seconds"] == 8
    assert out["usage"] == {"seconds": 8}
    assert out["formats"]["srt"] == f"1\n00:00:00,000 --> 00:00:08,000\n{out['text']}\n"  # one cue over the audio


def render_time(seconds: float, marker: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{marker}{ms % 1000:03d}"


def test_the_server_refuses_a_replayed_request(server: PoolServer) -> None:
    body = b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {"content-type": "application/json", **sign(SECRET, "POST", "/v1/chat/completions", body)}
    first = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers)
    again = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers)
    assert first.status_code == 200
    assert again.status_code == 401 and "replayed" in again.text


@pytest.mark.parametrize("secret", [WRONG, None])
def test_a_wrong_or_missing_secret_is_a_clear_permanent_error_without_the_secret(server: PoolServer, secret: str | None) -> None:
    with client(server, secret=secret) as pool:
        with pytest.raises(PermanentProviderError) as err:
            pool.chat(CHAT)
        health = pool.health()
    message = str(err.value)
    assert "pool onprem rejected our signature/credentials (401)" in message and "\n" not in message
    assert WRONG not in message and SECRET not in message
    assert not health.ok and "rejected our signature" in health.detail


@pytest.mark.parametrize("status", [500, 502, 429])
def test_overload_and_server_errors_are_transient(server: PoolServer, status: int) -> None:
    server.fail_next(1, status=status)
    with client(server) as pool:
        with pytest.raises(TransientProviderError, match=str(status)):
            pool.chat(CHAT)
        assert pool.chat(CHAT)["text"]  # the next one goes through


def test_a_rejected_request_is_permanent(server: PoolServer) -> None:
    with client(server) as pool, pytest.raises(PermanentProviderError, match="404.*not found"):
        pool.chat({**CHAT, "model": "mistral-7b"})


def test_a_slow_server_times_out_as_transient(server: PoolServer) -> None:
    server.set_latency(1.0)
    with client(server, timeout=0.2) as pool, pytest.raises(TransientProviderError, match="timed out"):
        pool.chat(CHAT)


def test_health_reports_latency_goes_down_with_the_server_and_falls_back_to_models() -> None:
    with PoolServer(secret=SECRET, health_endpoint=False) as server, client(server) as pool:
        health = pool.health()
        assert health.ok and "ms (GET /v1/models)" in health.detail
        server.down()
        assert not pool.health().ok and "unreachable" in pool.health().detail
        with pytest.raises(TransientProviderError, match="unreachable"):
            pool.chat(CHAT)
        server.up()
        assert pool.health().ok


# --- the provider --------------------------------------------------------------------------------


def make(server: PoolServer, monkeypatch: pytest.MonkeyPatch, secret: str = SECRET, **overrides: Any) -> PoolProvider:
    monkeypatch.setenv(ENV, secret)
    config: dict[str, Any] = {
        "endpoint": server.url, "secret_env": ENV, "kinds": ["inference", "transcription"],
        "models": ["llama-3-8b", "whisper-large-v3"], "concurrency": 2, "gpu": "A100", "gpu_count": 4,
        "gpu_memory_gb": 80, "region": "eu-se", "price_per_hour": 3.6, "assumed_tokens_per_second": 500,
        "timeout": 5, "health_cache_seconds": 0, **overrides,
    }
    return PoolProvider(f"pool-{uuid.uuid4().hex[:6]}", config)  # a fresh name: fresh per-process measurements


def job(kind: str = "inference", spec: dict[str, Any] | None = None) -> JobSpec:
    return JobSpec(job_id=uuid.uuid4().hex, kind=kind, attempt=1, spec=spec or CHAT, timeout_seconds=60,  # type: ignore[arg-type]
                   label="gpufleet-test")


def run(provider: PoolProvider, spec: JobSpec) -> RunHandle:
    offer = provider.offers(Requirements(), spec.kind, spec.spec)[0]
    lease = provider.reserve(offer, spec)
    handle = provider.start(lease, spec)
    provider.release(lease, handle)
    return handle


def test_inference_is_priced_from_the_measured_throughput(server: PoolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.set_latency(0.2)
    provider = make(server, monkeypatch)
    (offer,) = provider.offers(Requirements(gpu=["A100"], gpu_count=1, regions=["EU"]), "inference", CHAT)
    assert offer.price_per_hour == 0 and offer.capacity == 2 and offer.gpu == "A100" and offer.region == "eu-se"
    assert offer.price_per_1k_tokens == pytest.approx(3.6 / 3600 / 500 * 1000)  # nothing measured yet
    assert usage_priced(offer, "inference") and rejection(offer, Requirements(gpu=["A100"]), "inference", set()) is None

    first = run(provider, job())
    status = provider.poll(first)
    tokens, elapsed = status.result["usage"]["total_tokens"], first.data["elapsed_seconds"]  # type: ignore[index]
    assert status.state == "succeeded" and status.result["text"] and elapsed >= 0.2  # type: ignore[index]
    # One measurement replaces the assumption: the run costs its share of the pool's time.
    assert status.cost == pytest.approx(3.6 / 3600 * elapsed / 2, rel=1e-4)
    measured = 3.6 / 3600 / (tokens / elapsed * 2) * 1000
    assert first.data["price_per_1k_tokens"] == pytest.approx(measured, rel=1e-4)
    (after,) = provider.offers(Requirements(), "inference", CHAT)
    assert after.price_per_1k_tokens == pytest.approx(measured, rel=1e-4)
    assert (after.price_per_1k_tokens or 0) > (offer.price_per_1k_tokens or 0)  # measured slower than assumed

    server.set_latency(0.05)  # faster now: the EWMA moves part of the way
    second = run(provider, job())
    rate = 0.3 * tokens / second.data["elapsed_seconds"] + 0.7 * tokens / elapsed
    assert second.data["price_per_1k_tokens"] == pytest.approx(3.6 / 3600 / (rate * 2) * 1000, rel=1e-4)
    assert provider.poll(second).cost == pytest.approx(tokens * second.data["price_per_1k_tokens"] / 1000, rel=1e-6)


def test_transcription_is_priced_by_tokens_or_else_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    for usage in ("tokens", "duration"):
        with PoolServer(secret=SECRET, transcription_usage=usage, latency=0.1) as server:
            provider = make(server, monkeypatch)
            handle = run(provider, job("transcription", AUDIO))
            status = provider.poll(handle)
            assert status.state == "succeeded" and status.result["duration_seconds"] == 8  # type: ignore[index]
            elapsed = handle.data["elapsed_seconds"]
            # With tokens the first measurement makes the cost the time share too; with seconds it is so directly.
            assert status.cost == pytest.approx(3.6 / 3600 * elapsed / 2, rel=1e-4)
            assert (handle.data["price_per_1k_tokens"] is None) == (usage == "duration")


def test_a_fixed_token_price_wins_over_the_derived_one(server: PoolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = make(server, monkeypatch, price_per_1k_tokens=0.0004)
    assert provider.offers(Requirements(), "inference", CHAT)[0].price_per_1k_tokens == 0.0004
    status = provider.poll(run(provider, job()))
    assert status.cost == pytest.approx(status.result["usage"]["total_tokens"] * 0.0004 / 1000)  # type: ignore[index]


def test_offers_drop_capacity_while_requests_are_in_flight(server: PoolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = make(server, monkeypatch)
    server.hold()
    threads = [threading.Thread(target=run, args=(provider, job())) for _ in range(2)]
    try:
        threads[0].start()
        assert server.wait_in_flight(1)
        assert provider.offers(Requirements(), "inference", CHAT)[0].capacity == 1
        threads[1].start()
        assert server.wait_in_flight(2)
        (full,) = provider.offers(Requirements(), "inference", CHAT)
        assert full.capacity == 0 and rejection(full, Requirements(), "inference", set()) is not None
        with pytest.raises(NoCapacity):
            provider.reserve(full, job())
    finally:
        server.release_held()
        for thread in threads:
            thread.join(10)
    assert provider.offers(Requirements(), "inference", CHAT)[0].capacity == 2
    assert server.max_in_flight == 2 and all(r["status"] == 200 for r in server.work_requests())


def test_only_served_kinds_and_models_get_an_offer(server: PoolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = make(server, monkeypatch, kinds=["inference"])
    assert provider.offers(Requirements(), "inference", {**CHAT, "model": "mistral-7b"}) == []
    assert provider.offers(Requirements(), "transcription", AUDIO) == []
    assert provider.offers(Requirements(), "training", {}) == []
    assert len(provider.offers(Requirements(), "inference", {})) == 1  # `gpufleet offers` asks without a model
    any_model = make(server, monkeypatch, models=[])
    assert len(any_model.offers(Requirements(), "inference", {**CHAT, "model": "mistral-7b"})) == 1


def test_bad_input_is_permanent(server: PoolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = make(server, monkeypatch)
    offer = provider.offers(Requirements(), "inference", {})[0]
    lease = provider.reserve(offer, job())
    with pytest.raises(PermanentProviderError, match="need a 'model'"):
        provider.start(lease, job(spec={"prompt": "hi"}))
    with pytest.raises(PermanentProviderError, match="does not serve model"):
        provider.start(lease, job(spec={**CHAT, "model": "mistral-7b"}))
    with pytest.raises(PermanentProviderError, match="audio_url"):
        provider.start(lease, job("transcription", {"model": "whisper-large-v3"}))
    assert server.work_requests() == []


def test_a_wrong_secret_fails_clearly_and_never_leaks(server: PoolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = make(server, monkeypatch, secret=WRONG)
    health = provider.health()
    assert not health.ok and "rejected our signature" in health.detail and WRONG not in health.detail
    offer = provider.offers(Requirements(), "inference", CHAT)[0]
    with pytest.raises(PermanentProviderError, match="rejected our signature") as err:
        provider.start(provider.reserve(offer, job()), job())
    assert WRONG not in str(err.value) and SECRET not in str(err.value)


def test_an_unset_secret_env_is_reported_by_name(server: PoolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = make(server, monkeypatch)
    monkeypatch.delenv(ENV)
    health = provider.health()
    assert not health.ok and ENV in health.detail
    with pytest.raises(PermanentProviderError, match=ENV):
        provider.start(provider.reserve(provider.offers(Requirements(), "inference", CHAT)[0], job()), job())


def test_pool_failures_are_transient_and_an_outage_shows_in_health(server: PoolServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    provider = make(server, monkeypatch, timeout=0.3)
    offer = provider.offers(Requirements(), "inference", CHAT)[0]
    server.fail_next(1, status=503)
    with pytest.raises(TransientProviderError, match="503"):
        provider.start(provider.reserve(offer, job()), job())
    server.set_latency(1.0)
    with pytest.raises(TransientProviderError, match="timed out"):
        provider.start(provider.reserve(offer, job()), job())
    assert provider.offers(Requirements(), "inference", CHAT)[0].capacity == 2  # failed requests free their slot
    assert provider.health().ok
    server.down()
    assert not provider.health().ok


def test_config_is_checked(monkeypatch: pytest.MonkeyPatch, server: PoolServer) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        PoolProvider("p", {})
    with pytest.raises(ValueError, match="training"):
        make(server, monkeypatch, kinds=["inference", "training"])
    with pytest.raises(ValueError, match="concurrency"):
        make(server, monkeypatch, concurrency=0)
