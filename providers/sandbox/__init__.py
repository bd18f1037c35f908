from providers.sandbox.provider import SandboxProvider

__all__ = ["SandboxProvider"]
