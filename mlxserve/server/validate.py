"""Request parsing and validation, for every API: one home, one set of rules.

Every field a translator reads goes through these getters, so a wrong type is the same 400 with
the field named whichever API it came through, and the sampling fields of all APIs are read from
the one table in ``modelstore/parameters.py``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any

from aiohttp import web

from mlxserve.chat.types import CUSTOM_INPUT, Tool, ToolCall
from mlxserve.errors import InvalidRequestError
from mlxserve.runners.base import LoadAsk
from mlxserve.runners.kvcache import kv_cache_type
from mlxserve.server import limits
from mlxserve.server.config import ConfigError, parse_duration
from modelstore import parameters
from modelstore.parameters import Api, api_names, from_ollama

log = logging.getLogger("mlxserve.validate")

LOAD_TIME_OPTIONS = frozenset(
    {
        "num_ctx",
        "kv_cache_type",
        "num_gpu",
        "num_thread",
        "num_batch",
        "use_mmap",
        "use_mlock",
        "numa",
        "main_gpu",
        "low_vram",
        "vocab_only",
        "num_keep",
    }
)
"""Ollama options a loaded runner applies at load time (``num_ctx`` is read by the core)."""
_KIND_NAMES = {
    float: "a number",
    int: "an integer",
    list: "a string or a list of strings",
    dict: "an object",
    str: "a string",
    bool: "true or false",
}


async def json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, parsed under ``limits`` (off the loop when it is large)."""
    raw = await request.read()
    if len(raw) > limits.PARSE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(limits.parse_body, raw)
    return limits.parse_body(raw)


def typed(name: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or a 400 naming the field."""
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is dict and name == "logit_bias":
        return logit_bias(value)
    elif isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    raise InvalidRequestError(
        f"'{name}' must be {_KIND_NAMES[kind]}, not {type(value).__name__}", param=name
    )


def optional(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name)
    return default if value is None else typed(name, value, kind)


def required_str(body: dict[str, Any], name: str) -> str:
    value = optional(body, name, str)
    if not value:
        raise InvalidRequestError(f"'{name}' is required", param=name)
    return value


def model_name(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("'model' is required", param="model")
    return name


def logit_bias(value: Any) -> dict[int, float]:
    try:
        if not isinstance(value, dict):
            raise TypeError
        return {int(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise InvalidRequestError(
            "'logit_bias' must map token ids to numbers", param="logit_bias"
        ) from None


def sampling(body: dict[str, Any], api: Api) -> dict[str, Any]:
    """The ``Sampling`` overrides a body (or Ollama's ``options``) sets, by field name."""
    overrides: dict[str, Any] = {}
    for wire, (field, kind) in api_names(api).items():
        value = body.get(wire)
        if value is not None and field not in overrides:
            value = typed(wire, value, kind)
            if api == "ollama":
                value = from_ollama(field, value)
            overrides[field] = parameters.check(field, value, wire)
            if field == "stop":
                limits.check_stop(value, wire)
    return overrides


def ollama_options(options: Any) -> tuple[dict[str, Any], LoadAsk]:
    """Ollama's ``options``: sampling overrides, and how to load the model: ``num_ctx`` (the
    context) and ``kv_cache_type`` (ours: Ollama sets it for the whole server with
    ``OLLAMA_KV_CACHE_TYPE``; here a request may choose, as it may choose ``num_ctx``)."""
    if options is None:
        return {}, LoadAsk()
    if not isinstance(options, dict):
        raise InvalidRequestError("'options' must be an object", param="options")
    known = api_names("ollama")
    for name in options:
        if name not in known and name not in LOAD_TIME_OPTIONS:
            log.warning("unknown option %s ignored (as Ollama does)", name)
    num_ctx = optional(options, "num_ctx", int)
    if num_ctx is not None and num_ctx < 1:
        raise InvalidRequestError("'num_ctx' must be at least 1", param="num_ctx")
    if num_ctx is not None:
        limits.check_at_most(num_ctx, "context_length", "num_ctx")
    cache = optional(options, "kv_cache_type", str)
    if cache is not None:
        kv_cache_type(cache)  # an unknown type is refused before anything loads
    return sampling(options, "ollama"), LoadAsk(num_ctx, cache)


def keep_alive(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) > limits.MAX_DURATION_CHARS:
        raise limits.refuse("duration", "keep_alive")
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise InvalidRequestError(exc.message, param="keep_alive") from None


def schema_format(schema: Any, param: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"'{param}' must hold a JSON Schema object", param=param)
    return {"type": "json_schema", "schema": schema}


def tool_arguments(value: Any, param: str) -> dict[str, Any]:
    """Arguments of an earlier tool call: an object, or (OpenAI's wire form) its JSON text.

    The error names ``arguments``: that text must hold a JSON object, which no JSON Schema of
    the request can say (``tests/test_openapi_fuzz.py`` knows it)."""
    where = f"{param} (tool call arguments)"
    if isinstance(value, str):
        try:
            value = limits.parse_json(value, where) if value.strip() else {}
        except limits.RequestLimitError:
            raise
        except InvalidRequestError:
            raise InvalidRequestError(f"{where} must be JSON", param="arguments") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where} must be a JSON object", param="arguments")
    return value


EFFORTS: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
}
"""OpenAI's reasoning efforts -> ``think`` (``none`` turns thinking off)."""


