"""What a provider is given to run a job: its spec (with inputs in our bucket presigned) and the env a
run on a rented instance needs to report back and to write its outputs — never our credentials."""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.db.engine import session_scope
from orchestrator.services import run_output
from orchestrator.services.snapshots import Snapshot
from orchestrator.settings import Settings, get_settings
from orchestrator.storage import StorageError, configured_storage
from providers.base import JobSpec
from providers.registry import get_providers

log = logging.getLogger(__name__)


def job_spec(job: Snapshot, label: str, token: str) -> JobSpec:
    """What the provider runs. The env is what a job on a rented instance needs to report back;
    the token is scoped to this job and attempt, and only its hash is stored."""
    settings = get_settings()
    base = (settings.callback_url or settings.api_url).rstrip("/")
    env = {
        "GPUFLEET_JOB_ID": str(job.id),
        "GPUFLEET_ATTEMPT": str(job.attempt),
        "GPUFLEET_RESERVATION": label,
        "GPUFLEET_CALLBACK_URL": f"{base}/v1/jobs/{job.id}/report",
        "GPUFLEET_OUTPUT_URL": f"{base}/v1/jobs/{job.id}/output",
        "GPUFLEET_JOB_TOKEN": token,
    }
    env.update(_artifact_env(settings, job))
    spec = _readable_inputs(settings, job)
    if job.kind == "training":
        env.update(_checkpoint_env(settings, job))
        # What to train, as the run can read it (an s3:// dataset of ours arrives presigned).
        env.update({"GPUFLEET_DATASET_URI": str(spec["dataset_uri"]), "GPUFLEET_BASE_MODEL": str(spec["base_model"])})
        for name in ("epochs", "max_steps"):
            if spec.get(name) is not None:
                env[f"GPUFLEET_{name.upper()}"] = str(spec[name])
    return JobSpec(job_id=str(job.id), kind=job.kind, attempt=job.attempt,  # type: ignore[arg-type]
                   spec=spec, timeout_seconds=job.timeout_seconds, env=env, label=label)


INPUT_FIELDS = ("audio_url", "dataset_uri")


def _readable_inputs(settings: Settings, job: Snapshot) -> dict[str, Any]:
    """The spec with inputs in our S3 storage (``s3://bucket/prefix/…``) turned into presigned GET URLs:
    providers and instances read them without holding our credentials."""
    inputs = {f: str(job.spec[f]) for f in INPUT_FIELDS if str(job.spec.get(f, "")).startswith("s3://")}
    if not inputs or not settings.artifact_base_uri:
        return job.spec
    try:
        store = configured_storage(settings)
        if not store.reachable_by_instances:
            return job.spec
        expires = min(7 * 24 * 3600, job.timeout_seconds + 3600)
        return {**job.spec, **{f: store.presigned_get(store.key_of(uri), expires=expires) for f, uri in inputs.items()}}
    except StorageError as exc:  # another bucket: pass the URI on as given
        log.info("job %s inputs left as given: %s", job.id, exc)
        return job.spec


def _checkpoint_env(settings: Settings, job: Snapshot) -> dict[str, str]:
    """Where a training run writes checkpoints (one place for every attempt, so a restart finds them),
    how often, and — after a lost run — the latest checkpoint to resume from."""
    env = {"GPUFLEET_CHECKPOINT_INTERVAL": str(job.spec.get("checkpoint_interval_seconds", 600))}
    uri = job.spec.get("checkpoint_uri")
    provider = get_providers().get(job.provider or "")
    # Our storage is a default only for runs on this machine: a rented instance holds no credentials of
    # ours, and our disk is not its disk. There the job names its own checkpoint_uri (docs/training.md).
    if not uri and provider is not None and provider.runs_here:
        try:
            uri = configured_storage(settings).uri(f"jobs/{job.id}/checkpoints") + "/"
        except StorageError as exc:
            log.warning("job %s has no checkpoint storage: %s", job.id, exc)
    if uri:
        env["GPUFLEET_CHECKPOINT_URI"] = str(uri)
    with session_scope() as s:
        latest = run_output.latest_checkpoint(s, job.id)
    if latest is not None:
        env["GPUFLEET_RESUME_FROM"] = latest.uri
        env["GPUFLEET_RESUME_STEP"] = str(latest.step)
    return env


def _artifact_env(settings: Settings, job: Snapshot) -> dict[str, str]:
    """Where the run writes its outputs: the prefix, and on S3 a presigned PUT URL for one artifact
    (rented instances hold no storage credentials of ours)."""
    if not settings.artifact_base_uri:
        return {}
    prefix = f"jobs/{job.id}/{job.attempt}"
    try:
        store = configured_storage(settings)
        env = {"GPUFLEET_ARTIFACT_URI": store.uri(prefix) + "/"}
        if store.reachable_by_instances:
            expires = min(7 * 24 * 3600, job.timeout_seconds + 3600)
            env["GPUFLEET_ARTIFACT_PUT_URL"] = store.presigned_put(f"{prefix}/artifact", expires=expires)
    except StorageError as exc:  # the run can still do its work; say why it has nowhere to put outputs
        log.warning("job %s runs without artifact storage: %s", job.id, exc)
        return {}
    return env
