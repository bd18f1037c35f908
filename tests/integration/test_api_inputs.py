"""Bad input gets a clear 4xx naming the field, and writes nothing."""

from __future__ import annotations

import httpx
import pytest

from .conftest import KEY_A, count_jobs


@pytest.fixture()
def http(stack):  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {KEY_A}"}) as c:
        yield c


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"spec": {"command": ["true"]}}, "kind", "Unable to extract tag"),
        ({"kind": "inference", "spec": {}}, "spec.model", "Field required"),
        ({"kind": "inference", "spec": {"model": "m"}}, "spec", "either 'messages' or 'prompt'"),
        ({"kind": "command", "spec": {"command": 42}}, "spec.command", "valid"),
        ({"kind": "teleport", "spec": {}}, "kind", "does not match"),
        ({"kind": "command", "spec": {"command": ["true"]}, "priority": "urgent"}, "priority", "'high', 'normal' or 'low'"),
        ({"kind": "command", "spec": {"command": ["true"]}, "requirements": {"gpu_count": "two"}},
         "requirements.gpu_count", "valid integer"),
        ({"kind": "command", "spec": {"command": ["true"]}, "max_attempts": 0}, "max_attempts", "greater than or equal"),
        ({"kind": "command", "spec": {"command": ["true"]}, "surprise": 1}, "surprise", "Extra inputs"),
    ],
)
def test_invalid_job_is_422_with_field_and_reason(http, body, field, reason) -> None:
    before = count_jobs()
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(d["field"] == field and reason in d["reason"] for d in detail), detail
    assert count_jobs() == before


def test_invalid_job_in_a_batch_rejects_the_whole_batch(http) -> None:
    before = count_jobs()
    jobs = [{"kind": "command", "spec": {"command": ["true"]}}] * 3 + [{"kind": "inference", "spec": {"prompt": "x"}}]
    response = http.post("/v1/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "jobs.3.spec.model"
    assert count_jobs() == before


def test_oversized_payload_is_413_and_writes_nothing(http) -> None:
    before = count_jobs()
    response = http.post("/v1/jobs", json={"kind": "command", "spec": {"command": ["echo", "x" * 2_000_000]}})
    assert response.status_code == 413 and "exceeds" in response.json()["error"]
    chunked = http.post("/v1/jobs", content=iter([b'{"kind": "command", "spec": {"command": ["', b"x" * 1_100_000, b'"]}}']),
                        headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert count_jobs() == before


def test_malformed_json_and_wrong_types(http) -> None:
    assert http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert http.post("/v1/jobs", json=[1, 2]).status_code == 422
    assert http.get("/v1/jobs/not-a-uuid").status_code == 422
    assert http.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_unknown_job_is_404_and_auth_is_required(stack, http) -> None:
    missing = http.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    anonymous = httpx.post(f"{stack.url}/v1/jobs", json={"kind": "command", "spec": {"command": ["true"]}})
    assert anonymous.status_code == 401
    wrong = httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": "Bearer gf_wrong"})
    assert wrong.status_code == 401 and "invalid" in wrong.json()["error"]
    assert httpx.get(f"{stack.url}/health").status_code == 200  # health needs no key


def test_health_metrics_and_openapi(stack, client, http) -> None:
    done = client.wait(client.submit("command", {"command": ["true"]}).id, timeout=30)
    assert done.status.value == "succeeded"
    health = httpx.get(f"{stack.url}/health").json()
    assert health == {"status": "ok", "database": "ok", "broker": "ok"}
    assert httpx.get(f"{stack.url}/metrics").status_code == 401
    metrics = http.get("/metrics").text
    assert 'gpufleet_jobs{kind="command",queue="default",status="succeeded"}' in metrics
    assert "gpufleet_queue_depth{queue=\"default\"}" in metrics
    assert 'gpufleet_job_duration_seconds_count{kind="command"}' in metrics
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    assert {"submit_job", "submit_batch", "get_job", "list_jobs", "cancel_job", "get_batch"} <= {
        op["operationId"] for path in spec["paths"].values() for op in path.values()}


def test_api_keys_are_stored_hashed() -> None:
    from sqlalchemy import select

    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import ApiKey

    with session_scope() as s:
        stored = [k.key_hash for k in s.scalars(select(ApiKey))]
    assert stored and KEY_A not in stored and all(len(h) == 64 for h in stored)


def test_runtime_limits_are_422_with_the_field(http, stack) -> None:
    before = count_jobs()
    bad_cursor = http.get("/v1/jobs", params={"cursor": "not-a-cursor"})
    assert bad_cursor.status_code == 422 and bad_cursor.json()["detail"][0]["field"] == "cursor"
    empty = http.post("/v1/jobs/batch", json={"jobs": []})
    assert empty.status_code == 422 and empty.json()["detail"][0]["field"] == "jobs"
    assert count_jobs() == before
