"""The sandbox marketplace as a provider worker drives it: reserve → start → poll → release,
deterministic emulated results, failures drawn per (job, attempt, offer), and one capacity
ledger shared by every process that points at the same state_dir."""

from __future__ import annotations

import json
import time
import wave
from pathlib import Path
from typing import Any

import pytest

from providers.base import (
    JobSpec,
    Lease,
    NoCapacity,
    PermanentProviderError,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.sandbox import SandboxProvider

GPU = {"offer_id": "gpu-1", "gpu": "A100", "gpu_memory_gb": 80, "region": "us-east", "price_per_hour": 1.5,
       "capacity": 2, "boot_seconds": 0}
TOKENS = {"offer_id": "tok-1", "gpu": "L4", "gpu_memory_gb": 24, "region": "us-east", "price_per_hour": 0.5,
          "price_per_1k_tokens": 0.002, "capacity": 2, "kinds": ["inference", "transcription"]}


def make(state_dir: Path, *offers: dict[str, Any], time_scale: float = 0, name: str = "sandbox") -> SandboxProvider:
    return SandboxProvider(name, {"state_dir": str(state_dir), "time_scale": time_scale,
                                  "offers": list(offers) or [GPU]})


def job(kind: str, spec: dict[str, Any], job_id: str = "job-1", attempt: int = 1, timeout: int = 60) -> JobSpec:
    return JobSpec(job_id=job_id, kind=kind, attempt=attempt, spec=spec, timeout_seconds=timeout)  # type: ignore[arg-type]


def offer(provider: SandboxProvider, offer_id: str, kind: str = "training"):  # type: ignore[no-untyped-def]
    return next(o for o in provider.offers(Requirements(), kind, {}) if o.offer_id == offer_id)


def wait(provider: SandboxProvider, handle: RunHandle, seconds: float = 1.5) -> RunStatus:
    end = time.monotonic() + seconds
    while (status := provider.poll(handle)).state == "running":
        assert time.monotonic() < end, "run did not finish in time"
        time.sleep(0.01)
    return status


def run(provider: SandboxProvider, spec: JobSpec, offer_id: str = "gpu-1") -> tuple[Lease, RunHandle, RunStatus]:
    lease = provider.reserve(offer(provider, offer_id, spec.kind), spec)
    handle = provider.start(lease, spec)
    status = wait(provider, handle)
    provider.release(lease, handle)
    return lease, handle, status


INFER = {"model": "llama-3-8b", "prompt": "why is the sky blue?", "max_tokens": 64}


# --- offers ------------------------------------------------------------------------------------


def test_offers_come_from_the_configured_catalog(tmp_path: Path) -> None:
    provider = make(tmp_path, GPU, TOKENS)
    training = provider.offers(Requirements(), "training", {})
    assert [o.offer_id for o in training] == ["gpu-1"]  # tok-1 does not run training
    o = training[0]
    assert (o.provider, o.gpu, o.gpu_count, o.gpu_memory_gb, o.region, o.price_per_hour, o.capacity) == (
        "sandbox", "A100", 1, 80, "us-east", 1.5, 2)
    inference = {o.offer_id: o for o in provider.offers(Requirements(), "inference", {})}
    assert set(inference) == {"gpu-1", "tok-1"}
    assert inference["tok-1"].price_per_1k_tokens == 0.002


def test_default_catalog_without_offers(tmp_path: Path) -> None:
    provider = SandboxProvider("sandbox", {"state_dir": str(tmp_path)})
    ids = {o.offer_id for o in provider.offers(Requirements(), "training", {})}
    assert {"a100-us", "h100-de", "rtx4090-se"} <= ids
    assert provider.health().ok


# --- lifecycle per kind -------------------------------------------------------------------------


def test_lifecycle_reserve_start_poll_release(tmp_path: Path) -> None:
    provider = make(tmp_path)
    spec = job("inference", INFER)
    lease = provider.reserve(offer(provider, "gpu-1", "inference"), spec)
    assert lease.provider == "sandbox" and lease.offer_id == "gpu-1"
    assert lease.label == "gpufleet-job-1-1"
    assert lease.price_per_hour == 1.5  # hourly offer: rented time is billed
    assert offer(provider, "gpu-1").capacity == 1
    assert [r.external_id for r in provider.owned()] == [lease.external_id]

    handle = provider.start(lease, spec)
    assert handle.provider == "sandbox" and handle.lease == lease
    status = provider.poll(handle)  # time_scale 0: done at once
    assert status.state == "succeeded" and status.error is None and not status.transient
    assert status.cost is None  # hourly offers are priced by the caller from rented time

    provider.release(lease, handle)
    assert offer(provider, "gpu-1").capacity == 2
    assert provider.owned() == []


def test_inference_is_deterministic_for_the_same_input(tmp_path: Path) -> None:
    provider = make(tmp_path)
    _, _, a = run(provider, job("inference", INFER, job_id="a"))
    _, _, b = run(provider, job("inference", INFER, job_id="b", attempt=2))
    _, _, other = run(provider, job("inference", {**INFER, "prompt": "something else entirely"}, job_id="c"))
    assert a.result is not None and b.result is not None and other.result is not None
    assert a.result == b.result
    assert a.result["text"] and a.result["model"] == "llama-3-8b"
    assert other.result["text"] != a.result["text"]
    usage = a.result["usage"]
    assert usage["completion_tokens"] == len(a.result["text"].split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_inference_with_messages_and_token_limit(tmp_path: Path) -> None:
    provider = make(tmp_path)
    spec = {"model": "llama-3-70b", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5}
    _, _, status = run(provider, job("inference", spec))
    assert status.result is not None
    assert len(status.result["text"].split()) == 5 == status.result["usage"]["completion_tokens"]
    assert status.result["usage"]["prompt_tokens"] == 2


def test_inference_on_a_per_token_offer_reports_its_cost(tmp_path: Path) -> None:
    provider = make(tmp_path, TOKENS)
    lease, _, status = run(provider, job("inference", INFER), offer_id="tok-1")
    assert lease.price_per_hour == 0.0  # billed per token, not per hour
    assert status.result is not None
    total = status.result["usage"]["total_tokens"]
    assert status.cost == pytest.approx(total / 1000 * 0.002)


def test_transcription_result(tmp_path: Path) -> None:
    provider = make(tmp_path)
    spec = {"audio_url": "s3://bucket/a.wav", "duration_seconds": 4}
    _, _, a = run(provider, job("transcription", spec, job_id="a"))
    _, _, b = run(provider, job("transcription", spec, job_id="b"))
    assert a.state == "succeeded" and a.result == b.result
    assert a.result is not None
    assert set(a.result) == {"text", "language", "duration_seconds", "segments", "model", "usage"}
    assert a.result["model"] == "whisper-large-v3" and a.result["duration_seconds"] == 4
    assert a.result["language"] == "en"  # no hint: English
    assert len(a.result["text"].split()) == 10 and a.result["text"].endswith(".")
    assert " ".join(s["text"] for s in a.result["segments"]) == a.result["text"]


def test_transcription_segments_cover_the_audio_in_order(tmp_path: Path) -> None:
    provider = make(tmp_path)
    _, _, status = run(provider, job("transcription", {"audio_url": "https://x/talk.mp3", "duration_seconds": 95.5,
                                                       "language": "de"}))
    assert status.result is not None and status.result["language"] == "de"  # the hint is honoured
    segments = status.result["segments"]
    assert segments[0]["start"] == 0 and segments[-1]["end"] == 95.5
    assert all(earlier["end"] == later["start"] for earlier, later in zip(segments, segments[1:], strict=False))
    assert all(1.0 <= s["end"] - s["start"] <= 6.5 and s["text"] for s in segments)  # a few seconds each


def test_transcription_renders_the_subtitles_asked_for(tmp_path: Path) -> None:
    provider = make(tmp_path)
    spec = {"audio_url": "s3://bucket/a.wav", "duration_seconds": 12, "formats": ["srt", "vtt", "json"]}
    _, _, status = run(provider, job("transcription", spec))
    assert status.result is not None and set(status.result["formats"]) == {"srt", "vtt"}
    srt = status.result["formats"]["srt"]
    assert srt.startswith("1\n00:00:00,000 --> ") and status.result["formats"]["vtt"].startswith("WEBVTT\n\n00:00:00.000 --> ")
    _, _, plain = run(provider, job("transcription", {**spec, "formats": ["text"]}, job_id="plain"))
    assert plain.result is not None and "formats" not in plain.result


def _wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))
    return path


