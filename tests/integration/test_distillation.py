"""The distillation loop end to end on the sandbox: capture pairs (query, flagged inference, a
distillation job), export them, train a student with the stand-in trainer, register and evaluate
it, promote it, and shift a teacher's traffic to it — then roll back."""

from __future__ import annotations

import hashlib
import json
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from .conftest import KEY_A, Stack, isolated_stack

PROVIDERS = """
providers:
  sandbox:
    time_scale: 0.0
    offers:
      - {offer_id: l4-tokens, gpu: L4, gpu_memory_gb: 24, region: us-east, price_per_hour: 0.5,
         price_per_1k_tokens: 0.0002, capacity: 200, kinds: [inference, transcription]}
      - {offer_id: a100-us, gpu: A100, gpu_memory_gb: 80, region: us-east, price_per_hour: 1.2, capacity: 20}
  local:
    slots: 8
"""
TEACHER, STUDENT = "teacher-70b", "student-8b"


@pytest.fixture(scope="module")
def distill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A low bar: sandbox teacher and student answer differently, and every pair should count here.
    env = {"GPUFLEET_DISTILL_QUALITY_THRESHOLD": "0.0", "GPUFLEET_DISTILL_AUTO_TRAIN_PAIRS": "10",
           "GPUFLEET_DISTILL_JUDGE_MODEL": "judge-sandbox"}
    with isolated_stack(tmp_path_factory.mktemp("distill"), 8, PROVIDERS, env) as running:
        yield running


@pytest.fixture()
def client(distill: Stack):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    with Client(distill.url, KEY_A) as c:
        yield c


def _api(distill: Stack, method: str, path: str, **kwargs):  # type: ignore[no-untyped-def]
    response = httpx.request(method, f"{distill.url}{path}", headers={"Authorization": f"Bearer {KEY_A}"},
                             timeout=120, **kwargs)
    assert response.status_code < 400, response.text
    return response


def _wait_pairs(distill: Stack, count: int, **params) -> list[dict]:  # type: ignore[type-arg,no-untyped-def]
    deadline = time.monotonic() + 60
    while True:
        rows = _api(distill, "GET", "/v1/distillation/pairs", params={"limit": 1000, **params}).json()
        done = [p for p in rows if p["status"] != "pending"]
        if len(done) >= count:
            return done
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def test_query_answers_with_the_teacher_and_completes_the_pair(distill: Stack) -> None:
    out = _api(distill, "POST", "/v1/distillation/query", json={
        "teacher_model": TEACHER, "student_model": STUDENT, "prompt": "why is the sky blue", "tags": ["physics"]}).json()
    assert out["status"] == "succeeded" and out["text"] and out["provider"] == "sandbox"
    pair_id = out["pair_id"]
    deadline = time.monotonic() + 30
    while (pair := _api(distill, "GET", f"/v1/distillation/pairs/{pair_id}").json())["status"] == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert pair["status"] == "complete" and pair["teacher_output"] == out["text"] and pair["student_output"]
    # The judge model graded the teacher's answer (the sandbox judge answers 6-10); agreement is kept too.
    assert 0 <= pair["agreement"] <= 1 and pair["score_method"] == "judge" and 0.6 <= pair["score"] <= 1.0
    assert pair["accepted"] is True
    assert pair["teacher_cost"] > 0 and pair["student_cost"] > 0 and pair["tags"] == ["physics"]


def test_flagged_inference_and_distillation_jobs_capture_pairs(client, distill: Stack) -> None:
    job = client.submit("inference", {"model": TEACHER, "prompt": "summarise the plot of hamlet"},
                        distill={"student_model": STUDENT})
    done = client.wait(job.id, timeout=30)
    assert done.status.value == "succeeded"
    batch = client.wait(client.submit("distillation", {"teacher_model": TEACHER, "student_model": STUDENT,
                                                       "prompts": [f"question {i}" for i in range(12)]}).id, timeout=60)
    assert batch.status.value == "succeeded", batch.error
    assert batch.result["pairs"] == 12 and batch.result["complete"] == 12 and batch.result["accepted"] == 12
    assert batch.cost == pytest.approx(batch.result["teacher_cost"] + batch.result["student_cost"])
    children = _api(distill, "GET", "/v1/distillation/pairs", params={"parent_job_id": str(batch.id)}).json()
    assert len(children) == 12 and {p["source"] for p in children} == {"job"}
    deadline = time.monotonic() + 30
    while not [p for p in _wait_pairs(distill, 1, teacher_model=TEACHER) if p["source"] == "inference"]:
        assert time.monotonic() < deadline, "the flagged request's pair never completed"
        time.sleep(0.2)
    pair = next(p for p in _api(distill, "GET", "/v1/distillation/pairs").json() if p["source"] == "inference")
    assert _api(distill, "GET", f"/v1/distillation/pairs/{pair['id']}").json()["teacher_job_id"] == str(job.id)
    # Ten accepted pairs for the same teacher and student: the student is trained again, automatically.
    while not (auto := [j for j in client.list(kind="training").jobs if j.labels.get("distill_student") == STUDENT]):
        assert time.monotonic() < deadline, "no automatic training job"
        time.sleep(0.2)
    assert len(auto) == 1 and client.wait(auto[0].id, timeout=60).status.value == "succeeded"


