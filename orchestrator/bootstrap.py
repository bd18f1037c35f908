"""Getting a database ready to serve: migrations (embedded only) and bootstrap keys."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.db.engine import session_scope
from orchestrator.services import keys
from orchestrator.settings import Settings

LOCAL_TENANT = "local"


def prepare_database(settings: Settings) -> None:
    """Embedded mode migrates itself; a production stack is migrated by `gpufleet migrate`."""
    if settings.database_url.startswith("sqlite"):
        from orchestrator.db.migrate import upgrade

        upgrade(settings.database_url)
    if settings.bootstrap_api_keys:
        with session_scope() as s:
            keys.bootstrap(s, settings.bootstrap_api_keys)
    sync_configured_budgets(settings)


def sync_configured_budgets(settings: Settings) -> None:
    """Limits from configuration win over earlier ones: the config file is the operator's source of truth."""
    from orchestrator.services import budgets
    from providers.registry import provider_budgets

    wanted = {("provider", name): limits for name, limits in provider_budgets(settings).items()}
    if settings.monthly_budget is not None or settings.max_cost_per_hour is not None:
        wanted[("global", "")] = (settings.monthly_budget, settings.max_cost_per_hour)
    if not wanted:
        return
    with session_scope() as s:
        for (scope, key), (monthly, hourly) in wanted.items():
            budgets.set_budget(s, scope, key, monthly, hourly)


def local_key_path(settings: Settings) -> Path:
    return settings.data_dir / "local-api-key"


def ensure_local_key(settings: Settings) -> str:
    """The key the CLI and in-process SDK use on the embedded default, kept in the data dir (0600)."""
    path = local_key_path(settings)
    if path.exists():
        key = path.read_text().strip()
        with session_scope() as s:
            if keys.tenant_for_key(s, key) is not None:
                return key
    with session_scope() as s:
        key = keys.create_key(s, LOCAL_TENANT, name="local")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key
