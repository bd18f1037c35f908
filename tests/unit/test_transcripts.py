"""Transcript outputs and the one result shape behind them.

SRT and VTT are parsed back line by line (numbering, timing-line syntax, timestamps that never go
backwards, cues that never end before they start), so a subtitle file a player would reject fails
here; the normaliser is fed each engine's real answer shape (OpenAI verbose_json, faster-whisper's
objects, RunPod's faster-whisper worker) and must give the same shape back.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import pytest

from orchestrator.transcripts import FORMATS, cues, extension, render
from providers.transcription import (
    from_faster_whisper,
    language_code,
    normalize,
    transcription_result,
    with_formats,
)

SRT_TIME = re.compile(r"^(\d{2,}):([0-5]\d):([0-5]\d),(\d{3}) --> (\d{2,}):([0-5]\d):([0-5]\d),(\d{3})$")
VTT_TIME = re.compile(r"^(\d{2,}):([0-5]\d):([0-5]\d)\.(\d{3}) --> (\d{2,}):([0-5]\d):([0-5]\d)\.(\d{3})$")

RESULT: dict[str, Any] = {
    "text": "Hello there. How are you? Fine & you <really>?",
    "language": "en",
    "duration_seconds": 3725.5,
    "segments": [
        {"start": 0.0, "end": 2.5, "text": "Hello there."},
        {"start": 2.5, "end": 4.0, "text": "How are you?"},
        {"start": 3599.9996, "end": 3725.5, "text": "Fine & you <really>?"},  # rounds up to the hour: 01:00:00,000
    ],
    "model": "whisper-1",
    "usage": {"total_tokens": 9},
}


def _ms(groups: tuple[str, ...]) -> int:
    h, m, s, ms = (int(g) for g in groups)
    return ((h * 60 + m) * 60 + s) * 1000 + ms


def parse_srt(body: str) -> list[tuple[int, int, int, str]]:
    """(number, start ms, end ms, text) per cue, asserting SRT's structure as it goes."""
    assert body.endswith("\n") and not body.endswith("\n\n\n")
    cues_out: list[tuple[int, int, int, str]] = []
    for block in body.rstrip("\n").split("\n\n"):
        lines = block.split("\n")
        assert len(lines) >= 3, f"a cue needs a number, a timing line and text: {block!r}"
        assert lines[0].isdigit(), f"cue number expected, got {lines[0]!r}"
        timing = SRT_TIME.match(lines[1])
        assert timing, f"bad SRT timing line {lines[1]!r}"
        assert all(line.strip() for line in lines[2:]), "a blank line inside a cue would end it"
        assert all("-->" not in line for line in lines[2:])
        groups = timing.groups()
        cues_out.append((int(lines[0]), _ms(groups[:4]), _ms(groups[4:]), "\n".join(lines[2:])))
    return cues_out


def parse_vtt(body: str) -> list[tuple[int, int, str]]:
    """(start ms, end ms, text) per cue, asserting WebVTT's structure as it goes."""
    blocks = body.rstrip("\n").split("\n\n")
    assert blocks[0] == "WEBVTT" and body.startswith("WEBVTT\n")
    cues_out: list[tuple[int, int, str]] = []
    for block in blocks[1:]:
        lines = block.split("\n")
        timing = VTT_TIME.match(lines[0])
        assert timing, f"bad VTT timing line {lines[0]!r}"
        assert len(lines) >= 2 and all(line.strip() for line in lines[1:])
        text = "\n".join(lines[1:])
        assert "-->" not in text and not re.search(r"&(?!amp;|lt;|gt;)|<", text), f"unescaped markup in {text!r}"
        groups = timing.groups()
        cues_out.append((_ms(groups[:4]), _ms(groups[4:]), text))
    return cues_out


def assert_timeline(spans: list[tuple[int, int]]) -> None:
    starts = [start for start, _ in spans]
    assert starts == sorted(starts), "cue starts must never go backwards"
    assert all(end >= start for start, end in spans), "a cue must not end before it starts"


# --- render ---------------------------------------------------------------------------------------


def test_srt_cues_are_numbered_timed_and_in_order() -> None:
    parsed = parse_srt(render(RESULT, "srt"))
    assert [n for n, *_ in parsed] == [1, 2, 3]
    assert [(start, end) for _, start, end, _ in parsed] == [(0, 2500), (2500, 4000), (3_600_000, 3_725_500)]
    assert_timeline([(start, end) for _, start, end, _ in parsed])
    assert parsed[2][3] == "Fine & you <really>?"  # SRT text is not markup-escaped
    assert "01:00:00,000 --> 01:02:05,500" in render(RESULT, "srt").splitlines()


