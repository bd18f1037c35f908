"""The model-API adapters (OpenAI-compatible and Anthropic) against local emulators of both APIs:
the request → stored answer → cost cycle, rate-limit cooldowns, failover errors, and keys that
never leak into errors or logs. Nothing of ours is mocked."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from providers.base import (
    JobSpec,
    PermanentProviderError,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.llm_api import AnthropicProvider, OpenAICompatibleProvider
from providers.llm_api.base import ModelAPIProvider
from providers.llm_api.cooldown import retry_after_seconds
from tests.emulators.llm_apis import AnthropicEmulator, OpenAIEmulator

OPENAI_KEY = "sk-test-openai-" + "o" * 24
ANTHROPIC_KEY = "sk-ant-test-" + "a" * 24
WRONG_KEY = "sk-wrong-" + "w" * 24
OPENAI_ENV = "GPUFLEET_TEST_OPENAI_KEY"
ANTHROPIC_ENV = "GPUFLEET_TEST_ANTHROPIC_KEY"

MINI = {"input_per_1k": 0.15, "output_per_1k": 0.6}
HAIKU = {"input_per_1k": 0.8, "output_per_1k": 4.0}


@pytest.fixture
def openai_emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIEmulator]:
    monkeypatch.setenv(OPENAI_ENV, OPENAI_KEY)
    with OpenAIEmulator(api_key=OPENAI_KEY) as emu:
        yield emu


@pytest.fixture
def anthropic_emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[AnthropicEmulator]:
    monkeypatch.setenv(ANTHROPIC_ENV, ANTHROPIC_KEY)
    with AnthropicEmulator(api_key=ANTHROPIC_KEY) as emu:
        yield emu


def openai(emu: OpenAIEmulator, tmp_path: Path, **config: Any) -> OpenAICompatibleProvider:
    base = {"base_url": emu.url + "/v1", "api_key_env": OPENAI_ENV, "timeout": 5, "state_dir": str(tmp_path),
            "health_ttl": 0, "max_concurrency": 4,
            "models": {"gpt-4o-mini": MINI, "llama-8b": {**MINI, "upstream": "llama-3.1-8b-instant"}}}
    return OpenAICompatibleProvider("openai", {**base, **config})


def anthropic(emu: AnthropicEmulator, tmp_path: Path, **config: Any) -> AnthropicProvider:
    base = {"base_url": emu.url, "api_key_env": ANTHROPIC_ENV, "timeout": 5, "state_dir": str(tmp_path),
            "health_ttl": 0, "models": {"claude-haiku": {**HAIKU, "upstream": "claude-3-5-haiku-20241022"}}}
    return AnthropicProvider("anthropic", {**base, **config})


def job(model: str, content: str = "name three GPUs", **spec: Any) -> JobSpec:
    spec = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 50, **spec}
    return JobSpec(job_id="j1", kind="inference", attempt=1, spec=spec, timeout_seconds=60, label="gpufleet-j1")


def start(provider: ModelAPIProvider, spec_job: JobSpec) -> RunHandle:
    offers = provider.offers(Requirements(), "inference", spec_job.spec)
    assert [o.offer_id for o in offers] == [spec_job.spec["model"]]
    return provider.start(provider.reserve(offers[0], spec_job), spec_job)


def run(provider: ModelAPIProvider, spec_job: JobSpec) -> RunStatus:
    return provider.poll(start(provider, spec_job))


# --- happy paths ------------------------------------------------------------------------------


def test_openai_round_trip_charges_the_reported_tokens(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    provider = openai(openai_emu, tmp_path)
    handle = start(provider, job("gpt-4o-mini"))
    assert handle.lease.external_id.startswith("api-") and handle.lease.price_per_hour == 0
    # A worker that restarts picks the run up from its JSON alone, even with a fresh provider object.
    status = openai(openai_emu, tmp_path).poll(RunHandle.model_validate_json(handle.model_dump_json()))
    assert status.state == "succeeded"
    assert status.result == {"text": "echo: name three GPUs", "model": "gpt-4o-mini", "finish_reason": "stop",
                             "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    assert status.cost == pytest.approx(3 * 0.15 / 1000 + 4 * 0.6 / 1000, rel=1e-12)
    sent = openai_emu.requests("/v1/chat/completions")[0]
    assert sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert sent["body"] == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "name three GPUs"}],
                            "max_tokens": 50}


def test_openai_upstream_id_prompt_and_truncation(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    spec_job = JobSpec(job_id="j2", kind="inference", attempt=1, timeout_seconds=60,
                       spec={"model": "llama-8b", "prompt": "one two three four five", "max_tokens": 2, "temperature": 0.2})
    status = run(openai(openai_emu, tmp_path), spec_job)
    assert status.result is not None
    assert status.result["text"] == "echo: one" and status.result["finish_reason"] == "length"
    assert status.result["model"] == "llama-3.1-8b-instant"
    assert status.cost == pytest.approx(5 * 0.15 / 1000 + 2 * 0.6 / 1000, rel=1e-12)
    body = openai_emu.requests("/v1/chat/completions")[0]["body"]
    assert body["model"] == "llama-3.1-8b-instant" and body["temperature"] == 0.2
    assert body["messages"] == [{"role": "user", "content": "one two three four five"}]


def test_anthropic_round_trip_charges_the_reported_tokens(anthropic_emu: AnthropicEmulator, tmp_path: Path) -> None:
    status = run(anthropic(anthropic_emu, tmp_path), job("claude-haiku", "hello there"))
    assert status.state == "succeeded"
    assert status.result == {"text": "echo: hello there", "model": "claude-3-5-haiku-20241022", "finish_reason": "stop",
                             "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}
    assert status.cost == pytest.approx(2 * 0.8 / 1000 + 3 * 4.0 / 1000, rel=1e-12)
    sent = anthropic_emu.requests("/v1/messages")[0]
    assert sent["headers"]["x-api-key"] == ANTHROPIC_KEY and sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent["headers"]
    assert sent["body"]["max_tokens"] == 50 and sent["body"]["model"] == "claude-3-5-haiku-20241022"


def test_anthropic_moves_system_messages_to_the_top_level(anthropic_emu: AnthropicEmulator, tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "system", "content": "No emoji."},
                {"role": "user", "content": "which GPU"}]
    provider = anthropic(anthropic_emu, tmp_path, anthropic_version="2024-01-01")
    status = run(provider, job("claude-haiku", messages=messages, temperature=1.7))
    body = anthropic_emu.requests("/v1/messages")[0]["body"]
    assert body["system"] == "Be terse.\n\nNo emoji."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["temperature"] == 1.0  # Anthropic refuses more than 1
    assert anthropic_emu.requests("/v1/messages")[0]["headers"]["anthropic-version"] == "2024-01-01"
    assert status.result is not None and status.result["text"] == "echo: which GPU"
    # The system prompt is input too: 4 words of system + 1 + 1 + 2 of turns.
    assert status.result["usage"]["prompt_tokens"] == 8


def test_offers_are_free_usage_priced_and_only_for_configured_models(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    provider = openai(openai_emu, tmp_path, region="us")
    listing = provider.offers(Requirements(), "inference", {})
    assert sorted(o.offer_id for o in listing) == ["gpt-4o-mini", "llama-8b"]
    mini = next(o for o in listing if o.offer_id == "gpt-4o-mini")
    assert mini.price_per_hour == 0 and mini.price_per_1k_tokens == pytest.approx((0.15 + 0.6) / 2)
    assert mini.region == "us" and mini.kinds == ["inference"] and mini.capacity == 4 and mini.gpu is None
    assert provider.offers(Requirements(), "inference", job("gpt-5").spec) == []
    assert provider.offers(Requirements(gpu_count=1), "inference", job("gpt-4o-mini").spec) == []
    assert provider.offers(Requirements(), "training", job("gpt-4o-mini").spec) == []
    # A job-specific price sits between the input and output prices, weighted by the expected mix.
    priced = provider.offers(Requirements(), "inference", job("gpt-4o-mini").spec)[0].price_per_1k_tokens
    assert priced is not None and 0.15 < priced < 0.6
    assert openai_emu.request_log == []  # offers are computed locally


def test_a_job_too_big_for_the_context_window_gets_no_offer(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    provider = openai(openai_emu, tmp_path, models={"small": {**MINI, "context_window": 100}})
    assert provider.offers(Requirements(), "inference", job("small", max_tokens=50).spec)
    assert provider.offers(Requirements(), "inference", job("small", max_tokens=200).spec) == []


def test_capacity_shrinks_while_requests_are_in_flight(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    provider = openai(openai_emu, tmp_path)
    openai_emu.lag(0.6)
    worker = threading.Thread(target=run, args=(provider, job("gpt-4o-mini")))
    worker.start()
    deadline = time.time() + 3
    while not openai_emu.requests("/v1/chat/completions") and time.time() < deadline:
        time.sleep(0.01)
    assert provider.offers(Requirements(), "inference", {})[0].capacity == 3
    worker.join()
    assert provider.offers(Requirements(), "inference", {})[0].capacity == 4


def test_health_lists_models_cheaply(openai_emu: OpenAIEmulator, anthropic_emu: AnthropicEmulator, tmp_path: Path) -> None:
    assert openai(openai_emu, tmp_path).health().ok
    assert anthropic(anthropic_emu, tmp_path).health().ok
    assert [r["path"] for r in openai_emu.request_log] == ["/v1/models"]
    assert [r["path"] for r in anthropic_emu.request_log] == ["/v1/models"]
    cached = openai(openai_emu, tmp_path, health_ttl=60)
    assert cached.health().ok and cached.health().ok
    assert len(openai_emu.requests("/v1/models")) == 2


# --- rate limits ------------------------------------------------------------------------------


def test_429_cools_the_provider_down_until_retry_after(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    provider = openai(openai_emu, tmp_path)
    openai_emu.fail(429, retry_after=1)
    began = time.time()
    with pytest.raises(TransientProviderError, match=r"rate limited \(429\); cooling down 1s"):
        start(provider, job("gpt-4o-mini"))
    assert provider.offers(Requirements(), "inference", {}) == []
    health = provider.health()
    assert not health.ok and "cooling down" in health.detail
    # Another worker process (another provider object on the same state_dir) sees the cooldown too.
    assert openai(openai_emu, tmp_path).offers(Requirements(), "inference", {}) == []
    sent = len(openai_emu.request_log)
    while time.time() - began < 0.95:
        assert provider.offers(Requirements(), "inference", {}) == []
        time.sleep(0.1)
    assert len(openai_emu.request_log) == sent  # nothing was sent while cooling down
    while provider.cooldown.remaining() > 0:
        time.sleep(0.02)
    assert time.time() - began < 1.5
    assert len(provider.offers(Requirements(), "inference", {})) == 2
    assert run(provider, job("gpt-4o-mini")).state == "succeeded"


def test_anthropic_429_with_an_http_date_and_without_retry_after(anthropic_emu: AnthropicEmulator, tmp_path: Path) -> None:
    provider = anthropic(anthropic_emu, tmp_path / "a")
    anthropic_emu.fail(429, retry_after=formatdate(time.time() + 3, usegmt=True))
    with pytest.raises(TransientProviderError, match="cooling down"):
        start(provider, job("claude-haiku"))
    assert 1 < provider.cooldown.remaining() <= 3
    assert provider.offers(Requirements(), "inference", {}) == []

    other = anthropic(anthropic_emu, tmp_path / "b", default_cooldown_seconds=7)
    anthropic_emu.fail(429)
    with pytest.raises(TransientProviderError, match="cooling down 7s"):
        start(other, job("claude-haiku"))


def test_retry_after_parsing() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("12", 30, 900, now) == 12
    assert retry_after_seconds("0.5", 30, 900, now) == 0.5
    assert retry_after_seconds(formatdate(now + 20, usegmt=True), 30, 900, now) == pytest.approx(20)
    assert retry_after_seconds(formatdate(now - 20, usegmt=True), 30, 900, now) == 0
    assert retry_after_seconds(None, 30, 900, now) == 30
    assert retry_after_seconds("soon", 30, 900, now) == 30
    assert retry_after_seconds("86400", 30, 900, now) == 900


# --- failures worth failing over ----------------------------------------------------------------


def test_server_errors_and_timeouts_are_transient(openai_emu: OpenAIEmulator, anthropic_emu: AnthropicEmulator,
                                                  tmp_path: Path) -> None:
    provider = openai(openai_emu, tmp_path, timeout=0.5)
    openai_emu.fail(500, message="The server had an error")
    with pytest.raises(TransientProviderError, match="API error 500: The server had an error"):
        start(provider, job("gpt-4o-mini"))
    openai_emu.lag(1.5)
    with pytest.raises(TransientProviderError, match=r"no answer within 0.5s"):
        start(provider, job("gpt-4o-mini"))
    # Neither starts a cooldown: the next job may go straight through.
    assert run(provider, job("gpt-4o-mini")).state == "succeeded"

    claude = anthropic(anthropic_emu, tmp_path)
    anthropic_emu.fail(529, message="Overloaded")
    with pytest.raises(TransientProviderError, match="529: Overloaded"):
        start(claude, job("claude-haiku"))
    anthropic_emu.down()
    with pytest.raises(TransientProviderError, match="unreachable"):
        start(claude, job("claude-haiku"))
    assert not claude.health().ok


# --- failures of the job or the key -------------------------------------------------------------


def test_rejected_keys_are_named_by_their_env_var_and_never_leak(
        openai_emu: OpenAIEmulator, anthropic_emu: AnthropicEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(OPENAI_ENV, WRONG_KEY)
    monkeypatch.setenv(ANTHROPIC_ENV, WRONG_KEY)
    provider, claude = openai(openai_emu, tmp_path), anthropic(anthropic_emu, tmp_path)
    with pytest.raises(PermanentProviderError) as openai_error:
        start(provider, job("gpt-4o-mini"))
    with pytest.raises(PermanentProviderError) as anthropic_error:
        start(claude, job("claude-haiku"))
    assert str(openai_error.value) == f"openai: the API key in ${OPENAI_ENV} was rejected (401)"
    assert str(anthropic_error.value) == f"anthropic: the API key in ${ANTHROPIC_ENV} was rejected (401)"
    health = provider.health()
    assert not health.ok and f"${OPENAI_ENV}" in health.detail
    texts = [str(openai_error.value), str(anthropic_error.value), health.detail, claude.health().detail, caplog.text]
    assert caplog.records  # the failures were logged…
    for text in texts:  # …without the key, or the masked tail OpenAI echoes back
        assert WRONG_KEY not in text and WRONG_KEY[-4:] not in text


def test_rejected_requests_carry_the_api_message_scrubbed(openai_emu: OpenAIEmulator, anthropic_emu: AnthropicEmulator,
                                                          tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    provider = openai(openai_emu, tmp_path, models={"ghost": {**MINI, "upstream": "gpt-ghost"}, "gpt-4o-mini": MINI})
    with pytest.raises(PermanentProviderError, match=r"rejected the request \(404\): The model `gpt-ghost` does not exist"):
        start(provider, job("ghost"))
    openai_emu.fail(400, message="Invalid request made with key {key}")
    with pytest.raises(PermanentProviderError) as rejected:
        start(provider, job("gpt-4o-mini"))
    assert "(400): Invalid request made with key ***" in str(rejected.value)
    openai_emu.fail(422, message="temperature out of range")
    with pytest.raises(PermanentProviderError, match=r"\(422\): temperature out of range"):
        start(provider, job("gpt-4o-mini"))
    anthropic_emu.fail(400, message="messages.0.content: bad for {key}")
    with pytest.raises(PermanentProviderError, match=r"\(400\): messages.0.content: bad for \*\*\*"):
        start(anthropic(anthropic_emu, tmp_path), job("claude-haiku"))
    assert OPENAI_KEY not in caplog.text and ANTHROPIC_KEY not in caplog.text


def test_missing_key_env_means_unhealthy_and_no_offers(openai_emu: OpenAIEmulator, anthropic_emu: AnthropicEmulator,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OPENAI_ENV)
    monkeypatch.delenv(ANTHROPIC_ENV)
    for provider, env in ((openai(openai_emu, tmp_path), OPENAI_ENV), (anthropic(anthropic_emu, tmp_path), ANTHROPIC_ENV)):
        health = provider.health()
        assert not health.ok and f"${env} is not set" in health.detail
        assert provider.offers(Requirements(), "inference", {}) == []
    assert openai_emu.request_log == [] and anthropic_emu.request_log == []


def test_a_keyless_server_gets_no_auth_header(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    provider = openai(openai_emu, tmp_path, api_key_env=None)
    assert provider.offers(Requirements(), "inference", {})
    with pytest.raises(PermanentProviderError, match="requires a key .* no api_key_env"):
        start(provider, job("gpt-4o-mini"))
    assert "authorization" not in openai_emu.requests("/v1/chat/completions")[0]["headers"]


def test_bad_config_is_refused(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="models.gpt-4o-mini"):
        openai(openai_emu, tmp_path, models={"gpt-4o-mini": {"input_per_1k": 0.1}})
    with pytest.raises(ValueError, match="not served"):
        openai(openai_emu, tmp_path, kinds=["training"])


def test_transcription_uploads_the_fetched_audio_and_charges_its_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    with OpenAIEmulator(api_key="sk-test-transcribe-0000", models=["whisper-1"]) as emu:
        monkeypatch.setenv("GPUFLEET_TEST_WHISPER_KEY", "sk-test-transcribe-0000")
        provider = OpenAICompatibleProvider("oai", {
            "base_url": f"{emu.url}/v1", "api_key_env": "GPUFLEET_TEST_WHISPER_KEY", "kinds": ["inference", "transcription"],
            "models": {"whisper-1": {"per_minute": 0.006}, "gpt-4o-mini": {"input_per_1k": 0.1, "output_per_1k": 0.2}}})
        url = emu.serve_file("talk.wav", b"\x01\x02" * 480_000)  # 960000 bytes: 30 s at 16 kHz 16-bit mono
        spec = {"audio_url": url + "?X-Amz-Signature=secret-sig", "model": "whisper-1", "language": "en"}
        offers = provider.offers(Requirements(), "transcription", spec)
        assert [o.offer_id for o in offers] == ["whisper-1"]  # the chat model does not transcribe
        assert provider.offers(Requirements(), "inference", {"model": "whisper-1", "prompt": "hi"}) == []
        job = JobSpec(job_id="j", kind="transcription", attempt=1, spec=spec, timeout_seconds=60)
        lease = provider.reserve(offers[0], job)
        status = provider.poll(provider.start(lease, job))
        assert status.state == "succeeded" and status.result is not None
        assert status.result["duration_seconds"] == 30.0 and status.result["text"].startswith("word")
        assert status.cost == pytest.approx(30 / 60 * 0.006)
        sent = emu.requests("/v1/audio/transcriptions")[-1]["body"]
        assert sent["model"] == "whisper-1" and sent["language"] == "en" and len(sent["file"]) == 960_000
        assert sent["response_format"] == "verbose_json" and sent["timestamp_granularities[]"] == "segment"

        missing = JobSpec(job_id="j2", kind="transcription", attempt=1, timeout_seconds=60,
                          spec={**spec, "audio_url": f"{emu.url}/media/nothing.wav?X-Amz-Signature=secret-sig"})
        with pytest.raises(PermanentProviderError) as refused:
            provider.start(provider.reserve(offers[0], missing), missing)
        assert "404" in str(refused.value) and "secret-sig" not in str(refused.value)
        with pytest.raises(PermanentProviderError, match="s3://"):
            bucket = JobSpec(job_id="j3", kind="transcription", attempt=1, timeout_seconds=60,
                             spec={**spec, "audio_url": "s3://bucket/talk.wav"})
            provider.start(provider.reserve(offers[0], bucket), bucket)


def test_transcription_result_has_the_uniform_shape_with_segments_and_subtitles(monkeypatch: pytest.MonkeyPatch) -> None:
    with OpenAIEmulator(api_key="sk-test-segments-0000", models=["whisper-1"]) as emu:
        monkeypatch.setenv("GPUFLEET_TEST_WHISPER_KEY", "sk-test-segments-0000")
        provider = OpenAICompatibleProvider("oai", {
            "base_url": f"{emu.url}/v1", "api_key_env": "GPUFLEET_TEST_WHISPER_KEY", "kinds": ["transcription"],
            "models": {"whisper-1": {"per_minute": 0.006, "upstream": "whisper-1"}}})
        url = emu.serve_file("talk.wav", b"\x07" * 320_000)  # 10 s: 25 words, 3 segments
        spec = {"audio_url": url, "model": "whisper-1", "language": "fr", "formats": ["text", "srt", "vtt"]}
        job = JobSpec(job_id="j", kind="transcription", attempt=1, spec=spec, timeout_seconds=60)
        [offer] = provider.offers(Requirements(), "transcription", spec)
        status = provider.poll(provider.start(provider.reserve(offer, job), job))
        result = status.result
        assert result is not None and set(result) == {"text", "language", "duration_seconds", "segments", "model",
                                                      "usage", "formats"}
        assert result["language"] == "fr"  # the API said "french"
        assert result["model"] == "whisper-1" and result["duration_seconds"] == 10.0
        assert [(s["start"], s["end"]) for s in result["segments"]] == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
        assert " ".join(s["text"] for s in result["segments"]) == result["text"]
        assert result["formats"]["srt"].splitlines()[:2] == ["1", "00:00:00,000 --> 00:00:04,000"]
        assert result["formats"]["vtt"].splitlines()[:3] == ["WEBVTT", "", "00:00:00.000 --> 00:00:04.000"]
        assert status.cost == pytest.approx(10 / 60 * 0.006)


def test_transcription_from_an_api_without_verbose_json_still_has_the_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Some OpenAI-compatible servers answer only {"text"}: the job's own duration prices it and subtitles
    become one cue over the whole audio."""
    with OpenAIEmulator(api_key="sk-test-plain-0000", models=["whisper-1"]) as emu:
        monkeypatch.setenv("GPUFLEET_TEST_WHISPER_KEY", "sk-test-plain-0000")
        original = emu._transcribe
        monkeypatch.setattr(emu, "_transcribe", lambda body: original({**body, "response_format": "json"}))
        provider = OpenAICompatibleProvider("oai", {
            "base_url": f"{emu.url}/v1", "api_key_env": "GPUFLEET_TEST_WHISPER_KEY", "kinds": ["transcription"],
            "models": {"whisper-1": {"per_minute": 0.006}}})
        spec = {"audio_url": emu.serve_file("a.wav", b"\x01" * 64_000), "duration_seconds": 90, "formats": ["srt"]}
        job = JobSpec(job_id="j", kind="transcription", attempt=1, spec=spec, timeout_seconds=60)
        [offer] = provider.offers(Requirements(), "transcription", spec)
        status = provider.poll(provider.start(provider.reserve(offer, job), job))
        assert status.result is not None
        assert status.result["segments"] == [] and status.result["language"] is None
        assert status.result["duration_seconds"] == 90 and status.cost == pytest.approx(90 / 60 * 0.006)
        assert status.result["formats"]["srt"].splitlines()[:2] == ["1", "00:00:00,000 --> 00:01:30,000"]


