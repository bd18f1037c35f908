"""Emulated models: deterministic outputs and token counts, so demos and tests can assert on them.

Outputs are derived from a hash of (model, input); a "teacher" model answers at length,
a "student" more tersely, which gives distillation something real to compare.
"""

from __future__ import annotations

import hashlib
import wave
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from providers.base import PermanentProviderError

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


def transcribe(model: str, audio_url: str, duration_seconds: float | None = None,
               language: str | None = None) -> dict[str, Any]:
    """A deterministic transcript in the uniform shape (``providers.transcription``): words derived from
    (model, audio), 2.5 a second, in segments of a few seconds that cover the whole duration.

    The audio is opened only when it is a local path or ``file://`` URL: a missing or empty file fails
    permanently (what a real engine does, and how batch tests inject bad items); remote audio is not
    fetched. The language is the hint given, else English, as Whisper would report it."""
    duration = audio_seconds(audio_url, duration_seconds)
    n = max(5, int(duration * 2.5))
    words = _words(f"{model}|{audio_url}", n)
    bounds = _segment_bounds(f"{model}|{audio_url}", duration)
    segments: list[dict[str, Any]] = []
    for i, (start, end) in enumerate(bounds):
        first, last = round(n * start / duration), round(n * end / duration)
        chunk = words[first:max(last, first + 1)]
        text = " ".join(chunk)
        if i == 0:
            text = text.capitalize()
        if i == len(bounds) - 1:
            text += "."
        segments.append({"start": start, "end": end, "text": text})
    return {"text": " ".join(s["text"] for s in segments), "language": (language or "en").strip() or "en",
            "duration_seconds": duration, "segments": segments, "model": model, "usage": {"total_tokens": n}}


DEFAULT_AUDIO_SECONDS = 60.0


def audio_seconds(audio_url: str, duration_seconds: float | None = None) -> float:
    """How long the audio is: the job's own figure, else a local WAV file's length (stdlib ``wave``), else
    a minute. Raises ``PermanentProviderError`` for a local file that is missing, empty or not readable
    as the WAV it claims to be: retrying elsewhere cannot make a bad input good."""
    path = local_audio_path(audio_url)
    if path is not None:
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError as exc:
            raise PermanentProviderError(f"sandbox: cannot read the audio file {path}: {exc.strerror}") from None
        if size is None:
            raise PermanentProviderError(f"sandbox: the audio file {path} does not exist")
        if size == 0:
            raise PermanentProviderError(f"sandbox: the audio file {path} is empty")
        if duration_seconds is None and path.suffix.lower() == ".wav":
            try:
                with wave.open(str(path), "rb") as audio:
                    frames, rate = audio.getnframes(), audio.getframerate()
            except (wave.Error, EOFError, OSError) as exc:
                raise PermanentProviderError(f"sandbox: {path} is not a readable WAV file: {exc}") from None
            if frames == 0 or rate <= 0:
                raise PermanentProviderError(f"sandbox: the audio file {path} holds no audio")
            return round(frames / rate, 3)
    if duration_seconds is not None and duration_seconds > 0:
        return float(duration_seconds)
    return DEFAULT_AUDIO_SECONDS


def local_audio_path(audio_url: str) -> Path | None:
    """The file a local path or ``file://`` URL names; None for audio elsewhere (http(s), s3://…)."""
    parts = urlsplit(audio_url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme == "":
        return Path(audio_url)
    return None


def _segment_bounds(seed: str, duration: float) -> list[tuple[float, float]]:
    """(start, end) pairs of 2.5–5.5 s drawn from the seed, end to end over [0, duration]; a last sliver
    under a second joins the segment before it, as engines do not emit cues that short."""
    digest = hashlib.sha256(f"segments|{seed}".encode()).digest()
    bounds: list[tuple[float, float]] = []
    start = 0.0
    while start < duration:
        step = 2.5 + (digest[len(bounds) % len(digest)] % 31) / 10
        end = round(min(duration, start + step), 3)
        if duration - end < 1.0:
            end = round(duration, 3)
        bounds.append((start, end))
        start = end
    return bounds


def agreement(a: str, b: str) -> float:
    wa, wb = set(a.split()), set(b.split())
    return round(len(wa & wb) / len(wa | wb), 3) if wa | wb else 1.0