def test_export_streams_jsonl_with_a_stable_split_and_manifest(distill: Stack) -> None:
    _wait_pairs(distill, 14, teacher_model=TEACHER)
    params = {"teacher_model": TEACHER, "test_fraction": 0.25}
    train = _api(distill, "GET", "/v1/distillation/export", params={**params, "split": "train"}).content
    test = _api(distill, "GET", "/v1/distillation/export", params={**params, "split": "test"}).content
    lines = [json.loads(line) for line in train.splitlines()]
    assert lines and all(row["messages"][-1]["role"] == "assistant" for row in lines)
    manifest = _api(distill, "GET", "/v1/distillation/export/manifest", params=params).json()
    assert manifest["counts"] == {"train": len(lines), "test": len(test.splitlines())}
    assert manifest["sha256"]["train"] == hashlib.sha256(train).hexdigest()
    again = _api(distill, "GET", "/v1/distillation/export", params={**params, "split": "train"}).content
    assert again == train  # deterministic
    physics = _api(distill, "GET", "/v1/distillation/export", params={"tags": ["physics"], "split": "all"}).content
    assert len(physics.splitlines()) == 1


def test_train_register_evaluate_promote_shift_and_roll_back(client, distill: Stack) -> None:
    _api(distill, "PUT", f"/v1/distillation/routes/{TEACHER}",
         json={"student_name": "support-bot", "share": 0.0, "step": 0.5, "max_share": 1.0, "min_agreement": 0.2,
               "shadow_rate": 0.0})
    trained = _api(distill, "POST", "/v1/distillation/train", json={
        "student_name": "support-bot", "teacher_model": TEACHER, "validation_split": 0.25,
        "requirements": {"gpu": ["A100"]}}).json()
    assert trained["dataset"]["counts"]["train"] > 0
    job = client.wait(trained["job_id"], timeout=60)
    assert job.status.value == "succeeded", job.error
    assert job.provider == "sandbox" and job.result["examples"] == trained["dataset"]["counts"]["train"]
    deadline = time.monotonic() + 90
    while True:  # registered, evaluated on the held-out pairs, promoted, and given traffic
        versions = _api(distill, "GET", "/v1/models", params={"name": "support-bot"}).json()
        if versions and versions[-1]["metrics"].get("agreement") is not None:
            break
        assert time.monotonic() < deadline, versions
        time.sleep(0.5)
    v1 = versions[-1]
    assert v1["version"] == 1 and v1["served_model"].startswith("standin:")
    # The held-out pairs are a random few (the split hashes random pair ids): agreement on them varies
    # from run to run, about 0.25-0.5 for this stand-in; the route's bar is set below that.
    assert v1["metrics"]["examples"] == trained["dataset"]["counts"]["test"] and v1["metrics"]["agreement"] >= 0.2
    assert 0.6 <= v1["metrics"]["judge_score"] <= 1.0 and v1["metrics"]["cost_per_1k_tokens"] is not None
    assert v1["stage"] == "production"
    route = next(r for r in _api(distill, "GET", "/v1/distillation/routes").json() if r["teacher_model"] == TEACHER)
    assert route["share"] == 0.5

    # Half of the teacher's traffic now goes to the student, which answers from what it learned.
    served = [client.wait(client.submit("inference", {"model": TEACHER, "prompt": f"question {i}"}).id, timeout=30)
              for i in range(12)]
    to_student = [j for j in served if j.labels.get("route", "").startswith("student support-bot v1")]
    assert 0 < len(to_student) < 12 and all(j.spec["model"].startswith("standin:") for j in to_student)

    # A second version, then a rollback to the first.
    v2 = _api(distill, "POST", "/v1/models/support-bot/versions", json={"served_model": v1["served_model"]}).json()
    assert v2["version"] == 2 and v2["stage"] == "staging"
    assert _api(distill, "POST", "/v1/models/support-bot/versions/2/promote").json()["stage"] == "production"
    back = _api(distill, "POST", "/v1/models/support-bot/rollback").json()
    assert back["version"] == 1 and back["stage"] == "production"
    assert _api(distill, "GET", "/v1/models/support-bot/production").json()["version"] == 1


