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
