"""Exports of accepted pairs as OpenAI chat fine-tuning JSONL, streamed, never loaded whole.

Each line is ``{"messages": [...the input..., {"role": "assistant", "content": <teacher's answer>}]}``.
The train/test split is a pure function of the pair's id (a hash), so an export repeated with the
same filters splits identically and a pair never moves between sets as more data arrives. The
manifest records the filters, the counts and a SHA-256 of each file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select

from orchestrator.clock import utcnow
from orchestrator.db.engine import session_scope
from orchestrator.db.models import DistillationPair

Split = Literal["train", "test", "all"]
BATCH = 500


@dataclass(frozen=True)
class ExportFilters:
    since: datetime | None = None
    until: datetime | None = None
    teacher_model: str | None = None
    student_model: str | None = None
    tags: list[str] = field(default_factory=list)
    min_score: float | None = None  # default: the configured quality threshold (only accepted pairs)
    test_fraction: float = 0.1
    limit: int | None = None


def split_of(pair_id: uuid.UUID, test_fraction: float) -> str:
    """Deterministic: the same pair is always in the same set for the same fraction."""
    draw = int.from_bytes(hashlib.sha256(pair_id.bytes).digest()[:8], "big") / 2**64
    return "test" if draw < test_fraction else "train"


def example(pair: DistillationPair) -> dict[str, Any]:
    return {"messages": [*pair.messages, {"role": "assistant", "content": pair.teacher_output or ""}]}


def _query(tenant_id: uuid.UUID, f: ExportFilters, threshold: float) -> Any:
    q = select(DistillationPair).where(
        DistillationPair.tenant_id == tenant_id, DistillationPair.status == "complete",
        DistillationPair.teacher_output.is_not(None), DistillationPair.score >= (f.min_score if f.min_score is not None
                                                                                 else threshold))
    if f.since:
        q = q.where(DistillationPair.created_at >= f.since)
    if f.until:
        q = q.where(DistillationPair.created_at < f.until)
    if f.teacher_model:
        q = q.where(DistillationPair.teacher_model == f.teacher_model)
    if f.student_model:
        q = q.where(DistillationPair.student_model == f.student_model)
    return q.order_by(DistillationPair.created_at, DistillationPair.id)


def pairs(tenant_id: uuid.UUID, f: ExportFilters, split: Split, threshold: float) -> Iterator[DistillationPair]:
    """Matching pairs in creation order, read in batches (a server-side cursor on Postgres)."""
    wanted = set(f.tags)
    sent = 0
    with session_scope() as s:
        rows = s.execute(_query(tenant_id, f, threshold).execution_options(yield_per=BATCH)).scalars()
        for pair in rows:
            if wanted and not wanted <= set(pair.tags or []):
                continue
            if split != "all" and split_of(pair.id, f.test_fraction) != split:
                continue
            yield pair
            sent += 1
            if f.limit is not None and sent >= f.limit:
                return


def jsonl(tenant_id: uuid.UUID, f: ExportFilters, split: Split, threshold: float) -> Iterator[bytes]:
    for pair in pairs(tenant_id, f, split, threshold):
        yield (json.dumps(example(pair), ensure_ascii=False) + "\n").encode()


def manifest(tenant_id: uuid.UUID, f: ExportFilters, threshold: float) -> dict[str, Any]:
    """Counts and content hashes of the train and test files these filters produce."""
    digests = {"train": hashlib.sha256(), "test": hashlib.sha256()}
    counts = {"train": 0, "test": 0}
    for pair in pairs(tenant_id, f, "all", threshold):
        part = split_of(pair.id, f.test_fraction)
        digests[part].update((json.dumps(example(pair), ensure_ascii=False) + "\n").encode())
        counts[part] += 1
    filters = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(f).items()}
    filters["min_score"] = f.min_score if f.min_score is not None else threshold
    return {"format": "openai-chat-jsonl", "created_at": utcnow().isoformat(), "filters": filters, "counts": counts,
            "sha256": {k: d.hexdigest() for k, d in digests.items()}}


def to_storage(tenant_id: uuid.UUID, f: ExportFilters, threshold: float, store: Any, prefix: str) -> dict[str, Any]:
    """Write train.jsonl, test.jsonl and manifest.json under ``prefix``; returns the manifest with their URIs.
    Each file is written from the stream through a temporary file, so memory stays flat."""
    import tempfile

    uris: dict[str, str] = {}
    for split in ("train", "test"):
        with tempfile.NamedTemporaryFile("wb", suffix=".jsonl") as tmp:
            for line in jsonl(tenant_id, f, split, threshold):  # type: ignore[arg-type]
                tmp.write(line)
            tmp.flush()
            uris[split] = store.put_file(f"{prefix}/{split}.jsonl", tmp.name)
    out = manifest(tenant_id, f, threshold)
    out["uris"] = uris
    uris["manifest"] = store.put_bytes(f"{prefix}/manifest.json", json.dumps(out, indent=2).encode(), "application/json")
    return out
