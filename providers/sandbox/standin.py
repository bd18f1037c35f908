"""A small real stand-in for fine-tuning a student, so the distillation loop runs end to end here.

``python -m providers.sandbox.standin train`` reads the exported training JSONL (OpenAI chat format),
"learns" each prompt's teacher answer (a nearest-neighbour model over word overlap) and writes the
model as JSON; the sandbox provider serves it as the model ``standin:<path>``. Like a real student
it answers what it was trained on well and unseen prompts less well, so evaluation measures
something real. Its env follows the convention of real training commands: GPUFLEET_TRAIN_DATA,
GPUFLEET_VALIDATION_DATA (paths, file:// or http(s) URLs), GPUFLEET_STUDENT_ARTIFACT (where to
write the model) or GPUFLEET_STUDENT_ARTIFACT_PUT_URL (a presigned URL to PUT it to). It checkpoints
and resumes like any training run (docs/training.md): GPUFLEET_CHECKPOINT_URI, GPUFLEET_RESUME_FROM.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from providers.sandbox import trainer

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _read(location: str) -> str:
    parts = urlsplit(location)
    if parts.scheme in ("http", "https"):
        with urllib.request.urlopen(location, timeout=60) as response:
            return response.read().decode()
    return Path(unquote(parts.path) if parts.scheme == "file" else location).read_text()


def _prompt(messages: list[dict[str, Any]]) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "assistant")


def train(data: str, checkpoints: str | None = None, resume: str | None = None, every: int = 100,
          seconds_per_example: float = 0.0) -> dict[str, Any]:
    """Learn every example; with ``checkpoints`` (GPUFLEET_CHECKPOINT_URI) save the model so far every
    ``every`` examples and report it, and with ``resume`` (GPUFLEET_RESUME_FROM) start from such a save:
    the convention of docs/training.md, so a preempted student's training carries on where it stopped."""
    examples: dict[str, str] = {}
    done = 0
    if checkpoints and urlsplit(checkpoints).scheme not in ("", "file"):
        print(f"not checkpointing: this stand-in writes checkpoints to a path, not {checkpoints}", flush=True)
        checkpoints = None
    if resume:
        saved = json.loads(_read(resume))
        examples, done = dict(saved["examples"]), int(saved["step"])
        print(f"resuming from example {done} ({resume})", flush=True)
    lines = [line for line in _read(data).splitlines() if line.strip()]
    for step, line in enumerate(lines[done:], start=done + 1):
        messages = json.loads(line)["messages"]
        answer = next((m["content"] for m in reversed(messages) if m.get("role") == "assistant"), "")
        examples[" ".join(_words(_prompt(messages)))] = answer
        time.sleep(seconds_per_example)
        if checkpoints and (step % every == 0 or step == len(lines)):
            path = trainer.save(trainer.local_path(checkpoints), step, {"examples": examples})
            print("GPUFLEET_CHECKPOINT " + json.dumps({"step": step, "uri": str(path)}), flush=True)
    return {"kind": "gpufleet-standin", "examples": examples}


def answer(path: str, prompt: str) -> str:
    """The trained answer of the nearest known prompt (empty when nothing overlaps)."""
    examples = _load(path)
    key = " ".join(_words(prompt))
    if key in examples:
        return examples[key]
    asked = set(key.split())
    best, overlap = "", 0.0
    for known, text in examples.items():
        words = set(known.split())
        score = len(asked & words) / len(asked | words) if asked | words else 0.0
        if score > overlap:
            best, overlap = text, score
    return best


@lru_cache(maxsize=16)
def _load(path: str) -> dict[str, str]:
    return dict(json.loads(_read(path))["examples"])


def main() -> None:
    if sys.argv[1:] != ["train"]:
        sys.exit("usage: python -m providers.sandbox.standin train  (reads GPUFLEET_TRAIN_DATA)")
    model = train(os.environ["GPUFLEET_TRAIN_DATA"], checkpoints=os.environ.get("GPUFLEET_CHECKPOINT_URI"),
                  resume=os.environ.get("GPUFLEET_RESUME_FROM"),
                  every=int(os.environ.get("GPUFLEET_STANDIN_CHECKPOINT_EVERY", "100")),
                  seconds_per_example=float(os.environ.get("GPUFLEET_STANDIN_SECONDS_PER_EXAMPLE", "0")))
    body = json.dumps(model).encode()
    put_url, target = os.environ.get("GPUFLEET_STUDENT_ARTIFACT_PUT_URL"), os.environ["GPUFLEET_STUDENT_ARTIFACT"]
    if put_url:
        urllib.request.urlopen(urllib.request.Request(put_url, data=body, method="PUT",
                                                      headers={"Content-Type": "application/json"}), timeout=60).read()
    else:
        path = Path(unquote(urlsplit(target).path) if target.startswith("file://") else target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    validation = os.environ.get("GPUFLEET_VALIDATION_DATA")
    held_out = sum(1 for line in _read(validation).splitlines() if line.strip()) if validation else 0
    print("GPUFLEET_RESULT " + json.dumps({"artifact_uri": target, "examples": len(model["examples"]),
                                           "validation_examples": held_out, "steps": len(model["examples"])}))


if __name__ == "__main__":
    main()
