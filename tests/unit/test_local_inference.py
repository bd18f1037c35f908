"""The local provider sends inference to a configured OpenAI-compatible server (a local emulator here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from providers.base import JobSpec, PermanentProviderError, Requirements, TransientProviderError
from providers.local import LocalProvider
from tests.emulators.openai_compat import OpenAICompatServer

SECRET = "sk-local-secret-value"


def _provider(tmp_path: Path, url: str) -> LocalProvider:
    return LocalProvider("local", {"runs_dir": str(tmp_path), "openai_base_url": url, "openai_api_key": SECRET})


def _start(provider: LocalProvider, model: str):  # type: ignore[no-untyped-def]
    job = JobSpec(job_id="j", kind="inference", attempt=1, timeout_seconds=30,
                  spec={"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8})
    offer = provider.offers(Requirements(), "inference", job.spec)[0]
    return provider.start(provider.reserve(offer, job), job)


def test_inference_offered_only_with_a_server_configured(tmp_path: Path) -> None:
    assert "inference" not in LocalProvider("local", {"runs_dir": str(tmp_path)}).offers(Requirements(), "inference", {})[0].kinds


def test_inference_round_trip_without_leaking_the_key(tmp_path: Path) -> None:
    with OpenAICompatServer() as server:
        provider = _provider(tmp_path, server.url)
        handle = _start(provider, "llama-3-8b")
        status = provider.poll(handle)
    assert status.state == "succeeded" and status.cost == 0.0
    assert status.result == {"text": "echo: ping", "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                             "total_tokens": 5}, "model": "llama-3-8b"}
    sent = server.requests[0]
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}" and sent["body"]["max_tokens"] == 8
    assert SECRET not in handle.model_dump_json()  # the handle is stored in the job row


def test_server_errors_map_to_the_error_tree(tmp_path: Path) -> None:
    with OpenAICompatServer() as server:
        provider = _provider(tmp_path, server.url)
        with pytest.raises(TransientProviderError, match="answered 500"):
            _start(provider, "fail-500")
        with pytest.raises(PermanentProviderError, match="rejected the request: 400") as err:
            _start(provider, "fail-400")
        assert SECRET not in str(err.value)
    down = _provider(tmp_path, server.url)  # server stopped
    with pytest.raises(TransientProviderError, match="unreachable"):
        _start(down, "llama")
