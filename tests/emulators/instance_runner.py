"""Makes emulated cloud instances really run their start script, as the Vast emulator does for its
instances: moto's EC2 and our Compute Engine emulator only store an instance's UserData or
``startup-script``; they never boot anything. A runner thread watches the emulator for new
gpufleet instances (tagged/labelled ``gpufleet-label``), runs each one's script once with
``bash`` in a subprocess of its own process group, and plays the machine's part around it:

- the script's request to power off (``shutdown -h now`` and friends) powers the instance off:
  on EC2 that terminates it (our launches use shutdown behaviour "terminate"); on GCE the VM
  shows TERMINATED. A script that ends without asking to power off leaves its VM running, as on
  a real machine (our GCE startup script does that: gpufleet deletes the VM);
- whenever the script's main process ends, whatever it left in the background (the EC2
  watchdog ``( sleep N; shutdown -h now ) &``) is killed with the process group;
- an instance terminated or deleted under a running script (by our adapter, a test's
  out-of-band termination, a preemption) takes its script with it.

SAFETY: the test machine runs as root. Scripts run with a PATH that starts with a private
directory of stand-ins for every power command (shutdown, poweroff, halt, reboot, systemctl,
init, telinit) and for ``sync``; each stand-in only records that it was called. PATH holds no
sbin directory, a setup check proves ``shutdown`` resolves to the stand-in, and a script naming
a power command by absolute path is refused rather than run.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tests.emulators.gcp import GCPEmulator

log = logging.getLogger(__name__)

LABEL = "gpufleet-label"
POWER_COMMANDS = ("shutdown", "poweroff", "halt", "reboot", "systemctl", "init", "telinit")
HARMLESS_COMMANDS = ("sync",)
# A power command named by path would bypass the stand-ins on PATH: such a script is never run.
_ABSOLUTE_POWER = re.compile(r"/(?:usr/)?s?bin/(?:" + "|".join(POWER_COMMANDS) + r")\b")
_SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin")  # no sbin: the real shutdown lives there


@dataclass
class Run:
    """One instance's script: where it runs and how it ended."""

    instance: str
    script: str
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    state: str = "running"  # running | exited | powered_off | killed | refused
    exit_code: int | None = None
    shutdown_requested: bool = False
    started_at: float = 0.0
    ended_at: float | None = None

    @property
    def output(self) -> str:
        try:
            return (self.workdir / "output.log").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def power_requests(self) -> list[str]:
        """The power commands the script called (one line each: name and arguments)."""
        try:
            return (self.workdir / "power-requests").read_text().splitlines()
        except OSError:
            return []


class InstanceRunner:
    """The shared machinery; subclasses say how to find instances, read their scripts and end them."""

    name = "instance"

    def __init__(self, poll_interval: float = 0.1) -> None:
        self.poll_interval = poll_interval
        self.errors: list[str] = []  # emulator errors the watcher rode out (for a failing test's message)
        self._runs: dict[str, Run] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._root = Path(tempfile.mkdtemp(prefix=f"gpufleet-{self.name}-runner-"))

    # --- what a subclass provides ------------------------------------------------------------

    def _discover(self) -> list[tuple[str, str]]:
        """(instance key, script) of every gpufleet instance that has booted and might be new."""
        raise NotImplementedError

    def _alive(self, keys: list[str]) -> set[str]:
        """Of ``keys``, the instances that still exist and are not shutting down or terminated."""
        raise NotImplementedError

    def _power_off(self, key: str) -> None:
        """The instance powered itself off."""
        raise NotImplementedError

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-runner", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop watching and kill every script still running (tests must not leak processes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            for run in self._runs.values():
                self._kill(run, "killed")
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what tests read ---------------------------------------------------------------------

    def runs(self) -> list[Run]:
        with self._lock:
            return list(self._runs.values())

    def run_of(self, key: str) -> Run | None:
        with self._lock:
            return self._runs.get(key)

    def running(self) -> list[Run]:
        """Scripts whose process group has a live main process."""
        with self._lock:
            return [r for r in self._runs.values() if r.process is not None and r.process.poll() is None]

    def wait_for(self, predicate: Callable[[Run], bool], timeout: float = 20.0) -> Run:
        """The first run matching ``predicate``, waiting up to ``timeout`` seconds for one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.runs() if predicate(r)]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {self.name} run matched within {timeout}s: "
                             f"{[(r.instance, r.state) for r in self.runs()]}; errors {self.errors[-3:]}")

    # --- the watcher -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - an emulator hiccup must not end the watcher
                self.errors.append(f"{type(exc).__name__}: {exc}")
                log.warning("%s runner: %s", self.name, exc)
            self._stop.wait(self.poll_interval)

    def _tick(self) -> None:
        for key, script in self._discover():
            with self._lock:
                if key in self._runs or self._stop.is_set():
                    continue
                self._runs[key] = self._launch(key, script)
        with self._lock:
            live = [r for r in self._runs.values() if r.state == "running"]
        if not live:
            return
        alive = self._alive([r.instance for r in live])
        for run in live:
            with self._lock:
                # The script's own end first: an instance our adapter deleted right after the script
                # reported and exited did not take a running script with it.
                requested = bool(run.power_requests)
                ended = run.process is not None and run.process.poll() is not None
                if requested or ended:
                    run.shutdown_requested = requested
                    self._kill(run, "powered_off" if requested else "exited")
                elif run.instance not in alive:  # terminated or deleted under the running script
                    self._kill(run, "killed")
                    continue
                else:
                    continue
            if requested and run.instance in alive:
                self._power_off(run.instance)

    def _launch(self, key: str, script: str) -> Run:
        workdir = self._root / re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        run = Run(instance=key, script=script, workdir=workdir, started_at=time.time())
        workdir.mkdir(parents=True, exist_ok=True)
        if _ABSOLUTE_POWER.search(script):
            run.state, run.ended_at = "refused", time.time()
            self.errors.append(f"{key}: refused a script that names a power command by path")
            return run
        path = self._standins(workdir / "bin")
        (workdir / "start.sh").write_text(script)
        env = {"PATH": path, "HOME": str(workdir), "LANG": "C.UTF-8", "TMPDIR": str(workdir)}
        with open(workdir / "output.log", "wb") as out:
            run.process = subprocess.Popen(["/bin/bash", str(workdir / "start.sh")], cwd=workdir, env=env, stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return run

    def _standins(self, bindir: Path) -> str:
        """A PATH whose power commands are stand-ins that only write down the request."""
        bindir.mkdir(parents=True, exist_ok=True)
        record = bindir.parent / "power-requests"
        for command in POWER_COMMANDS:
            _write_script(bindir / command, f'#!/bin/sh\necho "{command} $*" >> "{record}"\nexit 0\n')
        for command in HARMLESS_COMMANDS:
            _write_script(bindir / command, "#!/bin/sh\nexit 0\n")
        python_dir = os.path.dirname(sys.executable)  # the instance's python3 is the one running the tests
        path = os.pathsep.join([str(bindir), python_dir, *_SYSTEM_PATH])
        for command in POWER_COMMANDS:
            found = shutil.which(command, path=path)
            if found != str(bindir / command):  # never run a script that could reach a real power command
                raise RuntimeError(f"{command} resolves to {found}, not the stand-in")
        return path

    def _kill(self, run: Run, state: str) -> None:
        """End the script's whole process group (the main process and anything it left in the background)."""
        if run.state != "running":
            return
        proc = run.process
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            run.exit_code = proc.returncode
        run.state, run.ended_at = state, time.time()


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


