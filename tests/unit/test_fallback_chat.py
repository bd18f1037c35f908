"""The fallback chat service, served for real by uvicorn and called with the real `openai` SDK: the
stand-in backend, forwarding to an OpenAI-compatible emulator, auth, errors, and its Fly config."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from fallback_chat.app import create_app
from fallback_chat.settings import ConfigError, FallbackSettings
from tests.emulators.openai_compat import OpenAICompatServer

ROOT = Path(__file__).resolve().parents[2]
CLIENT_KEY = "client-key-for-tests-0123456789"
UPSTREAM_KEY = "sk-upstream-secret-never-shown-42"


@pytest.fixture(autouse=True)
def _no_fallback_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test's arguments only, whatever FALLBACK_* the developer's shell has."""
    for name in list(os.environ):
        if name.startswith("FALLBACK_"):
            monkeypatch.delenv(name)


def _settings(**values: Any) -> FallbackSettings:
    return FallbackSettings(**values)


@contextmanager
def serve(settings: FallbackSettings) -> Iterator[str]:
    """Run the real app with uvicorn on a free port in a thread; yields its /v1 base URL."""
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def client_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_FALLBACK_CLIENT_KEY", CLIENT_KEY)
    return CLIENT_KEY


@pytest.fixture
def stand_in(client_key: str) -> Iterator[str]:
    with serve(_settings(backend="stand-in", api_key_env="TEST_FALLBACK_CLIENT_KEY", max_tokens_limit=64)) as url:
        yield url


@pytest.fixture
def upstream() -> Iterator[OpenAICompatServer]:
    with OpenAICompatServer() as server:
        yield server


@pytest.fixture
def forwarding(upstream: OpenAICompatServer, client_key: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TEST_FALLBACK_UPSTREAM_KEY", UPSTREAM_KEY)
    settings = _settings(upstream_url=upstream.url, upstream_key_env="TEST_FALLBACK_UPSTREAM_KEY",
                         api_key_env="TEST_FALLBACK_CLIENT_KEY")
    with serve(settings) as url:
        yield url


def _client(base_url: str, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)


# -------------------------------------------------------------------------------------------- stand-in


def test_stand_in_answers_in_openai_shape_with_honest_usage(stand_in: str) -> None:
    client = _client(stand_in)
    messages: Any = [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "what is the capital of France"}]
    first = client.chat.completions.create(model="anything", messages=messages)
    again = client.chat.completions.create(model="anything", messages=messages, stream=False)

    assert first.object == "chat.completion"
    assert first.model == "fallback-chat"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == "stand-in reply: what is the capital of France"
    assert first.choices[0].finish_reason == "stop"
    assert again.choices[0].message.content == first.choices[0].message.content  # deterministic
    assert first.usage is not None
    assert first.usage.prompt_tokens == 2 + 6  # whitespace words of every message
    assert first.usage.completion_tokens == 8
    assert first.usage.total_tokens == 16


def test_stand_in_respects_max_tokens_and_the_service_cap(stand_in: str) -> None:
    client = _client(stand_in)
    short = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b c d e"}],
                                           max_tokens=3)
    assert short.choices[0].message.content == "stand-in reply: a"
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 3

    long_prompt = " ".join(["word"] * 200)
    capped = client.chat.completions.create(model="m", messages=[{"role": "user", "content": long_prompt}],
                                            max_tokens=10_000)
    assert capped.usage is not None and capped.usage.completion_tokens == 64  # max_tokens_limit
    assert capped.choices[0].finish_reason == "length"


def test_models_and_health(stand_in: str) -> None:
    assert [m.id for m in _client(stand_in).models.list()] == ["fallback-chat"]
    health = httpx.get(stand_in.removesuffix("/v1") + "/health")  # no key: Fly's checks must get through
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "backend": "stand-in", "model": "fallback-chat"}


def test_a_key_is_required_when_configured(stand_in: str) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as info:
        _client(stand_in, key="wrong-key").chat.completions.create(model="m", messages=messages)
    assert info.value.status_code == 401
    assert "invalid API key" in info.value.message
    assert "wrong-key" not in info.value.response.text
    with pytest.raises(openai.AuthenticationError):
        _client(stand_in, key="wrong-key").models.list()
    assert httpx.post(f"{stand_in}/chat/completions", json={}).status_code == 401  # no header at all


