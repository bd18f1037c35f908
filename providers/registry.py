"""Builds the configured providers. Adapters are imported only when configured: several
provider SDKs are slow to import or reconfigure logging as a side effect."""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator.errors import ConfigError
from orchestrator.settings import Settings
from providers.base import Provider

# type name -> "module:Class"; a provider entry picks its adapter with `type`, else by its name.
ADAPTERS: dict[str, str] = {
    "local": "providers.local:LocalProvider",
    "sandbox": "providers.sandbox:SandboxProvider",
    "vastai": "providers.vastai:VastAIProvider",
    "runpod": "providers.runpod:RunPodProvider",
    "aws": "providers.aws:AWSProvider",
    "aws_pool": "providers.aws:AWSPoolProvider",
    "gcp": "providers.gcp:GCPProvider",
    "gcp_pool": "providers.gcp:GCPPoolProvider",
    "pool": "providers.pools:PoolProvider",
    "openai_api": "providers.llm_api:OpenAICompatibleProvider",
    "anthropic": "providers.llm_api:AnthropicProvider",
    "warm": "providers.warm:WarmPoolProvider",
}


def build_providers(settings: Settings) -> dict[str, Provider]:
    configs = settings.provider_configs()
    if not configs:
        configs = {"local": {}, "sandbox": {}}
    providers: dict[str, Provider] = {}
    for name, raw in configs.items():
        config: dict[str, Any] = dict(raw)
        if config.pop("enabled", True) in (False, "false", "0"):
            continue
        # Budget keys are the orchestrator's (synced into the budgets table), not the adapter's.
        config.pop("monthly_budget", None)
        config.pop("max_cost_per_hour", None)
        placement = {key: config.pop(key) for key in PLACEMENT_KEYS if key in config}
        adapter = str(config.pop("type", name))
        if adapter not in ADAPTERS:
            raise ConfigError(f"GPUFLEET_PROVIDERS: provider {name!r} has unknown type {adapter!r} "
                              f"(known: {', '.join(sorted(ADAPTERS))})")
        config.setdefault("runs_dir", str(settings.data_dir / "runs"))
        config.setdefault("state_dir", str(settings.data_dir / "providers"))
        module_name, class_name = ADAPTERS[adapter].split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        try:
            providers[name] = _with_placement(cls(name, config), placement)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"GPUFLEET_PROVIDERS: provider {name!r} config is invalid: {exc}".splitlines()[0]) from None
    return providers


PLACEMENT_KEYS = ("last_resort", "tier", "weight", "priority", "capabilities")
TIERS = ("primary", "secondary", "tertiary")


def _with_placement(provider: Provider, raw: dict[str, Any]) -> Provider:
    """The orchestrator's placement keys of a provider entry, checked, onto the adapter."""
    name = provider.name
    try:
        provider.last_resort = raw.get("last_resort", False) in (True, "true", "1")
        if "tier" in raw:
            if raw["tier"] not in TIERS:
                raise ValueError(f"tier must be one of {', '.join(TIERS)}")
            provider.tier = str(raw["tier"])
        provider.weight = float(raw.get("weight", 1.0))
        if provider.weight <= 0:
            raise ValueError("weight must be > 0")
        provider.priority = int(raw["priority"]) if raw.get("priority") is not None else None
        caps = raw.get("capabilities") or []
        if isinstance(caps, str) or not all(isinstance(c, str) for c in caps):
            raise ValueError("capabilities must be a list of names")
        provider.capabilities = tuple(caps)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"GPUFLEET_PROVIDERS: provider {name!r}: {exc}") from None
    return provider


def provider_budgets(settings: Settings) -> dict[str, tuple[float | None, float | None]]:
    """(monthly, hourly) USD limits declared in provider configs."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for name, config in settings.provider_configs().items():
        monthly, hourly = config.get("monthly_budget"), config.get("max_cost_per_hour")
        if monthly is None and hourly is None:
            continue
        try:
            out[name] = (float(monthly) if monthly is not None else None, float(hourly) if hourly is not None else None)
        except (TypeError, ValueError):
            raise ConfigError(f"GPUFLEET_PROVIDERS: provider {name!r} monthly_budget/max_cost_per_hour must be numbers") from None
    return out


_cache: dict[str, dict[str, Provider]] = {}


def get_providers(settings: Settings | None = None) -> dict[str, Provider]:
    """Providers for this process, built once per settings object."""
    from orchestrator.settings import get_settings

    settings = settings or get_settings()
    key = f"{id(settings)}"
    if key not in _cache:
        _cache.clear()
        _cache[key] = build_providers(settings)
    return _cache[key]
