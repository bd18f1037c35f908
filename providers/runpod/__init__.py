"""RunPod serverless endpoints and pods, through the official ``runpod`` SDK (imported lazily)."""

from providers.runpod.provider import RunPodProvider

__all__ = ["RunPodProvider"]