def test_local_wav_length_is_read_from_the_file(tmp_path: Path) -> None:
    provider = make(tmp_path)
    audio = _wav(tmp_path / "call.wav", 7.5)
    for url in (str(audio), audio.as_uri()):
        _, _, status = run(provider, job("transcription", {"audio_url": url}, job_id=url[-12:]))
        assert status.state == "succeeded" and status.result is not None
        assert status.result["duration_seconds"] == 7.5 and status.result["segments"][-1]["end"] == 7.5
    _, _, declared = run(provider, job("transcription", {"audio_url": str(audio), "duration_seconds": 3}, job_id="d"))
    assert declared.result is not None and declared.result["duration_seconds"] == 3  # the job's own figure wins


@pytest.mark.parametrize("problem", ["missing", "missing-file-url", "empty", "not-a-wav", "no-frames"])
def test_bad_local_audio_fails_permanently_at_start(tmp_path: Path, problem: str) -> None:
    provider = make(tmp_path)
    target = tmp_path / "item.wav"
    if problem == "empty":
        target.write_bytes(b"")
    elif problem == "not-a-wav":
        target.write_bytes(b"ID3 an mp3 named .wav")
    elif problem == "no-frames":
        _wav(target, 0)
    url = target.as_uri() if problem == "missing-file-url" else str(target)
    spec = job("transcription", {"audio_url": url})
    lease = provider.reserve(offer(provider, "gpu-1", "transcription"), spec)
    with pytest.raises(PermanentProviderError, match=f"sandbox: .*{target.name}") as failed:
        provider.start(lease, spec)
    assert not isinstance(failed.value, TransientProviderError)  # retrying elsewhere cannot fix the input
    expected = {"missing": "does not exist", "missing-file-url": "does not exist", "empty": "is empty",
                "not-a-wav": "not a readable WAV", "no-frames": "holds no audio"}[problem]
    assert expected in str(failed.value)
    provider.release(lease)
    assert provider.ledger.in_use().get("gpu-1", {}) == {}


