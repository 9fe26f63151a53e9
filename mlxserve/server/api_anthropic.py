"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) <-> the core.

Only translation: system, messages with ``text``/``image``/``tool_use``/``tool_result``/
``thinking`` blocks, tools, ``tool_choice`` and ``thinking`` become a ``ChatRequest``; events
become a ``message`` object, or the named SSE events ``message_start``, ``content_block_start``,
``content_block_delta``, ``content_block_stop``, ``message_delta`` and ``message_stop``.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from mlxserve.chat.core import Collected
from mlxserve.chat.events import Done, ErrorEvent, Event, TextDelta, ThinkingDelta, ToolCallEvent
from mlxserve.chat.types import ChatRequest, Message, Think, ThinkLevel, Tool, ToolCall
from mlxserve.errors import InvalidRequestError
from mlxserve.server import validate
from mlxserve.server.encoders import Frame
from mlxserve.server.errors import error_body

log = logging.getLogger("mlxserve.validate")
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "cancelled": "end_turn",
    "tool_calls": "tool_use",
}
PING = ("ping", {"type": "ping"})
"""Anthropic's keep-alive event, sent during a long prefill."""


def _text_of(value: Any, where: str) -> str:
    """A ``system`` or ``tool_result`` content: a string or a list of text blocks."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        return "".join(
            validate.typed(f"{where}.text", block.get("text"), str)
            for block in value
            if isinstance(block, dict) and block.get("type") == "text"
        )
    raise InvalidRequestError(f"{where} must be a string or a list of text blocks", param=where)


def _image(block: dict[str, Any], where: str) -> bytes:
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") != "base64":
        raise InvalidRequestError(
            f"{where}: only base64 image sources are accepted (the server never downloads)",
            param="messages",
        )
    return validate.image_bytes(source.get("data"), "messages")


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("'messages' must be a non-empty list", param="messages")
    messages: list[Message] = []
    for position, item in enumerate(value):
        where = f"messages[{position}]"
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant", "system"):
            raise InvalidRequestError(
                f"{where} must have role user, assistant or system", param="messages"
            )
        role = item["role"]
        content = item.get("content")
        if role == "system":  # Claude Code's, mid-conversation: the chat core places it
            messages.append(Message("system", _text_of(content, f"{where}.content")))
            continue
        if isinstance(content, str):
            messages.append(Message(role, content))
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(
                f"{where}.content must be a string or a list of blocks", param="messages"
            )
        current = Message(role)
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                current.content += validate.typed(f"{where}.text", block.get("text"), str)
            elif kind == "image":
                current.images.append(_image(block, where))
                current.image_at.append(len(current.content))
            elif kind == "thinking":
                current.thinking = (current.thinking or "") + str(block.get("thinking") or "")
            elif kind == "redacted_thinking":
                continue
            elif kind == "tool_use":
                arguments = validate.tool_arguments(block.get("input"), "messages")
                current.tool_calls.append(
                    ToolCall(
                        validate.required_str(block, "name"),
                        arguments,
                        validate.optional(block, "id", str) or "",
                        len(current.tool_calls),
                    )
                )
            elif kind == "tool_result":
                if current.content or current.images:
                    messages.append(current)
                    current = Message(role)
                messages.append(
                    Message(
                        "tool",
                        _text_of(block.get("content"), f"{where}.content"),
                        tool_call_id=validate.optional(block, "tool_use_id", str),
                    )
                )
            else:
                current.content += validate.unknown_part(block, where)
        if current.content or current.images or current.tool_calls or current.thinking:
            messages.append(current)
    return messages


def _tools(value: Any) -> list[Tool]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequestError("'tools' must be a list", param="tools")
    tools = []
    for tool in value:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequestError("each tool needs a name", param="tools")
        if tool.get("defer_loading"):
            continue
        if tool.get("type", "custom") != "custom":
            log.info("a %s tool is left out: the daemon cannot run server tools", tool["type"])
            continue
        schema = tool.get("input_schema") or {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                "a tool's input_schema must be a JSON Schema object", param="tools"
            )
        tools.append(Tool(tool["name"], tool.get("description") or "", schema))
    return tools


def _tool_choice(value: Any) -> tuple[str, bool | None]:
    """Anthropic's ``auto``/``any``/``tool``/``none`` -> ours, and parallel tool use."""
    if value is None:
        return "auto", None
    if not isinstance(value, dict):
        raise InvalidRequestError("'tool_choice' must be an object", param="tool_choice")
    kind = value.get("type")
    parallel = None if not value.get("disable_parallel_tool_use") else False
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(value.get("name"), str):  # type: ignore[union-attr]
        return value["name"], parallel  # type: ignore[index]
    raise InvalidRequestError(
        "tool_choice.type must be auto, any, tool or none", param="tool_choice"
    )


