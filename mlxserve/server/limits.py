"""What one request may hold, declared once; docs/API.md ("Request limits") lists the same.

Every bound is checked while the body is parsed, before any work, so nothing that grows with
the input without bound (a 100,000-message conversation, a stop list of 100k strings, a
schema nested 450 levels, a JSON body nested 100,000 levels, a multi-megabyte duration)
reaches the event loop or a runner. Each breach is a 400 ``request_limit`` naming the field
and its limit.
"""

from __future__ import annotations

import json
import math
from typing import Any

from mlxserve.errors import InvalidRequestError, RequestLimitError
from modelstore import parameters

MAX_JSON_DEPTH = 64
"""Nesting of a body, tool and format schemas included (a real tool schema nests < 20)."""
MAX_STRING_CHARS = 16 << 20
"""One string (a message's content, a base64 image); the body's size bounds the sum."""
MAX_MESSAGES = 10_000
"""Messages (or Responses input items) of one conversation."""
MAX_TOOLS = 512
MAX_EMBED_INPUTS = 2048
"""Texts one embedding request may hold, as OpenAI allows."""
MAX_STOP_SEQUENCES = 64
MAX_STOP_BYTES = 16 << 10
"""All stop strings of a request together, UTF-8."""
MAX_INT_DIGITS = 4300
"""Digits of one JSON integer: Python's own limit for turning text into an int, refused as a
400 here instead of escaping as a ``ValueError`` 500. Free-form fields (tool call arguments)
may hold big integers; each parameter's own range is checked where it is read."""
MAX_DURATION_CHARS = 64
"""A ``keep_alive`` string such as ``1h30m``."""
MAX_TOP_LOGPROBS = 20
"""OpenAI's bound for ``top_logprobs``; Ollama's API takes the same."""
MAX_CONTEXT_LENGTH = parameters.MAX_CONTEXT_LENGTH
"""``num_ctx`` / a ModelSpec's ``context_length``: 16M tokens, past every released model
(declared with the sampling bounds: ``repeat_last_n`` may span as much)."""
PARSE_OFF_LOOP_BYTES = 256 << 10
"""Bodies larger than this are parsed and checked in a thread, not on the event loop."""

LIMITS: dict[str, tuple[int, str]] = {
    "json_depth": (MAX_JSON_DEPTH, "levels of JSON nesting"),
    "string": (MAX_STRING_CHARS, "characters in one string"),
    "messages": (MAX_MESSAGES, "messages"),
    "tools": (MAX_TOOLS, "tools"),
    "inputs": (MAX_EMBED_INPUTS, "embedding inputs"),
    "stop": (MAX_STOP_SEQUENCES, "stop sequences"),
    "stop_bytes": (MAX_STOP_BYTES, "bytes of stop sequences"),
    "int_digits": (MAX_INT_DIGITS, "digits in one integer"),
    "duration": (MAX_DURATION_CHARS, "characters in a duration"),
    "top_logprobs": (MAX_TOP_LOGPROBS, "top_logprobs"),
    "context_length": (MAX_CONTEXT_LENGTH, "tokens of context"),
}
"""Each limit by name, with what it counts: the error messages and docs/API.md use these."""


def refuse(name: str, param: str | None = None) -> RequestLimitError:
    bound, what = LIMITS[name]
    return RequestLimitError(
        f"{f'{param!r}' if param else 'the request'} is over the limit of {bound:,} {what} "
        "(docs/API.md, Request limits)",
        param=param,
        limit=bound,
    )


def _refuse_constant(text: str) -> Any:
    raise InvalidRequestError(f"{text} is not a JSON number (NaN and Infinity are refused)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequestError(f"the number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise refuse("int_digits")
    return int(text)


def _check_string(text: str) -> None:
    if len(text) > MAX_STRING_CHARS:
        raise refuse("string")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(
                "a string holds a lone UTF-16 surrogate (such as \\ud800): not valid Unicode"
            ) from None


def _check_tree(value: Any) -> None:
    """Depth and strings of a parsed body, iteratively (a deep body cannot recurse here)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise refuse("json_depth")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str):
                    _check_string(key)
                pending.append((child, depth + 1))
        elif isinstance(item, str):
            _check_string(item)


def _loads(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(
            raw,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except RecursionError:
        raise refuse("json_depth") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise InvalidRequestError(f"{what} is not valid JSON") from None


def parse_json(raw: bytes | str, what: str) -> Any:
    """``raw`` as JSON under the limits: no NaN/Infinity, no huge integers, no lone
    surrogates, bounded depth; anything else is a 400, never a ``RecursionError`` 500."""
    value = _loads(raw, what)
    _check_tree(value)
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body: ``parse_json``, with the list fields every chat API shares counted
    first (a body of 100,000 messages is refused before its tree is walked)."""
    body = _loads(raw, "the request body")
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    check_count(body.get("messages"), "messages", "messages")
    check_count(body.get("input"), "messages", "input")
    check_count(body.get("tools"), "tools", "tools")
    _check_tree(body)
    return body


def check_count(value: Any, name: str, param: str) -> None:
    """A list field (``messages``, ``tools``) within its limit."""
    if isinstance(value, list) and len(value) > LIMITS[name][0]:
        raise refuse(name, param)


def check_stop(stop: list[str], param: str) -> list[str]:
    if len(stop) > MAX_STOP_SEQUENCES:
        raise refuse("stop", param)
    if sum(len(s.encode()) for s in stop) > MAX_STOP_BYTES:
        raise refuse("stop_bytes", param)
    return stop


def check_at_most(value: int, name: str, param: str) -> int:
    if value > LIMITS[name][0]:
        raise refuse(name, param)
    return value


def docs_table() -> str:
    """The Markdown table docs/API.md holds (``tests/test_limits.py`` keeps them equal)."""
    rows = [f"| `{name}` | {bound:,} {what} |" for name, (bound, what) in LIMITS.items()]
    return "\n".join(["| Limit | At most |", "|---|---|", *rows])
