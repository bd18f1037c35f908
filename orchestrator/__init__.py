"""gpufleet: orchestrate AI jobs across rented GPUs, clouds and model APIs."""

from __future__ import annotations

from typing import Any

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import orchestrator.settings` stays cheap for workers and the CLI.
    if name == "Client":
        from orchestrator.sdk import Client

        return Client
    raise AttributeError(name)
