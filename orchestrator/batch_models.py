"""The public shapes of batch runs: declaring one, feeding it items, its progress, its items, estimates.

A batch run is declared with its size and the options every item shares, then receives its items in
chunks; each item becomes one job whose idempotency key is derived from the batch and the item's key,
so a chunk sent twice (a client that restarted) creates nothing twice. Kept apart from ``domain.py``
because only the batch API, its service and the SDK use these.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.domain import JobKind, Priority
from providers.base import Requirements

MAX_ITEMS_PER_CALL = 1000
MAX_BATCH_ITEMS = 1_000_000
MAX_ITEM_KEY = 500
MAX_CLIENT_NOTES_BYTES = 16_384


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobOptions(_In):
    """What every item's job shares. ``defaults`` are spec fields an item gets unless it sets them itself
    (a transcription model and language, an inference model and max_tokens)."""

    priority: Priority = "normal"
    requirements: Requirements = Field(default_factory=Requirements)
    max_attempts: int | None = Field(default=None, ge=1, le=20,
                                     description="Tries per item when its capacity fails (lost host, preemption).")
    timeout_seconds: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    labels: dict[str, str] = Field(default_factory=dict, max_length=40)
    defaults: dict[str, Any] = Field(default_factory=dict, max_length=50)


class ItemIn(_In):
    """One item: a key that names it stably across restarts (a relative path, a prompt id) and its job spec."""

    key: str = Field(min_length=1, max_length=MAX_ITEM_KEY)
    spec: dict[str, Any] = Field(default_factory=dict)

    @field_validator("key")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("must not contain control characters")
        return value


def _unique_keys(items: list[ItemIn]) -> list[ItemIn]:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.key in seen:
            raise ValueError(f"item key {item.key!r} appears twice (items {seen[item.key]} and {i})")
        seen[item.key] = i
    return items


class BatchRunCreate(_In):
    kind: JobKind
    size: int = Field(ge=1, le=MAX_BATCH_ITEMS, description="How many items the batch will hold.")
    name: str | None = Field(default=None, max_length=200)
    options: JobOptions = Field(default_factory=JobOptions)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200,
                                        description="Creating again with this key returns the same batch.")
    output_uri: str | None = Field(default=None, max_length=2000, description="Where the client gathers results.")
    sample: list[ItemIn] = Field(default_factory=list, max_length=MAX_ITEMS_PER_CALL,
                                 description="Items to estimate cost and time from (all of them, or a sample).")
    client: dict[str, Any] = Field(default_factory=dict, description="Notes the client keeps with the batch "
                                                                     "(source, output formats, items hash) to resume it.")

    @field_validator("client")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, default=str)) > MAX_CLIENT_NOTES_BYTES:
            raise ValueError(f"must be at most {MAX_CLIENT_NOTES_BYTES} bytes as JSON")
        return value

    @model_validator(mode="after")
    def _sample_fits(self) -> BatchRunCreate:
        if len(self.sample) > self.size:
            raise ValueError(f"sample has {len(self.sample)} items, more than the batch's size {self.size}")
        _unique_keys(self.sample)
        return self


class ItemsAppend(_In):
    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS_PER_CALL)

    @field_validator("items")
    @classmethod
    def _unique(cls, value: list[ItemIn]) -> list[ItemIn]:
        return _unique_keys(value)


class EstimateIn(_In):
    kind: JobKind
    options: JobOptions = Field(default_factory=JobOptions)
    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS_PER_CALL)
    total: int | None = Field(default=None, ge=1, le=MAX_BATCH_ITEMS,
                              description="Items in the whole batch when ``items`` is a sample of it.")

    @model_validator(mode="after")
    def _total_covers_items(self) -> EstimateIn:
        if self.total is not None and self.total < len(self.items):
            raise ValueError(f"total {self.total} is less than the {len(self.items)} items given")
        return self


class EstimateGroup(BaseModel):
    """Items that placement treats alike (same model and token budget) and where it would put them now."""

    model: str | None = None
    items: int
    queue: str
    provider: str | None = None
    offer: str | None = None
    gpu: str | None = None
    price_per_hour: float | None = None
    price_per_1k_tokens: float | None = None
    cost_per_item: float | None = None
    seconds_per_item: float | None = None
    seconds_source: str | None = Field(default=None, description="'measured' (recent jobs on that offer), 'placement' "
                                                                 "(the run length its price assumed) or 'default'.")
    parallel: int | None = Field(default=None, description="Items that can run at once: the fitting offers' free capacity.")
    queue_concurrency: int | None = None
    rationale: str | None = None
    unplaceable: str | None = Field(default=None, description="Why nothing could take these items now.")


class Estimate(BaseModel):
    items: int
    sampled: int
    estimated_cost: float
    cost_per_item: float | None = None
    estimated_seconds: float | None = None
    unplaceable_items: int = 0
    groups: list[EstimateGroup] = Field(default_factory=list)
    at: datetime


class BatchRunOut(BaseModel):
    """A batch's progress. ``counts`` and ``size`` keep the shape of ``BatchOut`` (GET /v1/batches/{id})."""

    id: uuid.UUID
    size: int
    created_at: datetime
    counts: dict[str, int]
    name: str | None = None
    kind: str = "jobs"
    state: str = "open"
    submitted: int = 0
    queued: int = 0
    running: int = Field(default=0, description="Being placed or running.")
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    done: int = Field(default=0, description="Items that ended: succeeded, failed or cancelled.")
    finished: bool = False
    throughput_per_second: float | None = Field(default=None, description="Items ended per second over the last minute.")
    eta_seconds: float | None = None
    cost: float = 0.0
    elapsed_seconds: float | None = Field(default=None, description="From the first item's submission to the last "
                                                                    "end (or now while running).")
    first_finished_at: datetime | None = None
    last_finished_at: datetime | None = None
    cancelled_at: datetime | None = None
    updated_at: datetime | None = None
    output_uri: str | None = None
    estimate: dict[str, Any] | None = None
    options: dict[str, Any] | None = None


class AppendOut(BaseModel):
    batch_id: uuid.UUID
    created: int
    existing: int
    submitted: int
    size: int


class BatchItemOut(BaseModel):
    key: str
    job_id: uuid.UUID
    status: str
    attempt: int
    max_attempts: int
    error: str | None = None
    cost: float = 0.0
    duration_seconds: float | None = None
    provider: str | None = None
    offer_id: str | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None


class BatchItemPage(BaseModel):
    items: list[BatchItemOut]
    next_cursor: str | None = None