def test_training_without_command_is_emulated(tmp_path: Path) -> None:
    provider = make(tmp_path)
    spec = {"base_model": "llama-3-8b", "dataset_uri": "s3://d", "max_steps": 50}
    _, _, status = run(provider, job("training", spec))
    assert status.state == "succeeded"
    assert status.result == {"base_model": "llama-3-8b", "steps": 50, "final_loss": 1.25,
                             "checkpoint_uri": "sandbox://checkpoints/llama-3-8b/final"}
    _, _, epochs = run(provider, job("training", {"base_model": "m", "dataset_uri": "d", "epochs": 2,
                                                  "checkpoint_uri": "s3://ck"}, job_id="e"))
    assert epochs.result is not None and epochs.result["steps"] == 40 and epochs.result["checkpoint_uri"] == "s3://ck"


def test_distillation_returns_one_pair_per_prompt(tmp_path: Path) -> None:
    provider = make(tmp_path)
    prompts = ["what is a gpu", "explain queues", "why cheap", "what is a gpu"]
    spec = {"teacher_model": "teacher-70b", "student_model": "student-8b", "prompts": prompts}
    _, _, status = run(provider, job("distillation", spec))
    _, _, again = run(provider, job("distillation", spec, job_id="other"))
    assert status.state == "succeeded" and status.result is not None
    pairs = status.result["pairs"]
    assert [p["prompt"] for p in pairs] == prompts
    assert pairs[0] == pairs[3]  # same prompt, same answers
    for p in pairs:
        assert p["teacher"] and p["student"] and 0 <= p["agreement"] <= 1
        assert len(p["teacher"].split()) > len(p["student"].split())  # 70b answers at greater length
    assert status.result["mean_agreement"] == pytest.approx(sum(p["agreement"] for p in pairs) / 4, abs=1e-3)
    assert (status.result["teacher_model"], status.result["student_model"]) == ("teacher-70b", "student-8b")
    assert again.result == status.result


