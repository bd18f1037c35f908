"""The instance's start command, as one shell-safe string.

The wrapper and the job's command travel base64-encoded inside a ``python3 -c`` line, so no
provider's quoting rules (Vast's JSON, RunPod's GraphQL text) can break or inject into them.
"""

from __future__ import annotations

import base64
from pathlib import Path

from providers.base import JobSpec, PermanentProviderError

_WRAPPER = (Path(__file__).parent / "wrapper.py").read_text()


def instance_command(job: JobSpec, default_command: list[str] | str | None = None) -> str:
    """``python3 -c "…"`` that runs the job's command on the instance and reports back."""
    command = job.spec.get("command") or default_command
    if not command:
        raise PermanentProviderError(f"{job.kind} jobs on rented instances need a 'command' "
                                     "(or a configured default command for the provider)")
    return _python_line(_WRAPPER.replace("COMMAND = None", f"COMMAND = {command!r}", 1))


def agent_command() -> str:
    """``python3 -c "…"`` that takes the jobs submitted onto a standalone reservation until it ends
    (GPUFLEET_AGENT_URL / GPUFLEET_AGENT_TOKEN in its env)."""
    return _python_line(_WRAPPER)


def _python_line(source: str) -> str:
    encoded = base64.b64encode(source.encode()).decode()
    return f"python3 -c \"import base64;exec(compile(base64.b64decode('{encoded}'),'gpufleet-wrapper','exec'))\""