def think_value(value: Any, param: str = "think") -> bool | str | None:
    """Ollama's ``think``: a bool or ``low``/``medium``/``high``."""
    if value is None or isinstance(value, bool):
        return value
    if value in ("low", "medium", "high"):
        return value
    raise InvalidRequestError(f"'{param}' must be true, false, low, medium or high", param=param)


def reasoning_effort(value: Any, param: str) -> bool | str | None:
    """OpenAI's ``reasoning_effort`` (chat) / ``reasoning.effort`` (Responses)."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in EFFORTS:
        raise InvalidRequestError(f"'{param}' must be one of {', '.join(EFFORTS)}", param=param)
    return EFFORTS[value]


def image_bytes(data: Any, param: str) -> bytes:
    """A base64 image (bare, or a ``data:`` URL); the daemon never downloads one.

    Line breaks are ignored, as Ollama's decoder (Go's) ignores them: GNU ``base64`` and
    Python's ``encodebytes`` wrap at 76 columns, so ``"$(base64 photo.png)"`` in a shell holds
    them. Any other character outside the alphabet (URL-safe base64 included) is refused."""
    if not isinstance(data, str):
        raise InvalidRequestError("an image must be a base64 string", param=param)
    if data.startswith(("http://", "https://")):
        raise InvalidRequestError(
            "remote image URLs are not fetched; send the image as base64 (a data: URL)",
            param=param,
        )
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise InvalidRequestError("a data: URL image must be base64", param=param)
    if "\n" in data or "\r" in data:
        data = data.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("an image is not valid base64", param=param) from None


OLLAMA_IMAGE_TAG = "[img]"
"""Where Ollama places a message's next image in its text; without one, before the text."""


def placed_images(content: str, images: list[bytes]) -> tuple[str, list[bytes], list[int]]:
    """Ollama's ``images`` of one message placed as Ollama places them: the first ones each at
    the next ``[img]`` of the text (the tag removed), those left over before the text. The
    images come back in the order they sit (the leftovers first), with their offsets."""
    offsets: list[int] = []
    while len(offsets) < len(images):
        at = content.find(OLLAMA_IMAGE_TAG)
        if at < 0:
            break
        content = content[:at] + content[at + len(OLLAMA_IMAGE_TAG) :]
        offsets.append(at)
    placed = len(offsets)
    before = len(images) - placed
    return content, [*images[placed:], *images[:placed]], [0] * before + offsets


def images(value: Any, param: str) -> list[bytes]:
    """Ollama's ``images``: a list of base64 strings."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequestError(f"'{param}' must be a list of base64 strings", param=param)
    return [image_bytes(image, param) for image in value]


def top_logprobs(body: dict[str, Any]) -> int:
    count = optional(body, "top_logprobs", int, 0)
    if count < 0:
        raise InvalidRequestError("'top_logprobs' must be at least 0", param="top_logprobs")
    return limits.check_at_most(count, "top_logprobs", "top_logprobs")


def tool_choice(value: Any) -> str:
    """``none``/``auto``/``required``, or ``{"type": "function", "function": {"name"}}`` (chat)
    / ``{"type": "function", "name"}`` (Responses)."""
    if value is None:
        return "auto"
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict):
        function = value.get("function") if isinstance(value.get("function"), dict) else value
        if isinstance(function.get("name"), str):
            return function["name"]
    raise InvalidRequestError(
        "tool_choice must be none, auto, required or a named function", param="tool_choice"
    )


def function_tool(value: Any, namespace: str = "") -> Tool:
    """``{"type": "function", "function": {...}}`` (chat) or the flat Responses form."""
    function = value.get("function", value) if isinstance(value, dict) else None
    if (
        not isinstance(value, dict)
        or value.get("type", "function") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        raise InvalidRequestError("a function tool needs a name", param="tools")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise InvalidRequestError("a tool's parameters must be a JSON Schema object", param="tools")
    name = function["name"]
    if not namespace:
        return Tool(name, function.get("description") or "", parameters)
    return Tool(
        flat_name(namespace, name),
        function.get("description") or "",
        parameters,
        namespace=namespace,
        local_name=name,
    )


def flat_name(namespace: str, name: str) -> str:
    """A ``namespace`` function's name as the model sees it: Codex's namespaces end in ``__``
    (``mcp__server__``), which makes this its old flat MCP name (``mcp__server__tool``)."""
    return f"{namespace}{name}" if namespace.endswith("_") else f"{namespace}__{name}"


CUSTOM_GRAMMARS = ("lark", "regex")
"""The syntaxes of a ``custom`` tool's grammar: llguidance takes both."""


