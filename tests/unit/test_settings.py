"""Settings: embedded defaults, env switches, and one-line errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for key in list(__import__("os").environ):
        if key.startswith("GPUFLEET_"):
            monkeypatch.delenv(key)


def test_embedded_defaults(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path / 'gpufleet.db'}"
    assert s.broker_url == "filesystem://" and s.embedded
    assert s.queue_concurrency["inference"] == 4 and s.queue_concurrency["control"] == 1


def test_two_variables_switch_to_postgres_and_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_DATABASE_URL", "postgresql://u@db:5432/x")
    monkeypatch.setenv("GPUFLEET_BROKER_URL", "redis://r:6379/0")
    s = load_settings()
    assert s.database_url == "postgresql+psycopg://u@db:5432/x" and s.broker_url == "redis://r:6379/0"
    assert not s.embedded


@pytest.mark.parametrize(
    ("var", "value", "start"),
    [
        ("GPUFLEET_BROKER_URL", "http://x", "GPUFLEET_BROKER_URL: must be a redis://"),
        ("GPUFLEET_DATABASE_URL", "mysql://x", "GPUFLEET_DATABASE_URL: must start with"),
        ("GPUFLEET_VISIBILITY_TIMEOUT", "5", "GPUFLEET_VISIBILITY_TIMEOUT:"),
        ("GPUFLEET_VISIBILITY_TIMEOUT", "soon", "GPUFLEET_VISIBILITY_TIMEOUT:"),
        ("GPUFLEET_BOOTSTRAP_API_KEYS", "acme:short", "GPUFLEET_BOOTSTRAP_API_KEYS: each entry"),
        ("GPUFLEET_QUEUE_CONCURRENCY", "{\"inference\": 0}", "GPUFLEET_QUEUE_CONCURRENCY:"),
        ("GPUFLEET_QUEUE_CONCURRENCY", "lots", "GPUFLEET_QUEUE_CONCURRENCY: cannot parse"),
    ],
)
def test_invalid_value_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                                      start: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert message.startswith(start) and "\n" not in message


def test_bootstrap_keys_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_BOOTSTRAP_API_KEYS", "a:" + "x" * 16 + ", b:" + "y" * 16)
    assert load_settings().bootstrap_api_keys == ["a:" + "x" * 16, "b:" + "y" * 16]


@pytest.mark.parametrize("suffix", ["yaml", "toml"])
def test_providers_file_with_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    path = tmp_path / f"providers.{suffix}"
    if suffix == "yaml":
        path.write_text("providers:\n  sandbox: {time_scale: 1.0}\n  local: {slots: 2}\n")
    else:
        path.write_text("[providers.sandbox]\ntime_scale = 1.0\n[providers.local]\nslots = 2\n")
    monkeypatch.setenv("GPUFLEET_PROVIDERS_FILE", str(path))
    monkeypatch.setenv("GPUFLEET_PROVIDERS__SANDBOX__TIME_SCALE", "0")
    configs = load_settings().provider_configs()
    assert configs["local"] == {"slots": 2}
    assert float(configs["sandbox"]["time_scale"]) == 0  # env wins over the file


def test_bad_providers_file_names_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_PROVIDERS_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="^GPUFLEET_PROVIDERS_FILE: cannot read"):
        load_settings().provider_configs()
    broken = tmp_path / "broken.yaml"
    broken.write_text("providers: [1, 2\n")
    monkeypatch.setenv("GPUFLEET_PROVIDERS_FILE", str(broken))
    with pytest.raises(ConfigError, match="^GPUFLEET_PROVIDERS_FILE: .* is not valid"):
        load_settings().provider_configs()


def test_unknown_provider_type_is_a_clear_error(tmp_path: Path) -> None:
    from providers.registry import build_providers

    settings = load_settings(data_dir=tmp_path, providers={"gpu-farm": {"type": "teleporter"}})
    with pytest.raises(ConfigError, match="provider 'gpu-farm' has unknown type 'teleporter'"):
        build_providers(settings)