def test_streaming_is_refused_clearly(stand_in: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _client(stand_in).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    assert info.value.status_code == 400
    assert "streaming is not supported" in info.value.message
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "stream" and body["type"] == "invalid_request_error"


@pytest.mark.parametrize(("payload", "param", "text"), [
    ({"model": "m", "messages": []}, "messages", "at least 1 item"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "Input should be"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "Field required"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature", "less than"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n", "only n=1"),
])
def test_bad_input_is_a_400_naming_the_field(stand_in: str, payload: dict[str, Any], param: str, text: str) -> None:
    response = httpx.post(f"{stand_in}/chat/completions", json=payload,
                          headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert text in error["message"]


def test_invalid_json_is_a_400(stand_in: str) -> None:
    response = httpx.post(f"{stand_in}/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the request body is not valid JSON"


def test_multipart_content_is_read_as_text(stand_in: str) -> None:
    content: Any = [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "x"}},
                    {"type": "text", "text": "there"}]
    reply = _client(stand_in).chat.completions.create(model="m", messages=[{"role": "user", "content": content}])
    assert reply.choices[0].message.content == "stand-in reply: hello there"


# ------------------------------------------------------------------------------------------ forwarding


def test_forwarding_relays_the_upstream_answer(forwarding: str, upstream: OpenAICompatServer) -> None:
    reply = _client(forwarding).chat.completions.create(model="small-model", messages=[{"role": "user", "content": "ping"}],
                                                        max_tokens=20)
    assert reply.choices[0].message.content == "echo: ping"
    assert reply.model == "small-model"
    assert reply.usage is not None and reply.usage.total_tokens == 5

    seen = upstream.requests[-1]
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"  # its key, not the client's
    assert seen["body"]["model"] == "small-model"
    assert seen["body"]["max_tokens"] == 20
    assert "stream" not in seen["body"]


def test_upstream_model_override(upstream: OpenAICompatServer) -> None:
    with serve(_settings(upstream_url=upstream.url, upstream_model="their-model")) as url:
        _client(url).chat.completions.create(model="fallback-chat", messages=[{"role": "user", "content": "x"}])
    assert upstream.requests[-1]["body"]["model"] == "their-model"


def test_upstream_failures_map_to_502_and_400(forwarding: str) -> None:
    client = _client(forwarding)
    messages: Any = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="fail-500", messages=messages)
    assert failed.value.status_code == 502
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "upstream_error"
    assert body["message"] == "the upstream API failed: HTTP 500: overloaded"

    with pytest.raises(openai.BadRequestError) as rejected:
        client.chat.completions.create(model="fail-400", messages=messages)
    assert "the upstream API rejected the request: unknown model" in rejected.value.message


def test_unreachable_upstream_is_a_503(client_key: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with serve(_settings(upstream_url=dead, api_key_env="TEST_FALLBACK_CLIENT_KEY")) as url:
        with pytest.raises(openai.InternalServerError) as info:
            _client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503
    assert "the upstream API is unreachable (ConnectError)" in info.value.message


def test_the_upstream_key_never_leaks(forwarding: str, upstream: OpenAICompatServer,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = _client(forwarding)
    texts: list[str] = []
    for model in ("ok-model", "fail-500", "fail-400"):
        try:
            raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "x"}])
            texts.append(raw.http_response.text)
        except openai.APIStatusError as exc:
            texts.append(exc.response.text)
    texts.append(httpx.get(forwarding.removesuffix("/v1") + "/health").text)
    assert len(upstream.requests) == 3
    assert all(UPSTREAM_KEY not in text for text in texts)
    assert UPSTREAM_KEY not in caplog.text
    assert CLIENT_KEY not in caplog.text
    assert "upstream http://127.0.0.1" in caplog.text  # forwarding is logged, by host only


# --------------------------------------------------------------------------------------- configuration


