"""An in-process emulated GPU marketplace: offers, prices, boot delays, and failures.

It plays the role of dramatiq's stub broker: the demo and the tests exercise the whole
pipeline — placement, failover, capacity, costs — with no provider account. Failures
are drawn from a RNG seeded by (job, attempt, offer), so a given run is reproducible.
Command and training jobs with a ``command`` really run, as local subprocesses.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

from providers import transcription
from providers.base import (
    ExternalResource,
    Health,
    JobSpec,
    Lease,
    NoCapacity,
    Offer,
    Provider,
    ProviderKind,
    Requirements,
    RunHandle,
    RunStatus,
)
from providers.local import processes
from providers.sandbox import models, standin
from providers.sandbox.market import DEFAULT_OFFERS, Ledger, SandboxOffer


class SandboxProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.marketplace
    runs_here: ClassVar[bool] = True
    default_start_timeout: ClassVar[float] = 10.0
    lists_all_leases: ClassVar[bool] = True

    def __init__(self, name: str = "sandbox", config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        state_dir = Path(self.config.get("state_dir", Path.cwd() / ".gpufleet" / "sandbox"))
        self.runs_dir = Path(self.config.get("runs_dir", state_dir / "runs"))
        self.ledger = Ledger(state_dir / f"{name}-ledger.json")
        # Multiplies every emulated duration; 0 makes emulated work instant (benchmarks).
        self.speed = float(self.config.get("time_scale", 1.0))
        self.catalog = {o.offer_id: o for o in (SandboxOffer(**raw) for raw in self.config.get("offers", DEFAULT_OFFERS))}

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        used = self.ledger.in_use()
        return [
            Offer(
                provider=self.name,
                offer_id=o.offer_id,
                gpu=o.gpu,
                gpu_count=o.gpu_count,
                gpu_memory_gb=o.gpu_memory_gb,
                region=o.region,
                price_per_hour=o.price_per_hour,
                price_per_1k_tokens=o.price_per_1k_tokens,
                capacity=max(0, o.capacity - len(used.get(o.offer_id, {}))),
                reliability=o.reliability,
                interruptible=o.interruptible or o.preempt_after_seconds is not None,
                kinds=o.kinds,
            )
            for o in self.catalog.values()
            if kind in o.kinds
        ]

    def _rng(self, job: JobSpec, offer_id: str) -> random.Random:
        return random.Random(f"{job.job_id}:{job.attempt}:{offer_id}")

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        spec = self.catalog.get(offer.offer_id)
        if spec is None:
            raise NoCapacity(f"sandbox offer {offer.offer_id} no longer exists")
        if self._rng(job, offer.offer_id).random() < spec.reserve_failure_rate:
            raise NoCapacity(f"sandbox offer {offer.offer_id} was taken by someone else")
        lease_id = f"sbx-{uuid.uuid4().hex[:12]}"
        label = job.label or f"gpufleet-{job.job_id}-{job.attempt}"
        # Usage-priced offers bill per token, reported by poll(); their rented time is free.
        price = 0.0 if _usage_priced(spec, job.kind) else spec.price_per_hour
        if not self.ledger.take(offer.offer_id, lease_id, spec.capacity, label, price):
            raise NoCapacity(f"sandbox offer {offer.offer_id} is full ({spec.capacity} slots rented)")
        return Lease(
            provider=self.name,
            offer_id=offer.offer_id,
            external_id=lease_id,
            label=label,
            price_per_hour=price,
            reserved_at=time.time(),
        )

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        offer = self.catalog[lease.offer_id]
        rng = self._rng(job, lease.offer_id)
        rng.random()  # the draw reserve() used
        now = time.time()
        boot = offer.boot_seconds * self.speed
        spec = job.spec
        if job.kind == "transcription":
            # Open the audio now, as a real engine would: a missing or empty file fails the job at once
            # and for good, and a WAV file's own length paces the emulated work.
            duration = models.audio_seconds(str(spec.get("audio_url") or ""), _positive(spec.get("duration_seconds")))
            spec = {**spec, "duration_seconds": duration}
        data: dict[str, Any] = {"kind": job.kind, "spec": spec, "deadline": now + job.timeout_seconds}
        if rng.random() < offer.crash_rate:
            data["crash_at"] = now + boot + 0.1 * self.speed
        elif offer.preempt_after_seconds:
            data["crash_at"] = now + boot + offer.preempt_after_seconds * self.speed
            data["crash_reason"] = f"sandbox spot host for offer {offer.offer_id} was reclaimed (preempted)"
        if job.kind in ("command", "training") and job.spec.get("command"):
            run_dir = self.runs_dir / f"{job.job_id}-{job.attempt}"
            env = {**{k: str(v) for k, v in job.spec.get("env", {}).items()}, **job.env,
                   "GPUFLEET_GPU": offer.gpu or "", "GPUFLEET_REGION": offer.region}
            kill_after = data["crash_at"] - now if "crash_reason" in data else None
            data["process"] = processes.spawn(run_dir, job.spec["command"], env, job.spec.get("workdir"), kill_after)
        else:
            data["ready_at"] = now + boot + _work_seconds(job.kind, spec) * self.speed
        return RunHandle(provider=self.name, lease=lease, started_at=now, data=data)

    def poll(self, handle: RunHandle) -> RunStatus:
        now = time.time()
        data = handle.data
        # A run that ended before its host was taken away keeps its outcome.
        finished_first = "process" in data and (processes.exited_at(data["process"]) or now) < data.get("crash_at", 0) - 0.05
        if "crash_at" in data and now >= data["crash_at"] and not finished_first:
            if "process" in data:
                processes.kill(data["process"])
            output = processes.new_output(data["process"], ended=True) if "process" in data else []
            return RunStatus(state="failed", transient=True, output=output, error=data.get(
                "crash_reason", f"sandbox host for offer {handle.lease.offer_id} was lost mid-job"))
        if "process" in data:
            state, result, error = processes.status(data["process"], data["deadline"])
            output = processes.new_output(data["process"], ended=state != "running")
            return RunStatus(state=state, result=result, error=error, output=output)  # type: ignore[arg-type]
        if now < data["ready_at"]:
            if now > data["deadline"]:
                return RunStatus(state="failed", error="exceeded its time limit and was stopped")
            return RunStatus(state="running")
        result = _emulate(data["kind"], data["spec"])
        offer = self.catalog.get(handle.lease.offer_id)
        cost = None
        if offer and _usage_priced(offer, data["kind"]) and "usage" in result:
            cost = round(result["usage"].get("total_tokens", 0) / 1000 * offer.price_per_1k_tokens, 8)
        return RunStatus(state="succeeded", result=result, cost=cost)

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        if handle is not None and "process" in handle.data:
            processes.kill(handle.data["process"])
        self.ledger.give_back(lease.offer_id, lease.external_id)

    def owned(self) -> list[ExternalResource]:
        return [
            ExternalResource(provider=self.name, external_id=lease_id, offer_id=offer_id, label=entry["label"],
                             created_at=entry["at"],
                             price_per_hour=entry.get("price_per_hour", 0.0))
            for offer_id, leases in self.ledger.in_use().items()
            for lease_id, entry in leases.items()
        ]

    def health(self) -> Health:
        return Health(ok=True, detail=f"{len(self.catalog)} offers")


STANDIN = "standin:"


def _usage_priced(offer: SandboxOffer, kind: str) -> bool:
    return offer.price_per_1k_tokens is not None and kind in ("inference", "transcription")


def _work_seconds(kind: str, spec: dict[str, Any]) -> float:
    if kind == "inference":
        return 0.002 * int(spec.get("max_tokens", 256))
    if kind == "transcription":
        return 0.01 * float(spec.get("duration_seconds") or 60)
    if kind == "training":
        return 0.01 * _training_steps(spec)
    if kind == "distillation":
        return 0.01 * len(spec.get("prompts") or [])
    return 0.05


def _positive(value: object) -> float | None:
    """A declared duration, if it is one (the spec may carry none, or one from an older handle)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _training_steps(spec: dict[str, Any]) -> int:
    return int(spec.get("max_steps") or 20 * int(spec.get("epochs", 1)))