def test_vtt_has_its_header_dotted_timestamps_and_escaped_text() -> None:
    body = render(RESULT, "vtt")
    parsed = parse_vtt(body)
    assert [(start, end) for start, end, _ in parsed] == [(0, 2500), (2500, 4000), (3_600_000, 3_725_500)]
    assert_timeline([(start, end) for start, end, _ in parsed])
    assert parsed[2][2] == "Fine &amp; you &lt;really&gt;?"
    assert "00:00:02.500 --> 00:00:04.000" in body.splitlines()


def test_text_and_json() -> None:
    assert render(RESULT, "text") == RESULT["text"] + "\n"
    assert render({**RESULT, "text": "  "}, "text") == ""
    with_srt = {**RESULT, "formats": {"srt": render(RESULT, "srt")}}
    assert json.loads(render(with_srt, "json")) == RESULT  # the transcript, not its renderings


def test_no_segments_is_one_cue_over_the_whole_duration() -> None:
    bare = {"text": "all of it", "duration_seconds": 61.25, "segments": []}
    assert parse_srt(render(bare, "srt")) == [(1, 0, 61_250, "all of it")]
    assert parse_vtt(render(bare, "vtt")) == [(0, 61_250, "all of it")]
    assert parse_srt(render({"text": "unknown length"}, "srt")) == [(1, 0, 0, "unknown length")]
    assert render({"text": "", "segments": []}, "srt") == ""  # nothing said: no (invalid) empty cue
    assert render({"text": ""}, "vtt") == "WEBVTT\n"


def test_cue_text_cannot_break_the_file() -> None:
    tricky = {"segments": [{"start": 5, "end": 4, "text": "line one\n\n\nline two --> three"},
                           {"start": 1, "end": 2, "text": "   "},
                           {"start": 2, "end": 3, "text": "earlier"}]}
    parsed = parse_srt(render(tricky, "srt"))
    assert [(n, s, e) for n, s, e, _ in parsed] == [(1, 2000, 3000), (2, 5000, 5000)]  # sorted; end clamped
    assert parsed[1][3] == "line one\nline two -> three"
    assert parse_vtt(render(tricky, "vtt"))[1][2] == "line one\nline two -&gt; three"


def test_long_audio_hours_keep_counting() -> None:
    body = render({"segments": [{"start": 360_000.0, "end": 360_001.5, "text": "a hundred hours in"}]}, "srt")
    assert body.splitlines()[1] == "100:00:00,000 --> 100:00:01,500"
    parse_srt(body)


def test_formats_and_extensions() -> None:
    assert FORMATS == ("text", "srt", "vtt", "json")
    assert [extension(f) for f in FORMATS] == [".txt", ".srt", ".vtt", ".json"]
    with pytest.raises(ValueError, match="unknown transcript format"):
        extension("docx")
    with pytest.raises(ValueError, match="unknown transcript format"):
        render(RESULT, "docx")  # type: ignore[arg-type]
    assert cues({"segments": "not a list"}) == []


# --- one shape for every engine -----------------------------------------------------------------------

SHAPE = {"text", "language", "duration_seconds", "segments", "model", "usage"}


def test_openai_verbose_json_is_normalised() -> None:
    payload = {"task": "transcribe", "language": "english", "duration": 8.47, "text": " Hi. Bye.",
               "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": 3.2, "text": " Hi.", "tokens": [1],
                             "temperature": 0.0, "avg_logprob": -0.3, "compression_ratio": 1.1, "no_speech_prob": 0.1},
                            {"id": 1, "seek": 0, "start": 3.2, "end": 8.47, "text": " Bye.", "tokens": [2],
                             "temperature": 0.0, "avg_logprob": -0.3, "compression_ratio": 1.1, "no_speech_prob": 0.1}]}
    result = normalize(payload, model="whisper-1", usage={"total_tokens": 2})
    assert set(result) == SHAPE
    assert result == {"text": "Hi. Bye.", "language": "en", "duration_seconds": 8.47, "model": "whisper-1",
                      "segments": [{"start": 0.0, "end": 3.2, "text": "Hi."}, {"start": 3.2, "end": 8.47, "text": "Bye."}],
                      "usage": {"total_tokens": 2}}
    assert normalize(result, model="whisper-1") == result  # already uniform: unchanged


def test_plain_json_falls_back_to_the_jobs_hint_and_duration() -> None:
    result = normalize({"text": "only text"}, model="m", language="de", duration_seconds=12)
    assert result == {"text": "only text", "language": "de", "duration_seconds": 12.0, "segments": [], "model": "m",
                      "usage": {}}


class FakeSegment(NamedTuple):  # faster-whisper's Segment, as far as the normaliser reads it
    id: int
    start: float
    end: float
    text: str


