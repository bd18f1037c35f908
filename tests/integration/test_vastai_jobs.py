"""Jobs on Vast.ai, end to end: our API, Postgres, Redis and Celery worker processes, the real
`vastai` SDK, and the emulator of Vast's REST API (instances really run their start command).

Every test ends with the same question users judge us on: is anything still rented?
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from tests.emulators.vastai import VastEmulator

from .conftest import KEY_A, Stack, isolated_stack, wait_for_status

VAST_KEY = "vast-secret-key-" + "z" * 20


def _providers_yaml(url: str) -> str:
    return f"""
providers:
  vastai:
    server_url: "{url}"
    api_key_env: GPUFLEET_TEST_VAST_KEY
    provisioning_timeout: 3
    start_timeout: 4
    min_reliability: 0.9
    verified_only: false
    retry: 3
    max_retry_wait: 1
  local:
    slots: 8
"""


@pytest.fixture(scope="module")
def vast() -> Iterator[VastEmulator]:
    with VastEmulator(api_key=VAST_KEY, boot_delay=0.3) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def market(vast, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    with isolated_stack(tmp_path_factory.mktemp("vast"), 11, _providers_yaml(vast.url),
                        {"GPUFLEET_TEST_VAST_KEY": VAST_KEY}) as running:
        yield running


@pytest.fixture()
def client(market: Stack):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    with Client(market.url, KEY_A) as c:
        yield c


def submit(client, command: str, gpu: str = "RTX 4090", **options):  # type: ignore[no-untyped-def]
    requirements = {"gpu": [gpu], "providers": ["vastai"], **options.pop("requirements", {})}
    return client.submit("command", {"command": command}, requirements=requirements, **options)


def reservations_of(job_id: uuid.UUID) -> list:  # type: ignore[type-arg]
    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Reservation

    with session_scope() as s:
        return list(s.scalars(select(Reservation).where(Reservation.job_id == job_id).order_by(Reservation.created_at)))


def assert_nothing_rented(vast: VastEmulator, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while vast.alive():
        assert time.monotonic() < deadline, f"instances still rented: {vast.alive()}"
        time.sleep(0.1)


def wait_released(job_id: uuid.UUID, timeout: float = 20.0) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        rows = reservations_of(job_id)
        if rows and all(r.state in ("released", "failed") for r in rows):
            return rows
        assert time.monotonic() < deadline, f"reservations not settled: {[(r.label, r.state) for r in rows]}"
        time.sleep(0.1)


def test_job_runs_on_vast_reports_its_result_and_the_instance_is_destroyed(client, vast) -> None:
    job = submit(client, "echo trained; echo 'GPUFLEET_RESULT {\"loss\": 0.12}'")
    done = client.wait(job.id, timeout=60)
    assert done.status.value == "succeeded", done.error
    assert (done.provider, done.offer_id) == ("vastai", "1001")  # the cheapest 4090
    assert done.result["loss"] == 0.12 and done.result["stdout"].startswith("trained")
    assert_nothing_rented(vast)
    (row,) = wait_released(job.id)
    assert row.state == "released" and row.external_id and row.label == f"gpufleet-{row.id}"
    assert row.price_per_hour == pytest.approx(0.40) and row.cost > 0
    # The job's cost is what the reservation settled; the emulator billed about as much.
    assert client.get(job.id).cost == pytest.approx(row.cost)
    billed = vast.billing()["instances"][int(row.external_id)]
    assert row.cost == pytest.approx(billed, abs=0.0005)
    instance = next(i for i in vast.instances() if str(i["id"]) == row.external_id)
    assert instance["label"] == row.label and instance["env"]["GPUFLEET_JOB_ID"] == str(job.id)
    # The job-scoped token reached the instance, but no record of ours holds it.
    token = instance["env"]["GPUFLEET_JOB_TOKEN"]
    assert token not in str(client.get(job.id).model_dump()) and VAST_KEY not in str(instance["env"])


def test_offer_taken_between_search_and_create_moves_to_the_next_offer(client, vast) -> None:
    vast.lag(1.5, count=1, paths=["/api/v0/bundles"])
    searched = len([r for r in vast.request_log if r["path"].startswith("/api/v0/bundles")])
    job = submit(client, "echo ok", gpu="A100")
    deadline = time.monotonic() + 20
    while len([r for r in vast.request_log if r["path"].startswith("/api/v0/bundles")]) == searched:
        assert time.monotonic() < deadline, "the search never came"
        time.sleep(0.02)
    vast.take(1004)  # the cheapest A100, while the search's answer (listing it) is on the way
    try:
        done = client.wait(job.id, timeout=60)
    finally:
        vast.untake(1004)
    assert done.status.value == "succeeded", done.error
    # A taken offer is not a failure of the job: the same attempt moves to the next offer.
    assert done.offer_id == "1003" and done.attempt == 1
    assert any("vastai/1004 is busy" in e.reason and ("taken" in e.reason.lower() or "no longer" in e.reason.lower())
               for e in done.events), [e.reason for e in done.events]
    assert_nothing_rented(vast)
    first, second = wait_released(job.id)
    assert first.state == "failed" and first.cost == 0 and second.state == "released"


def test_instance_stuck_provisioning_is_destroyed_and_the_job_fails_over(client, vast) -> None:
    vast.stick(1003)
    job = submit(client, "echo ok", gpu="A100", requirements={"regions": ["EU"]}, max_attempts=2)
    done = client.wait(job.id, timeout=60)
    assert done.status.value == "failed"  # the only EU A100 hangs; the US one is not allowed
    assert any("not running after 3s" in e.reason for e in done.events) and "after trying vastai/1003" in done.error
    assert_nothing_rented(vast)
    (row,) = wait_released(job.id)
    assert row.state == "released" and row.cost > 0  # the hung instance billed while loading; we paid and recorded it


def test_api_errors_and_an_outage_are_ridden_out(client, vast) -> None:
    vast.fail(503, count=2, retry_after=0.2)
    vast.fail(429, count=2, retry_after=0.2)
    job = submit(client, "sleep 2; echo ok")
    wait_for_status(client, job.id, "running", timeout=30)
    vast.down(seconds=2)  # polls fail while it is down; the run goes on
    done = client.wait(job.id, timeout=60)
    assert done.status.value == "succeeded", done.error
    assert_nothing_rented(vast)


def test_failing_command_fails_the_job_and_destroys_the_instance(client, vast) -> None:
    done = client.wait(submit(client, "echo broken >&2; exit 3").id, timeout=60)
    assert done.status.value == "failed" and done.attempt == 1
    assert done.error == "exit code 3: broken"
    assert_nothing_rented(vast)


def test_cancel_while_provisioning_and_while_running_destroys_the_instance(client, vast) -> None:
    vast.stick(1005)
    booting = submit(client, "echo never", gpu="H100")
    wait_for_status(client, booting.id, "running", timeout=30)
    assert client.cancel(booting.id).status.value == "cancelled"
    assert_nothing_rented(vast)
    (row,) = wait_released(booting.id)
    assert row.state == "released" and row.offer_id == "1005"
    running = submit(client, "sleep 60")
    deadline = time.monotonic() + 30
    while not any(i["actual_status"] == "running" for i in vast.instances() if not i["destroyed"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.cancel(running.id)
    assert_nothing_rented(vast)
    assert wait_released(running.id)[0].cost > 0


def test_preempted_instance_fails_over_to_another_offer(client, vast) -> None:
    job = submit(client, "sleep 3; echo done", gpu="A100", max_attempts=3)
    deadline = time.monotonic() + 30
    while not [i for i in vast.instances() if not i["destroyed"] and i["label"].startswith("gpufleet-")]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first = next(i for i in vast.instances() if not i["destroyed"])
    vast.preempt(first["id"])
    done = client.wait(job.id, timeout=60)
    assert done.status.value == "succeeded", done.error
    assert done.attempt == 2 and done.offer_id != str(first["offer_id"])
    assert any("disappeared" in e.reason for e in done.events)
    assert_nothing_rented(vast)


def _latest_checkpoint_of(client, job_id, attempt: int, timeout: float = 30.0) -> int:  # type: ignore[no-untyped-def]
    """Wait until the run of ``attempt`` has reported a checkpoint (through the instance wrapper)."""
    deadline = time.monotonic() + timeout
    while True:
        mine = [c["step"] for c in client.checkpoints(job_id)["checkpoints"] if c["attempt"] == attempt]
        if mine:
            return max(mine)
        assert time.monotonic() < deadline, f"attempt {attempt} reported no checkpoint"
        time.sleep(0.05)


def test_training_preempted_twice_resumes_from_its_latest_checkpoint(client, vast, tmp_path) -> None:  # type: ignore[no-untyped-def]
    trainer = os.path.join(os.path.dirname(__file__), "..", "..", "providers", "sandbox", "trainer.py")
    spec = {"base_model": "llama-3-8b", "dataset_uri": "file:///data/train.jsonl", "checkpoint_uri": str(tmp_path),
            "command": f"python3 {os.path.abspath(trainer)} --steps 30 --step-seconds 0.15 --every 2"}
    job = client.submit("training", spec, requirements={"gpu": ["RTX 4090", "A100"], "providers": ["vastai"]})
    for attempt in (1, 2):
        _latest_checkpoint_of(client, job.id, attempt)
        instance = reservations_of(job.id)[-1].external_id
        vast.preempt(int(instance))  # the host is lost: the run's process dies with it
    done = client.wait(job.id, timeout=90)
    assert done.status.value == "succeeded", done.error
    assert (done.attempt, done.restarts, done.result["steps"]) == (3, 2, 30) and done.lost_seconds > 0
    found = client.checkpoints(job.id)["checkpoints"]
    last = {a: max(c["step"] for c in found if c["attempt"] == a) for a in (1, 2)}
    # The second run started from the first's latest checkpoint, the third from the second's.
    assert done.result["resumed_from_step"] == last[2] and done.result["steps_this_run"] == 30 - last[2]
    text = "".join(c["text"] for c in client.logs(job.id)["chunks"])
    assert f"resuming from step {last[1]}" in text and f"resuming from step {last[2]}" in text
    assert len({r.offer_id for r in reservations_of(job.id)}) == 3  # each lost host's offer was avoided
    assert_nothing_rented(vast)


def test_budget_cut_mid_run_stops_the_job_and_destroys_the_instance(client, vast) -> None:
    job = submit(client, "sleep 60")
    wait_for_status(client, job.id, "running", timeout=30)
    (row,) = reservations_of(job.id)
    assert row.hold_amount > 0 and len(row.held_on) == 1  # the tenant budget below holds it
    client.set_budget(monthly_limit=0.0001)  # the operator's cut: below what is already committed
    try:
        done = client.wait(job.id, timeout=60)
    finally:
        client.set_budget(monthly_limit=None)
    assert done.status.value == "failed" and "budget exhausted" in done.error
    assert_nothing_rented(vast)


@pytest.fixture(autouse=True)
def tenant_budget(client, vast) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """A healthy market and a generous tenant budget, so every hold is recorded against it."""
    vast.reset()
    client.set_budget(monthly_limit=1000.0)
    yield
    client.set_budget(monthly_limit=1000.0)


def test_worker_killed_after_create_leaves_nothing_running(client, vast, market: Stack) -> None:
    vast.lag(4.0, count=1, paths=["/api/v0/asks"])  # the create happens; its answer is late
    job = submit(client, "sleep 1; echo ok", gpu="A100", max_attempts=3)
    deadline = time.monotonic() + 30
    while not [i for i in vast.instances() if not i["destroyed"]]:
        assert time.monotonic() < deadline, "the instance was never created"
        time.sleep(0.05)
    orphan = next(i for i in vast.instances() if not i["destroyed"])
    market.kill_worker(signal.SIGKILL)  # after the instance exists, before we learn its id
    market.start_worker()
    done = client.wait(job.id, timeout=90)
    assert done.status.value == "succeeded", done.error
    assert done.attempt >= 2 and done.offer_id != str(orphan["offer_id"])
    assert_nothing_rented(vast, timeout=30)
    assert orphan["id"] in vast.destroyed()
    # Its rented time is charged — by the release that found it by label, or by the reaper.
    deadline = time.monotonic() + 20
    while not next(r for r in wait_released(job.id, timeout=30) if r.label == orphan["label"]).cost:
        rows = [(r.label, r.state, r.cost, r.error, r.external_id, r.lease) for r in reservations_of(job.id)]
        events = [(e.actor, e.reason) for e in client.get(job.id).events]
        assert time.monotonic() < deadline, f"the orphan's rented time was never charged: {orphan} {rows} {events}"
        time.sleep(0.2)
    assert os.environ["GPUFLEET_DATABASE_URL"]  # the test process reads the stack's database
