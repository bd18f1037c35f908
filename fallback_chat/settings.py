"""Configuration of the fallback chat service, from ``FALLBACK_*`` environment variables.

Secrets are never values here: ``FALLBACK_API_KEY_ENV`` and ``FALLBACK_UPSTREAM_KEY_ENV`` *name* the
variables that hold them (Fly secrets, say), so settings can be printed or logged without leaking keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendName = Literal["auto", "llama-cpp", "stand-in", "upstream"]


class ConfigError(Exception):
    """The service cannot start as configured; the message names the variable."""


class FallbackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FALLBACK_", extra="ignore")

    # "auto": the local model if FALLBACK_MODEL_PATH names an existing file, else the upstream API.
    backend: BackendName = "auto"
    # The model id this service advertises on /v1/models; requests may name any model.
    model_name: str = Field(default="fallback-chat", min_length=1)

    # llama-cpp: a GGUF file, and how much of the (small, shared) CPU it may use.
    model_path: Path | None = None
    n_ctx: int = Field(default=2048, ge=256)
    n_threads: int | None = Field(default=None, ge=1)

    # upstream: any OpenAI-compatible base URL ending in /v1, and the name of the env var with its key.
    upstream_url: str = ""
    upstream_key_env: str = ""
    # If set, every forwarded request uses this upstream model; else the client's model is forwarded.
    upstream_model: str = ""
    upstream_timeout: float = Field(default=60.0, gt=0)

    # Name of the env var holding the bearer key clients must send; unset: no auth (local use only).
    api_key_env: str = ""

    # Replies are capped so one request cannot hold the single CPU for minutes.
    max_tokens_limit: int = Field(default=512, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: str = "info"

    def secret(self, variable_setting: str) -> str | None:
        """The value of the env var that ``variable_setting`` (e.g. "api_key_env") names, or None if
        that setting is empty. A named but empty variable is a ConfigError: a service configured for
        auth must not quietly start open."""
        name = getattr(self, variable_setting)
        if not name:
            return None
        value = os.environ.get(name, "")
        if not value:
            raise ConfigError(f"FALLBACK_{variable_setting.upper()} names {name}, which is not set")
        return value


def load_settings() -> FallbackSettings:
    """Settings from the environment, with a validation error turned into one line naming the variable."""
    try:
        return FallbackSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]).upper() if err["loc"] else "SETTINGS"
        raise ConfigError(f"FALLBACK_{field}: {err['msg']}") from None
