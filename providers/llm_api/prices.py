"""Per-model token prices from the provider config, and what a job is estimated and charged.

Prices are configured, not fetched: no API publishes them in a usable form, and the
operator's negotiated price is the one that matters for budgets.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Characters per token for estimating prompts before sending them: the usual rule of thumb for
# English with BPE tokenizers. Only the offer's price estimate uses it; charges use the API's counts.
_CHARS_PER_TOKEN = 4
_PROMPT_OVERHEAD_TOKENS = 8
# Speech runs at about 150 words a minute: how a per-minute transcription price is put on the
# per-1K-token scale placement ranks usage-priced offers by (the charge itself uses the audio's minutes).
TOKENS_PER_AUDIO_MINUTE = 150


class ModelPrice(BaseModel):
    """One configured model: USD per 1K input/output tokens — or, for a transcription model, USD
    per minute of audio — and the id the API knows it by."""

    model_config = ConfigDict(extra="forbid")

    input_per_1k: float = Field(default=0.0, ge=0)
    output_per_1k: float = Field(default=0.0, ge=0)
    per_minute: float | None = Field(default=None, ge=0)
    context_window: int | None = Field(default=None, gt=0)
    upstream: str | None = Field(default=None, min_length=1)
    capabilities: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _priced(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("per_minute") is None and not {"input_per_1k", "output_per_1k"} <= set(raw):
            raise ValueError("give input_per_1k and output_per_1k (chat) or per_minute (transcription)")
        return raw

    @property
    def transcribes(self) -> bool:
        return self.per_minute is not None


def parse_models(raw: Any) -> dict[str, ModelPrice]:
    """The ``models`` config key; a ValueError here becomes a readable config error in the registry."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("'models' must map each model name to {input_per_1k, output_per_1k} or {per_minute}")
    out: dict[str, ModelPrice] = {}
    for name, entry in raw.items():
        try:
            out[str(name)] = ModelPrice.model_validate(entry or {})
        except ValidationError as exc:
            problems = ", ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"models.{name}: {problems}") from None
    return out


def estimated_prompt_tokens(spec: dict[str, Any]) -> int:
    """A rough prompt size from the job spec (≈4 characters a token), before the API counts it."""
    messages = spec.get("messages") or []
    chars = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    chars += len(str(spec.get("prompt") or ""))
    return chars // _CHARS_PER_TOKEN + _PROMPT_OVERHEAD_TOKENS * max(1, len(messages))


def blended_per_1k(price: ModelPrice, spec: dict[str, Any]) -> float:
    """One USD-per-1K-tokens figure for ranking offers, weighted by this job's expected input/output mix.

    Placement multiplies it by an estimated token count, so a model with cheap input but dear
    output ranks correctly for long prompts and for long answers alike. Without a job in hand
    (``gpufleet offers``) it is the plain average of the two prices.
    """
    if price.per_minute is not None:
        return round(price.per_minute * 1000 / TOKENS_PER_AUDIO_MINUTE, 8)
    if not spec.get("messages") and not spec.get("prompt"):
        return round((price.input_per_1k + price.output_per_1k) / 2, 8)
    prompt = estimated_prompt_tokens(spec)
    output = int(spec.get("max_tokens") or 256)
    return round((prompt * price.input_per_1k + output * price.output_per_1k) / (prompt + output), 8)


def usage_cost(usage: dict[str, Any], input_per_1k: float, output_per_1k: float) -> float:
    """What the API's own token counts cost at the configured prices."""
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return prompt * input_per_1k / 1000 + completion * output_per_1k / 1000


def audio_cost(duration_seconds: float, per_minute: float) -> float:
    """What transcribing this much audio costs (APIs bill per second of audio, priced per minute)."""
    return max(0.0, duration_seconds) / 60 * per_minute
