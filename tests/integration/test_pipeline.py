"""The job pipeline end to end: SDK → HTTP API → Postgres → Redis queues → Celery worker → providers."""

from __future__ import annotations

import os
import uuid

import pytest

from orchestrator.sdk import ConflictError, NotFoundError

from .conftest import wait_for_status


def test_command_job_runs_with_result_and_event_history(client) -> None:
    job = client.submit("command", {"command": ["sh", "-c", "echo out; echo err >&2"]}, labels={"t": "1"})
    assert job.status.value == "queued" and job.queue == "default"
    done = client.wait(job.id, timeout=30)
    assert done.status.value == "succeeded", done.error
    assert done.provider == "local" and done.result["stdout"] == "out\n" and done.result["stderr"] == "err\n"
    transitions = [(e.from_status, e.to_status) for e in done.events]
    assert transitions[0] == (None, "queued")
    assert ("queued", "placing") in transitions and ("placing", "running") in transitions
    assert transitions[-1] == ("running", "succeeded")
    placed = next(e for e in done.events if e.reason.startswith("placed:"))
    assert "local/local" in placed.reason  # the rationale names the winner


def test_inference_is_priced_per_token_and_high_priority_uses_its_queue(client) -> None:
    job = client.submit("inference", {"model": "llama-3-8b", "prompt": "hello there", "max_tokens": 16},
                        priority="high")
    assert job.queue == "high_priority"
    done = client.wait(job.id, timeout=30)
    assert done.status.value == "succeeded", done.error
    assert (done.provider, done.offer_id) == ("sandbox", "l4-serverless")
    tokens = done.result["usage"]["total_tokens"]
    assert done.cost == pytest.approx(tokens / 1000 * 0.0002)


def test_failed_host_fails_over_to_the_next_offer(client) -> None:
    job = client.submit("training", {"base_model": "m-8b", "dataset_uri": "s3://d", "max_steps": 5},
                        requirements={"gpu": ["H100"]})
    done = client.wait(job.id, timeout=30)
    assert done.status.value == "succeeded", done.error
    assert done.offer_id == "h100-de" and done.attempt == 2
    reasons = " | ".join(e.reason for e in done.events)
    assert "h100-spot-us was lost mid-job; retrying elsewhere" in reasons
    assert done.cost > 0  # both attempts rented time


def test_job_that_fits_nowhere_fails_with_reasons(client) -> None:
    job = client.submit("training", {"base_model": "m", "dataset_uri": "s3://d"},
                        requirements={"gpu": ["H100"], "max_price_per_hour": 1.0})
    done = client.wait(job.id, timeout=30)
    assert done.status.value == "failed"
    assert "no offer meets the job's constraints" in done.error and "> max $1.00/h" in done.error


def test_failing_command_reports_exit_code_and_stderr(client) -> None:
    job = client.submit("command", {"command": "echo boom >&2; exit 3"})
    done = client.wait(job.id, timeout=30)
    assert done.status.value == "failed" and done.attempt == 1
    assert done.error == "exit code 3: boom"


def test_batch_of_200_jobs_all_reach_a_terminal_state(client) -> None:
    bodies = []
    for i in range(200):
        if i % 3 == 0:
            bodies.append(client.job_body("command", {"command": ["true"]}, priority="low"))
        elif i % 3 == 1:
            bodies.append(client.job_body("inference", {"model": "m-8b", "prompt": f"q{i}", "max_tokens": 4}))
        else:
            bodies.append(client.job_body("transcription", {"audio_url": f"s3://a/{i}.wav", "duration_seconds": 1}))
    batch = client.submit_batch(bodies)
    assert batch.created == 200 and len(set(batch.job_ids)) == 200
    jobs = client.wait_all(batch.job_ids, timeout=240)
    assert {j.status.value for j in jobs} == {"succeeded"}
    summary = client.batch(batch.batch_id)
    assert summary.size == 200 and summary.counts == {"succeeded": 200} and summary.done


def test_cancel_running_job_stops_its_process_and_releases(client, stack) -> None:
    marker = stack.logs / f"cancel-{uuid.uuid4().hex}"
    job = client.submit("command", {"command": f"sleep 30; touch {marker}"})
    wait_for_status(client, job.id, "running")
    cancelled = client.cancel(job.id)
    assert cancelled.status.value == "cancelled"
    import time

    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Job
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with session_scope() as s:
            row = s.get_one(Job, job.id)
            if row.released_at is not None:
                break
        time.sleep(0.1)
    assert row.released_at is not None, "capacity of a cancelled job was never released"
    pid = row.run_handle["data"]["process"]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConflictError):
        client.cancel(job.id)
    assert client.get(job.id).status.value == "cancelled"


def test_idempotent_resubmission_returns_the_same_job(client) -> None:
    key = f"idem-{uuid.uuid4()}"
    first = client.submit("command", {"command": ["true"]}, idempotency_key=key)
    again = client.submit("command", {"command": ["true"]}, idempotency_key=key)
    assert again.id == first.id
    with pytest.raises(ConflictError, match="different request"):
        client.submit("command", {"command": ["false"]}, idempotency_key=key)
    page = client.list(limit=1000)
    assert sum(1 for j in page.jobs if j.idempotency_key == key) == 1


def test_tenants_never_see_each_others_jobs(client, other_tenant) -> None:
    job = client.submit("command", {"command": ["true"]})
    batch = client.submit_batch([client.job_body("command", {"command": ["true"]})])
    with pytest.raises(NotFoundError):
        other_tenant.get(job.id)
    with pytest.raises(NotFoundError):
        other_tenant.cancel(job.id)
    with pytest.raises(NotFoundError):
        other_tenant.batch(batch.batch_id)
    assert job.id not in {j.id for j in other_tenant.list(limit=1000).jobs}
    assert other_tenant.list(ids=[job.id]).jobs == []


def test_list_filters_and_paginates(client) -> None:
    batch = client.submit_batch([client.job_body("command", {"command": ["true"]}) for _ in range(7)])
    client.wait_all(batch.job_ids, timeout=60)
    seen, cursor = [], None
    while True:
        page = client.list(batch_id=batch.batch_id, limit=3, cursor=cursor)
        seen += [j.id for j in page.jobs]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert sorted(seen) == sorted(batch.job_ids) and len(seen) == 7
    assert all(j.kind == "command" for j in client.list(kind="command", limit=20).jobs)
    assert all(j.status.value == "succeeded" for j in client.list(status="succeeded", limit=20).jobs)
