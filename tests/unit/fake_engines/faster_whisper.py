"""A stand-in for the ``faster_whisper`` package, put on ``sys.path`` by tests of our local engine code.

It mirrors the real API where our code touches it: ``WhisperModel(model_size_or_path, device="auto",
compute_type="default", ..., local_files_only=False)`` and ``WhisperModel.transcribe(audio, language=None,
...)`` returning ``(segments, info)`` — ``segments`` a lazy generator of ``Segment`` records (``id``,
``seek``, ``start``, ``end``, ``text`` with its leading space, ``tokens``, ``avg_logprob``…) and ``info`` a
``TranscriptionInfo`` (``language``, ``language_probability``, ``duration``, ``duration_after_vad``…).

No model runs: the audio's length comes from the WAV header (or bytes / 32000 for anything else) and
each 2-second window becomes a segment "<language> words N". Audio whose bytes start with ``garbage``
fails to decode with ``ValueError``, as PyAV's ``InvalidDataError`` (a ``ValueError``) does. Every
load and call is recorded in ``LOADED`` and ``CALLS`` so tests can assert on what our code asked for.
"""

from __future__ import annotations

import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

__version__ = "0.0-fake"

LOADED: list[dict[str, Any]] = []
CALLS: list[dict[str, Any]] = []


class Segment(NamedTuple):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Any] | None
    temperature: float


class TranscriptionInfo(NamedTuple):
    language: str
    language_probability: float
    duration: float
    duration_after_vad: float
    all_language_probs: list[tuple[str, float]] | None


class WhisperModel:
    def __init__(self, model_size_or_path: str, device: str = "auto", device_index: int = 0,
                 compute_type: str = "default", cpu_threads: int = 0, num_workers: int = 1,
                 download_root: str | None = None, local_files_only: bool = False, **kwargs: Any) -> None:
        if not Path(model_size_or_path).is_dir():
            raise RuntimeError(f"Unable to open file 'model.bin' in model '{model_size_or_path}'")
        self.model_size_or_path = model_size_or_path
        LOADED.append({"path": model_size_or_path, "device": device, "compute_type": compute_type,
                       "local_files_only": local_files_only})

    def transcribe(self, audio: str, language: str | None = None, task: str = "transcribe", beam_size: int = 5,
                   **kwargs: Any) -> tuple[Iterator[Segment], TranscriptionInfo]:
        CALLS.append({"audio": audio, "language": language, "task": task})
        data = Path(audio).read_bytes()
        if data.startswith(b"garbage"):
            raise ValueError("[Errno 1094995529] Invalid data found when processing input")
        duration = _duration(Path(audio), data)
        detected = language or "en"
        info = TranscriptionInfo(language=detected, language_probability=1.0 if language else 0.93,
                                 duration=duration, duration_after_vad=duration, all_language_probs=None)
        return _segments(duration, detected), info


def _duration(path: Path, data: bytes) -> float:
    if path.suffix.lower() == ".wav":
        with wave.open(str(path), "rb") as audio:
            return audio.getnframes() / audio.getframerate()
    return len(data) / 32000


def _segments(duration: float, language: str) -> Iterator[Segment]:
    """Lazy, like the real generator: nothing is "decoded" until the caller iterates."""
    start, n = 0.0, 0
    while start < duration:
        end = min(duration, start + 2.0)
        yield Segment(id=n + 1, seek=int(start * 100), start=round(start, 2), end=round(end, 2),
                      text=f" {language} words {n}", tokens=[50364, n], avg_logprob=-0.25, compression_ratio=1.2,
                      no_speech_prob=0.02, words=None, temperature=0.0)
        start, n = end, n + 1
