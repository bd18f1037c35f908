"""Vast.ai marketplace adapter (``type: vastai``); the ``vastai`` SDK is imported only when first used."""

from providers.vastai.provider import VastAIProvider

__all__ = ["VastAIProvider"]
