"""Offering tools to a model: ``tool_choice`` as a constraint, and tools for templates without any.

``required`` and a named function are enforced by constrained decoding with the same grammar
engine as ``format``: the output is forced to be the call's JSON (``{"name": ..., "arguments":
...}``, the arguments matching the function's JSON Schema, its objects closed to the keys they
declare), so even a tiny model returns a valid call. A forced free-form (``custom``) tool's
output is its input text, held to the tool's Lark or regex grammar. A chat template that cannot
show tools still gets them, described in a system preamble
that asks for that same JSON (llama.cpp's "generic" tool format is the precedent).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mlxserve.chat.types import Message, Tool, ToolChoice
from mlxserve.errors import InvalidRequestError

PREAMBLE = (
    "You can call the following tools. To call one, reply with only a JSON object of the form "
    '{{"name": <tool name>, "arguments": <an object of arguments>}} and nothing else; '
    "otherwise answer normally.\n\nTools:\n{tools}"
)


def forced_tools(tools: list[Tool], choice: ToolChoice) -> list[Tool]:
    """The tools the output is constrained to (none: the model chooses freely)."""
    if choice in ("auto", "none"):
        return []
    if choice == "required":
        return tools
    chosen = [tool for tool in tools if tool.name == choice]
    if not chosen:
        raise InvalidRequestError(
            f"tool_choice names {choice!r}, which is not among the tools", param="tool_choice"
        )
    return chosen


SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
"""Keywords whose value maps names to subschemas."""
SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
SCHEMA_ONES = ("items", "additionalItems", "contains", "not", "if", "then", "else")
OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
"""An object schema that says any of these has chosen what else it allows: left as it is."""


def closed(schema: Any, *, in_all_of: bool = False) -> Any:
    """``schema`` with every object schema that leaves ``additionalProperties`` unsaid closed
    (declared keys only), recursively, as llama.cpp's and xgrammar's strict modes do: a forced
    call's arguments otherwise admit any key, and a small model invents keys until
    ``max_tokens`` (LangChain's ``@tool`` and most hand-written tools leave it unsaid). Members
    of an ``allOf`` stay open: each would refuse the keys the others declare."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in SCHEMA_ONES:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [closed(sub, in_all_of=True) for sub in out["allOf"]]
    kind = out.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind)
    if (
        (is_object or "properties" in out)
        and not in_all_of
        and not any(key in out for key in OPEN_KEYWORDS)
    ):
        out["additionalProperties"] = False
    return out


def _call_schema(tool: Tool) -> dict[str, Any]:
    parameters = closed(tool.parameters) if tool.parameters else {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_format(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """The ``response_format`` that makes the output exactly one call (or, with ``parallel``,
    a list of up to one call per tool)."""
    options = [_call_schema(tool) for tool in tools]
    one = options[0] if len(options) == 1 else {"anyOf": options}
    if parallel and len(tools) > 1:
        return {
            "type": "json_schema",
            "schema": {"type": "array", "items": one, "minItems": 1, "maxItems": len(tools)},
        }
    return {"type": "json_schema", "schema": one}


def with_tool_preamble(messages: list[Message], tools: list[Tool]) -> list[Message]:
    """For a template that does not read ``tools``: describe them in the system message, and
    write earlier calls the way the preamble asks for them (such a template ignores
    ``tool_calls``)."""
    listing = json.dumps([tool.for_template()["function"] for tool in tools], indent=1)
    preamble = PREAMBLE.format(tools=listing)
    shown = [_calls_as_text(message) for message in messages]
    if shown and shown[0].role == "system":
        merged = Message("system", f"{shown[0].content}\n\n{preamble}".strip())
        return [merged, *shown[1:]]
    return [Message("system", preamble), *shown]


def _calls_as_text(message: Message) -> Message:
    if not message.tool_calls:
        return message
    calls = [{"name": call.name, "arguments": call.arguments} for call in message.tool_calls]
    text = json.dumps(calls[0] if len(calls) == 1 else calls)
    return dataclasses.replace(message, content=f"{message.content}{text}", tool_calls=[])
