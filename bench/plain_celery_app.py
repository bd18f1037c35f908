"""The baseline: plain Celery with a no-op task and a Redis result backend."""

import os

from celery import Celery

URL = os.environ.get("BENCH_PLAIN_REDIS", "redis://127.0.0.1:6379/13")
app = Celery("plain", broker=URL, backend=URL)
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                task_acks_late=True, worker_prefetch_multiplier=4)


@app.task(name="noop")
def noop() -> None:
    return None
