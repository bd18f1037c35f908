"""The local provider: commands run as detached subprocesses whose whole state lives in the
run handle, so a worker that restarts can keep polling (and killing) them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from providers.base import (
    JobSpec,
    Lease,
    PermanentProviderError,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.local import LocalProvider
from tests.emulators.openai_compat import OpenAICompatServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def local(tmp_path: Path) -> LocalProvider:
    return LocalProvider("local", {"runs_dir": str(tmp_path / "runs"), "slots": 3})


def job(spec: dict[str, Any], kind: str = "command", job_id: str = "job-1", attempt: int = 1,
        timeout: int = 30, env: dict[str, str] | None = None) -> JobSpec:
    return JobSpec(job_id=job_id, kind=kind, attempt=attempt, spec=spec, timeout_seconds=timeout,  # type: ignore[arg-type]
                   env=env or {}, label=f"gpufleet-{job_id}-{attempt}")


def start(provider: LocalProvider, spec: JobSpec) -> tuple[Lease, RunHandle]:
    offer = provider.offers(Requirements(), spec.kind, spec.spec)[0]
    lease = provider.reserve(offer, spec)
    return lease, provider.start(lease, spec)


def wait(provider: LocalProvider, handle: RunHandle, seconds: float = 1.8) -> RunStatus:
    end = time.monotonic() + seconds
    while (status := provider.poll(handle)).state == "running":
        assert time.monotonic() < end, "command did not finish in time"
        time.sleep(0.01)
    return status


def process_group_gone(pgid: int, within: float = 0.5) -> bool:
    """No live (non-zombie) process is left in the group, checked for up to ``within`` seconds.
    Zombies count as gone: this container's PID 1 does not reap orphans."""
    end = time.monotonic() + within
    while not _group_empty(pgid):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _group_empty(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return False
    return True


# --- offers and leases --------------------------------------------------------------------------


def test_offer_is_free_and_sized_by_slots(local: LocalProvider) -> None:
    [offer] = local.offers(Requirements(), "command", {"command": "true"})
    assert (offer.provider, offer.offer_id, offer.region, offer.price_per_hour, offer.capacity) == (
        "local", "local", "local", 0.0, 3)
    assert offer.gpu is None and offer.gpu_count == 0
    assert offer.kinds == ["command", "training"]
    assert local.offers(Requirements(), "training", {"base_model": "m"})[0].kinds == ["command"]
    assert "inference" not in offer.kinds  # no local model server configured


def test_declared_gpus_are_offered(tmp_path: Path) -> None:
    provider = LocalProvider("local", {"runs_dir": str(tmp_path), "gpus": ["RTX 4090", "RTX 4090"],
                                       "gpu_memory_gb": 24, "openai_base_url": "http://127.0.0.1:1/v1"})
    [offer] = provider.offers(Requirements(), "inference", {})
    assert (offer.gpu, offer.gpu_count, offer.gpu_memory_gb) == ("RTX 4090", 2, 24)
    assert "inference" in offer.kinds


def test_lease_carries_the_reservation_label(local: LocalProvider) -> None:
    spec = job({"command": "true"}, job_id="abc", attempt=2)
    lease = local.reserve(local.offers(Requirements(), "command", spec.spec)[0], spec)
    assert lease.label == "gpufleet-abc-2" and lease.price_per_hour == 0.0 and lease.provider == "local"
    assert lease.external_id.startswith("local-")
    local.release(lease)  # nothing started: a no-op


# --- commands --------------------------------------------------------------------------------------


def test_command_that_prints_and_exits_zero_succeeds(local: LocalProvider) -> None:
    _, handle = start(local, job({"command": ["sh", "-c", "echo hello; echo world; echo note >&2"]}))
    status = wait(local, handle)
    assert status.state == "succeeded" and status.error is None
    assert status.result == {"exit_code": 0, "stdout": "hello\nworld\n", "stderr": "note\n"}


def test_shell_string_command(local: LocalProvider) -> None:
    _, handle = start(local, job({"command": "printf '%s' \"$((6 * 7))\""}))
    status = wait(local, handle)
    assert status.state == "succeeded" and status.result is not None and status.result["stdout"] == "42"


def test_exit_code_three_fails_with_last_stderr_line(local: LocalProvider) -> None:
    spec = job({"command": "echo first >&2; echo 'the real reason' >&2; echo; exit 3"})
    _, handle = start(local, spec)
    status = wait(local, handle)
    assert status.state == "failed" and not status.transient
    assert status.error == "exit code 3: the real reason"
    assert status.result is not None and status.result["exit_code"] == 3


def test_exit_code_without_stderr(local: LocalProvider) -> None:
    _, handle = start(local, job({"command": ["sh", "-c", "exit 3"]}))
    status = wait(local, handle)
    assert status.state == "failed" and status.error == "exit code 3"


def test_missing_program_fails_with_its_exit_code(local: LocalProvider) -> None:
    _, handle = start(local, job({"command": ["gpufleet-no-such-program-xyz"]}))
    status = wait(local, handle)
    assert status.state == "failed"
    assert (status.error or "").startswith("exit code 127")


def test_env_and_workdir_reach_the_command(local: LocalProvider, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    spec = job({"command": 'echo "$FROM_SPEC $FROM_JOB $(pwd)"', "env": {"FROM_SPEC": "spec"},
                "workdir": str(workdir)}, env={"FROM_JOB": "job"})
    _, handle = start(local, spec)
    status = wait(local, handle)
    assert status.result is not None and status.result["stdout"] == f"spec job {workdir}\n"


def test_output_is_tailed_to_the_last_4k(local: LocalProvider) -> None:
    _, handle = start(local, job({"command": "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done"}))
    status = wait(local, handle)
    assert status.result is not None
    stdout = status.result["stdout"]
    assert len(stdout.encode()) <= 4096 and stdout.endswith("line1999\n")


def test_rerun_of_the_same_attempt_does_not_see_stale_results(local: LocalProvider) -> None:
    _, first = start(local, job({"command": "echo old; exit 5"}))
    assert wait(local, first).state == "failed"
    _, second = start(local, job({"command": "sleep 0.2; echo new"}))  # same job id and attempt
    assert local.poll(second).state == "running"  # not the old exit code
    status = wait(local, second)
    assert status.state == "succeeded" and status.result is not None and status.result["stdout"] == "new\n"


def test_command_job_without_a_command_is_a_permanent_error(local: LocalProvider) -> None:
    spec = job({"base_model": "m", "dataset_uri": "d"}, kind="training")
    lease = local.reserve(local.offers(Requirements(), "training", spec.spec)[0], spec)
    with pytest.raises(PermanentProviderError, match="need a 'command'"):
        local.start(lease, spec)


def test_time_limit_kills_the_command(local: LocalProvider) -> None:
    _, handle = start(local, job({"command": ["sleep", "30"]}, timeout=1))
    assert local.poll(handle).state == "running"
    status = wait(local, handle, seconds=3)
    assert status.state == "failed" and "time limit" in (status.error or "")
    assert status.result is None
    assert process_group_gone(handle.data["process"]["pid"])


def test_handle_survives_json_and_a_second_instance_polls_it(local: LocalProvider, tmp_path: Path) -> None:
    _, handle = start(local, job({"command": "sleep 0.3; echo finished; exit 0"}))
    stored = json.dumps(handle.model_dump(mode="json"))
    restored = RunHandle(**json.loads(stored))
    assert restored == handle
    restarted = LocalProvider("local", {"runs_dir": str(tmp_path / "runs")})
    assert restarted.poll(restored).state == "running"
    status = wait(restarted, restored)
    assert status.state == "succeeded" and status.result is not None
    assert status.result["stdout"] == "finished\n"


def test_a_run_started_by_another_process_is_polled_here(tmp_path: Path) -> None:
    """The worker that started the command has exited; this process only has the stored handle."""
    runs = tmp_path / "runs"
    script = (
        "import json, sys\n"
        "from providers.base import JobSpec, Requirements\n"
        "from providers.local import LocalProvider\n"
        f"p = LocalProvider('local', {{'runs_dir': {str(runs)!r}}})\n"
        "j = JobSpec(job_id='far', kind='command', attempt=1, spec={'command': 'sleep 0.3; echo from-afar'},"
        " timeout_seconds=30)\n"
        "lease = p.reserve(p.offers(Requirements(), 'command', j.spec)[0], j)\n"
        "print(json.dumps(p.start(lease, j).model_dump(mode='json')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=10)
    handle = RunHandle(**json.loads(out.stdout))
    status = wait(LocalProvider("local", {"runs_dir": str(runs)}), handle)
    assert status.state == "succeeded" and status.result is not None
    assert status.result["stdout"] == "from-afar\n"


def test_release_kills_a_running_command(local: LocalProvider, tmp_path: Path) -> None:
    marker = tmp_path / "should-not-exist"
    lease, handle = start(local, job({"command": f"sleep 30; touch {marker}"}))
    assert local.poll(handle).state == "running"
    began = time.monotonic()
    local.release(lease, handle)
    assert time.monotonic() - began < 1.5  # TERM is enough: no wait for the 2 s grace
    assert process_group_gone(handle.data["process"]["pid"])
    local.release(lease, handle)  # idempotent
    status = local.poll(handle)
    assert status.state == "failed"
    assert not marker.exists()


def test_release_from_a_restarted_worker_kills_the_command(local: LocalProvider, tmp_path: Path) -> None:
    lease, handle = start(local, job({"command": "sleep 30"}))
    restored = RunHandle(**json.loads(json.dumps(handle.model_dump(mode="json"))))
    other = LocalProvider("local", {"runs_dir": str(tmp_path / "runs")})
    other.release(restored.lease, restored)
    assert process_group_gone(handle.data["process"]["pid"])


# --- inference (server errors and key handling: see test_local_inference.py) ---------------------------


def test_prompt_becomes_a_user_message_and_a_restored_handle_does_not_call_again(tmp_path: Path) -> None:
    with OpenAICompatServer() as server:
        provider = LocalProvider("local", {"runs_dir": str(tmp_path), "openai_base_url": server.url + "/"})
        _, handle = start(provider, job({"model": "m", "prompt": "say hi", "max_tokens": 9}, kind="inference"))
        first = provider.poll(handle)
        again = LocalProvider("local", {"runs_dir": str(tmp_path)}).poll(RunHandle(**handle.model_dump(mode="json")))
    assert first.state == "succeeded" and first.result is not None and first.result["text"] == "echo: say hi"
    assert again == first
    [request] = server.requests  # one call, though polled twice by two workers
    assert request["path"] == "/v1/chat/completions"  # trailing slash in the base URL is tolerated
    assert request["body"]["messages"] == [{"role": "user", "content": "say hi"}]
    assert "Authorization" not in request["headers"]  # no key configured, none sent


def test_training_runs_locally_only_with_a_command(local: LocalProvider) -> None:
    assert "training" not in local.offers(Requirements(), "training", {"base_model": "m"})[0].kinds
    assert "training" in local.offers(Requirements(), "training", {"command": ["x"]})[0].kinds


# --- transcription with a local engine (faster-whisper; a fake of its API stands in) ----------------

FAKE_ENGINES = Path(__file__).resolve().parent / "fake_engines"


@pytest.fixture
def fake_whisper(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The fake ``faster_whisper`` importable for one test, with fresh call records and no cached models."""
    from providers.local import transcribe

    monkeypatch.syspath_prepend(str(FAKE_ENGINES))
    monkeypatch.delitem(sys.modules, "faster_whisper", raising=False)
    monkeypatch.setattr(transcribe, "_models", {})
    import faster_whisper

    assert faster_whisper.__version__ == "0.0-fake"
    faster_whisper.LOADED.clear()
    faster_whisper.CALLS.clear()
    yield faster_whisper
    sys.modules.pop("faster_whisper", None)


@pytest.fixture
def no_whisper(monkeypatch: pytest.MonkeyPatch) -> None:
    """faster-whisper not importable, whatever this machine has installed."""
    monkeypatch.setitem(sys.modules, "faster_whisper", None)


def _wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    import wave

    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "faster-whisper-small"
    path.mkdir()
    return path


def transcriber(tmp_path: Path, model_dir: Path, **extra: Any) -> LocalProvider:
    return LocalProvider("local", {"runs_dir": str(tmp_path / "runs"), "transcription_model": str(model_dir),
                                   "transcription_device": "cpu", "transcription_compute_type": "int8", **extra})


def test_transcription_is_not_offered_without_a_configured_model(local: LocalProvider, fake_whisper: Any) -> None:
    [offer] = local.offers(Requirements(), "transcription", {"audio_url": "/a.wav"})
    assert "transcription" not in offer.kinds  # the engine is importable, but no model is configured


def test_transcription_is_not_offered_without_the_engine(tmp_path: Path, model_dir: Path, no_whisper: None) -> None:
    provider = transcriber(tmp_path, model_dir)
    [offer] = provider.offers(Requirements(), "transcription", {"audio_url": "/a.wav"})
    assert "transcription" not in offer.kinds
    spec = job({"audio_url": str(_wav(tmp_path / "a.wav", 1))}, kind="transcription")
    lease = provider.reserve(offer, spec)
    with pytest.raises(TransientProviderError, match="faster-whisper"):  # placed by a stale offer: go elsewhere
        provider.start(lease, spec)


def test_transcription_runs_on_the_local_engine_in_start(tmp_path: Path, model_dir: Path, fake_whisper: Any) -> None:
    provider = transcriber(tmp_path, model_dir)
    [offer] = provider.offers(Requirements(), "transcription", {})
    assert "transcription" in offer.kinds and offer.price_per_hour == 0.0
    audio = _wav(tmp_path / "call.wav", 5.0)
    spec = job({"audio_url": str(audio), "language": "fr", "formats": ["text", "srt", "vtt"]}, kind="transcription")
    handle = provider.start(provider.reserve(offer, spec), spec)
    restored = RunHandle(**json.loads(json.dumps(handle.model_dump(mode="json"))))  # any worker can poll it
    status = LocalProvider("local", {"runs_dir": str(tmp_path / "runs")}).poll(restored)
    assert status.state == "succeeded" and status.cost == 0.0 and status.result is not None
    result = status.result
    assert result["model"] == "faster-whisper-small" and result["language"] == "fr" and result["duration_seconds"] == 5.0
    assert result["segments"] == [{"start": 0.0, "end": 2.0, "text": "fr words 0"},
                                  {"start": 2.0, "end": 4.0, "text": "fr words 1"},
                                  {"start": 4.0, "end": 5.0, "text": "fr words 2"}]
    assert result["text"] == "fr words 0 fr words 1 fr words 2" and result["usage"] == {}
    assert result["formats"]["srt"].splitlines()[:3] == ["1", "00:00:00,000 --> 00:00:02,000", "fr words 0"]
    assert result["formats"]["vtt"].splitlines()[:3] == ["WEBVTT", "", "00:00:00.000 --> 00:00:02.000"]
    assert fake_whisper.CALLS == [{"audio": str(audio), "language": "fr", "task": "transcribe"}]
    # Loaded from the given path only (never a hub download), with the configured device and precision.
    assert fake_whisper.LOADED == [{"path": str(model_dir), "device": "cpu", "compute_type": "int8",
                                    "local_files_only": True}]


def test_detected_language_and_a_loaded_model_is_reused(tmp_path: Path, model_dir: Path, fake_whisper: Any) -> None:
    provider = transcriber(tmp_path, model_dir)
    audio = _wav(tmp_path / "a.wav", 1.5)
    for n, url in enumerate((str(audio), audio.as_uri())):
        spec = job({"audio_url": url}, kind="transcription", job_id=f"j{n}")
        _, handle = start(provider, spec)
        assert handle.data["response"]["language"] == "en"  # no hint: what the engine detected
    assert [c["language"] for c in fake_whisper.CALLS] == [None, None]
    assert len(fake_whisper.LOADED) == 1


def test_http_audio_is_downloaded_first(tmp_path: Path, model_dir: Path, fake_whisper: Any) -> None:
    from tests.emulators.llm_apis import OpenAIEmulator

    provider = transcriber(tmp_path, model_dir)
    wav = _wav(tmp_path / "remote.wav", 3.0).read_bytes()
    with OpenAIEmulator(api_key="unused", models=[]) as emu:
        url = emu.serve_file("remote.wav", wav)
        _, handle = start(provider, job({"audio_url": url + "?X-Amz-Signature=sig"}, kind="transcription"))
        assert handle.data["response"]["duration_seconds"] == 3.0
        [call] = fake_whisper.CALLS
        assert call["audio"].endswith(".wav") and not Path(call["audio"]).exists()  # the temporary copy is gone
        missing = job({"audio_url": f"{emu.url}/media/gone.wav?X-Amz-Signature=sig"}, kind="transcription", job_id="m")
        with pytest.raises(PermanentProviderError, match="404") as refused:
            start(provider, missing)
        assert "sig" not in str(refused.value)


@pytest.mark.parametrize("problem", ["missing", "empty", "undecodable", "s3"])
def test_bad_audio_fails_permanently(tmp_path: Path, model_dir: Path, fake_whisper: Any, problem: str) -> None:
    provider = transcriber(tmp_path, model_dir)
    target = tmp_path / "item.mp3"
    if problem == "empty":
        target.write_bytes(b"")
    elif problem == "undecodable":
        target.write_bytes(b"garbage, not audio")
    url = "s3://bucket/item.mp3" if problem == "s3" else str(target)
    expected = {"missing": "does not exist", "empty": "is empty", "undecodable": "could not transcribe item.mp3",
                "s3": "cannot read s3://"}[problem]
    with pytest.raises(PermanentProviderError, match=expected):
        start(provider, job({"audio_url": url}, kind="transcription"))


def test_a_model_that_cannot_be_loaded_sends_the_job_elsewhere(tmp_path: Path, fake_whisper: Any) -> None:
    audio = str(_wav(tmp_path / "a.wav", 1))
    gone = transcriber(tmp_path, tmp_path / "no-such-model")
    with pytest.raises(TransientProviderError, match="does not exist on this machine"):
        start(gone, job({"audio_url": audio}, kind="transcription"))
    not_a_model = tmp_path / "model.txt"
    not_a_model.write_text("not a model")
    broken = transcriber(tmp_path, not_a_model)
    with pytest.raises(TransientProviderError, match="could not load the model .*model.bin"):
        start(broken, job({"audio_url": audio}, kind="transcription"))


def test_a_transcribing_machine_gets_the_time_a_long_file_takes_to_start() -> None:
    from providers.local.provider import TRANSCRIPTION_START_TIMEOUT, LocalProvider

    assert LocalProvider("local", {}).start_timeout == LocalProvider.default_start_timeout
    assert LocalProvider("local", {"transcription_model": "/models/x"}).start_timeout == TRANSCRIPTION_START_TIMEOUT
    assert LocalProvider("local", {"transcription_model": "/m", "transcription_timeout": 600}).start_timeout == 600
    assert LocalProvider("local", {"transcription_model": "/m", "start_timeout": 42}).start_timeout == 42


def test_output_is_read_in_whole_lines_and_a_line_across_a_read_is_not_lost(tmp_path: Path) -> None:
    from providers.local import processes

    info = {"run_dir": str(tmp_path)}
    checkpoint = 'GPUFLEET_CHECKPOINT {"step": 3, "uri": "u"}\n'
    (tmp_path / "stdout.log").write_text("a" * 90 + "\n" + checkpoint + "partial")
    first = processes.new_output(info, max_bytes=100)  # the read ends inside the checkpoint line
    second = processes.new_output(info, max_bytes=100)
    last = processes.new_output(info, ended=True, max_bytes=100)
    assert [c[1] for c in first + second + last] == ["a" * 90 + "\n", checkpoint, "partial"]
    assert processes.new_output(info, ended=True) == []


def test_a_local_job_does_not_inherit_the_workers_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from providers.local import processes

    monkeypatch.setenv("GPUFLEET_DATABASE_URL", "postgresql://u:secret@db/x")
    monkeypatch.setenv("VAST_API_KEY", "vast-secret")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("OPERATOR_PASSES_THIS", "yes")
    info = processes.spawn(tmp_path, ["env"], {"MINE": "1"}, inherit=["OPERATOR_PASSES_THIS"])
    deadline = time.time() + 10
    while processes.exit_code(info) is None:
        assert time.time() < deadline
        time.sleep(0.02)
    seen = dict(line.split("=", 1) for line in (tmp_path / "stdout.log").read_text().splitlines() if "=" in line)
    assert "GPUFLEET_DATABASE_URL" not in seen and "VAST_API_KEY" not in seen
    assert seen["MINE"] == "1" and seen["CUDA_VISIBLE_DEVICES"] == "0" and seen["OPERATOR_PASSES_THIS"] == "yes"
    assert "PATH" in seen
