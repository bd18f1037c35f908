"""Pair quality: agreement, the judge's grade, log-probabilities, and the deterministic export split."""

from __future__ import annotations

import math
import uuid

import pytest

from orchestrator.distillation import quality
from orchestrator.distillation.export import split_of


def test_similarity_rewards_the_same_words_in_the_same_order() -> None:
    assert quality.similarity("the sky is blue", "the sky is blue") == 1.0
    assert quality.similarity("", "") == 1.0 and quality.similarity("something", "") == 0.0
    same_words = quality.similarity("blue is the sky", "the sky is blue")
    assert 0.5 < same_words < 1.0
    assert quality.similarity("the sky is blue", "bananas are yellow") < 0.2


@pytest.mark.parametrize(("answer", "grade"), [("8", 0.8), ("Score: 10/10", 1.0), ("7.5", 0.75), ("0", 0.0),
                                                ("no idea", None), ("42", None)])
def test_judge_grades_are_read_from_its_reply(answer: str, grade: float | None) -> None:
    assert quality.parse_judge(answer) == grade


def test_judge_prompt_carries_the_conversation_and_the_answer() -> None:
    prompt = quality.judge_prompt([{"role": "user", "content": "2+2?"}], "4")
    assert "user: 2+2?" in prompt and "ANSWER:\n4" in prompt and "0 to 10" in prompt


def test_log_probability_becomes_a_confidence() -> None:
    assert quality.from_logprob(0.0) == 1.0
    assert quality.from_logprob(math.log(0.5)) == 0.5


def test_export_split_is_deterministic_and_near_the_fraction() -> None:
    ids = [uuid.UUID(int=i * 7919 + 1) for i in range(4000)]
    test = [i for i in ids if split_of(i, 0.2) == "test"]
    assert 0.17 < len(test) / len(ids) < 0.23
    assert [split_of(i, 0.2) for i in ids[:50]] == [split_of(i, 0.2) for i in ids[:50]]
    # A larger held-out fraction only adds pairs to the test set: nothing trained on moves into it.
    assert set(test) <= {i for i in ids if split_of(i, 0.3) == "test"}
