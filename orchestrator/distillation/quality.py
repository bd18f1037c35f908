"""How good a teacher's answer is as training data, and how close the student already is.

Three ways to judge, best first: the teacher's own token log-probability when its API returns it;
a judge model given a rubric (configured with ``GPUFLEET_DISTILL_JUDGE_MODEL``); otherwise the
similarity of the two answers (two models that agree are more often right). Agreement between
student and teacher is always the similarity: it is what evaluation and traffic shifting watch.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from difflib import SequenceMatcher

_WORD = re.compile(r"\w+", re.UNICODE)
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")

JUDGE_RUBRIC = (
    "You grade answers used to train a smaller model. Rate the ANSWER to the CONVERSATION from 0 to 10 "
    "for correctness, completeness and clarity. Reply with the number only.\n\nCONVERSATION:\n{conversation}"
    "\n\nANSWER:\n{answer}\n\nSCORE (0-10):"
)


def _tokens(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def similarity(a: str, b: str) -> float:
    """0..1: the mean of word-level F1 (what they say) and sequence similarity (how they say it)."""
    ta, tb = _tokens(a), _tokens(b)
    if not ta and not tb:
        return 1.0
    if not ta or not tb:
        return 0.0
    common = sum((Counter(ta) & Counter(tb)).values())
    f1 = 0.0 if common == 0 else 2 * common / (len(ta) + len(tb))
    order = SequenceMatcher(None, ta, tb, autojunk=False).ratio()
    return round((f1 + order) / 2, 4)


def from_logprob(mean_logprob: float) -> float:
    """The teacher's mean token log-probability as a 0..1 confidence (its geometric-mean token probability)."""
    return round(min(1.0, max(0.0, math.exp(mean_logprob))), 4)


def judge_prompt(messages: list[dict[str, str]], answer: str) -> str:
    conversation = "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
    return JUDGE_RUBRIC.format(conversation=conversation, answer=answer)


def parse_judge(text: str) -> float | None:
    """The judge's 0..10 grade as 0..1, or None if it did not answer with a number."""
    found = _NUMBER.search(text or "")
    if not found:
        return None
    value = float(found.group(1))
    return round(min(10.0, max(0.0, value)) / 10, 4) if value <= 10 else None
