"""A stand-in training loop that follows gpufleet's checkpoint convention (docs/training.md), so
preemption and resume run end to end here — and a template for job authors. Stdlib only: it runs
on any instance with python3.

    python3 trainer.py [--steps N] [--step-seconds S] [--every K]

Each step "trains" (sleeps, updates a loss); every K steps it writes a checkpoint file under
GPUFLEET_CHECKPOINT_URI (a local path or file:// URL), atomically, then reports it with a
``GPUFLEET_CHECKPOINT`` line. Started again after a preemption, it loads GPUFLEET_RESUME_FROM and
carries on from GPUFLEET_RESUME_STEP. The result says how many steps ran in this run and in total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


def local_path(location: str) -> Path:
    parts = urlsplit(location)
    if parts.scheme not in ("", "file"):
        sys.exit(f"trainer: this stand-in writes checkpoints to a path or file:// URL, not {parts.scheme}://")
    return Path(unquote(parts.path) if parts.scheme == "file" else location)


def save(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Write the checkpoint completely before anyone hears of it: a temp file renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step-{step:08d}.json"
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as fh:
        json.dump({"step": step, **state}, fh)
    os.replace(fh.name, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(os.environ.get("GPUFLEET_TRAIN_STEPS", "20")))
    parser.add_argument("--step-seconds", type=float, default=0.1)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every K steps")
    args = parser.parse_args(argv)

    step, loss = 0, 4.0
    resume = os.environ.get("GPUFLEET_RESUME_FROM")
    if resume:
        state = json.loads(local_path(resume).read_text())
        step, loss = int(state["step"]), float(state["loss"])
        print(f"resuming from step {step} ({resume})", flush=True)
    started_at = step
    directory = local_path(os.environ["GPUFLEET_CHECKPOINT_URI"]) if os.environ.get("GPUFLEET_CHECKPOINT_URI") else None
    while step < args.steps:
        time.sleep(args.step_seconds)
        step += 1
        loss *= 0.9
        print(f"step {step}/{args.steps} loss {loss:.4f}", flush=True)
        if directory is not None and (step % args.every == 0 or step == args.steps):
            path = save(directory, step, {"loss": loss})
            print("GPUFLEET_CHECKPOINT " + json.dumps({"step": step, "uri": str(path)}), flush=True)
    print("GPUFLEET_RESULT " + json.dumps({"steps": step, "steps_this_run": step - started_at,
                                           "resumed_from_step": started_at, "loss": round(loss, 6)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
