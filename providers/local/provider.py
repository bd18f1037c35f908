"""The machine gpufleet runs on: commands as subprocesses, inference via a local server.

Free and always healthy, so it wins placement for work that needs no GPU; a GPU job
lands here only if the config declares the machine's GPUs.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import httpx

from providers.base import (
    Health,
    JobSpec,
    Lease,
    Offer,
    PermanentProviderError,
    Provider,
    ProviderKind,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.local import processes

TRANSCRIPTION_START_TIMEOUT = 1800.0


class LocalProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.local
    runs_here: ClassVar[bool] = True
    default_start_timeout: ClassVar[float] = 10.0

    def __init__(self, name: str = "local", config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        self.runs_dir = Path(self.config.get("runs_dir", Path.cwd() / ".gpufleet" / "runs"))
        self.slots = int(self.config.get("slots", os.cpu_count() or 1))
        self.gpus: list[str] = list(self.config.get("gpus", []))
        self.gpu_memory_gb = float(self.config.get("gpu_memory_gb", 0))
        self.openai_base_url: str | None = self.config.get("openai_base_url")
        if self.config.get("transcription_model") and "start_timeout" not in self.config:
            # Transcription runs inside start(): give it the time a long file takes, or the sweeper would
            # take the job for lost and run it again elsewhere while this worker is still transcribing.
            self.start_timeout = float(self.config.get("transcription_timeout", TRANSCRIPTION_START_TIMEOUT))

    def _kinds(self, spec: dict[str, Any]) -> list[str]:
        kinds = ["command"]
        if spec.get("command"):
            kinds.append("training")
        if self.openai_base_url:
            kinds.append("inference")
        if self._transcribes():
            kinds.append("transcription")
        return kinds

    def _transcribes(self) -> bool:
        """Transcription needs a model the operator provides (``transcription_model``: a local path; nothing
        is downloaded) and faster-whisper installed; without either, the job goes to a provider that can."""
        from providers.local import transcribe  # imported here: only machines that transcribe need it

        return bool(self.config.get("transcription_model")) and transcribe.available()

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        return [
            Offer(
                provider=self.name,
                offer_id="local",
                gpu=self.gpus[0] if self.gpus else None,
                gpu_count=len(self.gpus),
                gpu_memory_gb=self.gpu_memory_gb,
                region="local",
                price_per_hour=0.0,
                capacity=self.slots,
                kinds=self._kinds(spec),
            )
        ]

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        return Lease(
            provider=self.name,
            offer_id=offer.offer_id,
            external_id=f"local-{uuid.uuid4().hex[:12]}",
            label=job.label,
            price_per_hour=0.0,
            reserved_at=time.time(),
        )

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        now = time.time()
        data: dict[str, Any] = {"deadline": now + job.timeout_seconds}
        if job.kind == "inference":
            data["response"] = self._chat(job.spec)
        elif job.kind == "transcription":
            data["response"] = self._transcribe(job.spec)
        else:
            command = job.spec.get("command")
            if not command:
                raise PermanentProviderError(f"{job.kind} jobs on the local provider need a 'command'")
            run_dir = self.runs_dir / f"{job.job_id}-{job.attempt}"
            env = {**{k: str(v) for k, v in job.spec.get("env", {}).items()}, **job.env}
            data["process"] = processes.spawn(run_dir, command, env, job.spec.get("workdir"),
                                              inherit=self.config.get("inherit_env", ()))
        return RunHandle(provider=self.name, lease=lease, started_at=now, data=data)

    def poll(self, handle: RunHandle) -> RunStatus:
        if "response" in handle.data:
            return RunStatus(state="succeeded", result=handle.data["response"], cost=0.0)
        state, result, error = processes.status(handle.data["process"], handle.data["deadline"])
        output = processes.new_output(handle.data["process"], ended=state != "running")
        return RunStatus(state=state, result=result, error=error, output=output)  # type: ignore[arg-type]

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        if handle is not None and "process" in handle.data:
            processes.kill(handle.data["process"])

    def health(self) -> Health:
        return Health(ok=True, detail=f"{self.slots} slots")

    def _transcribe(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Run the local engine synchronously, like ``_chat``: the handle then holds the answer, so any
        worker can poll it. Config: ``transcription_model`` (path), ``transcription_device`` (``auto``,
        ``cpu``, ``cuda``), ``transcription_compute_type`` (``default``, ``int8``, ``float16``…)."""
        from providers.local import transcribe
        from providers.transcription import transcription_result

        if not self._transcribes():  # the config or the install changed since this offer was made
            raise TransientProviderError("local transcription needs 'transcription_model' and faster-whisper installed")
        audio_url = spec.get("audio_url")
        if not audio_url:
            raise PermanentProviderError("transcription jobs need an 'audio_url'")
        raw = transcribe.transcribe(
            str(audio_url), spec.get("language"), str(self.config["transcription_model"]),
            str(self.config.get("transcription_device", "auto")),
            compute_type=str(self.config.get("transcription_compute_type", "default")),
            timeout=float(self.config.get("timeout", 120)))
        return dict(transcription_result(raw, model=raw["model"], spec=spec))

    def _chat(self, spec: dict[str, Any]) -> dict[str, Any]:
        messages = spec.get("messages") or [{"role": "user", "content": spec.get("prompt", "")}]
        body = {
            "model": spec["model"],
            "messages": messages,
            "max_tokens": spec.get("max_tokens", 256),
            "temperature": spec.get("temperature", 0.7),
        }
        headers = {}
        if key := self.config.get("openai_api_key"):
            headers["Authorization"] = f"Bearer {key}"
        url = str(self.openai_base_url).rstrip("/") + "/chat/completions"
        try:
            response = httpx.post(url, json=body, headers=headers, timeout=float(self.config.get("timeout", 120)))
        except httpx.HTTPError as exc:
            raise TransientProviderError(f"local model server unreachable: {type(exc).__name__}") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientProviderError(f"local model server answered {response.status_code}")
        if response.status_code >= 400:
            raise PermanentProviderError(f"local model server rejected the request: {response.status_code} {response.text[:200]}")
        payload = response.json()
        choice = (payload.get("choices") or [{}])[0]
        return {
            "text": (choice.get("message") or {}).get("content", ""),
            "usage": payload.get("usage", {}),
            "model": payload.get("model", spec["model"]),
        }