def custom_tool(value: dict[str, Any]) -> Tool:
    """A free-form tool (Responses ``custom``): shown to the model as a function taking one
    string, its grammar (if any) enforced on that string when the call is forced."""
    name = required_str(value, "name")
    description = optional(value, "description", str, "")
    spec = value.get("format")
    grammar = None
    if isinstance(spec, dict) and spec.get("type") == "grammar":
        syntax, definition = spec.get("syntax"), spec.get("definition")
        if syntax not in CUSTOM_GRAMMARS or not isinstance(definition, str):
            raise InvalidRequestError(
                "a custom tool's grammar needs a syntax of lark or regex and a definition",
                param="tools",
            )
        grammar = {"type": "grammar", "syntax": syntax, "definition": definition}
        description += f"\n\nIts input follows this {syntax} grammar:\n{definition}"
    parameters = {
        "type": "object",
        "properties": {CUSTOM_INPUT: {"type": "string", "description": "The tool's input."}},
        "required": [CUSTOM_INPUT],
    }
    return Tool(name, description.strip(), parameters, custom=True, grammar=grammar)


def function_tools(value: Any) -> list[Tool]:
    """A request's ``tools``: Ollama's and OpenAI chat's nested form or the Responses flat one,
    ``namespace`` groups flattened into their functions, ``custom`` free-form tools; tools
    the client marks ``defer_loading`` stay out of the prompt, and hosted tools the daemon
    cannot run (``web_search``, ``file_search``, ``computer_use``, ...) are left out, logged
    (docs/API.md, "Leniency")."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequestError("'tools' must be a list", param="tools")
    limits.check_count(value, "tools", "tools")
    tools: list[Tool] = []
    for tool in value:
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        if isinstance(tool, dict) and tool.get("defer_loading"):
            continue
        if kind == "function":
            tools.append(function_tool(tool))
        elif kind == "namespace" and isinstance(tool.get("tools"), list):  # type: ignore[union-attr]
            namespace = required_str(tool, "name")  # type: ignore[arg-type]
            tools += [
                function_tool(inner, namespace)
                for inner in tool["tools"]  # type: ignore[index]
                if not (isinstance(inner, dict) and inner.get("defer_loading"))
            ]
        elif kind == "custom":
            tools.append(custom_tool(tool))  # type: ignore[arg-type]
        elif isinstance(kind, str):
            log.info("a %s tool is left out: the daemon cannot run hosted tools", kind)
        else:
            raise InvalidRequestError("each tool must be an object with a type", param="tools")
    return tools


def unknown_part(part: Any, where: str) -> str:
    """A content block or part of a type no model here reads (``document``, ``input_file``,
    ``search_result``, a server tool's result...): its text if it has any, else nothing,
    with a warning (never a 400: the real services accept them)."""
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    text = part.get("text") if isinstance(part, dict) else None
    if isinstance(text, str):
        log.info("%s: a %s block is read as its text", where, kind)
        return text
    log.warning("%s: a %s block is dropped: no model here reads it", where, kind)
    return ""


def content_parts(content: Any, where: str) -> tuple[str, list[bytes], list[int]]:
    """A message's content: a string, or parts (text and base64 ``image_url``); the text, the
    images, and where each image sits in the text (``Message.image_at``)."""
    if content is None or isinstance(content, str):
        return content or "", [], []
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"{where}.content must be a string or a list of parts", param="messages"
        )
    text, images, offsets = "", [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text", "output_text"):
            text += typed(f"{where}.content.text", part.get("text"), str)
        elif kind in ("image_url", "input_image"):
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(image_bytes(url, "messages"))
            offsets.append(len(text))
        else:
            text += unknown_part(part, where)
    return text, images, offsets


def response_format(value: Any, param: str) -> dict[str, Any] | None:
    """OpenAI's format object (chat's ``response_format``, Responses' ``text.format``)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json"}
    if kind == "json_schema":
        spec = value.get("json_schema", value)
        return schema_format(
            spec.get("schema") if isinstance(spec, dict) else None, f"{param}.json_schema.schema"
        )
    raise InvalidRequestError(f"{param}.type must be text, json_object or json_schema", param=param)


def tool_calls(value: Any, where: str) -> list[ToolCall]:
    """An assistant message's earlier calls: ``[{"id"?, "function": {"name", "arguments"}}]``."""
    if value is not None and not isinstance(value, list):
        raise InvalidRequestError(f"{where}.tool_calls must be a list", param="messages")
    calls = []
    for index, call in enumerate(value or []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(
                f"{where}.tool_calls[{index}] needs a function name", param="messages"
            )
        arguments = tool_arguments(function.get("arguments"), "messages")
        calls.append(ToolCall(function["name"], arguments, call.get("id") or "", index))
    return calls
