"""The job state machine: which moves are allowed, and that every move is one guarded
UPDATE plus exactly one event — so a replayed or late message changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.db.engine import make_engine
from orchestrator.db.migrate import upgrade
from orchestrator.db.models import Job, JobEvent, Tenant
from orchestrator.domain import TERMINAL, JobStatus, job_create_adapter
from orchestrator.errors import InvalidTransition
from orchestrator.services import jobs, keys
from orchestrator.services.transitions import ALLOWED, check_allowed, transition
from orchestrator.settings import load_settings

S = JobStatus


# --- the table -----------------------------------------------------------------------------


def test_every_status_has_an_entry() -> None:
    assert set(ALLOWED) == set(JobStatus)


@pytest.mark.parametrize("status", sorted(TERMINAL, key=lambda s: s.value))
def test_terminal_states_have_no_exits(status: JobStatus) -> None:
    assert status.terminal
    assert ALLOWED[status] == frozenset()
    for to in JobStatus:
        with pytest.raises(InvalidTransition):
            check_allowed(status, to)


def test_non_terminal_states_can_fail_and_be_cancelled() -> None:
    for status in (S.queued, S.placing, S.running):
        assert not status.terminal
        assert {S.failed, S.cancelled} <= ALLOWED[status]


def test_queued_cannot_jump_to_running() -> None:
    assert S.running not in ALLOWED[S.queued]
    with pytest.raises(InvalidTransition, match="queued to running"):
        check_allowed(S.queued, S.running)


def test_expected_path_is_allowed() -> None:
    for current, to in [(S.queued, S.placing), (S.placing, S.running), (S.running, S.succeeded),
                        (S.placing, S.queued), (S.running, S.queued)]:
        check_allowed(current, to)  # does not raise


# --- transition() against a real database ----------------------------------------------------


@pytest.fixture
def session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Session]:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'test.db'}"
    upgrade(url)
    engine = make_engine(url)
    with Session(engine, expire_on_commit=False) as s:
        yield s
    engine.dispose()


@pytest.fixture
def tenant_id(session: Session) -> uuid.UUID:
    tenant = Tenant(name="acme")
    session.add(tenant)
    session.commit()
    return tenant.id


def _submit(session: Session, tenant_id: uuid.UUID, tmp_path: Path) -> Job:
    settings = load_settings(data_dir=tmp_path)
    req = job_create_adapter.validate_python({"kind": "command", "spec": {"command": "echo hi"}})
    job, created = jobs.submit(session, tenant_id, req, settings)
    session.commit()
    assert created
    return job


def _events(session: Session, job_id: uuid.UUID) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def _status(session: Session, job_id: uuid.UUID) -> tuple[str, int]:
    row = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one()
    return row.status, row.attempt


def test_submit_writes_a_queued_job_and_its_first_event(session: Session, tenant_id: uuid.UUID,
                                                         tmp_path: Path) -> None:
    job = _submit(session, tenant_id, tmp_path)
    assert _status(session, job.id) == ("queued", 1)
    events = _events(session, job.id)
    assert [(e.from_status, e.to_status) for e in events] == [(None, "queued")]


def test_guarded_update_succeeds_once_and_writes_one_event(session: Session, tenant_id: uuid.UUID,
                                                           tmp_path: Path) -> None:
    job = _submit(session, tenant_id, tmp_path)
    before = len(_events(session, job.id))

    moved = transition(session, job.id, expected=S.queued, attempt=1, to=S.placing, actor="dispatch",
                       reason="placing", data={"k": 1})
    session.commit()

    assert moved is True
    assert _status(session, job.id) == ("placing", 1)
    events = _events(session, job.id)
    assert len(events) == before + 1
    last = events[-1]
    assert (last.from_status, last.to_status, last.attempt, last.actor, last.reason, last.data) == (
        "queued", "placing", 1, "dispatch", "placing", {"k": 1})


def test_replayed_message_changes_nothing(session: Session, tenant_id: uuid.UUID, tmp_path: Path) -> None:
    job = _submit(session, tenant_id, tmp_path)
    assert transition(session, job.id, expected=S.queued, attempt=1, to=S.placing, actor="dispatch")
    session.commit()
    count = len(_events(session, job.id))
    updated_at = session.scalar(select(Job.updated_at).where(Job.id == job.id))

    again = transition(session, job.id, expected=S.queued, attempt=1, to=S.placing, actor="dispatch")
    session.commit()

    assert again is False
    assert _status(session, job.id) == ("placing", 1)
    assert len(_events(session, job.id)) == count
    assert session.scalar(select(Job.updated_at).where(Job.id == job.id)) == updated_at


def test_wrong_attempt_is_refused(session: Session, tenant_id: uuid.UUID, tmp_path: Path) -> None:
    job = _submit(session, tenant_id, tmp_path)
    count = len(_events(session, job.id))

    assert transition(session, job.id, expected=S.queued, attempt=2, to=S.placing, actor="dispatch") is False
    assert transition(session, job.id, expected=S.queued, attempt=0, to=S.placing, actor="dispatch") is False
    session.commit()

    assert _status(session, job.id) == ("queued", 1)
    assert len(_events(session, job.id)) == count


def test_wrong_expected_status_is_refused(session: Session, tenant_id: uuid.UUID, tmp_path: Path) -> None:
    job = _submit(session, tenant_id, tmp_path)
    count = len(_events(session, job.id))
    assert transition(session, job.id, expected=S.placing, attempt=1, to=S.running, actor="worker") is False
    session.commit()
    assert _status(session, job.id) == ("queued", 1)
    assert len(_events(session, job.id)) == count


def test_unknown_job_is_refused(session: Session, tenant_id: uuid.UUID) -> None:
    assert transition(session, uuid.uuid4(), expected=S.queued, attempt=1, to=S.placing, actor="x") is False
    session.commit()
    assert session.scalar(select(func.count()).select_from(JobEvent)) == 0


def test_disallowed_transition_raises_before_touching_the_row(session: Session, tenant_id: uuid.UUID,
                                                               tmp_path: Path) -> None:
    job = _submit(session, tenant_id, tmp_path)
    count = len(_events(session, job.id))
    with pytest.raises(InvalidTransition):
        transition(session, job.id, expected=S.queued, attempt=1, to=S.running, actor="worker")
    session.rollback()
    assert _status(session, job.id) == ("queued", 1)
    assert len(_events(session, job.id)) == count


@pytest.mark.parametrize("final", [S.succeeded, S.failed, S.cancelled])
def test_terminal_transitions_set_finished_at(session: Session, tenant_id: uuid.UUID, tmp_path: Path,
                                              final: JobStatus) -> None:
    job = _submit(session, tenant_id, tmp_path)
    assert transition(session, job.id, expected=S.queued, attempt=1, to=S.placing, actor="d")
    assert transition(session, job.id, expected=S.placing, attempt=1, to=S.running, actor="d")
    session.commit()
    assert session.scalar(select(Job.finished_at).where(Job.id == job.id)) is None

    assert transition(session, job.id, expected=S.running, attempt=1, to=final, actor="w")
    session.commit()

    assert _status(session, job.id) == (final.value, 1)
    assert session.scalar(select(Job.finished_at).where(Job.id == job.id)) is not None


def test_non_terminal_transition_leaves_finished_at_empty(session: Session, tenant_id: uuid.UUID,
                                                          tmp_path: Path) -> None:
    job = _submit(session, tenant_id, tmp_path)
    assert transition(session, job.id, expected=S.queued, attempt=1, to=S.placing, actor="d")
    session.commit()
    assert session.scalar(select(Job.finished_at).where(Job.id == job.id)) is None


def test_values_are_written_and_event_records_the_new_attempt(session: Session, tenant_id: uuid.UUID,
                                                              tmp_path: Path) -> None:
    job = _submit(session, tenant_id, tmp_path)
    assert transition(session, job.id, expected=S.queued, attempt=1, to=S.placing, actor="d")
    assert transition(session, job.id, expected=S.placing, attempt=1, to=S.queued, actor="d",
                      reason="retry elsewhere", values={"attempt": 2, "error": "host lost"})
    session.commit()

    assert _status(session, job.id) == ("queued", 2)
    assert session.scalar(select(Job.error).where(Job.id == job.id)) == "host lost"
    assert _events(session, job.id)[-1].attempt == 2
    # The old attempt number no longer matches: a late message for attempt 1 is ignored.
    assert transition(session, job.id, expected=S.queued, attempt=1, to=S.placing, actor="late") is False
    assert transition(session, job.id, expected=S.queued, attempt=2, to=S.placing, actor="d") is True


def test_explicit_finished_at_is_kept(session: Session, tenant_id: uuid.UUID, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    job = _submit(session, tenant_id, tmp_path)
    at = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert transition(session, job.id, expected=S.queued, attempt=1, to=S.cancelled, actor="api",
                      values={"finished_at": at})
    session.commit()
    stored = session.scalar(select(Job.finished_at).where(Job.id == job.id))
    assert stored is not None and stored.replace(tzinfo=None) == at.replace(tzinfo=None)


def test_direct_row_insert_and_cancel_only_once(session: Session, tenant_id: uuid.UUID) -> None:
    """A job row inserted by hand (the columns jobs._row fills) moves like a submitted one."""
    job_id = uuid.uuid4()
    session.add(Job(id=job_id, tenant_id=tenant_id, kind="command", priority="normal", queue="default",
                    status="running", spec={"command": "true"}, requirements={}, labels={}, attempt=3,
                    max_attempts=3, timeout_seconds=60, request_hash="0" * 64, excluded_offers=[], cost=0.0))
    session.commit()

    assert transition(session, job_id, expected=S.running, attempt=3, to=S.cancelled, actor="api")
    assert transition(session, job_id, expected=S.running, attempt=3, to=S.cancelled, actor="api") is False
    session.commit()
    events = _events(session, job_id)
    assert [(e.from_status, e.to_status, e.attempt) for e in events] == [("running", "cancelled", 3)]


def test_batch_over_the_configured_limit_is_refused_before_writing(session: Session, tmp_path: Path) -> None:
    from orchestrator.errors import InvalidInput

    keys.create_key(session, "t", key="k" * 20)
    tenant = keys.tenant_for_key(session, "k" * 20)
    req = job_create_adapter.validate_python({"kind": "command", "spec": {"command": ["true"]}})
    with pytest.raises(InvalidInput, match="jobs: a batch holds at most 2 jobs, got 3"):
        jobs.submit_batch(session, tenant.id, [req] * 3, load_settings(data_dir=tmp_path, max_batch_size=2))
    assert session.scalar(select(func.count()).select_from(Job)) == 0
