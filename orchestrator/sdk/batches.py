"""Batch runs from the SDK: build items from a source, submit them in chunks, wait, gather the results.

    items = transcription_items("calls/", language="en", formats=("srt", "vtt"))
    run = BatchRun(client, items, out="transcripts/")
    print(run.estimate().estimated_cost)
    summary = run.run(on_progress=lambda p: print(p.done, "/", p.size))

Resume: the output location holds a small state file (the batch id, a hash of the items and options, how
many chunks the server has confirmed). Running the same thing again — or ``BatchRun.resume(client, out)``
after the client or the whole stack restarted — re-sends the chunks not confirmed (the server creates only
missing items: each item's job is keyed by the batch and the item's key), then waits and gathers again.
Gathering overwrites the outputs, so it can be repeated.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import wave
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from orchestrator.batch_models import AppendOut, BatchItemOut, BatchRunOut, Estimate
from orchestrator.sdk.errors import ConflictError, GpufleetClientError, WaitTimeout

AUDIO_EXTENSIONS = frozenset({".wav", ".mp3", ".m4a", ".flac", ".ogg", ".opus", ".webm", ".mp4", ".aac", ".aif",
                              ".aiff", ".wma", ".amr", ".mka"})
STATE_FILE = ".gpufleet-batch.json"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
TRANSCRIPTS_DIR = "transcripts"
DEFAULT_CHUNK_SIZE = 250
# Well under the API's default 1 MiB body limit, whatever the items hold.
MAX_CHUNK_BYTES = 600_000
ESTIMATE_SAMPLE = 1000
_INFERENCE_FIELDS = ("id", "prompt", "messages", "max_tokens", "temperature", "logprobs", "model")
_TRANSCRIPTION_FIELDS = ("id", "audio_url", "language", "duration_seconds", "model")


class BatchInputError(GpufleetClientError):
    """A source that cannot become items, or an output location that holds another run; one line, says why."""


@dataclass(frozen=True)
class Item:
    """One unit of work: ``key`` names it stably across restarts (a relative path, a prompt id)."""

    key: str
    spec: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {"key": self.key, "spec": self.spec}


@dataclass
class ItemSet:
    """Items of one kind, with what built them (``builder`` + ``params`` rebuild the same items on resume)."""

    kind: str
    items: list[Item]
    source: str
    builder: str
    params: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    formats: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def items_hash(self) -> str:
        """Identifies the items and their shared spec fields: a changed source is a different batch."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.kind, self.defaults], sort_keys=True).encode())
        for item in self.items:
            digest.update(json.dumps([item.key, item.spec], sort_keys=True, separators=(",", ":")).encode())
            digest.update(b"\n")
        return digest.hexdigest()


# --- building items ---------------------------------------------------------------------------


def _storage_for(uri: str) -> Any:
    """Storage for a local path or an s3:// URI; S3 endpoint and region from the settings, as elsewhere."""
    from orchestrator.settings import get_settings
    from orchestrator.storage import storage_from_uri

    if uri.startswith("s3://"):
        settings = get_settings()
        return storage_from_uri(uri, endpoint_url=settings.storage_endpoint_url, region=settings.storage_region)
    return storage_from_uri(uri)


def _is_url(text: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text))


def _local_url(entry: str, base: Path) -> str:
    """A manifest entry as the job's audio_url: URLs as given, local paths made absolute (the manifest's
    directory is where relative paths start) — existence is the run's business, so one missing file fails
    only its item, with the reason."""
    if _is_url(entry):
        return entry
    path = Path(entry).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    from orchestrator import transcripts

    chosen = tuple(dict.fromkeys(formats))
    if not chosen:
        raise BatchInputError(f"give at least one output format ({', '.join(transcripts.FORMATS)})")
    for fmt in chosen:
        if fmt not in transcripts.FORMATS:
            raise BatchInputError(f"unknown transcript format {fmt!r}: choose from {', '.join(transcripts.FORMATS)}")
    return chosen


