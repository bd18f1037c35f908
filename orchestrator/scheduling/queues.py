"""Which Celery queue a job waits on: its priority first, then its kind."""

from __future__ import annotations

from orchestrator.settings import CONTROL_QUEUE, QUEUE_NAMES

KIND_QUEUES = {
    "inference": "inference",
    "transcription": "inference",
    "training": "training",
    "distillation": "distillation",
    "command": "default",
}


def queue_for(kind: str, priority: str) -> str:
    if priority == "high":
        return "high_priority"
    if priority == "low":
        return "low_priority"
    return KIND_QUEUES[kind]


def provider_queue(provider: str) -> str:
    """Provider workers consume only their own queue, so they hold only their own credentials."""
    return f"p.{provider}"


def all_queues() -> list[str]:
    """Every queue a worker could serve: job queues, control, and one per configured provider."""
    from providers.registry import get_providers

    return [*QUEUE_NAMES, CONTROL_QUEUE, *(provider_queue(name) for name in get_providers())]
