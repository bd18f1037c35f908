from providers.local.provider import LocalProvider

__all__ = ["LocalProvider"]