EFFORTS: dict[str, ThinkLevel] = {"low": "low", "medium": "medium", "high": "high", "max": "high"}
"""``output_config.effort`` -> a think level (only where thinking is on)."""


def _think(value: Any, effort: Any) -> Think:
    """``thinking``: ``enabled`` / ``adaptive`` (the model decides: its template's default,
    at the effort asked) / ``disabled``."""
    level = EFFORTS.get(effort) if isinstance(effort, str) else None
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "enabled":
        return level or True
    if kind == "adaptive":
        return level
    if kind == "disabled":
        return False
    raise InvalidRequestError(
        "thinking.type must be enabled, adaptive or disabled", param="thinking"
    )


def _budget(value: Any) -> int | None:
    """``thinking.budget_tokens`` of enabled thinking: a real budget (the chat core closes the
    reasoning there and the model answers)."""
    if not isinstance(value, dict) or value.get("type") != "enabled":
        return None
    budget = validate.optional(value, "budget_tokens", int)
    if budget is not None and budget < 1:
        raise InvalidRequestError(
            "thinking.budget_tokens must be at least 1", param="thinking.budget_tokens"
        )
    return budget


def _output_format(config: dict[str, Any]) -> dict[str, Any] | None:
    """``output_config.format`` (what ``messages.parse`` sends): a JSON Schema, enforced."""
    spec = config.get("format")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "json_schema":
        raise InvalidRequestError(
            "output_config.format.type must be json_schema", param="output_config.format"
        )
    return validate.schema_format(spec.get("schema"), "output_config.format.schema")


def _cache_marked(body: dict[str, Any]) -> bool:
    """Whether the request has a ``cache_control`` breakpoint anywhere Anthropic takes one: at
    the top level, on a system, tool or message content block."""
    if isinstance(body.get("cache_control"), dict):
        return True
    blocks: list[Any] = []
    for value in (body.get("system"), body.get("tools")):
        if isinstance(value, list):
            blocks += value
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            blocks += content
    return any(isinstance(b, dict) and isinstance(b.get("cache_control"), dict) for b in blocks)


def parse(body: dict[str, Any], *, count_only: bool = False) -> ChatRequest:
    messages = _messages(body.get("messages"))
    system = _text_of(body.get("system"), "system")
    if system:
        messages.insert(0, Message("system", system))
    sampling = validate.sampling(body, "anthropic")
    if "max_tokens" not in sampling and not count_only:
        raise InvalidRequestError("'max_tokens' is required", param="max_tokens")
    choice, parallel = _tool_choice(body.get("tool_choice"))
    config = validate.optional(body, "output_config", dict, {})
    return ChatRequest(
        model=validate.model_name(body),
        messages=messages,
        tools=_tools(body.get("tools")),
        tool_choice=choice,
        parallel_tool_calls=parallel,
        think=_think(body.get("thinking"), config.get("effort")),
        think_budget=_budget(body.get("thinking")),
        think_optional=True,
        format=_output_format(config),
        sampling=sampling,
        stream=validate.optional(body, "stream", bool, False),
        keep_prefix=_cache_marked(body),
    )


