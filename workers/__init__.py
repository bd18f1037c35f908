"""Celery side of gpufleet: the app (queues, routes, beat) and thin tasks that call services."""
