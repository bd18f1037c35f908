"""Placement: the cheapest fitting offer wins, and every rejection says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import CapacityBusy, NoPlacement
from orchestrator.scheduling.placement import place
from orchestrator.scheduling.queues import queue_for
from providers.base import JobSpec, Requirements
from providers.local import LocalProvider
from providers.sandbox import SandboxProvider

OFFERS = [
    {"offer_id": "cheap-4090", "gpu": "RTX 4090", "gpu_memory_gb": 24, "region": "eu-se", "price_per_hour": 0.39,
     "capacity": 1},
    {"offer_id": "a100", "gpu": "A100", "gpu_memory_gb": 80, "region": "us-east", "price_per_hour": 1.29},
    {"offer_id": "h100", "gpu": "H100", "gpu_memory_gb": 80, "region": "us-west", "price_per_hour": 2.49},
    {"offer_id": "tokens", "gpu": "L4", "gpu_memory_gb": 24, "region": "us-east", "price_per_hour": 5.0,
     "price_per_1k_tokens": 0.0001, "kinds": ["inference"]},
]


@pytest.fixture()
def providers(tmp_path: Path) -> dict[str, object]:
    return {
        "local": LocalProvider("local", {"runs_dir": str(tmp_path / "runs"), "slots": 2}),
        "sandbox": SandboxProvider("sandbox", {"state_dir": str(tmp_path), "offers": OFFERS}),
    }


def _place(registry, kind="training", spec=None, excluded=None, **req):  # type: ignore[no-untyped-def]
    return place(registry, kind, spec or {"base_model": "m", "dataset_uri": "d"}, Requirements(**req), 3600, excluded)


def test_cheapest_fitting_gpu_offer_wins_with_rationale(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, gpu_count=1)
    assert placement.offer.offer_id == "cheap-4090"
    assert "cheapest of 3 fitting offers: sandbox/cheap-4090" in placement.rationale
    assert placement.rejected["local/local"] == "does not run training jobs"


def test_command_without_gpu_goes_to_the_free_local_machine(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, kind="command", spec={"command": ["true"]})
    assert (placement.provider, placement.estimated_cost) == ("local", 0.0)


@pytest.mark.parametrize(
    ("req", "winner", "rejected", "reason"),
    [
        ({"gpu": ["A100", "H100"]}, "a100", "sandbox/cheap-4090", "GPU RTX 4090 not in ['A100', 'H100']"),
        ({"min_gpu_memory_gb": 40}, "a100", "sandbox/cheap-4090", "24 GB GPU memory < 40"),
        ({"gpu_count": 1, "max_price_per_hour": 2.0}, "cheap-4090", "sandbox/h100", "$2.49/h > max $2.00/h"),
        ({"gpu_count": 1, "regions": ["us-west"]}, "h100", "sandbox/a100", "region us-east not in ['us-west']"),
        ({"gpu_count": 2}, None, "sandbox/a100", "1 GPUs < 2"),
    ],
)
def test_each_constraint_rejects_with_a_reason(providers, req, winner, rejected, reason) -> None:  # type: ignore[no-untyped-def]
    if winner is None:
        with pytest.raises(NoPlacement) as err:
            _place(providers, **req)
        assert f"{rejected}: {reason}" in str(err.value)
        return
    placement = _place(providers, **req)
    assert placement.offer.offer_id == winner
    assert placement.rejected[rejected] == reason


def test_provider_filter_and_exclusions(providers) -> None:  # type: ignore[no-untyped-def]
    assert _place(providers, kind="command", spec={"command": ["x"]}, providers=["sandbox"]).provider == "sandbox"
    placement = _place(providers, gpu_count=1, excluded={"sandbox/cheap-4090"})
    assert placement.offer.offer_id == "a100"
    assert placement.rejected["sandbox/cheap-4090"] == "failed this job before"


def test_full_offers_make_the_job_wait_not_fail(providers) -> None:  # type: ignore[no-untyped-def]
    sandbox = providers["sandbox"]
    offer = next(o for o in sandbox.offers(Requirements(), "training", {}) if o.offer_id == "cheap-4090")
    sandbox.reserve(offer, JobSpec(job_id="j", kind="training", attempt=1, spec={}, timeout_seconds=60))
    with pytest.raises(CapacityBusy, match="every fitting offer is full"):
        _place(providers, gpu=["RTX 4090"])


def test_per_token_offers_compete_on_estimated_cost(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, kind="inference", spec={"model": "m", "prompt": "p", "max_tokens": 100})
    assert placement.offer.offer_id == "tokens"  # $5/h, but ~300 tokens cost far less than 30 s of a GPU
    assert placement.estimated_cost == pytest.approx(0.0001 * 300 / 1000)


def test_queue_routing() -> None:
    assert queue_for("training", "high") == "high_priority"
    assert queue_for("inference", "low") == "low_priority"
    expected = {"inference": "inference", "transcription": "inference", "training": "training",
                "distillation": "distillation", "command": "default"}
    for kind, queue in expected.items():
        assert queue_for(kind, "normal") == queue
