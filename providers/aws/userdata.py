"""The instance's UserData: a shell script that runs the job once at first boot, then powers off.

The job's environment is exported with shell quoting; the job itself is the shared instance
command (providers.instance), which reports the outcome to our callback before we power off.
A watchdog powers the instance off after the job's time limit plus a margin, so an instance
whose orchestrator vanished does not bill forever (with shutdown behaviour "terminate" that
also deletes it).
"""

from __future__ import annotations

import re
import shlex

from providers.base import JobSpec, PermanentProviderError
from providers.instance import instance_command

USER_DATA_LIMIT = 16 * 1024  # EC2's limit on the raw (pre-base64) user data
WATCHDOG_MARGIN_SECONDS = 600
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def job_env(job: JobSpec, extra: dict[str, str]) -> dict[str, str]:
    env = {str(k): str(v) for k, v in (job.spec.get("env") or {}).items()}
    env.update({str(k): str(v) for k, v in job.env.items()})
    for key, value in extra.items():
        env.setdefault(key, value)
    return env


def user_data(job: JobSpec, env: dict[str, str], default_command: list[str] | str | None = None) -> str:
    command = instance_command(job, default_command)
    bad = [k for k in env if not _NAME.fullmatch(k)]
    if bad:
        raise PermanentProviderError(f"environment variable names must be letters, digits and _: {', '.join(bad)}")
    exports = "\n".join(f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items()))
    watchdog = int(job.timeout_seconds) + WATCHDOG_MARGIN_SECONDS
    script = f"""#!/bin/bash
# gpufleet {job.label or job.job_id}: run the job once, report, power off.
{exports}
( sleep {watchdog}; shutdown -h now ) >/dev/null 2>&1 &
cd /tmp
{command}
code=$?
sync
shutdown -h now
exit $code
"""
    if len(script.encode()) > USER_DATA_LIMIT:
        raise PermanentProviderError(f"the job's command and environment are too large for EC2 user data "
                                     f"({len(script.encode())} bytes > {USER_DATA_LIMIT})")
    return script