def _validated(kind: str, spec: dict[str, Any], where: str) -> None:
    """Check a spec locally with the API's own model, so a bad line is reported by its line number."""
    from orchestrator.domain import SPEC_MODELS

    try:
        SPEC_MODELS[kind].model_validate(spec)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(p) for p in error["loc"])
        reason = str(error["msg"]).removeprefix("Value error, ")
        raise BatchInputError(f"{where}: {loc + ': ' if loc else ''}{reason}") from None


def _add(items: dict[str, Item], lines: dict[str, str], item: Item, where: str) -> None:
    if item.key in items:
        raise BatchInputError(f"{where}: item {item.key!r} is already listed ({lines[item.key]})")
    items[item.key] = item
    lines[item.key] = where


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchInputError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchInputError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise BatchInputError(f"{path} line {number}: must be a JSON object")
        yield number, value


def _item_id(value: Any, where: str) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
        raise BatchInputError(f"{where}: 'id' must be a non-empty string or integer")
    return str(value)


def _unknown(value: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    extra = sorted(set(value) - set(allowed))
    if extra:
        raise BatchInputError(f"{where}: unknown field {extra[0]!r} (allowed: {', '.join(allowed)})")


def _from_directory(root: Path) -> list[Item]:
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
         and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise BatchInputError(f"{root}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) in this directory")
    return [Item(p.relative_to(root).as_posix(), {"audio_url": str(p.resolve()), **_wav_length(p)}) for p in files]


def _wav_length(path: Path) -> dict[str, float]:
    """``duration_seconds`` of a readable WAV file (the header says it), so the estimate prices the audio
    there is rather than a guess; nothing for other formats or a file that is not readable (the run says
    why)."""
    if path.suffix.lower() != ".wav":
        return {}
    try:
        with wave.open(str(path), "rb") as audio:
            frames, rate = audio.getnframes(), audio.getframerate()
    except (wave.Error, EOFError, OSError):
        return {}
    return {"duration_seconds": round(frames / rate, 3)} if frames > 0 and rate > 0 else {}


def _from_s3(uri: str) -> list[Item]:
    storage = _storage_for(uri)
    keys = [k for k in storage.list("") if Path(k).suffix.lower() in AUDIO_EXTENSIONS]
    if not keys:
        raise BatchInputError(f"{uri}: no audio objects ({', '.join(sorted(AUDIO_EXTENSIONS))}) under this prefix")
    return [Item(key, {"audio_url": storage.uri(key)}) for key in keys]


def _from_manifest(path: Path) -> list[Item]:
    items: dict[str, Item] = {}
    lines: dict[str, str] = {}
    base = path.parent.resolve()
    first = next((line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                  if line.strip()), "")
    if path.suffix.lower() == ".jsonl" or first.startswith("{"):
        for number, value in _json_lines(path):
            where = f"{path} line {number}"
            _unknown(value, _TRANSCRIPTION_FIELDS, where)
            url = value.get("audio_url")
            if not isinstance(url, str) or not url.strip():
                raise BatchInputError(f"{where}: 'audio_url' is required (a path or URL)")
            key = _item_id(value["id"], where) if "id" in value else url.strip()
            spec = {"audio_url": _local_url(url.strip(), base),
                    **{k: value[k] for k in ("language", "duration_seconds", "model") if value.get(k) is not None}}
            _validated("transcription", spec, where)
            _add(items, lines, Item(key, spec), where)
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            where = f"{path} line {number}"
            spec = {"audio_url": _local_url(entry, base)}
            _validated("transcription", spec, where)
            _add(items, lines, Item(entry, spec), where)
    if not items:
        raise BatchInputError(f"{path}: the manifest lists no audio files")
    return list(items.values())


def transcription_items(source: str | Path, language: str | None = None, formats: Iterable[str] = ("text",),
                        model: str | None = None) -> ItemSet:
    """Items for ``gpufleet batch transcribe``: every audio file of a directory (recursively, sorted by
    relative path, which is each item's key), the entries of a manifest (a text file of paths/URLs, one a
    line, ``#`` comments; or JSONL of ``{"audio_url", "id"?, "language"?, "duration_seconds"?}``), or the
    audio objects under an ``s3://bucket/prefix``. ``formats`` are the transcript files to gather
    (``orchestrator.transcripts.FORMATS``); ``language`` and ``model`` apply to every item that does not
    name its own."""
    chosen = _check_formats(formats)
    text = str(source)
    if text.startswith("s3://"):
        items, where = _from_s3(text), text
    elif _is_url(text):
        raise BatchInputError(f"{text}: a source is a directory, a manifest file or an s3://bucket/prefix")
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            items = _from_directory(path)
        elif path.is_file():
            items = _from_manifest(path)
        else:
            raise BatchInputError(f"{path}: no such directory or manifest file")
        where = str(path.resolve())
    defaults = {k: v for k, v in (("language", language), ("model", model)) if v}
    _validated("transcription", {"audio_url": "x", **defaults}, "options")
    return ItemSet(kind="transcription", items=items, source=where, builder="transcription",
                   params={"language": language, "formats": list(chosen), "model": model}, defaults=defaults,
                   formats=chosen)


def inference_items(prompts: str | Path, model: str | None = None, max_tokens: int | None = None) -> ItemSet:
    """Items for ``gpufleet batch infer``: one per line of a JSONL file, each ``{"prompt": …}`` or
    ``{"messages": […]}`` with optional ``id`` (the item's key; else ``line-N``), ``max_tokens``,
    ``temperature``, ``logprobs`` and ``model`` (else ``model`` here, which is then required)."""
    path = Path(prompts).expanduser()
    if not path.is_file():
        raise BatchInputError(f"{path}: no such prompts file (JSONL, one {{\"prompt\": …}} per line)")
    items: dict[str, Item] = {}
    lines: dict[str, str] = {}
    defaults = {k: v for k, v in (("model", model), ("max_tokens", max_tokens)) if v is not None}
    for number, value in _json_lines(path):
        where = f"{path} line {number}"
        _unknown(value, _INFERENCE_FIELDS, where)
        if "prompt" not in value and "messages" not in value:
            raise BatchInputError(f"{where}: give 'prompt' or 'messages'")
        if not value.get("model") and not model:
            raise BatchInputError(f"{where}: no model: pass model= (--model) or give \"model\" on the line")
        key = _item_id(value["id"], where) if "id" in value else f"line-{number}"
        spec = {k: v for k, v in value.items() if k != "id"}
        _validated("inference", {**defaults, **spec}, where)
        _add(items, lines, Item(key, spec), where)
    if not items:
        raise BatchInputError(f"{path}: no prompts in the file")
    return ItemSet(kind="inference", items=list(items.values()), source=str(path.resolve()), builder="inference",
                   params={"model": model, "max_tokens": max_tokens}, defaults=defaults)


def rebuild(builder: str, source: str, params: dict[str, Any]) -> ItemSet:
    """The items a batch was made from, built again from its recorded source and parameters (resume)."""
    if builder == "transcription":
        return transcription_items(source, **params)
    if builder == "inference":
        return inference_items(source, **params)
    raise BatchInputError(f"cannot rebuild items made by {builder!r}")


def chunks(items: Sequence[Item], size: int = DEFAULT_CHUNK_SIZE, max_bytes: int = MAX_CHUNK_BYTES) -> list[list[Item]]:
    """Deterministic chunks (the same items always split the same way, so 'chunks confirmed' means the same
    thing after a restart) of at most ``size`` items and about ``max_bytes`` of JSON."""
    out: list[list[Item]] = []
    current: list[Item] = []
    used = 0
    for item in items:
        weight = len(json.dumps(item.body(), separators=(",", ":"))) + 1
        if current and (len(current) >= size or used + weight > max_bytes):
            out.append(current)
            current, used = [], 0
        current.append(item)
        used += weight
    if current:
        out.append(current)
    return out


# --- output -------------------------------------------------------------------------------------


def _safe_name(key: str) -> str:
    """A transcript's relative path from its item key: the key's own directories kept, unsafe characters
    replaced, the audio extension dropped ('calls/a b.wav' → 'calls/a_b')."""
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if _is_url(key):
        parts = [p for p in urlsplit(key).path.split("/") if p not in ("", ".", "..")] or ["item"]
    cleaned = [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip("._") or "item" for p in parts]
    last = cleaned[-1]
    stem, dot, ext = last.rpartition(".")
    if dot and stem and f".{ext.lower()}" in AUDIO_EXTENSIONS:
        cleaned[-1] = stem
    return "/".join(cleaned)[-200:].lstrip("/") or "item"


def _extension(fmt: str) -> str:
    from orchestrator import transcripts

    ext = transcripts.extension(fmt)
    return ext if ext.startswith(".") else f".{ext}"


@dataclass
class Summary:
    batch_id: str
    progress: BatchRunOut
    out: str
    results: int
    files: int
    failed: list[BatchItemOut]
    not_submitted: list[str]


ProgressCallback = Callable[[BatchRunOut], None]
ChunkCallback = Callable[[int, int, AppendOut], None]


class BatchRun:
    """One batch run writing to ``out`` (a directory or ``s3://bucket/prefix``). See the module docstring."""

    def __init__(self, client: Any, items: ItemSet, out: str | Path, *, priority: str = "normal",
                 requirements: dict[str, Any] | None = None, max_attempts: int | None = None,
                 timeout_seconds: int | None = None, name: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.client = client
        self.items: ItemSet | None = items
        self.out = str(out) if str(out).startswith("s3://") else str(Path(out).expanduser().resolve())
        self.storage = _storage_for(self.out)
        self.chunk_size = chunk_size
        self.name = name
        self.options: dict[str, Any] = {"priority": priority, "requirements": requirements or {},
                                        "defaults": items.defaults}
        if max_attempts is not None:
            self.options["max_attempts"] = max_attempts
        if timeout_seconds is not None:
            self.options["timeout_seconds"] = timeout_seconds
        self.kind = items.kind
        self.total = len(items)
        self.formats: tuple[str, ...] = items.formats
        self.batch_id: str | None = None
        self.state: dict[str, Any] = {}
        self._chunks: list[list[Item]] | None = None
        body = {"kind": self.kind, "options": self.options, "formats": list(self.formats), "out": self.out}
        # Identifies the run's options; a resumed run takes the one recorded with the batch.
        self.options_hash = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    # --- identity and state ---------------------------------------------------------------------

    @property
    def run_key(self) -> str:
        """The batch's idempotency key: the same items, options and output are the same batch, so a client
        that died before writing its state file still finds its batch instead of starting another."""
        assert self.items is not None
        return "run:" + hashlib.sha256(f"{self.items.items_hash}:{self.options_hash}".encode()).hexdigest()[:48]

    def _read_state(self) -> dict[str, Any] | None:
        from orchestrator.storage import ObjectNotFound

        try:
            raw = self.storage.get_bytes(STATE_FILE)
        except ObjectNotFound:
            return None
        try:
            state = json.loads(raw)
        except ValueError:
            raise BatchInputError(f"{self.out}/{STATE_FILE} is not valid JSON: remove it to start over") from None
        return state if isinstance(state, dict) else None

    def _write_state(self) -> None:
        self.storage.put_bytes(STATE_FILE, json.dumps(self.state, indent=2, sort_keys=True).encode(),
                               content_type="application/json")

    def existing(self) -> str | None:
        """The batch this output location already holds for these same items and options (a run to resume);
        BatchInputError if it holds a different run."""
        state = self._read_state()
        if state is None:
            return None
        assert self.items is not None
        if state.get("items_hash") != self.items.items_hash or state.get("options_hash") != self.options_hash:
            what = "items" if state.get("items_hash") != self.items.items_hash else "options"
            raise BatchInputError(
                f"{self.out} already holds batch {state.get('batch_id')} with different {what} "
                f"({state.get('total')} items from {state.get('source')}); use another output location, or "
                f"'gpufleet batch resume {state.get('batch_id')} --out {self.out}' to finish that one")
        self.state = state
        self.batch_id = str(state["batch_id"])
        return self.batch_id

    def _sample(self) -> list[dict[str, Any]]:
        """Items spread over the whole set for the estimate: every one for small batches, else an even
        sample of at most ESTIMATE_SAMPLE, cut to one request's size (the server scales it to the total)."""
        assert self.items is not None
        items = self.items.items
        step = max(1, -(-len(items) // ESTIMATE_SAMPLE))
        return [i.body() for i in chunks(items[::step], ESTIMATE_SAMPLE)[0]]

    def chunk_list(self) -> list[list[Item]]:
        if self._chunks is None:
            assert self.items is not None
            self._chunks = chunks(self.items.items, self.chunk_size)
        return self._chunks

    # --- steps ----------------------------------------------------------------------------------

    def estimate(self) -> Estimate:
        """What the batch would cost and take if placed now (nothing is created)."""
        return self.client.estimate_batch(self.kind, self._sample(), options=self.options, total=self.total)

    def create(self) -> BatchRunOut:
        """Declare the batch (or find it, by its key) and record it in the state file."""
        assert self.items is not None
        notes = {"builder": self.items.builder, "source": self.items.source, "params": self.items.params,
                 "items_hash": self.items.items_hash, "options_hash": self.options_hash, "out": self.out,
                 "chunk_size": self.chunk_size, "formats": list(self.formats)}
        batch = self.client.create_batch(self.kind, self.total, options=self.options, name=self.name,
                                         idempotency_key=self.run_key, output_uri=self.out, sample=self._sample(),
                                         client_notes=notes)
        if str(batch.id) != self.state.get("batch_id"):
            self.state = {"version": 1, "batch_id": str(batch.id), "kind": self.kind, "source": self.items.source,
                          "items_hash": self.items.items_hash, "options_hash": self.options_hash,
                          "total": self.total, "chunk_size": self.chunk_size, "chunks_confirmed": 0,
                          "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self._write_state()
        self.batch_id = str(batch.id)
        return batch

    def submit(self, on_chunk: ChunkCallback | None = None) -> BatchRunOut:
        """Send the chunks the server has not confirmed; idempotent per item, so a chunk that was in flight
        when the client died is simply sent again. If the server still holds fewer items than the batch
        declares (a state file older than the server's truth), every chunk is sent once more."""
        assert self.batch_id is not None
        progress = self.client.batch_progress(self.batch_id)
        if progress.state == "cancelled" or progress.submitted >= progress.size:
            return progress
        all_chunks = self.chunk_list()
        for attempt in range(2):
            start = int(self.state.get("chunks_confirmed", 0)) if attempt == 0 else 0
            for index in range(start, len(all_chunks)):
                try:
                    out = self.client.add_batch_items(self.batch_id, [i.body() for i in all_chunks[index]])
                except ConflictError:
                    if self.client.batch_progress(self.batch_id).state == "cancelled":
                        return self.client.batch_progress(self.batch_id)
                    raise
                self.state["chunks_confirmed"] = index + 1
                self._write_state()
                if on_chunk:
                    on_chunk(index + 1, len(all_chunks), out)
            progress = self.client.batch_progress(self.batch_id)
            if progress.submitted >= progress.size:
                break
        return progress

    def wait(self, on_progress: ProgressCallback | None = None, poll_interval: float = 1.0,
             timeout: float | None = None) -> BatchRunOut:
        """Block until every item has ended (or, for a cancelled batch, every item it holds)."""
        assert self.batch_id is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            progress = self.client.batch_progress(self.batch_id)
            if on_progress:
                on_progress(progress)
            if progress.finished:
                return progress
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"batch {self.batch_id}: {progress.done} of {progress.size} items ended after "
                                  f"{timeout:g}s")
            time.sleep(poll_interval)

    def gather(self) -> Summary:
        """Write ``results.jsonl`` (one line per item: key, status, result or error, cost), the transcripts
        in the chosen formats (``transcripts/<item>.<ext>``) and ``summary.json``. Overwrites: repeatable."""
        assert self.batch_id is not None
        progress = self.client.batch_progress(self.batch_id)
        found: dict[str, BatchItemOut] = {}
        for item in self.client.iter_batch_items(self.batch_id, results=True):
            found[item.key] = item
        order = [i.key for i in self.items.items] if self.items is not None else []
        known = set(order)
        order += sorted((k for k in found if k not in known), key=_natural)
        names: dict[str, str] = {}
        used: set[str] = set()
        lines: list[str] = []
        files = 0
        for index, key in enumerate(order):
            item = found.get(key)
            if item is None:
                lines.append(json.dumps({"key": key, "status": "not_submitted", "error": "never sent to the batch"}))
                continue
            line: dict[str, Any] = {"key": key, "status": item.status, "job_id": str(item.job_id), "cost": item.cost,
                                    "attempts": item.attempt, "duration_seconds": item.duration_seconds}
            if item.status == "succeeded":
                line["result"] = item.result
            else:
                line["error"] = item.error or item.status
            if item.status == "succeeded" and self.kind == "transcription" and self.formats and item.result:
                name = _safe_name(key)
                if name in used:
                    name = f"{name}-{index}"
                used.add(name)
                names[key] = name
                written = []
                for fmt in self.formats:
                    written.append(self._write_transcript(name, fmt, item.result))
                    files += 1
                line["files"] = written
            lines.append(json.dumps(line, ensure_ascii=False, default=str))
        self.storage.put_bytes(RESULTS_FILE, ("\n".join(lines) + "\n").encode(), content_type="application/x-ndjson")
        failed = [i for i in found.values() if i.status == "failed"]
        not_submitted = [k for k in order if k not in found]
        estimate = progress.estimate or {}
        summary = {
            "batch_id": self.batch_id, "kind": progress.kind, "state": progress.state, "size": progress.size,
            "counts": progress.counts, "finished": progress.finished,
            "actual": {"cost": progress.cost, "elapsed_seconds": progress.elapsed_seconds},
            "estimate": {"cost": estimate.get("estimated_cost"), "seconds": estimate.get("estimated_seconds")},
            "failed": [{"key": i.key, "job_id": str(i.job_id), "error": i.error, "attempts": i.attempt} for i in failed],
            "not_submitted": not_submitted, "results": RESULTS_FILE, "transcripts": files,
        }
        self.storage.put_bytes(SUMMARY_FILE, json.dumps(summary, indent=2, default=str).encode(),
                               content_type="application/json")
        return Summary(batch_id=self.batch_id, progress=progress, out=self.out, results=len(lines), files=files,
                       failed=failed, not_submitted=not_submitted)

    def _write_transcript(self, name: str, fmt: str, result: dict[str, Any]) -> str:
        from orchestrator import transcripts

        key = f"{TRANSCRIPTS_DIR}/{name}{_extension(fmt)}"
        self.storage.put_bytes(key, transcripts.render(result, fmt).encode("utf-8"))  # type: ignore[arg-type]
        return key

    def run(self, on_progress: ProgressCallback | None = None, on_chunk: ChunkCallback | None = None,
            poll_interval: float = 1.0, timeout: float | None = None) -> Summary:
        """Create (or find) the batch, send what is missing, wait, gather."""
        if self.batch_id is None:
            self.existing()
        self.create()
        self.submit(on_chunk)
        self.wait(on_progress, poll_interval, timeout)
        return self.gather()

    # --- resume -----------------------------------------------------------------------------------

    @classmethod
    def resume(cls, client: Any, out: str | Path | None = None, batch_id: str | None = None,
               chunk_size: int | None = None) -> BatchRun:
        """The run of ``batch_id`` (or of the state file in ``out``) ready to ``run()`` again: its items are
        rebuilt from the source recorded with the batch when some were never sent, else not needed."""
        state: dict[str, Any] = {}
        if out is not None:
            probe = _storage_for(str(out) if str(out).startswith("s3://") else str(Path(out).expanduser().resolve()))
            from orchestrator.storage import ObjectNotFound

            try:
                state = json.loads(probe.get_bytes(STATE_FILE))
            except ObjectNotFound:
                state = {}
            except ValueError:
                raise BatchInputError(f"{out}/{STATE_FILE} is not valid JSON") from None
            if batch_id and state.get("batch_id") and state["batch_id"] != str(batch_id):
                raise BatchInputError(f"{out} holds batch {state['batch_id']}, not {batch_id}")
        batch_id = batch_id or state.get("batch_id")
        if not batch_id:
            raise BatchInputError(f"{out}: no {STATE_FILE} here; give the batch id: gpufleet batch resume ID --out DIR")
        progress = client.batch_progress(batch_id)
        notes = (progress.options or {}).get("client") or {}
        if not notes.get("builder"):
            raise BatchInputError(f"batch {batch_id} was not made by a batch run (no source recorded); "
                                  "see it with 'gpufleet batch status'")
        target = out if out is not None else notes.get("out")
        if not target:
            raise BatchInputError(f"batch {batch_id}: give the output location with --out")
        job = (progress.options or {}).get("job") or {}
        need_items = progress.submitted < progress.size and progress.state != "cancelled"
        if need_items:
            items = rebuild(notes["builder"], notes["source"], notes.get("params") or {})
            if items.items_hash != notes.get("items_hash"):
                raise BatchInputError(f"the source {notes['source']} changed since batch {batch_id} started "
                                      f"({progress.size} items then, {len(items)} now): its missing items cannot be "
                                      "rebuilt; cancel it or restore the source")
        else:
            items = ItemSet(kind=progress.kind, items=[], source=notes.get("source", ""), builder=notes["builder"],
                            params=notes.get("params") or {}, defaults=job.get("defaults") or {},
                            formats=tuple(notes.get("formats") or ()))
        run = cls(client, items, target, priority=job.get("priority", "normal"),
                  requirements=job.get("requirements") or {}, max_attempts=job.get("max_attempts"),
                  timeout_seconds=job.get("timeout_seconds"), name=progress.name,
                  chunk_size=chunk_size or int(notes.get("chunk_size") or DEFAULT_CHUNK_SIZE))
        run.total = progress.size
        run.formats = tuple(notes.get("formats") or ())
        run.options_hash = notes.get("options_hash") or run.options_hash
        if not need_items:
            run.items = None
        run.batch_id = str(batch_id)
        same_place = state.get("batch_id") == str(batch_id)
        run.state = state if same_place else {
            "version": 1, "batch_id": str(batch_id), "kind": progress.kind, "source": notes.get("source"),
            "items_hash": notes.get("items_hash"), "options_hash": run.options_hash, "total": progress.size,
            "chunk_size": run.chunk_size, "chunks_confirmed": 0,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if not same_place:
            run._write_state()
        return run

    def finish(self, on_progress: ProgressCallback | None = None, on_chunk: ChunkCallback | None = None,
               poll_interval: float = 1.0, timeout: float | None = None) -> Summary:
        """For a resumed run: send what is missing (if anything), wait, gather."""
        if self.items is not None:
            self.submit(on_chunk)
        self.wait(on_progress, poll_interval, timeout)
        return self.gather()


def _natural(key: str) -> list[Any]:
    """'line-10' after 'line-9'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