def test_command_really_runs_with_offer_env(tmp_path: Path) -> None:
    provider = make(tmp_path)
    spec = {"command": 'echo "$GPUFLEET_GPU@$GPUFLEET_REGION $GREETING"', "env": {"GREETING": "hi"}}
    _, _, status = run(provider, job("command", spec))
    assert status.state == "succeeded"
    assert status.result is not None
    assert status.result["exit_code"] == 0 and status.result["stdout"] == "A100@us-east hi\n"


def test_command_failure_is_not_transient(tmp_path: Path) -> None:
    provider = make(tmp_path)
    _, _, status = run(provider, job("command", {"command": "echo boom >&2; exit 4"}))
    assert status.state == "failed" and status.error == "exit code 4: boom" and not status.transient


def test_emulated_work_takes_time_when_time_scale_is_set(tmp_path: Path) -> None:
    provider = make(tmp_path, {**GPU, "boot_seconds": 0.1}, time_scale=1)
    spec = job("inference", {**INFER, "max_tokens": 10})  # 0.1 s boot + 0.02 s of work
    lease = provider.reserve(offer(provider, "gpu-1", "inference"), spec)
    handle = provider.start(lease, spec)
    assert provider.poll(handle).state == "running"
    assert wait(provider, handle, seconds=1.5).state == "succeeded"
    provider.release(lease, handle)


def test_emulated_work_past_its_deadline_fails(tmp_path: Path) -> None:
    provider = make(tmp_path, time_scale=1)
    spec = job("training", {"base_model": "m", "dataset_uri": "d", "max_steps": 10_000})  # 100 s of work
    lease = provider.reserve(offer(provider, "gpu-1"), spec)
    handle = provider.start(lease, spec)
    assert provider.poll(handle).state == "running"
    # The handle is JSON in the job row; a poll after the deadline sees a run that overstayed.
    late = RunHandle(**{**handle.model_dump(mode="json"), "data": {**handle.data, "deadline": time.time() - 1}})
    status = provider.poll(late)
    assert status.state == "failed" and "time limit" in (status.error or "")
    provider.release(lease, handle)


def test_handle_survives_json_and_is_polled_by_another_instance(tmp_path: Path) -> None:
    first = make(tmp_path)
    spec = job("inference", INFER)
    lease = first.reserve(offer(first, "gpu-1", "inference"), spec)
    handle = first.start(lease, spec)
    stored = json.loads(json.dumps(handle.model_dump(mode="json")))
    second = make(tmp_path)  # a restarted worker
    status = second.poll(RunHandle(**stored))
    assert status.state == "succeeded" and status.result == first.poll(handle).result
    second.release(Lease(**stored["lease"]))
    assert offer(first, "gpu-1").capacity == 2


# --- failures -------------------------------------------------------------------------------------


def test_reserve_failure_rate_one_raises_no_capacity(tmp_path: Path) -> None:
    provider = make(tmp_path, {**GPU, "reserve_failure_rate": 1})
    for attempt in (1, 2, 3):
        with pytest.raises(NoCapacity, match="gpu-1"):
            provider.reserve(offer(provider, "gpu-1"), job("training", {}, attempt=attempt))
    assert provider.owned() == []  # a refused reservation takes no slot
    assert offer(provider, "gpu-1").capacity == 2


def test_reserve_failures_are_reproducible_per_job_attempt_and_offer(tmp_path: Path) -> None:
    def outcomes(provider: SandboxProvider) -> list[bool]:
        result = []
        for n in range(20):
            spec = job("training", {}, job_id=f"j{n}")
            try:
                lease = provider.reserve(offer(provider, "gpu-1"), spec)
            except NoCapacity:
                result.append(False)
            else:
                provider.release(lease)
                result.append(True)
        return result

    flaky = {**GPU, "reserve_failure_rate": 0.5}
    first = outcomes(make(tmp_path / "a", flaky))
    assert first == outcomes(make(tmp_path / "b", flaky))
    assert True in first and False in first


