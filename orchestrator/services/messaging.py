"""Publishing Celery messages. The broker is a doorbell: a lost message costs a delay
(the sweeper re-publishes from Postgres), never a job — so publishing failures are
logged, not raised to the caller whose job is already committed."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

DISPATCH = "gpufleet.dispatch"
EXECUTE = "gpufleet.execute"
POLL = "gpufleet.poll"
RELEASE = "gpufleet.release"
SWEEP = "gpufleet.sweep"
AUTOSCALE = "gpufleet.autoscale"
HEALTH = "gpufleet.health"
EVALUATE_MODEL = "gpufleet.evaluate_model"
AFTER_TRAINING = "gpufleet.after_training"
DISTILL_UPKEEP = "gpufleet.distill_upkeep"
PRUNE_RUN_OUTPUT = "gpufleet.prune_run_output"
RELEASE_RESERVATION = "gpufleet.release_reservation"
PLACE_RESERVATION = "gpufleet.place_reservation"
PROVISION_RESERVATION = "gpufleet.provision_reservation"
WATCH_RESERVATION = "gpufleet.watch_reservation"


def _app() -> Any:
    from workers.celery_app import get_app

    return get_app()


def send(task: str, args: list[Any], queue: str, countdown: float | None = None) -> bool:
    try:
        _app().send_task(task, args=args, queue=queue, countdown=countdown)
        return True
    except Exception as exc:  # broker down: the sweeper will publish it later
        log.warning("could not publish %s to %s (%s); the sweeper will retry", task, queue, type(exc).__name__)
        return False


def send_dispatches(jobs: Iterable[tuple[uuid.UUID, int, str]]) -> int:
    """Publish dispatch messages for (job_id, attempt, queue) over one producer connection."""
    app = _app()
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for job_id, attempt, queue in jobs:
                app.send_task(DISPATCH, args=[str(job_id), attempt], queue=queue, producer=producer)
                sent += 1
    except Exception as exc:
        log.warning("published %d dispatch messages, then the broker failed (%s); the sweeper will publish the rest",
                    sent, type(exc).__name__)
    return sent
