"""The Celery app: queues, reliability settings and the beat schedule, built from Settings.

``celery -A workers.celery_app flower`` and ``gpufleet worker`` both use ``app`` here.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

from orchestrator.services import messaging
from orchestrator.settings import CONTROL_QUEUE, QUEUE_NAMES, Settings, get_settings
from workers import filesystem_broker


def _transport_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_dir
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options.update(data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
                       control_folder=str(folder / "control"), polling_interval=0.05)
    return options


def make_app(settings: Settings) -> Celery:
    app = Celery("gpufleet", broker=filesystem_broker.broker_url(settings.broker_url),
                 backend=settings.result_url or None)
    transport = _transport_options(settings)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A task is acked after it ran, and re-delivered if its worker died mid-way.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="default",
        task_queues=[Queue(name) for name in (*QUEUE_NAMES, CONTROL_QUEUE)],
        task_create_missing_queues=True,  # provider queues p.<name> come from config
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Off by default (they cost a message per task); Flower switches them on when it connects.
        worker_send_task_events=False,
        beat_schedule={
            "sweep-overdue-jobs": {
                "task": messaging.SWEEP,
                "schedule": settings.sweep_interval_seconds,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.sweep_interval_seconds * 3},
            },
            "distillation-upkeep": {
                "task": messaging.DISTILL_UPKEEP,
                "schedule": 300.0,
                "options": {"queue": CONTROL_QUEUE, "expires": 600},
            },
            "prune-run-output": {
                "task": messaging.PRUNE_RUN_OUTPUT,
                "schedule": 3600.0,
                "options": {"queue": CONTROL_QUEUE, "expires": 3600},
            },
            "autoscale-pools": {
                "task": messaging.AUTOSCALE,
                "schedule": settings.autoscale_interval_seconds,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.autoscale_interval_seconds * 2},
            },
            "provider-health": {
                "task": messaging.HEALTH,
                "schedule": settings.health_interval_seconds,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.health_interval_seconds * 2},
            },
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        imports=["workers.tasks"],
    )
    return app


_apps: dict[int, Celery] = {}


def get_app(settings: Settings | None = None) -> Celery:
    """The app for the current settings (rebuilt when tests swap settings)."""
    settings = settings or get_settings()
    if id(settings) not in _apps:
        _apps.clear()
        _apps[id(settings)] = make_app(settings)
        import workers.tasks  # noqa: F401  (registers the shared tasks on this app)
    return _apps[id(settings)]


@worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    # A forked pool child must not reuse the parent's database connections.
    from orchestrator.db.engine import reset_engines

    reset_engines()


app = get_app()
