"""Thin Celery tasks: parse arguments, call the pipeline service, nothing else."""

from __future__ import annotations

import uuid

from celery import Task, shared_task

from orchestrator.services import autoscaler, health, messaging, pipeline, reaper, reservation_requests, reservations, sweeper


@shared_task(name=messaging.DISPATCH, bind=True)
def dispatch(self: Task, job_id: str, attempt: int) -> None:
    consumed = self.app.amqp.queues.consume_from
    pipeline.dispatch(uuid.UUID(job_id), attempt, serves=lambda queue: queue in consumed)


@shared_task(name=messaging.EXECUTE)
def execute(job_id: str, attempt: int) -> None:
    pipeline.execute(uuid.UUID(job_id), attempt)


@shared_task(name=messaging.POLL)
def poll(job_id: str, attempt: int, delay: float = pipeline.FIRST_POLL_DELAY) -> None:
    pipeline.poll(uuid.UUID(job_id), attempt, delay)


@shared_task(name=messaging.RELEASE)
def release(job_id: str) -> None:
    pipeline.release(uuid.UUID(job_id))


@shared_task(name=messaging.RELEASE_RESERVATION)
def release_reservation(reservation_id: str) -> None:
    reservations.release(uuid.UUID(reservation_id), reason="released by the sweeper")


@shared_task(name=messaging.PLACE_RESERVATION)
def place_reservation(reservation_id: str) -> None:
    reservation_requests.place_request(uuid.UUID(reservation_id))


@shared_task(name=messaging.PROVISION_RESERVATION)
def provision_reservation(reservation_id: str) -> None:
    reservation_requests.provision(uuid.UUID(reservation_id))


@shared_task(name=messaging.WATCH_RESERVATION)
def watch_reservation(reservation_id: str) -> None:
    reservation_requests.watch(uuid.UUID(reservation_id))


@shared_task(name=messaging.SWEEP)
def sweep() -> dict[str, int]:
    return {**sweeper.sweep(), "reaped": reaper.reap()}


@shared_task(name=messaging.AUTOSCALE)
def autoscale() -> dict[str, str]:
    return autoscaler.autoscale()


@shared_task(name=messaging.PRUNE_RUN_OUTPUT)
def prune_run_output() -> int:
    from orchestrator.services import run_output

    return run_output.prune()


@shared_task(name=messaging.HEALTH)
def health_check() -> dict[str, str]:
    return health.probe_all()


@shared_task(name=messaging.AFTER_TRAINING)
def after_training(job_id: str) -> None:
    from orchestrator.distillation import training

    version_id = training.on_trained(uuid.UUID(job_id))
    if version_id is not None:
        messaging.send(messaging.EVALUATE_MODEL, [str(version_id)], "distillation")


@shared_task(name=messaging.EVALUATE_MODEL)
def evaluate_model(version_id: str) -> dict[str, object]:
    from orchestrator.distillation import evaluation

    return evaluation.evaluate(uuid.UUID(version_id))


@shared_task(name=messaging.DISTILL_UPKEEP)
def distill_upkeep() -> dict[str, int]:
    from orchestrator.distillation import maintenance

    return maintenance.maintain()