def parse_count(body: dict[str, Any]) -> ChatRequest:
    return parse(body, count_only=True)


def _usage(prompt_tokens: int, done: Done | None) -> dict[str, Any]:
    """As Anthropic counts: ``input_tokens`` is the part of the prompt not read from the prompt
    cache, ``cache_read_input_tokens`` the rest (clients add the two, as Claude Code does)."""
    cached = done.stats.cached_prompt_tokens if done else 0
    return {
        "input_tokens": (done.stats.prompt_eval_count - cached) if done else prompt_tokens,
        "output_tokens": done.stats.eval_count if done else 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _stop_reason(done: Done) -> str:
    return "stop_sequence" if done.stop_sequence else STOP_REASONS[done.reason]


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": call.id.replace("call_", "toolu_", 1),
        "name": call.name,
        "input": call.arguments,
    }


class MessagesEncoder:
    def __init__(self, chat: ChatRequest, body: dict[str, Any]) -> None:
        self.chat = chat
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.index = -1
        self.open: str | None = None
        """The kind of the content block being streamed (``text`` or ``thinking``)."""
        thinking = body.get("thinking")
        self.show_thinking = not (
            isinstance(thinking, dict) and thinking.get("display") == "omitted"
        )
        """``thinking.display: omitted``: the model reasons, the client is not sent it."""

    def message(
        self, content: list[dict[str, Any]], done: Done | None, prompt_tokens: int = 0
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.chat.model,
            "content": content,
            "stop_reason": _stop_reason(done) if done else None,
            "stop_sequence": done.stop_sequence if done else None,
            "usage": _usage(prompt_tokens, done),
        }

    def _close(self) -> list[Frame]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _block(self, kind: str, delta: dict[str, Any]) -> list[Frame]:
        frames: list[Frame] = []
        if self.open != kind:
            frames += self._close()
            self.index += 1
            self.open = kind
            start = (
                {"type": "text", "text": ""}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            frames.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": self.index, "content_block": start},
                )
            )
        frames.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": self.index, "delta": delta},
            )
        )
        return frames

    def opening(self, prompt_tokens: int) -> list[Frame]:
        start = self.message([], None, prompt_tokens)
        return [("message_start", {"type": "message_start", "message": start})]

    def encode(self, event: Event) -> list[Frame]:
        if isinstance(event, TextDelta):
            return (
                self._block("text", {"type": "text_delta", "text": event.text})
                if event.text
                else []
            )
        if isinstance(event, ThinkingDelta):
            if not self.show_thinking:
                return []
            return self._block("thinking", {"type": "thinking_delta", "thinking": event.text})
        if isinstance(event, ToolCallEvent):
            frames = self._close()
            self.index += 1
            block = _tool_use(event.call)
            return [
                *frames,
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": self.index,
                        "content_block": {**block, "input": {}},
                    },
                ),
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": self.index,
                        "delta": {
                            "type": "input_json_delta",
                            "partial_json": json.dumps(block["input"]),
                        },
                    },
                ),
                ("content_block_stop", {"type": "content_block_stop", "index": self.index}),
            ]
        if isinstance(event, Done):
            return [
                *self._close(),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": _stop_reason(event),
                            "stop_sequence": event.stop_sequence,
                        },
                        "usage": _usage(0, event),
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ]
        assert isinstance(event, ErrorEvent)
        return [("error", error_body(event.error, "anthropic"))]

    def closing(self) -> list[Frame]:
        return []

    def whole(self, collected: Collected) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if collected.thinking and self.show_thinking:
            content.append({"type": "thinking", "thinking": collected.thinking, "signature": ""})
        if collected.text:
            content.append({"type": "text", "text": collected.text})
        content += [_tool_use(call) for call in collected.calls]
        return self.message(content, collected.done)
