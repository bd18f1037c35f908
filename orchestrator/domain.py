"""The public shapes of jobs: what callers submit and what they get back.

Shared by the API (validation, OpenAPI), the SDK (typed results) and the services.
Each kind has its own spec model so a bad field is reported by name, not as a blob.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from providers.base import Requirements


class JobStatus(enum.StrEnum):
    queued = "queued"
    placing = "placing"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

Priority = Literal["high", "normal", "low"]
JobKind = Literal["inference", "transcription", "training", "distillation", "command"]
JOB_KINDS: tuple[str, ...] = ("inference", "transcription", "training", "distillation", "command")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Spec):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class InferenceSpec(_Spec):
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = None
    max_tokens: int = Field(default=256, ge=1, le=200_000)
    temperature: float = Field(default=0.7, ge=0, le=2)
    logprobs: bool = Field(default=False, description="Ask for token log-probabilities where the API gives them "
                                                      "(the result's mean 'logprob'); distillation teachers do.")

    @model_validator(mode="after")
    def _needs_input(self) -> InferenceSpec:
        if self.messages is None and self.prompt is None:
            raise ValueError("give either 'messages' or 'prompt'")
        return self


class TranscriptionSpec(_Spec):
    audio_url: str = Field(min_length=1, max_length=2000)
    model: str = "whisper-large-v3"
    language: str | None = Field(default=None, max_length=16)
    duration_seconds: float | None = Field(default=None, gt=0, description="Length of the audio, if known.")
    formats: list[Literal["text", "srt", "vtt", "json"]] = Field(
        default=["text"], min_length=1, max_length=4,
        description="Outputs wanted; subtitles (srt, vtt) are rendered into the result's 'formats'.")

    @model_validator(mode="after")
    def _unique_formats(self) -> TranscriptionSpec:
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("formats: each format may be listed once")
        return self


class TrainingSpec(_Spec):
    """A training run that may be preempted: it writes checkpoints where ``GPUFLEET_CHECKPOINT_URI`` says,
    reports each (a ``GPUFLEET_CHECKPOINT {"step": N, "uri": "…"}`` line on stdout), and on a restart
    finds the latest in ``GPUFLEET_RESUME_FROM`` / ``GPUFLEET_RESUME_STEP`` (docs/training.md)."""

    base_model: str = Field(min_length=1, max_length=200)
    dataset_uri: str = Field(min_length=1, max_length=2000)
    command: list[str] | str | None = None
    script: str | None = Field(default=None, max_length=2000,
                               description="A Python training script (path on the image); run as `python3 SCRIPT` "
                                           "when no command is given.")
    image: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    epochs: int = Field(default=1, ge=1, le=1000)
    max_steps: int | None = Field(default=None, ge=1)
    checkpoint_uri: str | None = Field(default=None, max_length=2000, description=(
        "Where checkpoints go (a prefix in object storage, or a path the run can write). Default: "
        "jobs/<id>/checkpoints/ in the configured artifact storage."))
    checkpoint_interval_seconds: int = Field(default=600, ge=10, le=7 * 24 * 3600)
    max_restarts: int = Field(default=3, ge=0, le=100, description=(
        "How many times a run lost after it started (preempted, host gone, a retryable exit) runs again."))
    retry_exit_codes: list[int] = Field(default_factory=list, max_length=50, description=(
        "Exit codes of the user's code that mean 'run again from the latest checkpoint'; any other "
        "non-zero exit fails the job."))

    @model_validator(mode="after")
    def _script_is_a_command(self) -> TrainingSpec:
        if self.command is None and self.script:
            self.command = ["python3", self.script]
        return self


class DistillationSpec(_Spec):
    teacher_model: str = Field(min_length=1, max_length=200)
    student_model: str = Field(min_length=1, max_length=200)
    prompts: list[str] = Field(min_length=1, max_length=10_000)
    max_tokens: int = Field(default=256, ge=1, le=200_000)
    tags: list[str] = Field(default_factory=list, max_length=20)


class CommandSpec(_Spec):
    command: list[str] | str = Field(description="argv list, or a shell string run with sh -c.")
    image: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> CommandSpec:
        if not self.command or (isinstance(self.command, list) and not self.command[0]):
            raise ValueError("command must not be empty")
        return self


SPEC_MODELS: dict[str, type[_Spec]] = {
    "inference": InferenceSpec,
    "transcription": TranscriptionSpec,
    "training": TrainingSpec,
    "distillation": DistillationSpec,
    "command": CommandSpec,
}


class _JobCreateBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: Priority = "normal"
    requirements: Requirements = Field(default_factory=Requirements)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    timeout_seconds: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    labels: dict[str, str] = Field(default_factory=dict, max_length=50)
    reservation_id: uuid.UUID | None = Field(
        default=None, description="Run on this standalone reservation's capacity instead of renting new capacity.")


class DistillOptions(_Spec):
    """Also send this request to a student model and keep the pair for training (the caller still gets
    the teacher's answer, never waiting for the student)."""

    student_model: str = Field(min_length=1, max_length=200)
    tags: list[str] = Field(default_factory=list, max_length=20)


class InferenceJob(_JobCreateBase):
    kind: Literal["inference"]
    spec: InferenceSpec
    distill: DistillOptions | None = None


class TranscriptionJob(_JobCreateBase):
    kind: Literal["transcription"]
    spec: TranscriptionSpec


class TrainingJob(_JobCreateBase):
    kind: Literal["training"]
    spec: TrainingSpec


class DistillationJob(_JobCreateBase):
    kind: Literal["distillation"]
    spec: DistillationSpec


class CommandJob(_JobCreateBase):
    kind: Literal["command"]
    spec: CommandSpec


JobCreate = Annotated[
    InferenceJob | TranscriptionJob | TrainingJob | DistillationJob | CommandJob,
    Field(discriminator="kind"),
]
job_create_adapter: TypeAdapter[Any] = TypeAdapter(JobCreate)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[JobCreate] = Field(min_length=1)


class JobEventOut(BaseModel):
    at: datetime
    from_status: str | None
    to_status: str
    attempt: int
    actor: str
    reason: str
    data: dict[str, Any] | None = None


class JobOut(BaseModel):
    id: uuid.UUID
    kind: str
    status: JobStatus
    priority: str
    queue: str
    spec: dict[str, Any]
    requirements: dict[str, Any]
    labels: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    attempt: int
    max_attempts: int
    idempotency_key: str | None = None
    batch_id: uuid.UUID | None = None
    provider: str | None = None
    offer_id: str | None = None
    price_per_hour: float | None = None
    placement: dict[str, Any] | None = None
    reservation_id: uuid.UUID | None = None
    use_reservation_id: uuid.UUID | None = None
    cost: float = 0.0
    duration_seconds: float | None = None
    restarts: int = 0
    lost_seconds: float = 0.0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    events: list[JobEventOut] | None = None

    @property
    def done(self) -> bool:
        return self.status.terminal


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = None


class BatchOut(BaseModel):
    id: uuid.UUID
    size: int
    created_at: datetime
    counts: dict[str, int]
    job_ids: list[uuid.UUID] | None = None

    @property
    def done(self) -> bool:
        return sum(self.counts.get(s.value, 0) for s in TERMINAL) >= self.size
