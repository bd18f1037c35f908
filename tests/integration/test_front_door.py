"""The OpenAI-compatible front door, driven by the real ``openai`` client package."""

from __future__ import annotations

import openai
import pytest

from .conftest import KEY_A


@pytest.fixture()
def oai(stack) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0, timeout=60)


def test_chat_completion_runs_as_a_costed_job(oai, client) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="llama-3-8b", max_tokens=16,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    completion = raw.parse()
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    job = client.get(raw.headers["x-gpufleet-job-id"])
    assert job.status.value == "succeeded" and job.kind == "inference"
    assert job.result["text"] == text and job.spec["messages"][0] == {"role": "system", "content": "be brief"}
    assert raw.headers["x-gpufleet-provider"] == job.provider == "sandbox"
    assert float(raw.headers["x-gpufleet-cost"]) == pytest.approx(job.cost) and job.cost > 0
    assert job.labels == {"api": "chat.completions"}


def test_requirements_ride_in_extra_body_and_failures_keep_openai_shapes(oai, stack) -> None:
    with pytest.raises(openai.InternalServerError) as failed:  # nothing can serve it: the job fails, 502
        oai.chat.completions.create(model="m-8b", messages=[{"role": "user", "content": "hi"}],
                                    extra_body={"gpufleet": {"requirements": {"gpu": ["B200"]}}})
    assert failed.value.status_code == 502 and "no offer" in str(failed.value).lower()
    with pytest.raises(openai.BadRequestError, match="stream"):
        oai.chat.completions.create(model="m-8b", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="wrong-key", max_retries=0).chat.completions.create(
            model="m-8b", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="m-8b", messages=[])


def test_a_front_door_request_can_be_distilled(oai, client) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="llama-3-70b", messages=[{"role": "user", "content": "teach me"}], max_tokens=16,
        extra_body={"gpufleet": {"distill": {"student_model": "llama-3-8b", "tags": ["front-door"]}}})
    assert raw.parse().choices[0].message.content
    job_id = raw.headers["x-gpufleet-job-id"]
    import time

    deadline = time.monotonic() + 30
    while not (pairs := [p for p in client.pairs(teacher_model="llama-3-70b") if p["source"] == "inference"
                         and p["status"] == "complete"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    full = client._request("GET", f"/v1/distillation/pairs/{pairs[0]['id']}")
    assert full["teacher_job_id"] == job_id and full["student_output"] and full["tags"] == ["front-door"]
