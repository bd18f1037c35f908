"""Building batch items: a directory, a manifest (text or JSONL), an s3:// prefix, a prompts file.

Users judge this on: the same source always gives the same items with the same keys (that is what makes
resume safe), a bad source or line is one clear sentence naming the file and line, and nothing checks
whether a listed file exists (a missing file fails only its own item, at run time, with the reason).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from orchestrator.batch_models import BatchItemOut, BatchRunOut
from orchestrator.sdk.batches import (
    MAX_CHUNK_BYTES,
    RESULTS_FILE,
    SUMMARY_FILE,
    BatchInputError,
    BatchRun,
    Item,
    _safe_name,
    chunks,
    inference_items,
    transcription_items,
)


def _touch(path: Path, data: bytes = b"RIFF") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- directories ------------------------------------------------------------------------------


def test_directory_gives_sorted_audio_files_keyed_by_relative_path(tmp_path: Path) -> None:
    for name in ("b.wav", "a.MP3", "sub/c.flac", "notes.txt", ".hidden.wav", ".cache/d.wav", "sub/e.json"):
        _touch(tmp_path / name)
    items = transcription_items(tmp_path, language="en", formats=("srt", "vtt"))
    assert [i.key for i in items.items] == ["a.MP3", "b.wav", "sub/c.flac"]
    assert items.items[2].spec == {"audio_url": str((tmp_path / "sub/c.flac").resolve())}
    assert items.kind == "transcription" and items.formats == ("srt", "vtt")
    assert items.defaults == {"language": "en"}
    assert items.source == str(tmp_path.resolve())


def test_a_readable_wav_carries_its_length_for_the_estimate(tmp_path: Path) -> None:
    import wave

    with wave.open(str(tmp_path / "call.wav"), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(b"\0\0" * 8000 * 3)
    (tmp_path / "broken.wav").write_bytes(b"not a wav")
    specs = {i.key: i.spec for i in transcription_items(tmp_path).items}
    assert specs["call.wav"]["duration_seconds"] == 3.0
    assert "duration_seconds" not in specs["broken.wav"]  # the run says what is wrong with it


def test_same_source_same_keys_and_hash_and_a_new_file_changes_the_hash(tmp_path: Path) -> None:
    for i in range(5):
        _touch(tmp_path / f"call-{i}.wav")
    first, again = transcription_items(tmp_path), transcription_items(tmp_path)
    assert [i.key for i in first.items] == [i.key for i in again.items]
    assert first.items_hash == again.items_hash
    assert transcription_items(tmp_path, language="de").items_hash != first.items_hash
    _touch(tmp_path / "call-9.wav")
    assert transcription_items(tmp_path).items_hash != first.items_hash


def test_directory_without_audio_is_a_clear_error(tmp_path: Path) -> None:
    _touch(tmp_path / "readme.txt")
    with pytest.raises(BatchInputError, match="no audio files"):
        transcription_items(tmp_path)


def test_missing_source_and_url_source_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="no such directory or manifest file"):
        transcription_items(tmp_path / "nope")
    with pytest.raises(BatchInputError, match="directory, a manifest file or an s3://"):
        transcription_items("https://example.com/calls/")


def test_unknown_format_names_the_choices(tmp_path: Path) -> None:
    _touch(tmp_path / "a.wav")
    with pytest.raises(BatchInputError, match="unknown transcript format 'docx'.*text, srt, vtt, json"):
        transcription_items(tmp_path, formats=("srt", "docx"))
    with pytest.raises(BatchInputError, match="at least one output format"):
        transcription_items(tmp_path, formats=())


# --- manifests --------------------------------------------------------------------------------


def test_text_manifest_resolves_relative_paths_keeps_urls_and_does_not_check_existence(tmp_path: Path) -> None:
    manifest = tmp_path / "lists" / "calls.txt"
    manifest.parent.mkdir()
    manifest.write_text("# calls of Monday\n\naudio/one.wav\n/abs/two.wav\ns3://bucket/three.mp3\n  \n")
    items = transcription_items(manifest)
    assert [i.key for i in items.items] == ["audio/one.wav", "/abs/two.wav", "s3://bucket/three.mp3"]
    assert items.items[0].spec["audio_url"] == str((manifest.parent / "audio/one.wav").resolve())
    assert items.items[1].spec["audio_url"] == "/abs/two.wav"
    assert items.items[2].spec["audio_url"] == "s3://bucket/three.mp3"


def test_manifest_duplicate_names_both_lines(tmp_path: Path) -> None:
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.wav\nb.wav\na.wav\n")
    with pytest.raises(BatchInputError, match=r"m.txt line 3: item 'a.wav' is already listed \(.*m.txt line 1\)"):
        transcription_items(manifest)


def test_jsonl_manifest_ids_languages_and_durations(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in [
        {"id": "c1", "audio_url": "one.wav", "language": "fr"},
        {"audio_url": "https://cdn.example.com/two.mp3", "duration_seconds": 12.5},
        {"id": 7, "audio_url": "file:///data/seven.wav"},
    ]) + "\n")
    items = transcription_items(manifest, language="en")
    assert [i.key for i in items.items] == ["c1", "https://cdn.example.com/two.mp3", "7"]
    assert items.items[0].spec == {"audio_url": str((tmp_path / "one.wav").resolve()), "language": "fr"}
    assert items.items[1].spec == {"audio_url": "https://cdn.example.com/two.mp3", "duration_seconds": 12.5}
    assert items.items[2].spec == {"audio_url": "file:///data/seven.wav"}
    assert items.defaults == {"language": "en"}  # an item's own language wins over the batch's


@pytest.mark.parametrize(("line", "message"), [
    ('{"audio": "a.wav"}', r"line 2: unknown field 'audio' \(allowed: id, audio_url"),
    ('{"id": "x"}', "line 2: 'audio_url' is required"),
    ('{"audio_url": "a.wav", "duration_seconds": -3}', "line 2: duration_seconds: Input should be greater than 0"),
    ('{"audio_url": "a.wav"', "line 2: not valid JSON"),
    ('["a.wav"]', "line 2: must be a JSON object"),
    ('{"id": true, "audio_url": "a.wav"}', "line 2: 'id' must be a non-empty string or integer"),
])
def test_jsonl_manifest_bad_lines_name_the_line_and_the_reason(tmp_path: Path, line: str, message: str) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio_url": "ok.wav"}\n' + line + "\n")
    with pytest.raises(BatchInputError, match=message):
        transcription_items(manifest)


def test_empty_manifest_is_an_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.txt"
    manifest.write_text("# nothing yet\n\n")
    with pytest.raises(BatchInputError, match="lists no audio files"):
        transcription_items(manifest)


# --- s3 ---------------------------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    with mock_aws():
        bucket = f"calls-{uuid.uuid4().hex[:8]}"
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        yield s3, bucket


def test_s3_prefix_lists_audio_objects(aws: Any) -> None:
    s3, bucket = aws
    for key in ("monday/b.wav", "monday/a.mp3", "monday/notes.txt", "monday/deep/c.wav", "tuesday/x.wav"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"RIFF")
    items = transcription_items(f"s3://{bucket}/monday/")
    assert [i.key for i in items.items] == ["a.mp3", "b.wav", "deep/c.wav"]
    assert items.items[0].spec == {"audio_url": f"s3://{bucket}/monday/a.mp3"}
    with pytest.raises(BatchInputError, match="no audio objects"):
        transcription_items(f"s3://{bucket}/wednesday/")


# --- prompts ----------------------------------------------------------------------------------


def test_prompts_keys_are_ids_or_line_numbers(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"id": "q1", "prompt": "Hello?"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "model": "m-70b"}),
    ]) + "\n")
    items = inference_items(prompts, model="m-8b", max_tokens=32)
    assert [i.key for i in items.items] == ["q1", "line-3"]
    assert items.items[0].spec == {"prompt": "Hello?"}
    assert items.items[1].spec["model"] == "m-70b"
    assert items.defaults == {"model": "m-8b", "max_tokens": 32}
    assert inference_items(prompts, model="m-8b", max_tokens=32).items_hash == items.items_hash


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "x", "model": null}', "line 1: no model: pass model="),
    ('{"id": "a"}', "line 1: give 'prompt' or 'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}], "model": "m"}', "line 1: messages.0.role: Input should be"),
    ('{"prompt": "x", "model": "m", "top_k": 3}', "line 1: unknown field 'top_k'"),
    ('{"prompt": "x", "model": "m", "max_tokens": 0}', "line 1: max_tokens: Input should be greater than or equal to 1"),
])
def test_prompts_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(line + "\n")
    with pytest.raises(BatchInputError, match=message):
        inference_items(prompts)


def test_prompts_duplicate_ids_and_missing_file(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n')
    with pytest.raises(BatchInputError, match="line 2: item '1' is already listed"):
        inference_items(prompts, model="m")
    with pytest.raises(BatchInputError, match="no such prompts file"):
        inference_items(tmp_path / "missing.jsonl", model="m")


# --- chunks and names ---------------------------------------------------------------------------


def test_chunks_are_deterministic_and_bounded_by_count_and_bytes() -> None:
    items = [Item(f"k{i}", {"prompt": "x" * (i % 7) * 100}) for i in range(1000)]
    first = chunks(items, 64)
    assert [len(c) for c in first] == [len(c) for c in chunks(items, 64)]
    assert all(len(c) <= 64 for c in first) and sum(map(len, first)) == 1000
    big = [Item(f"b{i}", {"prompt": "y" * 100_000}) for i in range(20)]
    assert all(sum(len(json.dumps(i.body())) for i in c) <= MAX_CHUNK_BYTES for c in chunks(big, 250))


@pytest.mark.parametrize(("key", "name"), [
    ("calls/monday/a b.wav", "calls/monday/a_b"),
    ("../../etc/passwd.mp3", "etc/passwd"),
    ("s3://bucket/x/y.flac", "x/y"),
    ("q1", "q1"),
    ("notes.v2.txt", "notes.v2.txt"),
])
def test_transcript_file_names_stay_inside_the_output(key: str, name: str) -> None:
    assert _safe_name(key) == name


# --- gathering into object storage ----------------------------------------------------------------


class _FakeClient:
    """Just what gather() asks: the batch's progress and its items with results."""

    def __init__(self, batch_id: uuid.UUID, items: list[BatchItemOut]) -> None:
        self.batch_id, self.items = batch_id, items

    def batch_progress(self, batch_id: str) -> BatchRunOut:
        return BatchRunOut(id=self.batch_id, size=len(self.items), created_at="2026-11-26T10:00:00Z",  # type: ignore[arg-type]
                           counts={"succeeded": 1, "failed": 1}, kind="transcription", succeeded=1, failed=1, done=2,
                           finished=True, cost=0.25, elapsed_seconds=4.0,
                           estimate={"estimated_cost": 0.2, "estimated_seconds": 3.0})

    def iter_batch_items(self, batch_id: str, **_: Any) -> list[BatchItemOut]:
        return self.items