def test_configuration_errors_stop_the_service_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_UNSET_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="nothing to answer with"):
        create_app(_settings())
    with pytest.raises(ConfigError, match="FALLBACK_API_KEY_ENV names TEST_UNSET_KEY_VAR, which is not set"):
        create_app(_settings(backend="stand-in", api_key_env="TEST_UNSET_KEY_VAR"))
    with pytest.raises(ConfigError, match="FALLBACK_UPSTREAM_KEY_ENV names TEST_UNSET_KEY_VAR"):
        create_app(_settings(upstream_url="http://127.0.0.1:9/v1", upstream_key_env="TEST_UNSET_KEY_VAR"))
    with pytest.raises(ConfigError, match="no model file"):
        create_app(_settings(backend="llama-cpp", model_path=tmp_path / "missing.gguf"))


def test_a_local_model_needs_llama_cpp(tmp_path: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed here; this checks the message when it is not")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"llama-cpp-python is not installed: pip install 'gpufleet\[fallback\]'"):
        create_app(_settings(model_path=model))


def test_auto_falls_back_to_upstream_when_the_model_file_is_missing(
        tmp_path: Path, upstream: OpenAICompatServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    app = create_app(_settings(model_path=tmp_path / "absent.gguf", upstream_url=upstream.url))
    assert app.state.backend.name == "upstream"
    assert "does not exist; forwarding to the upstream API instead" in caplog.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_python_dash_m_serves_with_env_settings(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLBACK_")}
    env.update(FALLBACK_BACKEND="stand-in", FALLBACK_HOST="127.0.0.1", FALLBACK_PORT=str(port),
               FALLBACK_API_KEY_ENV="SERVICE_KEY", SERVICE_KEY=CLIENT_KEY, FALLBACK_MODEL_NAME="tiny")
    proc = subprocess.Popen([sys.executable, "-m", "fallback_chat"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200, proc)
        reply = _client(f"http://127.0.0.1:{port}/v1").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}])
        assert reply.model == "tiny"
        assert reply.choices[0].message.content == "stand-in reply: hello"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0].decode()
    assert CLIENT_KEY not in output


def test_python_dash_m_reports_a_config_error_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLBACK_")}
    done = subprocess.run([sys.executable, "-m", "fallback_chat"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("fallback_chat: nothing to answer with")
    assert "Traceback" not in done.stderr


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "python -m fallback_chat exited early"
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("python -m fallback_chat did not become ready")


def test_fly_toml_keeps_the_service_always_on() -> None:
    fly = tomllib.loads((ROOT / "fallback_chat" / "fly.toml").read_text())
    assert fly["app"] == "gpufleet-fallback-chat"
    service = fly["http_service"]
    assert service["internal_port"] == 8080 == int(fly["env"]["FALLBACK_PORT"])
    assert service["auto_stop_machines"] == "off"
    assert service["min_machines_running"] >= 1
    assert any(check["path"] == "/health" for check in service["checks"])
    assert fly["vm"][0]["size"] == "shared-cpu-1x" and fly["vm"][0]["memory"] == "1gb"
    assert fly["env"]["FALLBACK_HOST"] == "0.0.0.0"
    # Every FALLBACK_* variable it sets is a real setting, and the values parse.
    fields = {f"FALLBACK_{name.upper()}" for name in FallbackSettings.model_fields}
    assert set(fly["env"]) <= fields
    FallbackSettings(**{k.removeprefix("FALLBACK_").lower(): v for k, v in fly["env"].items()})
    # Secrets are named, never written here.
    assert not any("KEY" in k and not k.endswith("_ENV") for k in fly["env"])


def test_dockerfile_installs_the_fallback_extra_and_runs_the_module() -> None:
    dockerfile = (ROOT / "fallback_chat" / "Dockerfile").read_text()
    assert "pip install '.[fallback]'" in dockerfile
    assert "COPY fallback_chat ./fallback_chat" in dockerfile
    assert dockerfile.strip().splitlines()[-1] == 'CMD ["python", "-m", "fallback_chat"]'
    assert "EXPOSE 8080" in dockerfile
