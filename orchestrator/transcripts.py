"""A transcription result rendered as a file a person or a player can use: plain text, SubRip (SRT),
WebVTT or JSON.

Every transcription provider returns the same shape (``providers.transcription``): ``text``,
``language``, ``duration_seconds``, ``segments`` (``start``/``end`` in seconds, ``text``), ``model`` and
``usage``. Rendering lives here, apart from the providers, so the SDK, the CLI or an API download can
turn a stored result into subtitles without importing any adapter. Standard library only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

TranscriptFormat = Literal["text", "srt", "vtt", "json"]
FORMATS: tuple[str, ...] = get_args(TranscriptFormat)
# The formats that are subtitles (timed cues) rather than the transcript itself.
SUBTITLE_FORMATS: tuple[str, ...] = ("srt", "vtt")

_EXTENSIONS = {"text": ".txt", "srt": ".srt", "vtt": ".vtt", "json": ".json"}
_BLANK_LINES = re.compile(r"\s*\n\s*")


def extension(fmt: str) -> str:
    """The file extension (with its dot) for a format: ``extension("text") == ".txt"``."""
    try:
        return _EXTENSIONS[fmt]
    except KeyError:
        raise ValueError(f"unknown transcript format {fmt!r}; expected one of {', '.join(FORMATS)}") from None


def render(result: Mapping[str, Any], fmt: TranscriptFormat) -> str:
    """The result as ``fmt``. A result without segments becomes one cue spanning its duration (or
    none when it has no text at all: an empty cue is not valid SRT/VTT)."""
    if fmt == "text":
        text = str(result.get("text") or "").strip()
        return f"{text}\n" if text else ""
    if fmt == "json":
        # The transcript itself; renderings already attached to it are not part of it.
        body = {k: v for k, v in result.items() if k != "formats"}
        return json.dumps(body, ensure_ascii=False, indent=2) + "\n"
    if fmt == "srt":
        blocks = [f"{n}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}"
                  for n, (start, end, text) in enumerate(cues(result), start=1)]
        return "\n\n".join(blocks) + "\n" if blocks else ""
    if fmt == "vtt":
        blocks = ["WEBVTT"] + [f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{_vtt_escape(text)}"
                               for start, end, text in cues(result)]
        return "\n\n".join(blocks) + "\n"
    raise ValueError(f"unknown transcript format {fmt!r}; expected one of {', '.join(FORMATS)}")


def cues(result: Mapping[str, Any]) -> list[tuple[float, float, str]]:
    """(start, end, text) per cue, ordered by start, each ending no earlier than it starts, with text
    that cannot break the file's structure (no blank lines, no ``-->``). Segments with no text are
    skipped: a cue with an empty payload ends at its timing line and confuses players."""
    out: list[tuple[float, float, str]] = []
    for segment in result.get("segments") or []:
        if not isinstance(segment, Mapping):
            continue
        text = _cue_text(segment.get("text"))
        start, end = _seconds(segment.get("start")), _seconds(segment.get("end"))
        if text and start is not None:
            out.append((start, max(start, end if end is not None else start), text))
    if not out and not result.get("segments"):
        text = _cue_text(result.get("text"))
        if text:
            out.append((0.0, _seconds(result.get("duration_seconds")) or 0.0, text))
    out.sort(key=lambda cue: cue[0])  # stable: equal starts keep the engine's order
    return out


def _cue_text(value: object) -> str:
    text = _BLANK_LINES.sub("\n", str(value or "").strip())
    return text.replace("-->", "->")


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no time


def _timestamp(seconds: float, decimal: str) -> str:
    """``HH:MM:SS,mmm`` (SRT) or ``HH:MM:SS.mmm`` (VTT); hours grow past two digits if they must."""
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _vtt_escape(text: str) -> str:
    """WebVTT cue text is markup: a bare ``&`` or ``<`` would be read as an entity or a tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
