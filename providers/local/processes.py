"""Detached subprocesses that outlive the worker that started them.

A provider worker may be killed mid-job; the command must keep running and its exit
code must still be readable by whichever worker polls next. So the command runs in
its own session under a tiny shell wrapper that writes the exit code to a file, and
everything a poller needs (pid, paths, deadline) lives in the run handle.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Writes the exit code atomically so a poller never reads a half-written file.
_WRAPPER = '"$@"; code=$?; printf %s "$code" > "$GPUFLEET_EXIT_FILE.tmp" && mv "$GPUFLEET_EXIT_FILE.tmp" "$GPUFLEET_EXIT_FILE"'
TAIL_BYTES = 4096
# Read once a process has ended (more than a job's kept output: the rest would be dropped anyway).
FINAL_READ_BYTES = 64_000_000


def argv_for(command: list[str] | str) -> list[str]:
    return ["sh", "-c", command] if isinstance(command, str) else list(command)


# What a job inherits from the worker's environment: the basics and the GPU/ML runtime's settings —
# never the rest, which holds our database URL, provider API keys and storage credentials (a job's
# output is kept and shown, and a job may print its environment).
INHERITED = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
                       "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX"})
INHERITED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "HF_", "TRANSFORMERS_", "TORCH_", "XDG_", "OMP_", "MKL_")


def inherited_env(extra: Iterable[str] = ()) -> dict[str, str]:
    """The part of this process's environment a job may see; ``extra``: names an operator passes on too."""
    allowed = INHERITED | set(extra)
    return {k: v for k, v in os.environ.items() if k in allowed or k.startswith(INHERITED_PREFIXES)}


def spawn(run_dir: Path, command: list[str] | str, env: dict[str, str], cwd: str | None = None,
          kill_after: float | None = None, inherit: Iterable[str] = ()) -> dict[str, Any]:
    """Start the command detached. ``kill_after``: seconds after which it is killed outright, as a host
    that is taken away (the sandbox's spot offers) would end it. ``inherit``: more variable names of
    this process's environment to pass on (the basics always are; secrets never by default)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    exit_file = run_dir / "exit_code"
    for stale in (exit_file, run_dir / "stdout.log", run_dir / "stderr.log"):
        stale.unlink(missing_ok=True)
    full_env = {**inherited_env(inherit), **env, "GPUFLEET_EXIT_FILE": str(exit_file)}
    with open(run_dir / "stdout.log", "wb") as out, open(run_dir / "stderr.log", "wb") as err:
        proc = subprocess.Popen(
            ["sh", "-c", _WRAPPER, "gpufleet-run",
             *(["timeout", "-s", "KILL", f"{kill_after:.3f}"] if kill_after else []), *argv_for(command)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    return {"pid": proc.pid, "run_dir": str(run_dir), "command": shlex.join(argv_for(command))}


def exit_code(info: dict[str, Any]) -> int | None:
    try:
        return int((Path(info["run_dir"]) / "exit_code").read_text())
    except (FileNotFoundError, ValueError):
        return None


def exited_at(info: dict[str, Any]) -> float | None:
    """When the command finished (its exit file's time), or None while it runs."""
    try:
        return (Path(info["run_dir"]) / "exit_code").stat().st_mtime
    except FileNotFoundError:
        return None


def alive(info: dict[str, Any]) -> bool:
    pid = int(info["pid"])
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our own child
        if finished == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie answers kill(0) but has exited: where nobody reaps orphans (no init in a
    # container), a finished command would otherwise look alive until its deadline.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def kill(info: dict[str, Any], grace_seconds: float = 2.0) -> None:
    """Stop the whole process group: TERM, then KILL after a grace period. Idempotent."""
    pid = int(info["pid"])
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(info):
                return
            time.sleep(0.05)


def tail(info: dict[str, Any], name: str) -> str:
    path = Path(info["run_dir"]) / name
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def new_output(info: dict[str, Any], *, ended: bool = False, max_bytes: int = 256_000) -> list[tuple[str, str]]:
    """What the process printed since the last call, as (stream, text); the read offsets live in
    ``info`` (the run handle), so whichever worker polls next carries on where this one stopped.
    Only whole lines are taken while it runs (a line being written waits; so does a line longer than
    ``max_bytes``, until it ends or grows past it); once it has ended, the rest is read."""
    offsets = info.setdefault("offsets", {})
    chunks = []
    for stream in ("stdout", "stderr"):
        path = Path(info["run_dir"]) / f"{stream}.log"
        start = int(offsets.get(stream, 0))
        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read(max_bytes if not ended else FINAL_READ_BYTES)
        except FileNotFoundError:
            continue
        cut = len(data) if ended else data.rfind(b"\n") + 1
        if not cut and len(data) >= max_bytes:
            cut = len(data)  # one line longer than a read: take it in pieces rather than never
        if cut:
            offsets[stream] = start + cut
            chunks.append((stream, data[:cut].decode("utf-8", "replace")))
    return chunks


def status(info: dict[str, Any], deadline: float) -> tuple[str, dict[str, Any] | None, str | None]:
    """(state, result, error) of a spawned command; kills it once past its deadline."""
    code = exit_code(info)
    if code is None:
        if alive(info):
            if time.time() > deadline:
                kill(info)
                return "failed", None, "exceeded its time limit and was stopped"
            return "running", None, None
        code = exit_code(info)  # it may have finished between the two checks
        if code is None:
            return "failed", None, "the process vanished without an exit code (killed outside gpufleet?)"
    result: dict[str, Any] = {"exit_code": code, "stdout": tail(info, "stdout.log"), "stderr": tail(info, "stderr.log")}
    # The same convention as on rented instances: a ``GPUFLEET_RESULT {json}`` line becomes the result.
    for line in result["stdout"].splitlines():
        if line.startswith("GPUFLEET_RESULT "):
            try:
                reported = json.loads(line[len("GPUFLEET_RESULT "):])
            except ValueError:
                continue
            if isinstance(reported, dict):
                result.update(reported)
    if code == 0:
        return "succeeded", result, None
    last_line = next((line for line in reversed(result["stderr"].splitlines()) if line.strip()), "")
    return "failed", result, f"exit code {code}" + (f": {last_line[:300]}" if last_line else "")
