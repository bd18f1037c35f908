"""Transcription on this machine with faster-whisper and a model the operator provides.

faster-whisper (CTranslate2) is optional and heavy, so it is imported only when a job runs, and the
local provider offers transcription only when :func:`available` says the engine is importable and its
config names a model (``transcription_model``: a local CTranslate2 model directory; nothing is
downloaded). Loaded models are kept per (path, device, compute type): loading takes seconds to
minutes, transcribing a short clip far less.
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from providers.base import PermanentProviderError, TransientProviderError
from providers.llm_api.audio import download_audio
from providers.transcription import Transcript, from_faster_whisper, language_code

ENGINE = "faster_whisper"
NAME = "local transcription"

_models: dict[tuple[str, str, str], Any] = {}
_lock = threading.Lock()


def available() -> bool:
    """Whether faster-whisper can be imported here, without importing it (that costs seconds)."""
    try:
        return importlib.util.find_spec(ENGINE) is not None
    except (ImportError, ValueError):
        return False


def transcribe(path_or_url: str, language: str | None, model_path: str, device: str = "auto", *,
               compute_type: str = "default", timeout: float = 120.0) -> Transcript:
    """Transcribe a local path, ``file://`` URL or http(s) URL (downloaded to a temporary file first, as
    the engine reads files) into the uniform result shape. The language hint skips detection; without
    it the engine detects the language. A missing, empty or undecodable input fails permanently; an
    engine or model that cannot be loaded fails transiently, so the job can run elsewhere."""
    parts = urlsplit(path_or_url)
    if parts.scheme in ("http", "https"):
        with tempfile.TemporaryDirectory(prefix="gpufleet-audio-") as directory:
            audio = download_audio(path_or_url, directory, timeout, NAME)
            return _run(audio, language, model_path, device, compute_type)
    if parts.scheme in ("", "file"):
        audio = Path(unquote(parts.path)) if parts.scheme == "file" else Path(path_or_url)
        if not audio.is_file():
            raise PermanentProviderError(f"{NAME}: the audio file {audio} does not exist")
        if audio.stat().st_size == 0:
            raise PermanentProviderError(f"{NAME}: the audio file {audio} is empty")
        return _run(audio, language, model_path, device, compute_type)
    raise PermanentProviderError(f"{NAME}: cannot read {parts.scheme}:// audio; give an http(s) URL or a path "
                                 "(s3:// inputs are presigned by gpufleet when its storage is that bucket)")


def _run(audio: Path, language: str | None, model_path: str, device: str, compute_type: str) -> Transcript:
    model = _model(model_path, device, compute_type)
    try:
        # The engine wants a code ("en"); a hint given as a name ("english") would be refused.
        segments, info = model.transcribe(str(audio), language=language_code(language))
        # The segments are a lazy generator: the model runs while they are read, inside this try.
        return from_faster_whisper(segments, info, model=Path(model_path).name or model_path, language=language)
    except (ValueError, RuntimeError, OSError, EOFError) as exc:
        # The engine reads the file itself: an error here is the input's (format, corruption, language).
        raise PermanentProviderError(f"{NAME}: could not transcribe {audio.name}: {type(exc).__name__}: {exc}") from None


def _model(model_path: str, device: str, compute_type: str) -> Any:
    """The loaded model, loading it once per process and configuration."""
    key = (model_path, device, compute_type)
    with _lock:
        if key in _models:
            return _models[key]
        if not Path(model_path).exists():
            raise TransientProviderError(f"{NAME}: the model {model_path} does not exist on this machine")
        try:
            engine = importlib.import_module(ENGINE)
        except ImportError as exc:
            raise TransientProviderError(f"{NAME}: faster-whisper is not installed here ({exc})") from None
        try:
            # local_files_only: a path is what we were given; never reach out to a model hub from a worker.
            loaded = engine.WhisperModel(model_path, device=device, compute_type=compute_type, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 — any load failure means this machine cannot serve the job
            raise TransientProviderError(f"{NAME}: could not load the model {model_path}: "
                                         f"{type(exc).__name__}: {exc}") from None
        _models[key] = loaded
        return loaded
