"""The emulated GPU market: offers, and a ledger of rented slots shared by all processes.

The ledger is a JSON file under a lock so that API, dispatchers and provider workers in
different processes agree on what is rented — the sandbox says ``NoCapacity`` when an
offer is full, exactly like a real marketplace would.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

ALL_KINDS = ["inference", "transcription", "training", "distillation", "command"]


class SandboxOffer(BaseModel):
    offer_id: str
    gpu: str | None = None
    gpu_count: int = 1
    gpu_memory_gb: float = 0
    region: str = "us-east"
    price_per_hour: float
    price_per_1k_tokens: float | None = None
    capacity: int = 4
    reliability: float = 0.99
    boot_seconds: float = 0.2
    # Probability that reserving fails with NoCapacity (the offer was taken meanwhile).
    reserve_failure_rate: float = Field(default=0.0, ge=0, le=1)
    # Probability that the host dies while running the job (a transient failure).
    crash_rate: float = Field(default=0.0, ge=0, le=1)
    # Spot/bid capacity (a job asking for on-demand only never lands here); one with preempt_after_seconds is.
    interruptible: bool = False
    # A spot offer: the host is reclaimed after the run has had it this long (seconds, before time_scale).
    preempt_after_seconds: float | None = Field(default=None, gt=0)
    kinds: list[str] = Field(default_factory=lambda: list(ALL_KINDS))


DEFAULT_OFFERS: list[dict[str, Any]] = [
    {"offer_id": "l4-serverless", "gpu": "L4", "gpu_memory_gb": 24, "region": "us-east", "price_per_hour": 0.48,
     "price_per_1k_tokens": 0.0002, "capacity": 8, "kinds": ["inference", "transcription"]},
    {"offer_id": "rtx4090-se", "gpu": "RTX 4090", "gpu_memory_gb": 24, "region": "eu-se", "price_per_hour": 0.39,
     "capacity": 4, "reliability": 0.97},
    {"offer_id": "a100-us", "gpu": "A100", "gpu_memory_gb": 80, "region": "us-east", "price_per_hour": 1.29,
     "capacity": 2, "boot_seconds": 0.5},
    {"offer_id": "h100-spot-us", "gpu": "H100", "gpu_memory_gb": 80, "region": "us-west", "price_per_hour": 1.89,
     "capacity": 2, "reliability": 0.80, "crash_rate": 1.0, "interruptible": True},
    {"offer_id": "h100-de", "gpu": "H100", "gpu_memory_gb": 80, "region": "eu-de", "price_per_hour": 2.49,
     "capacity": 2, "boot_seconds": 0.5},
    # Spot capacity that is reclaimed 1.5 s into every run: training resumes elsewhere from its checkpoint.
    {"offer_id": "a10-spot-us", "gpu": "A10", "gpu_memory_gb": 24, "region": "us-west", "price_per_hour": 0.16,
     "capacity": 2, "preempt_after_seconds": 1.5, "kinds": ["training"]},
    {"offer_id": "a10-de", "gpu": "A10", "gpu_memory_gb": 24, "region": "eu-de", "price_per_hour": 0.35,
     "capacity": 2, "kinds": ["training"]},
]


class Ledger:
    """Rented slots per offer, persisted in ``path`` and guarded by an exclusive flock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, dict[str, Any]]]]:
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_text()) if self.path.exists() else {}
            except json.JSONDecodeError:
                state = {}
            yield state
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.path)

    def take(self, offer_id: str, lease_id: str, capacity: int, label: str = "", price_per_hour: float = 0.0) -> bool:
        with self._locked() as state:
            leases = state.setdefault(offer_id, {})
            if lease_id in leases:
                return True
            if len(leases) >= capacity:
                return False
            # The label is what the provider stores for us: the reaper matches it against jobs.
            leases[lease_id] = {"at": time.time(), "label": label, "price_per_hour": price_per_hour}
            return True

    def give_back(self, offer_id: str, lease_id: str) -> None:
        with self._locked() as state:
            state.get(offer_id, {}).pop(lease_id, None)

    def in_use(self) -> dict[str, dict[str, dict[str, Any]]]:
        with self._locked() as state:
            return {k: dict(v) for k, v in state.items()}
