"""Emulated models: deterministic outputs and token counts, so demos and tests can assert on them.

Outputs are derived from a hash of (model, input); a "teacher" model answers at length,
a "student" more tersely, which gives distillation something real to compare.
"""

from __future__ import annotations

import hashlib
from typing import Any

_WORDS = (
    "the model routes each request to the cheapest healthy gpu and records every cost so budgets "
    "hold while queues drain quickly across regions with failover when hosts disappear"
).split()


def _words(seed: str, n: int) -> list[str]:
    digest = hashlib.sha256(seed.encode()).digest()
    return [_WORDS[(digest[i % len(digest)] + i) % len(_WORDS)] for i in range(n)]


def _size(model: str) -> int:
    """A rough size from the model name: '70b' answers longer than '8b'."""
    digits = "".join(ch for ch in model.lower().split("-")[-1] if ch.isdigit())
    return max(8, min(64, int(digits) if digits else 16))


def prompt_text(spec: dict[str, Any]) -> str:
    if spec.get("messages"):
        return "\n".join(str(m.get("content", "")) for m in spec["messages"])
    return str(spec.get("prompt", ""))


def complete(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    n = min(max_tokens, _size(model))
    text = " ".join(_words(f"{model}|{prompt}", n))
    if model.startswith("judge"):  # a grading model answers with a 0-10 grade, as a rubric asks
        grade = hashlib.sha256(f"{model}|{prompt}".encode()).digest()[0] % 5 + 6
        text, n = str(grade), 1
    prompt_tokens = max(1, len(prompt.split()))
    return {"text": text, "model": model, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                    "total_tokens": prompt_tokens + n}}


def transcribe(model: str, audio_url: str, duration_seconds: float) -> dict[str, Any]:
    n = max(5, int(duration_seconds * 2.5))
    return {"text": " ".join(_words(f"{model}|{audio_url}", n)).capitalize() + ".", "model": model,
            "duration_seconds": duration_seconds, "usage": {"total_tokens": n}}


def agreement(a: str, b: str) -> float:
    wa, wb = set(a.split()), set(b.split())
    return round(len(wa & wb) / len(wa | wb), 3) if wa | wb else 1.0