def _emulate(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    if kind == "inference":
        if str(spec["model"]).startswith(STANDIN):  # a student trained by the stand-in trainer
            prompt = models.prompt_text(spec)
            text = standin.answer(spec["model"][len(STANDIN):], prompt)
            used = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
            return {"text": text, "model": spec["model"], "usage": {**used, "total_tokens": sum(used.values())}}
        return models.complete(spec["model"], models.prompt_text(spec), int(spec.get("max_tokens", 256)))
    if kind == "transcription":
        model = str(spec.get("model") or "whisper-large-v3")
        raw = models.transcribe(model, str(spec["audio_url"]), _positive(spec.get("duration_seconds")),
                                spec.get("language"))
        return dict(transcription.transcription_result(raw, model=model, spec=spec))
    if kind == "training":
        steps = _training_steps(spec)
        return {"base_model": spec["base_model"], "steps": steps, "final_loss": round(2.5 / (1 + steps / 50), 4),
                "checkpoint_uri": spec.get("checkpoint_uri") or f"sandbox://checkpoints/{spec['base_model']}/final"}
    if kind == "distillation":
        pairs = []
        for prompt in spec.get("prompts") or []:
            teacher = models.complete(spec["teacher_model"], prompt, int(spec.get("max_tokens", 256)))
            student = models.complete(spec["student_model"], prompt, int(spec.get("max_tokens", 256)))
            pairs.append({"prompt": prompt, "teacher": teacher["text"], "student": student["text"],
                          "agreement": models.agreement(teacher["text"], student["text"])})
        mean = round(sum(p["agreement"] for p in pairs) / len(pairs), 3) if pairs else 0.0
        return {"teacher_model": spec["teacher_model"], "student_model": spec["student_model"],
                "pairs": pairs, "mean_agreement": mean}
    return {"exit_code": 0, "stdout": "", "stderr": ""}
