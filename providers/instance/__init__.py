"""What runs on a rented instance (Vast.ai, RunPod pods, clouds): the job's command, wrapped so
it reports its outcome to our callback. Shared by every instance-based adapter."""

from providers.instance.command import instance_command

__all__ = ["instance_command"]