def test_an_empty_local_audio_file_is_refused_before_any_upload(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with OpenAIEmulator(api_key="sk-test-empty-0000", models=["whisper-1"]) as emu:
        monkeypatch.setenv("GPUFLEET_TEST_WHISPER_KEY", "sk-test-empty-0000")
        provider = OpenAICompatibleProvider("oai", {
            "base_url": f"{emu.url}/v1", "api_key_env": "GPUFLEET_TEST_WHISPER_KEY", "kinds": ["transcription"],
            "models": {"whisper-1": {"per_minute": 0.006}}})
        empty = tmp_path / "empty.wav"
        empty.write_bytes(b"")
        job = JobSpec(job_id="j", kind="transcription", attempt=1, spec={"audio_url": str(empty)}, timeout_seconds=60)
        [offer] = provider.offers(Requirements(), "transcription", job.spec)
        with pytest.raises(PermanentProviderError, match="is empty"):
            provider.start(provider.reserve(offer, job), job)
        assert emu.requests("/v1/audio/transcriptions") == []


def test_log_probabilities_are_asked_for_and_averaged(monkeypatch: pytest.MonkeyPatch) -> None:
    with OpenAIEmulator(api_key="sk-test-logprobs-0000", models=["gpt-4o-mini"]) as emu:
        monkeypatch.setenv("GPUFLEET_TEST_LOGPROB_KEY", "sk-test-logprobs-0000")
        provider = OpenAICompatibleProvider("oai", {"base_url": f"{emu.url}/v1", "api_key_env": "GPUFLEET_TEST_LOGPROB_KEY",
                                                    "models": {"gpt-4o-mini": {"input_per_1k": 0.1, "output_per_1k": 0.2}}})
        spec = {"model": "gpt-4o-mini", "prompt": "be sure", "logprobs": True}
        job = JobSpec(job_id="j", kind="inference", attempt=1, spec=spec, timeout_seconds=60)
        offer = provider.offers(Requirements(), "inference", spec)[0]
        result = provider.poll(provider.start(provider.reserve(offer, job), job)).result
        assert result is not None and result["logprob"] == pytest.approx(-0.1)
        assert emu.requests("/v1/chat/completions")[-1]["body"]["logprobs"] is True
        plain = JobSpec(job_id="k", kind="inference", attempt=1, spec={**spec, "logprobs": False}, timeout_seconds=60)
        answer = provider.poll(provider.start(provider.reserve(offer, plain), plain)).result
        assert answer is not None and "logprob" not in answer
