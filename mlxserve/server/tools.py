"""Tool calls in generated text -> structured calls, for ``/api/chat`` and ``/v1``.

Models write tool calls as JSON in their own wrappers: ``<tool_call>{...}</tool_call>``
(Qwen, Hermes and most ChatML models), or a bare JSON object ``{"name": ..., "arguments":
...}``. Hand-written because this is a property of chat templates, not of any library we use.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_TAGGED = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclass
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]


def _as_call(candidate: Any, known: set[str]) -> ParsedToolCall | None:
    if not isinstance(candidate, dict):
        return None
    name = candidate.get("name")
    arguments = candidate.get("arguments", candidate.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    if known and name not in known:
        return None
    return ParsedToolCall(name, arguments)


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    names = set()
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None) -> tuple[str, list]:
    """(text without the calls, calls); no tools offered means no calls are looked for."""
    if not tools:
        return text, []
    known = tool_names(tools)
    calls = []
    for match in _TAGGED.finditer(text):
        try:
            call = _as_call(json.loads(match.group(1)), known)
        except json.JSONDecodeError:
            call = None
        if call:
            calls.append(call)
    if calls:
        return _TAGGED.sub("", text).strip(), calls
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text, []
        candidates = value if isinstance(value, list) else [value]
        parsed = [_as_call(item, known) for item in candidates]
        if parsed and all(parsed):
            return "", parsed
    return text, []
