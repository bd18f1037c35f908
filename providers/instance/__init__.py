"""What runs on a rented instance (Vast.ai, RunPod pods, clouds): the job's command, wrapped so
it reports its outcome to our callback — or, on a standalone reservation, an agent that takes
the jobs submitted onto it. Shared by every instance-based adapter."""

from providers.instance.command import agent_command, instance_command

__all__ = ["agent_command", "instance_command"]
