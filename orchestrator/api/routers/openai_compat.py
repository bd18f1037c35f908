"""``POST /v1/chat/completions``: the OpenAI-compatible front door.

Existing OpenAI clients (the ``openai`` package with ``base_url`` pointed at us) send inference
through gpufleet's placement, budgets and failover unchanged. Each request becomes an ordinary
inference job — recorded, costed, visible in ``/v1/jobs`` — and the call returns when it ends.
Headers say where it ran and what it cost; ``extra_body={"gpufleet": {...}}`` carries our
requirements and priority.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.db.engine import session_scope
from orchestrator.domain import DistillOptions, InferenceJob, JobOut, JobStatus, Priority
from orchestrator.services import jobs, messaging
from providers.base import Requirements

from ..deps import SettingsDep, TenantDep

router = APIRouter(tags=["openai-compatible"])


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class GpufleetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requirements: Requirements = Field(default_factory=Requirements)
    priority: Priority = "normal"
    timeout_seconds: int | None = Field(default=None, ge=1, le=3600)
    labels: dict[str, str] = Field(default_factory=dict, max_length=50)
    distill: DistillOptions | None = Field(default=None, description="Also ask this student; keep the pair.")


class ChatCompletionRequest(BaseModel):
    """OpenAI's request; parameters we do not act on (top_p, stop, seed…) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=200_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=200_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    gpufleet: GpufleetOptions = Field(default_factory=GpufleetOptions)


def _error(status: int, message: str, kind: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape, so its clients raise their usual exception types with our message."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": None}})


@router.post("/v1/chat/completions", name="chat_completions",
             responses={400: {"description": "Unsupported option"}, 502: {"description": "The job failed"},
                        504: {"description": "The job did not finish in time"}})
def chat_completions(body: Annotated[ChatCompletionRequest, Body()], tenant: TenantDep, settings: SettingsDep) -> Any:
    if body.stream:
        return _error(400, "stream=true is not supported by gpufleet yet; send stream=false", "invalid_request_error",
                      "stream")
    try:
        job_request = InferenceJob.model_validate(dict(
            kind="inference", priority=body.gpufleet.priority, requirements=body.gpufleet.requirements,
            timeout_seconds=body.gpufleet.timeout_seconds, labels={"api": "chat.completions", **body.gpufleet.labels},
            distill=body.gpufleet.distill,
            spec={"model": body.model,
                  "messages": [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                               for m in body.messages],
                  "max_tokens": body.max_completion_tokens or body.max_tokens or 256,
                  "temperature": 0.7 if body.temperature is None else body.temperature}))
    except ValidationError as exc:
        first = exc.errors()[0]
        return _error(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", "invalid_request_error")
    with session_scope() as s:
        job, _ = jobs.submit(s, tenant, job_request, settings, actor="openai")
        out = jobs.to_out(job)
    messaging.send(messaging.DISPATCH, [str(out.id), out.attempt], out.queue)
    done = jobs.wait_for(tenant, out.id, min(job_request.timeout_seconds or settings.default_timeout_seconds,
                                             settings.front_door_timeout_seconds))
    headers = {"x-gpufleet-job-id": str(out.id)}
    if done is None or not done.status.terminal:
        return _error(504, f"job {out.id} did not finish in time; it keeps running: GET /v1/jobs/{out.id}",
                      "timeout", headers=headers)
    headers.update({"x-gpufleet-provider": done.provider or "", "x-gpufleet-offer": done.offer_id or "",
                     "x-gpufleet-cost": f"{done.cost:.8f}"})
    if done.status != JobStatus.succeeded:
        return _error(502, f"job {out.id} {done.status.value}: {done.error}", "upstream_error", headers=headers)
    return JSONResponse(content=_completion(done, body.model), headers=headers)


def _completion(job: JobOut, requested_model: str) -> dict[str, Any]:
    result = job.result or {}
    usage = result.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {
        "id": f"chatcmpl-{job.id.hex}",
        "object": "chat.completion",
        "created": int((job.finished_at or job.created_at).timestamp()),
        "model": result.get("model") or requested_model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.get("text", "")},
                     "finish_reason": result.get("finish_reason") or "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": int(usage.get("total_tokens", prompt + completion))},
        "system_fingerprint": f"gpufleet:{job.provider}",
    }
