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


# --- more cases -----------------------------------------------------------------------------------


def test_embedded_defaults_follow_data_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_DATA_DIR", str(tmp_path / "state"))
    s = load_settings()
    assert s.data_dir == tmp_path / "state"
    assert s.database_url == f"sqlite:///{tmp_path / 'state' / 'gpufleet.db'}"
    assert s.broker_dir == tmp_path / "state" / "broker"
    assert s.embedded and s.bootstrap_api_keys == [] and s.provider_configs() == {}


def test_only_one_service_switched_is_not_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_BROKER_URL", "redis://r:6379/0")
    s = load_settings(data_dir=tmp_path)
    assert s.database_url.startswith("sqlite:///") and not s.embedded
    monkeypatch.setenv("GPUFLEET_BROKER_URL", "memory://")
    assert load_settings(data_dir=tmp_path).embedded


def test_explicit_psycopg_and_sqlite_urls_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_DATABASE_URL", "postgresql+psycopg://u:p@db/x")
    assert load_settings().database_url == "postgresql+psycopg://u:p@db/x"
    monkeypatch.setenv("GPUFLEET_DATABASE_URL", f"sqlite:///{tmp_path}/other.db")
    assert load_settings().database_url == f"sqlite:///{tmp_path}/other.db"


def test_postgres_scheme_alias_is_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    # Heroku/Fly-style URLs use postgres://; the validator means to rewrite them but refuses them first.
    monkeypatch.setenv("GPUFLEET_DATABASE_URL", "postgres://u@db:5432/x")
    assert load_settings().database_url == "postgresql+psycopg://u@db:5432/x"


@pytest.mark.parametrize("url", ["redis://r:6379/0", "rediss://r:6380/0", "amqp://g@mq//", "filesystem://",
                                 "memory://"])
def test_accepted_broker_urls(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("GPUFLEET_BROKER_URL", url)
    assert load_settings().broker_url == url


def test_broker_error_message_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_BROKER_URL", "http://x")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value) == "GPUFLEET_BROKER_URL: must be a redis://, amqp:// or filesystem:// URL"


def test_visibility_timeout_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_VISIBILITY_TIMEOUT", "60")
    assert load_settings().visibility_timeout == 60
    monkeypatch.setenv("GPUFLEET_VISIBILITY_TIMEOUT", "59")
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert message.startswith("GPUFLEET_VISIBILITY_TIMEOUT: ") and "60" in message and "\n" not in message


@pytest.mark.parametrize("entry", ["acme:" + "k" * 15, ":" + "k" * 20, "acme" + "k" * 20, "acme:"])
def test_bad_bootstrap_keys(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    monkeypatch.setenv("GPUFLEET_BOOTSTRAP_API_KEYS", "good:" + "g" * 16 + "," + entry)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert message.startswith("GPUFLEET_BOOTSTRAP_API_KEYS: ") and "16" in message and "\n" not in message
    assert entry.partition(":")[2] == "" or entry.partition(":")[2] not in message  # keys are not echoed


def test_bootstrap_key_of_exactly_16_chars_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_BOOTSTRAP_API_KEYS", " acme:" + "k" * 16 + " ,,")
    assert load_settings().bootstrap_api_keys == ["acme:" + "k" * 16]


def test_queue_concurrency_overrides_merge_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_QUEUE_CONCURRENCY", '{"inference": 16, "p.sandbox": 3}')
    concurrency = load_settings().queue_concurrency
    assert concurrency["inference"] == 16 and concurrency["p.sandbox"] == 3
    assert concurrency["training"] == 2 and concurrency["control"] == 1


def test_errors_from_keyword_overrides_also_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="^GPUFLEET_MAX_BATCH_SIZE: "):
        load_settings(max_batch_size=0)


def test_yaml_providers_file_without_top_level_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "providers.yml"
    path.write_text("sandbox:\n  time_scale: 2\n  offers:\n    - {offer_id: x, price_per_hour: 1.0}\n")
    monkeypatch.setenv("GPUFLEET_PROVIDERS_FILE", str(path))
    monkeypatch.setenv("GPUFLEET_PROVIDERS__SANDBOX__TIME_SCALE", "0")
    monkeypatch.setenv("GPUFLEET_PROVIDERS__LOCAL__SLOTS", "8")  # not in the file: env alone adds it
    configs = load_settings().provider_configs()
    assert configs == {"sandbox": {"time_scale": 0, "offers": [{"offer_id": "x", "price_per_hour": 1.0}]},
                       "local": {"slots": 8}}


def test_toml_providers_file_is_read_by_its_suffix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[providers.sandbox]\ntime_scale = 0.5\n[[providers.sandbox.offers]]\noffer_id = "a"\n'
                    "price_per_hour = 2.0\n")
    monkeypatch.setenv("GPUFLEET_PROVIDERS_FILE", str(path))
    assert load_settings().provider_configs() == {"sandbox": {"time_scale": 0.5,
                                                              "offers": [{"offer_id": "a", "price_per_hour": 2.0}]}}


def test_empty_providers_file_means_no_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text("")
    monkeypatch.setenv("GPUFLEET_PROVIDERS_FILE", str(path))
    assert load_settings().provider_configs() == {}


@pytest.mark.parametrize(("name", "text"), [
    ("providers.yaml", "providers:\n  sandbox: 3\n"),
    ("providers.yaml", "- just\n- a list\n"),
    ("providers.yaml", "just a sentence\n"),
    ("providers.toml", "providers = 1\n"),
    ("providers.toml", "[providers\n"),
])
def test_invalid_providers_file_is_one_line_naming_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    monkeypatch.setenv("GPUFLEET_PROVIDERS_FILE", str(path))
    with pytest.raises(ConfigError) as err:
        load_settings().provider_configs()
    message = str(err.value)
    assert message.startswith("GPUFLEET_PROVIDERS_FILE: ") and str(path) in message and "\n" not in message


def test_providers_file_that_is_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_PROVIDERS_FILE", str(tmp_path))
    with pytest.raises(ConfigError, match="^GPUFLEET_PROVIDERS_FILE: cannot read"):
        load_settings().provider_configs()


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GPUFLEET_BROKER_URL=redis://from-dotenv:6379/0\n")
    assert load_settings().broker_url == "redis://from-dotenv:6379/0"
