"""Run output as it is kept: checkpoint lines recorded once per step (malformed ones skipped), a
per-job cap on kept text that never drops a checkpoint, and retention — on the embedded SQLite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from orchestrator.clock import utcnow
from orchestrator.db.engine import reset_engines, session_scope
from orchestrator.db.migrate import upgrade
from orchestrator.db.models import Job, JobLog, Tenant
from orchestrator.domain import job_create_adapter
from orchestrator.services import jobs, run_output
from orchestrator.settings import get_settings


@pytest.fixture
def job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[uuid.UUID]:
    for key in [k for k in os.environ if k.startswith("GPUFLEET_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GPUFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GPUFLEET_MAX_LOG_CHARS_PER_JOB", "10000")
    get_settings.cache_clear()
    reset_engines()
    upgrade(get_settings().database_url)
    with session_scope() as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        s.flush()
        req = job_create_adapter.validate_python({"kind": "training", "spec": {"base_model": "m", "dataset_uri": "d"}})
        job, _ = jobs.submit(s, tenant.id, req, get_settings())
        found = job.id
    yield found
    reset_engines()
    get_settings.cache_clear()


def test_checkpoints_are_recorded_once_per_step_and_bad_lines_skipped(job_id: uuid.UUID) -> None:
    out = 'step 1\nGPUFLEET_CHECKPOINT {"step": 5, "uri": "s3://b/5"}\nGPUFLEET_CHECKPOINT {not json}\n'
    with session_scope() as s:
        assert run_output.append(s, job_id, 1, [("stdout", out)]) == [5]
        run_output.append(s, job_id, 1, [("stdout", 'GPUFLEET_CHECKPOINT {"step": 5, "uri": "s3://b/other"}\n')])
        run_output.append(s, job_id, 2, [("stderr", 'GPUFLEET_CHECKPOINT {"step": 9, "uri": "x"}\n')])  # stderr: no
        latest = run_output.latest_checkpoint(s, job_id)
    assert latest is not None and (latest.step, latest.uri, latest.attempt) == (5, "s3://b/5", 1)
    assert [c["text"] for c in run_output.read(job_id)][0] == out


def test_output_past_the_cap_is_dropped_but_checkpoints_still_count(job_id: uuid.UUID) -> None:
    with session_scope() as s:
        for _ in range(30):
            run_output.append(s, job_id, 1, [("stdout", "x" * 999 + "\n")])
        run_output.append(s, job_id, 1, [("stdout", 'GPUFLEET_CHECKPOINT {"step": 30, "uri": "u"}\n')])
        kept = s.scalar(select(func.sum(func.length(JobLog.text))).where(JobLog.job_id == job_id))
        latest = run_output.latest_checkpoint(s, job_id)
    assert 10_000 <= kept < 12_000 and latest is not None and latest.step == 30
    notes = [c["text"] for c in run_output.read(job_id) if c["text"].startswith("[gpufleet]")]
    assert len(notes) == 1 and "not kept" in notes[0]


def test_prune_deletes_only_output_past_retention(job_id: uuid.UUID) -> None:
    with session_scope() as s:
        run_output.append(s, job_id, 1, [("stdout", "old\n")])
        s.execute(update(JobLog).values(at=utcnow() - timedelta(days=31)))
        run_output.append(s, job_id, 1, [("stdout", "new\n")])
    assert run_output.prune(batch=1) == 1
    assert [c["text"] for c in run_output.read(job_id)] == ["new\n"]
    with session_scope() as s:
        assert s.get(Job, job_id) is not None  # the job itself stays