def test_unknown_offer_is_no_capacity(tmp_path: Path) -> None:
    provider = make(tmp_path)
    gone = offer(provider, "gpu-1").model_copy(update={"offer_id": "vanished"})
    with pytest.raises(NoCapacity, match="vanished"):
        provider.reserve(gone, job("training", {}))


def test_crash_rate_one_makes_poll_a_transient_failure(tmp_path: Path) -> None:
    provider = make(tmp_path, {**GPU, "crash_rate": 1})
    spec = job("inference", INFER)
    lease = provider.reserve(offer(provider, "gpu-1", "inference"), spec)
    handle = provider.start(lease, spec)
    status = provider.poll(handle)
    assert status.state == "failed" and status.transient
    assert "gpu-1" in (status.error or "") and "lost" in (status.error or "")
    assert status.result is None
    provider.release(lease, handle)
    assert offer(provider, "gpu-1").capacity == 2


def test_crash_kills_a_real_command(tmp_path: Path) -> None:
    provider = make(tmp_path, {**GPU, "crash_rate": 1})
    marker = tmp_path / "ran-to-completion"
    spec = job("command", {"command": f"sleep 0.5; touch {marker}"})
    lease = provider.reserve(offer(provider, "gpu-1", "command"), spec)
    handle = provider.start(lease, spec)
    status = provider.poll(handle)
    assert status.state == "failed" and status.transient
    provider.release(lease, handle)
    time.sleep(0.7)
    assert not marker.exists()


# --- capacity shared across processes ----------------------------------------------------------------


def test_capacity_is_enforced_across_two_instances_sharing_state(tmp_path: Path) -> None:
    worker_a, worker_b = make(tmp_path), make(tmp_path)  # two processes, one ledger
    gpu = offer(worker_a, "gpu-1")
    first = worker_a.reserve(gpu, job("training", {}, job_id="a"))
    second = worker_b.reserve(gpu, job("training", {}, job_id="b"))
    assert first.external_id != second.external_id
    assert offer(worker_a, "gpu-1").capacity == 0 and offer(worker_b, "gpu-1").capacity == 0
    with pytest.raises(NoCapacity, match="full"):
        worker_a.reserve(gpu, job("training", {}, job_id="c"))
    with pytest.raises(NoCapacity, match="full"):
        worker_b.reserve(gpu, job("training", {}, job_id="c"))
    assert {r.external_id for r in worker_a.owned()} == {first.external_id, second.external_id}

    worker_a.release(second)  # any process may release any lease
    assert offer(worker_b, "gpu-1").capacity == 1
    third = worker_b.reserve(gpu, job("training", {}, job_id="c"))
    assert {r.external_id for r in worker_b.owned()} == {first.external_id, third.external_id}


def test_separate_state_dirs_do_not_share_capacity(tmp_path: Path) -> None:
    one, two = make(tmp_path / "one", {**GPU, "capacity": 1}), make(tmp_path / "two", {**GPU, "capacity": 1})
    one.reserve(offer(one, "gpu-1"), job("training", {}, job_id="a"))
    two.reserve(offer(two, "gpu-1"), job("training", {}, job_id="b"))
    assert offer(one, "gpu-1").capacity == 0 and offer(two, "gpu-1").capacity == 0


def test_release_frees_the_slot_and_is_idempotent(tmp_path: Path) -> None:
    provider = make(tmp_path, {**GPU, "capacity": 1})
    spec = job("inference", INFER)
    lease = provider.reserve(offer(provider, "gpu-1", "inference"), spec)
    handle = provider.start(lease, spec)
    assert offer(provider, "gpu-1").capacity == 0
    provider.release(lease, handle)
    provider.release(lease, handle)
    provider.release(lease)
    assert offer(provider, "gpu-1").capacity == 1
    assert provider.owned() == []
    # The freed slot is really usable again — and only once.
    again = provider.reserve(offer(provider, "gpu-1"), job("training", {}, job_id="next"))
    provider.release(lease)  # a late, duplicate release of the old lease must not free the new one
    assert [r.external_id for r in provider.owned()] == [again.external_id]
    with pytest.raises(NoCapacity):
        provider.reserve(offer(provider, "gpu-1"), job("training", {}, job_id="third"))