def test_bad_input_is_refused_cleanly(distill: Stack) -> None:
    response = httpx.post(f"{distill.url}/v1/distillation/train", headers={"Authorization": f"Bearer {KEY_A}"},
                          json={"student_name": "nobody", "teacher_model": "no-such-teacher"}, timeout=30)
    assert response.status_code == 422 and "nothing to train on" in response.text
    response = httpx.post(f"{distill.url}/v1/models/{uuid.uuid4()}/rollback", headers={"Authorization": f"Bearer {KEY_A}"})
    assert response.status_code == 409


def test_shadow_traffic_measures_the_student_and_a_regression_sends_requests_back(client, distill: Stack) -> None:
    from orchestrator.distillation import maintenance

    assert _api(distill, "GET", "/v1/models/support-bot/production").json()["version"] == 1
    _api(distill, "PUT", f"/v1/distillation/routes/{TEACHER}",
         json={"student_name": "support-bot", "share": 1.0, "shadow_rate": 1.0, "min_agreement": 0.99})
    served = [client.wait(client.submit("inference", {"model": TEACHER, "prompt": f"novel question {i}"}).id, timeout=30)
              for i in range(6)]
    assert all(j.spec["model"].startswith("standin:") for j in served)  # every request went to the student
    deadline = time.monotonic() + 30
    while len(shadows := [p for p in _wait_pairs(distill, 1) if p["source"] == "shadow"]) < 6:
        assert time.monotonic() < deadline, shadows
        time.sleep(0.2)
    assert all(p["agreement"] is not None and p["teacher_cost"] > 0 for p in shadows)
    assert maintenance.maintain()["routes_dropped"] == 1  # shadow agreement is far below 0.99
    route = next(r for r in _api(distill, "GET", "/v1/distillation/routes").json() if r["teacher_model"] == TEACHER)
    assert route["share"] == 0.0
    back = client.wait(client.submit("inference", {"model": TEACHER, "prompt": "one more"}).id, timeout=30)
    assert back.spec["model"] == TEACHER and "route" not in back.labels


def test_cli_exports_lists_pairs_and_models(distill: Stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    env = {**os.environ, "GPUFLEET_API_URL": distill.url, "GPUFLEET_API_KEY": KEY_A}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    target = tmp_path / "train.jsonl"
    out = cli("distill", "export", "--teacher", TEACHER, "--out", str(target))
    assert out.returncode == 0, out.stderr
    lines = target.read_text().splitlines()
    assert lines and f"wrote {len(lines)} examples" in out.stdout
    assert all(json.loads(line)["messages"][-1]["role"] == "assistant" for line in lines)
    listed = cli("distill", "pairs", "--limit", "5")
    assert listed.returncode == 0 and TEACHER in listed.stdout
    models = cli("models", "--name", "support-bot")
    assert models.returncode == 0 and "support-bot" in models.stdout and "production" in models.stdout
    missing = cli("models", "rollback", "no-such-model")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "no-such-model" in missing.stderr


def test_cancelling_a_pairs_jobs_settles_the_pair_at_once(client, distill: Stack) -> None:
    distill.kill_worker(signal.SIGTERM)  # nothing runs: both sides stay queued until we cancel them
    try:
        job = client.submit("inference", {"model": TEACHER, "prompt": "a question nobody answers"},
                            distill={"student_model": STUDENT})
        rows = _api(distill, "GET", "/v1/distillation/pairs", params={"status": "pending", "limit": 1000}).json()
        pair = next(p for p in (_api(distill, "GET", f"/v1/distillation/pairs/{r['id']}").json() for r in rows)
                    if p["teacher_job_id"] == str(job.id))
        client.cancel(pair["student_job_id"])
        assert _api(distill, "GET", f"/v1/distillation/pairs/{pair['id']}").json()["status"] == "pending"
        client.cancel(job.id)
        settled = _api(distill, "GET", f"/v1/distillation/pairs/{pair['id']}").json()
        assert settled["status"] == "failed" and settled["accepted"] is False
    finally:
        distill.start_worker()