def test_gather_writes_results_transcripts_and_summary_to_s3(aws: Any, tmp_path: Path) -> None:
    s3, bucket = aws
    _touch(tmp_path / "calls" / "good.wav")
    _touch(tmp_path / "calls" / "bad.wav")
    items = transcription_items(tmp_path / "calls", formats=("srt", "vtt", "text"))
    batch_id = uuid.uuid4()
    result = {"text": "Hello there. General.", "language": "en", "duration_seconds": 4.0,
              "segments": [{"start": 0.0, "end": 1.5, "text": "Hello there."}, {"start": 1.5, "end": 4.0, "text": "General."}]}
    found = [BatchItemOut(key="good.wav", job_id=uuid.uuid4(), status="succeeded", attempt=1, max_attempts=3, cost=0.25,
                          result=result),
             BatchItemOut(key="bad.wav", job_id=uuid.uuid4(), status="failed", attempt=1, max_attempts=3,
                          error="sandbox: the audio file bad.wav is empty")]
    run = BatchRun(_FakeClient(batch_id, found), items, f"s3://{bucket}/out/run1")
    run.batch_id = str(batch_id)
    summary = run.gather()
    assert summary.results == 2 and summary.files == 3 and [f.key for f in summary.failed] == ["bad.wav"]

    def read(key: str) -> str:
        return s3.get_object(Bucket=bucket, Key=f"out/run1/{key}")["Body"].read().decode()

    lines = [json.loads(line) for line in read(RESULTS_FILE).splitlines()]
    assert [(line["key"], line["status"]) for line in lines] == [("bad.wav", "failed"), ("good.wav", "succeeded")]
    assert lines[0]["error"].endswith("is empty") and lines[1]["result"]["text"] == result["text"]
    assert read("transcripts/good.srt").startswith("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n")
    assert read("transcripts/good.vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.")
    assert read("transcripts/good.txt").strip() == "Hello there. General."
    totals = json.loads(read(SUMMARY_FILE))
    assert totals["actual"] == {"cost": 0.25, "elapsed_seconds": 4.0} and totals["estimate"]["cost"] == 0.2
    assert totals["failed"][0]["key"] == "bad.wav"