class FakeInfo(NamedTuple):
    language: str
    language_probability: float
    duration: float


def test_faster_whisper_objects_are_normalised_from_a_lazy_generator() -> None:
    def generate() -> Any:
        yield FakeSegment(1, 0.0, 2.0, " Bonjour.")
        yield FakeSegment(2, 2.0, 3.5, " Ça va?")

    result = from_faster_whisper(generate(), FakeInfo("fr", 0.98, 3.61), model="large-v3")
    assert result == {"text": "Bonjour. Ça va?", "language": "fr", "duration_seconds": 3.61, "model": "large-v3",
                      "segments": [{"start": 0.0, "end": 2.0, "text": "Bonjour."}, {"start": 2.0, "end": 3.5, "text": "Ça va?"}],
                      "usage": {}}


def test_runpod_faster_whisper_worker_output_is_normalised() -> None:
    output = {"segments": [{"id": 1, "seek": 0, "start": 0.0, "end": 4.0, "text": " First words.", "tokens": [1],
                            "temperature": 0.0, "avg_logprob": -0.2, "compression_ratio": 1.0, "no_speech_prob": 0.0},
                           {"id": 2, "seek": 400, "start": 4.0, "end": 6.5, "text": " And more.", "tokens": [2],
                            "temperature": 0.0, "avg_logprob": -0.2, "compression_ratio": 1.0, "no_speech_prob": 0.0}],
              "detected_language": "en", "transcription": "1\n00:00:00,000 --> 00:00:04,000\nFirst words.\n\n",
              "translation": None, "device": "cuda", "model": "large-v3"}
    result = normalize(output, model="whisper-large-v3", usage={"execution_seconds": 1.2})
    assert result["text"] == "First words. And more."  # from segments, not the worker's rendered SRT
    assert result["language"] == "en" and result["duration_seconds"] == 6.5  # no duration reported: last segment's end
    assert [s["text"] for s in result["segments"]] == ["First words.", "And more."]
    no_segments = normalize({"transcription": "just text", "detected_language": "es"}, model="m")
    assert no_segments["text"] == "just text" and no_segments["language"] == "es" and no_segments["segments"] == []


def test_untimed_or_empty_segments_are_dropped_and_order_restored() -> None:
    result = normalize({"text": "x", "segments": [{"start": 3, "end": 4, "text": "b"}, {"start": None, "end": 1, "text": "?"},
                                                   {"start": 1, "end": 2, "text": "  "}, {"start": -1, "end": 2, "text": "a"},
                                                   {"start": 5, "end": float("nan"), "text": "c"}]}, model="m")
    assert result["segments"] == [{"start": 0.0, "end": 2.0, "text": "a"}, {"start": 3.0, "end": 4.0, "text": "b"},
                                  {"start": 5.0, "end": 5.0, "text": "c"}]


@pytest.mark.parametrize(("given", "code"), [("english", "en"), ("English", "en"), ("EN", "en"), ("cantonese", "yue"),
                                             ("burmese", "my"), ("pt-BR", "pt-BR"), ("", None), (None, None)])
def test_language_names_become_codes(given: str | None, code: str | None) -> None:
    assert language_code(given) == code


def test_subtitles_requested_by_the_job_travel_with_the_result() -> None:
    raw = {"text": "a b", "segments": [{"start": 0, "end": 1, "text": "a"}, {"start": 1, "end": 2, "text": "b"}]}
    result = transcription_result(raw, model="m", spec={"formats": ["text", "srt", "vtt", "json"], "language": "en"})
    assert set(result["formats"]) == {"srt", "vtt"}  # text and json are the result itself
    assert parse_srt(result["formats"]["srt"]) == [(1, 0, 1000, "a"), (2, 1000, 2000, "b")]
    assert parse_vtt(result["formats"]["vtt"]) == [(0, 1000, "a"), (1000, 2000, "b")]
    assert "formats" not in transcription_result(raw, model="m", spec={"formats": ["text"]})
    assert "formats" not in with_formats(dict(result), None)  # type: ignore[arg-type]


def test_a_job_asks_for_formats_once_each_and_from_the_list() -> None:
    from pydantic import ValidationError

    from orchestrator.domain import TranscriptionSpec

    assert TranscriptionSpec(audio_url="/a.wav").formats == ["text"]
    assert TranscriptionSpec(audio_url="/a.wav", formats=["srt", "vtt"]).formats == ["srt", "vtt"]
    for bad, reason in ((["srt", "srt"], "listed once"), ([], "at least 1"), (["docx"], "'text', 'srt', 'vtt' or 'json'")):
        with pytest.raises(ValidationError, match=reason):
            TranscriptionSpec(audio_url="/a.wav", formats=bad)
