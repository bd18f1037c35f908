"""Errors gpufleet raises to its users; each carries a message fit to print as one line."""

from __future__ import annotations


class GpufleetError(Exception):
    """Base for errors that are shown to users as-is."""


class ConfigError(GpufleetError):
    """Invalid or unreadable configuration; the message names the setting."""


class NotFound(GpufleetError):
    pass


class Conflict(GpufleetError):
    pass


class InvalidInput(GpufleetError):
    """A request that parses but breaks a rule checked at run time (e.g. a configured limit)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class InvalidTransition(GpufleetError):
    pass


class NoPlacement(GpufleetError):
    """No offer meets the job's constraints; the message lists why each was rejected."""


class CapacityBusy(NoPlacement):
    """Offers fit the job but all are full right now: wait and place again, don't fail."""
