"""Getting a transcription job's audio to an engine that wants the file itself: OpenAI's
``/audio/transcriptions`` takes a multipart upload, not a URL, and a local faster-whisper reads a file.

Messages never carry a URL's query string: presigned URLs hold their signature there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from providers.base import PermanentProviderError, TransientProviderError

MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's upload limit; larger files must be split first


def _shown(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path


def fetch_audio(url: str, timeout: float, name: str) -> tuple[str, bytes]:
    """(file name, bytes) of the audio at an http(s) URL or a local path / file:// URL."""
    parts = urlsplit(url)
    filename = Path(unquote(parts.path)).name or "audio"
    if parts.scheme in ("http", "https"):
        try:
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
                if response.status_code >= 500 or response.status_code == 429:
                    raise TransientProviderError(f"{name}: fetching the audio at {_shown(url)} failed ({response.status_code})")
                if response.status_code >= 400:
                    raise PermanentProviderError(f"{name}: the audio at {_shown(url)} could not be read ({response.status_code})")
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_AUDIO_BYTES:
                        raise PermanentProviderError(f"{name}: the audio at {_shown(url)} is larger than "
                                                     f"{MAX_AUDIO_BYTES // (1024 * 1024)} MB; split it first")
                    chunks.append(chunk)
                return filename, b"".join(chunks)
        except httpx.HTTPError as exc:
            raise TransientProviderError(f"{name}: fetching the audio at {_shown(url)} failed: {type(exc).__name__}") from None
    if parts.scheme in ("", "file"):
        path = Path(unquote(parts.path))
        try:
            if path.stat().st_size > MAX_AUDIO_BYTES:
                raise PermanentProviderError(f"{name}: {path} is larger than {MAX_AUDIO_BYTES // (1024 * 1024)} MB")
            data = path.read_bytes()
            if not data:
                raise PermanentProviderError(f"{name}: the audio file {path} is empty")
            return filename, data
        except OSError as exc:
            raise PermanentProviderError(f"{name}: cannot read the audio file {path}: {exc.strerror}") from None
    raise PermanentProviderError(f"{name}: cannot read {parts.scheme}:// audio; give an http(s) URL or a path "
                                 "(s3:// inputs are presigned by gpufleet when its storage is that bucket)")


def download_audio(url: str, directory: str | os.PathLike[str], timeout: float, name: str,
                   max_bytes: int | None = None) -> Path:
    """Stream the audio at an http(s) URL into a new file under ``directory`` and return its path, for
    engines that read files and for audio too long to hold in memory. Errors map like ``fetch_audio``:
    5xx, 429 and network failures are transient (another try may work), other 4xx and an empty or
    oversized answer permanent. The caller owns (and removes) the file."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise PermanentProviderError(f"{name}: cannot download {parts.scheme or 'a path'}: only http(s) URLs")
    suffix = Path(unquote(parts.path)).suffix[:16]
    handle, target = tempfile.mkstemp(prefix="audio-", suffix=suffix, dir=directory)
    path, size = Path(target), 0
    try:
        with os.fdopen(handle, "wb") as out, httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise TransientProviderError(f"{name}: fetching the audio at {_shown(url)} failed ({response.status_code})")
            if response.status_code >= 400:
                raise PermanentProviderError(f"{name}: the audio at {_shown(url)} could not be read ({response.status_code})")
            for chunk in response.iter_bytes():
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise PermanentProviderError(f"{name}: the audio at {_shown(url)} is larger than "
                                                 f"{max_bytes // (1024 * 1024)} MB")
                out.write(chunk)
        if size == 0:
            raise PermanentProviderError(f"{name}: the audio at {_shown(url)} is empty")
        return path
    except httpx.HTTPError as exc:
        path.unlink(missing_ok=True)
        raise TransientProviderError(f"{name}: fetching the audio at {_shown(url)} failed: {type(exc).__name__}") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
