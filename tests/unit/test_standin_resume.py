"""The stand-in student trainer keeps the training convention: killed mid-run, it resumes from its
latest checkpoint and ends with the same model as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _data(path: Path, n: int) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question number {i}"},
                                      {"role": "assistant", "content": f"answer {i}"}]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(env: dict[str, str], wait: bool = True) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "providers.sandbox.standin", "train"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.wait(timeout=60)
    return proc


def test_killed_training_resumes_from_its_latest_checkpoint(tmp_path: Path) -> None:
    data = _data(tmp_path / "train.jsonl", 40)
    env = {"GPUFLEET_TRAIN_DATA": str(data), "GPUFLEET_CHECKPOINT_URI": str(tmp_path / "ckpt"),
           "GPUFLEET_STANDIN_CHECKPOINT_EVERY": "5", "GPUFLEET_STANDIN_SECONDS_PER_EXAMPLE": "0.05",
           "GPUFLEET_STUDENT_ARTIFACT": str(tmp_path / "model.json")}
    first = _run(env, wait=False)
    deadline = time.monotonic() + 30
    while len(list((tmp_path / "ckpt").glob("step-*.json"))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.kill()  # preempted
    first.wait()
    reported = [json.loads(line.split(" ", 1)[1]) for line in first.stdout.read().splitlines()  # type: ignore[union-attr]
                if line.startswith("GPUFLEET_CHECKPOINT ")]
    latest = max(reported, key=lambda c: c["step"])
    assert latest["step"] < 40 and Path(latest["uri"]).exists()
    second = _run({**env, "GPUFLEET_RESUME_FROM": latest["uri"], "GPUFLEET_STANDIN_SECONDS_PER_EXAMPLE": "0"})
    out = second.stdout.read()  # type: ignore[union-attr]
    assert second.returncode == 0, second.stderr.read()  # type: ignore[union-attr]
    assert f"resuming from example {latest['step']}" in out
    resumed = json.loads((tmp_path / "model.json").read_text())["examples"]
    fresh = _run({"GPUFLEET_TRAIN_DATA": str(data), "GPUFLEET_STUDENT_ARTIFACT": str(tmp_path / "fresh.json")})
    assert fresh.returncode == 0
    assert resumed == json.loads((tmp_path / "fresh.json").read_text())["examples"] and len(resumed) == 40


def test_object_storage_checkpoints_are_skipped_not_fatal(tmp_path: Path) -> None:
    data = _data(tmp_path / "train.jsonl", 3)
    done = _run({"GPUFLEET_TRAIN_DATA": str(data), "GPUFLEET_CHECKPOINT_URI": "s3://bucket/ckpt/",
                 "GPUFLEET_STUDENT_ARTIFACT": str(tmp_path / "model.json")})
    assert done.returncode == 0 and "not checkpointing" in done.stdout.read()  # type: ignore[union-attr]
