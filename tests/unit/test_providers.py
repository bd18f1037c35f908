"""The local and sandbox providers through the Provider interface, as a worker drives them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from providers.base import JobSpec, NoCapacity, Provider, Requirements, RunHandle, RunStatus
from providers.local import LocalProvider
from providers.sandbox import SandboxProvider


def _job(kind: str, spec: dict[str, object], job_id: str = "j1", timeout: int = 30) -> JobSpec:
    return JobSpec(job_id=job_id, kind=kind, attempt=1, spec=spec, timeout_seconds=timeout)  # type: ignore[arg-type]


def _run(provider: Provider, job: JobSpec, deadline: float = 10.0) -> tuple[RunHandle, RunStatus]:
    offer = next(o for o in provider.offers(Requirements(), job.kind, job.spec) if job.kind in o.kinds)
    handle = provider.start(provider.reserve(offer, job), job)
    end = time.monotonic() + deadline
    while (status := provider.poll(handle)).state == "running":
        assert time.monotonic() < end, "run never finished"
        time.sleep(0.02)
    return handle, status


@pytest.fixture()
def local(tmp_path: Path) -> LocalProvider:
    return LocalProvider("local", {"runs_dir": str(tmp_path / "runs")})


def sandbox(tmp_path: Path, **offer: object) -> SandboxProvider:
    base = {"offer_id": "o1", "gpu": "A100", "price_per_hour": 1.0, "capacity": 1, "boot_seconds": 0}
    return SandboxProvider("sandbox", {"state_dir": str(tmp_path), "time_scale": 0, "offers": [{**base, **offer}]})


def test_local_command_output_and_exit_codes(local: LocalProvider) -> None:
    _, ok = _run(local, _job("command", {"command": ["sh", "-c", "echo hi; echo warn >&2"]}))
    assert ok.state == "succeeded" and ok.result == {"exit_code": 0, "stdout": "hi\n", "stderr": "warn\n"}
    _, bad = _run(local, _job("command", {"command": "echo first >&2; echo last >&2; exit 3"}, job_id="j2"))
    assert bad.state == "failed" and bad.error == "exit code 3: last" and not bad.transient


def test_local_time_limit_kills_the_command(local: LocalProvider) -> None:
    _, status = _run(local, _job("command", {"command": ["sleep", "30"]}, timeout=1), deadline=8)
    assert status.state == "failed" and "time limit" in (status.error or "")


def test_handle_survives_json_and_another_worker_polls_it(local: LocalProvider, tmp_path: Path) -> None:
    job = _job("command", {"command": "sleep 0.3; echo done"})
    offer = local.offers(Requirements(), "command", job.spec)[0]
    handle = local.start(local.reserve(offer, job), job)
    restored = RunHandle(**handle.model_dump(mode="json"))
    other = LocalProvider("local", {"runs_dir": str(tmp_path / "runs")})  # a restarted worker
    end = time.monotonic() + 10
    while (status := other.poll(restored)).state == "running":
        assert time.monotonic() < end
        time.sleep(0.02)
    assert status.state == "succeeded" and status.result["stdout"] == "done\n"


def test_local_release_kills_a_running_command(local: LocalProvider, tmp_path: Path) -> None:
    marker = tmp_path / "should-not-exist"
    job = _job("command", {"command": f"sleep 5; touch {marker}"})
    offer = local.offers(Requirements(), "command", job.spec)[0]
    lease = local.reserve(offer, job)
    handle = local.start(lease, job)
    local.release(lease, handle)
    local.release(lease, handle)  # idempotent
    status = local.poll(handle)
    assert status.state == "failed"
    time.sleep(0.2)
    assert not marker.exists()


def test_training_without_command_is_not_offered_locally(local: LocalProvider) -> None:
    assert "training" not in local.offers(Requirements(), "training", {"base_model": "m"})[0].kinds
    assert "training" in local.offers(Requirements(), "training", {"command": ["x"]})[0].kinds


def test_sandbox_results_are_deterministic_per_kind(tmp_path: Path) -> None:
    provider = SandboxProvider("sandbox", {"state_dir": str(tmp_path), "time_scale": 0})
    spec = {"model": "llama-3-8b", "prompt": "hello", "max_tokens": 32}
    _, a = _run(provider, _job("inference", spec, "a"))
    _, b = _run(provider, _job("inference", spec, "b"))
    assert a.state == "succeeded" and a.result["text"] == b.result["text"] and a.result["usage"]["total_tokens"] > 0
    assert a.cost == pytest.approx(a.result["usage"]["total_tokens"] / 1000 * 0.0002)  # l4 is per-token
    _, d = _run(provider, _job("distillation", {"teacher_model": "t-70b", "student_model": "s-8b",
                                                "prompts": ["p1", "p2", "p3"]}, "d"))
    assert [p["prompt"] for p in d.result["pairs"]] == ["p1", "p2", "p3"]
    assert all(len(p["teacher"].split()) > len(p["student"].split()) for p in d.result["pairs"])


def test_sandbox_capacity_is_shared_across_processes_and_release_frees_it(tmp_path: Path) -> None:
    first, second = sandbox(tmp_path), sandbox(tmp_path)  # two workers, one ledger
    offer = first.offers(Requirements(), "training", {})[0]
    lease = first.reserve(offer, _job("training", {}, "a"))
    assert second.offers(Requirements(), "training", {})[0].capacity == 0
    with pytest.raises(NoCapacity, match="full"):
        second.reserve(offer, _job("training", {}, "b"))
    first.release(lease)
    first.release(lease)
    assert second.reserve(offer, _job("training", {}, "b")).offer_id == "o1"
    assert [r.external_id for r in second.owned()] != [lease.external_id]


def test_sandbox_failures(tmp_path: Path) -> None:
    taken = sandbox(tmp_path / "a", reserve_failure_rate=1.0)
    with pytest.raises(NoCapacity, match="taken"):
        taken.reserve(taken.offers(Requirements(), "command", {})[0], _job("command", {}))
    crashing = sandbox(tmp_path / "b", crash_rate=1.0)
    _, status = _run(crashing, _job("training", {"base_model": "m", "dataset_uri": "d"}))
    assert status.state == "failed" and status.transient and "lost mid-job" in (status.error or "")
