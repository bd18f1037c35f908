"""One result shape for every transcription provider, whatever the engine answered.

Engines disagree: OpenAI's ``verbose_json`` names the language in English words ("english") and
calls the length ``duration``; faster-whisper yields segment objects and a ``TranscriptionInfo``;
RunPod's faster-whisper worker answers ``detected_language`` and a ``transcription`` that may already
be SRT. Callers (the SDK, subtitle rendering, batch reports) should not care which provider ran a
job, so every adapter passes its answer through :func:`transcription_result`, which gives::

    {"text": str, "language": str | None, "duration_seconds": float | None,
     "segments": [{"start": float, "end": float, "text": str}], "model": str, "usage": {...}}

plus ``formats`` — the rendered subtitles (``srt``/``vtt``) the job asked for — so a finished job
carries its subtitles whichever provider produced them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from orchestrator.transcripts import SUBTITLE_FORMATS, render


class Segment(TypedDict):
    start: float
    end: float
    text: str


class Transcript(TypedDict, total=False):
    text: str
    language: str | None
    duration_seconds: float | None
    segments: list[Segment]
    model: str
    usage: dict[str, Any]
    formats: dict[str, str]


# Whisper's languages (ISO 639-1 code → the English name OpenAI's API answers with).
WHISPER_LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao",
    "uz": "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa",
    "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
_CODES_BY_NAME: dict[str, str] = {
    **{name: code for code, name in WHISPER_LANGUAGES.items()},
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb", "pushto": "ps",
    "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si", "castilian": "es", "mandarin": "zh",
}


def language_code(value: object) -> str | None:
    """``"english"``, ``"English"`` or ``"en"`` → ``"en"``: results name languages one way, whichever
    engine answered. Anything else (``"pt-BR"``, a code Whisper does not know) is kept as given."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    lowered = text.lower()
    if lowered in WHISPER_LANGUAGES:
        return lowered
    return _CODES_BY_NAME.get(lowered, text)


def normalize(raw: Mapping[str, Any], *, model: str, language: str | None = None,
              duration_seconds: float | None = None, usage: Mapping[str, Any] | None = None) -> Transcript:
    """The uniform shape from an engine's answer: OpenAI ``verbose_json`` (or plain ``json``), a
    faster-whisper run (segments as objects or dicts, ``language``/``duration`` from its info), RunPod's
    faster-whisper worker (``detected_language``, ``transcription``) or a result already in this shape.

    ``language`` and ``duration_seconds`` are what the job said (its hint, its declared length): used only
    where the engine reports nothing. Without either, the duration is where the last segment ends.
    ``usage`` replaces the engine's own usage report when given."""
    segments = _segments(raw.get("segments"))
    text = raw.get("text")
    if not isinstance(text, str) or (not text.strip() and segments):
        # RunPod's "transcription" may be rendered SRT/VTT, so segments are the better source of text.
        text = " ".join(s["text"] for s in segments) if segments else str(raw.get("transcription") or "")
    duration = (_number(raw.get("duration")) or _number(raw.get("duration_seconds")) or _number(duration_seconds)
                or (max(s["end"] for s in segments) if segments else None))
    reported = raw.get("usage")
    return {
        "text": text.strip(),
        "language": language_code(raw.get("language")) or language_code(raw.get("detected_language"))
        or language_code(language),
        "duration_seconds": round(duration, 3) if duration is not None else None,
        "segments": segments,
        "model": model,
        "usage": dict(usage) if usage is not None else dict(reported) if isinstance(reported, Mapping) else {},
    }


def from_faster_whisper(segments: Iterable[Any], info: Any, *, model: str, language: str | None = None,
                        usage: Mapping[str, Any] | None = None) -> Transcript:
    """A faster-whisper ``WhisperModel.transcribe`` answer: ``segments`` is its (lazy) generator of segment
    objects, ``info`` its ``TranscriptionInfo``. Iterating runs the model, so this is where the work happens."""
    return normalize({"segments": list(segments), "language": getattr(info, "language", None),
                      "duration": getattr(info, "duration", None)}, model=model, language=language, usage=usage)


def with_formats(result: Transcript, formats: Iterable[str] | None) -> Transcript:
    """The result with the subtitles the job asked for rendered under ``result["formats"][fmt]``.
    ``text`` and ``json`` are the result itself (``result["text"]``, the result), so only subtitle formats
    are stored: a long transcript is not kept three times in the job row."""
    wanted = [f for f in dict.fromkeys(formats or ()) if f in SUBTITLE_FORMATS]
    if not wanted:
        result.pop("formats", None)
        return result
    result["formats"] = {fmt: render(result, fmt) for fmt in wanted}  # type: ignore[arg-type]
    return result


def transcription_result(raw: Mapping[str, Any], *, model: str, spec: Mapping[str, Any],
                         usage: Mapping[str, Any] | None = None) -> Transcript:
    """What a transcription job's result is, from an engine's answer and the job's spec (its language hint,
    declared duration and requested ``formats``): the one place every provider's answer passes through."""
    hint = spec.get("language")
    result = normalize(raw, model=model, language=str(hint) if hint else None,
                       duration_seconds=_number(spec.get("duration_seconds")), usage=usage)
    return with_formats(result, spec.get("formats"))


def _segments(raw: object) -> list[Segment]:
    """Timed, non-empty segments in order. Dicts (OpenAI, RunPod) and objects (faster-whisper's Segment)
    both work; a segment without usable times is dropped rather than guessed."""
    if not isinstance(raw, Iterable) or isinstance(raw, str | bytes | Mapping):
        return []
    out: list[Segment] = []
    for item in raw:
        start, end, text = (_field(item, "start"), _field(item, "end"), _field(item, "text"))
        start_s, end_s = _number(start), _number(end)
        words = str(text or "").strip()
        if start_s is None or not words:
            continue
        start_s = max(0.0, start_s)
        out.append({"start": round(start_s, 3), "end": round(max(start_s, end_s if end_s is not None else start_s), 3),
                    "text": words})
    out.sort(key=lambda s: s["start"])  # stable: equal starts keep the engine's order
    return out


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
