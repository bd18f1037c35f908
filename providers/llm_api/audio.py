"""Getting a transcription job's audio to an API that wants the file itself (OpenAI's
``/audio/transcriptions`` takes a multipart upload, not a URL).

Messages never carry a URL's query string: presigned URLs hold their signature there.
"""

from __future__ import annotations

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
            return filename, path.read_bytes()
        except OSError as exc:
            raise PermanentProviderError(f"{name}: cannot read the audio file {path}: {exc.strerror}") from None
    raise PermanentProviderError(f"{name}: cannot read {parts.scheme}:// audio; give an http(s) URL or a path "
                                 "(s3:// inputs are presigned by gpufleet when its storage is that bucket)")
