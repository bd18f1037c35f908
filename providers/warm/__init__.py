"""Warm pools of rented instances (``type: warm``): see providers/warm/provider.py."""

from providers.warm.provider import WarmPoolProvider

__all__ = ["WarmPoolProvider"]