class EC2Runner(InstanceRunner):
    """Runs the UserData of moto's EC2 instances tagged ``gpufleet-label``; a power-off terminates."""

    name = "ec2"

    def __init__(self, endpoint_url: str, regions: list[str] | None = None, poll_interval: float = 0.1) -> None:
        super().__init__(poll_interval)
        import boto3

        self._clients = {r: boto3.client("ec2", region_name=r, endpoint_url=endpoint_url)
                         for r in regions or ["us-east-1"]}
        self._region_of: dict[str, str] = {}

    def _discover(self) -> list[tuple[str, str]]:
        found = []
        for region, client in self._clients.items():
            answer = client.describe_instances(Filters=[{"Name": "tag-key", "Values": [LABEL]},
                                                        {"Name": "instance-state-name", "Values": ["running"]}])
            for reservation in answer.get("Reservations") or []:
                for inst in reservation.get("Instances") or []:
                    iid = str(inst["InstanceId"])
                    if self.run_of(iid) is not None:
                        continue
                    attr = client.describe_instance_attribute(InstanceId=iid, Attribute="userData")
                    raw = (attr.get("UserData") or {}).get("Value") or ""
                    self._region_of[iid] = region
                    found.append((iid, base64.b64decode(raw).decode(errors="replace") if raw else ""))
        return found

    def _alive(self, keys: list[str]) -> set[str]:
        alive: set[str] = set()
        by_region: dict[str, list[str]] = {}
        for key in keys:
            by_region.setdefault(self._region_of.get(key, next(iter(self._clients))), []).append(key)
        for region, ids in by_region.items():
            answer = self._clients[region].describe_instances(InstanceIds=ids)
            alive |= {str(i["InstanceId"]) for r in answer.get("Reservations") or [] for i in r.get("Instances") or []
                      if (i.get("State") or {}).get("Name") in ("pending", "running")}
        return alive

    def _power_off(self, key: str) -> None:
        # Shutdown behaviour "terminate": powering off deletes the instance. (moto records the reason
        # as a user-initiated shutdown; the API has no way to ask for an instance-initiated one.)
        self._clients[self._region_of.get(key, next(iter(self._clients)))].terminate_instances(InstanceIds=[key])


class GCPRunner(InstanceRunner):
    """Runs the ``startup-script`` of the GCP emulator's VMs labelled ``gpufleet-label`` once they are RUNNING."""

    name = "gce"

    def __init__(self, emulator: GCPEmulator, poll_interval: float = 0.1) -> None:
        super().__init__(poll_interval)
        self.emulator = emulator

    @staticmethod
    def _key(inst: dict[str, Any]) -> str:
        return f"{str(inst['zone']).rsplit('/', 1)[-1]}/{inst['name']}"

    def _discover(self) -> list[tuple[str, str]]:
        found = []
        for inst in self.emulator.instances():
            if LABEL not in (inst.get("labels") or {}) or inst.get("status") != "RUNNING":
                continue
            items = (inst.get("metadata") or {}).get("items") or []
            script = next((str(i.get("value") or "") for i in items if i.get("key") == "startup-script"), "")
            found.append((self._key(inst), script))
        return found

    def _alive(self, keys: list[str]) -> set[str]:
        return {self._key(i) for i in self.emulator.instances() if i.get("status") == "RUNNING"} & set(keys)

    def _power_off(self, key: str) -> None:
        zone, _, name = key.partition("/")
        self.emulator.power_off(zone, name)
