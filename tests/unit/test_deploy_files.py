"""docker-compose.yml and fly.toml stay valid: every command they run is a real `gpufleet` command
with options our CLI accepts, and every queue of the design is served by some worker."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import click
import typer.main
import yaml

from orchestrator.cli.main import app
from orchestrator.settings import CONTROL_QUEUE, QUEUE_NAMES

ROOT = Path(__file__).resolve().parents[2]
CLI: click.Group = typer.main.get_command(app)  # type: ignore[assignment]


def _parse(argv: list[str]) -> tuple[str, dict[str, object]]:
    """Parse a command line with our own CLI; raises if a command or option does not exist."""
    assert argv[0] == "gpufleet", argv
    name = argv[1]
    assert name in CLI.commands, f"'gpufleet {name}' is not a command"
    command = CLI.commands[name]
    ctx = command.make_context(f"gpufleet {name}", list(argv[2:]), resilient_parsing=False)
    return name, dict(ctx.params)


def _compose() -> dict[str, dict[str, object]]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_compose_has_the_production_stack() -> None:
    services = _compose()
    assert {"postgres", "redis", "migrate", "api", "beat", "flower"} <= set(services)
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name


def test_every_compose_command_is_a_real_cli_command() -> None:
    seen = set()
    for name, service in _compose().items():
        command = service.get("command")
        if name in ("postgres", "redis"):
            continue
        assert isinstance(command, list), f"{name}: command must be a list"
        sub, _ = _parse([str(c) for c in command])
        seen.add(sub)
    assert {"migrate", "api", "worker", "beat", "flower"} <= seen


def test_every_queue_is_served_and_concurrency_matches_the_design() -> None:
    expected = {"high_priority": 2, "inference": 4, "default": 4, "training": 2, "distillation": 2,
                "low_priority": 2, "control": 1}
    served: dict[str, int] = {}
    for service in _compose().values():
        command = [str(c) for c in service.get("command") or []]
        if command[:2] != ["gpufleet", "worker"]:
            continue
        _, params = _parse(command)
        for queue in str(params["queues"]).split(","):
            served[queue] = int(params["concurrency"])  # type: ignore[arg-type]
    for queue in (*QUEUE_NAMES, CONTROL_QUEUE):
        assert served.get(queue) == expected[queue], queue
    assert {"p.local", "p.sandbox"} <= set(served)


def test_flower_is_never_served_open() -> None:
    flower = _compose()["flower"]
    auth = flower["environment"]["GPUFLEET_FLOWER_BASIC_AUTH"]  # type: ignore[index]
    assert auth.startswith("${GPUFLEET_FLOWER_BASIC_AUTH:?"), "basic auth must be required"


def test_flower_command_refuses_to_start_without_auth(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from orchestrator.settings import get_settings

    monkeypatch.delenv("GPUFLEET_FLOWER_BASIC_AUTH", raising=False)
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["flower"])
    get_settings.cache_clear()
    assert result.exit_code != 0
    assert "GPUFLEET_FLOWER_BASIC_AUTH must be set" in str(result.exception)


def test_fly_toml_runs_our_commands() -> None:
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    assert fly["http_service"]["checks"][0]["path"] == "/health"
    for command in [*fly["processes"].values(), fly["deploy"]["release_command"]]:
        _parse(shlex.split(command))
