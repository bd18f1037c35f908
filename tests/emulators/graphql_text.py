"""GraphQL input literals as a server parses them, for the RunPod emulator: string literals are
unescaped exactly as GraphQL does, so a client's escaping bugs show up as syntax errors or mangled
values instead of passing silently."""

from __future__ import annotations

import json
import re
from typing import Any


class GraphQLSyntaxError(ValueError):
    pass


_NAME = re.compile(r"[_A-Za-z][_0-9A-Za-z]*")
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")


def _skip(text: str, pos: int) -> int:
    """Past whitespace, commas (insignificant in GraphQL) and comments."""
    while pos < len(text):
        if text[pos] in " \t\r\n,\ufeff":
            pos += 1
        elif text[pos] == "#":
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end
        else:
            break
    return pos


def _string(text: str, pos: int) -> tuple[str, int]:
    if text.startswith('"""', pos):
        raise GraphQLSyntaxError("block strings are not supported by this emulator")
    i = pos + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            try:
                return json.loads(text[pos:i + 1]), i + 1  # GraphQL's escapes are JSON's
            except ValueError as exc:
                raise GraphQLSyntaxError(f"Syntax Error: invalid string literal at {pos}: {exc}") from None
        if ch in "\r\n":
            raise GraphQLSyntaxError(f"Syntax Error: Unterminated string at {pos}.")
        i += 1
    raise GraphQLSyntaxError(f"Syntax Error: Unterminated string at {pos}.")


def parse_value(text: str, pos: int) -> tuple[Any, int]:
    """One GraphQL input value starting at ``pos``: (value, position after it)."""
    pos = _skip(text, pos)
    ch = text[pos:pos + 1]
    if ch == '"':
        return _string(text, pos)
    if ch in "{[":
        return _object(text, pos + 1) if ch == "{" else _list(text, pos + 1)
    if match := _NUMBER.match(text, pos):
        number = match[0]
        return (float(number) if match[1] or match[2] else int(number)), match.end()
    if match := _NAME.match(text, pos):
        return {"true": True, "false": False, "null": None}.get(match[0], match[0]), match.end()
    raise GraphQLSyntaxError(f"Syntax Error: Unexpected {text[pos:pos + 10]!r} at {pos}.")


def _object(text: str, pos: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while True:
        pos = _skip(text, pos)
        if text[pos:pos + 1] == "}":
            return out, pos + 1
        name = _NAME.match(text, pos)
        if not name:
            raise GraphQLSyntaxError(f"Syntax Error: Expected Name, found {text[pos:pos + 10]!r} at {pos}.")
        pos = _skip(text, name.end())
        if text[pos:pos + 1] != ":":
            raise GraphQLSyntaxError(f"Syntax Error: Expected ':', found {text[pos:pos + 10]!r} at {pos}.")
        out[name[0]], pos = parse_value(text, pos + 1)


def _list(text: str, pos: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    while True:
        pos = _skip(text, pos)
        if text[pos:pos + 1] == "]":
            return out, pos + 1
        if pos >= len(text):
            raise GraphQLSyntaxError("Syntax Error: Unterminated list.")
        value, pos = parse_value(text, pos)
        out.append(value)


def input_of(query: str, field_name: str) -> dict[str, Any]:
    """The ``input: {…}`` argument of ``field_name(…)`` in the query text."""
    match = re.search(rf"\b{field_name}\s*\(\s*input\s*:\s*", query)
    if not match:
        raise GraphQLSyntaxError(f"{field_name} needs an input argument")
    value, _ = parse_value(query, match.end())
    if not isinstance(value, dict):
        raise GraphQLSyntaxError(f"{field_name}: input must be an object")
    return value
