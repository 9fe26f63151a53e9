"""Ollama's native API (``/api/chat``, ``/api/generate``) <-> the chat core.

Only translation: a body becomes a ``ChatRequest``; events become Ollama's NDJSON lines (the last
with ``done: true``, ``done_reason`` and the stats in nanoseconds) or, with ``stream: false``,
one object. Field names and meanings follow Ollama's ``docs/api.md``.
"""

from __future__ import annotations

from typing import Any

from mlxserve.api.types import utc_timestamp
from mlxserve.chat.core import Collected
from mlxserve.chat.events import Done, ErrorEvent, Event, TextDelta, ThinkingDelta, ToolCallEvent
from mlxserve.chat.types import ChatRequest, Message, ToolCall
from mlxserve.errors import InvalidRequestError
from mlxserve.runners.base import TokenLogprob
from mlxserve.server import validate
from mlxserve.server.encoders import Frame
from mlxserve.server.errors import error_body

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_FIELDS = ("content", "thinking", "tool_calls")


def _common(body: dict[str, Any]) -> ChatRequest:
    sampling, load = validate.ollama_options(body.get("options"))
    logprobs = None
    if validate.optional(body, "logprobs", bool, False):
        logprobs = validate.top_logprobs(body)
    return ChatRequest(
        model=validate.model_name(body),
        think=validate.think_value(body.get("think")),
        format=_format(body.get("format")),
        sampling=sampling,
        load=load,
        logprobs=logprobs,
        keep_alive=validate.keep_alive(body.get("keep_alive")),
        stream=validate.optional(body, "stream", bool, True),
    )


def _format(value: Any) -> dict[str, Any] | None:
    """``format: "json"`` or a JSON Schema object."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json"}
    if isinstance(value, dict):
        return validate.schema_format(value, "format")
    raise InvalidRequestError("'format' must be \"json\" or a JSON Schema object", param="format")


def _message(position: int, value: Any) -> Message:
    where = f"messages[{position}]"
    if not isinstance(value, dict) or value.get("role") not in ROLES:
        raise InvalidRequestError(
            f"{where} must be an object with a role of {', '.join(ROLES)}", param="messages"
        )
    content = value.get("content")
    if content is not None and not isinstance(content, str):
        raise InvalidRequestError(f"{where}.content must be a string", param="messages")
    text, images, image_at = validate.placed_images(
        content or "", validate.images(value.get("images"), "images")
    )
    return Message(
        role=value["role"],
        content=text,
        thinking=validate.optional(value, "thinking", str),
        images=images,
        image_at=image_at,
        tool_calls=validate.tool_calls(value.get("tool_calls"), where),
        tool_name=validate.optional(value, "tool_name", str),
        tool_call_id=validate.optional(value, "tool_call_id", str),
    )


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    chat = _common(body)
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise InvalidRequestError("'messages' must be a list", param="messages")
    chat.messages = [_message(i, m) for i, m in enumerate(messages)]
    chat.tools = validate.function_tools(body.get("tools"))
    chat.tool_choice = validate.tool_choice(body.get("tool_choice"))
    chat.parallel_tool_calls = validate.optional(body, "parallel_tool_calls", bool)
    return chat


def parse_generate(body: dict[str, Any]) -> ChatRequest:
    chat = _common(body)
    chat.prompt = validate.optional(body, "prompt", str, "")
    chat.system = validate.optional(body, "system", str)
    chat.raw = validate.optional(body, "raw", bool, False)
    chat.suffix = validate.optional(body, "suffix", str)
    if body.get("template"):
        raise InvalidRequestError(
            "'template' is not supported per request; set the model's template in its ModelSpec",
            param="template",
        )
    images = validate.images(body.get("images"), "images")
    if images:
        image_at: list[int] = []
        if not chat.raw:
            chat.prompt, images, image_at = validate.placed_images(chat.prompt, images)
        chat.messages = [Message("user", chat.prompt, images=images, image_at=image_at)]
    context = body.get("context")
    if context is not None:
        if not (
            isinstance(context, list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in context)
        ):
            raise InvalidRequestError("'context' must be a list of token ids", param="context")
        chat.context = context
    chat.return_context = not chat.raw
    return chat


def is_load_request(chat: ChatRequest) -> bool:
    """An empty prompt (or no messages) only loads the model, or unloads it (Ollama)."""
    if chat.prompt is not None:
        return not chat.prompt and not chat.suffix
    return not chat.messages


def stats(done: Done) -> dict[str, Any]:
    s = done.stats
    return {
        "total_duration": s.total_duration,
        "load_duration": s.load_duration,
        "prompt_eval_count": s.prompt_eval_count,
        "prompt_eval_duration": s.prompt_eval_duration,
        "cached_prompt_tokens": s.cached_prompt_tokens,
        "eval_count": s.eval_count,
        "eval_duration": s.eval_duration,
    }


def _done_reason(done: Done) -> str:
    return "stop" if done.reason == "tool_calls" else done.reason


def logprobs_wire(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return [
        {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for _, t, lp in e.top]}
        for e in entries
    ]


def tool_call_wire(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "function": {"index": call.index, "name": call.name, "arguments": call.arguments},
    }


class _Lines:
    """What both native streams share: the envelope of each line, and no opening or closing."""

    def __init__(self, chat: ChatRequest, body: dict[str, Any]) -> None:
        self.model = chat.model

    def _envelope(self, **fields: Any) -> dict[str, Any]:
        return {"model": self.model, "created_at": utc_timestamp(), "done": False, **fields}

    def _last(self, done: Done, **fields: Any) -> dict[str, Any]:
        if done.context is not None:
            fields["context"] = done.context
        return self._line(done=True, done_reason=_done_reason(done), **stats(done), **fields)

    def _line(self, **fields: Any) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self, prompt_tokens: int) -> list[Frame]:
        return []

    def closing(self) -> list[Frame]:
        return []

    def encode(self, event: Event) -> list[Frame]:
        if isinstance(event, TextDelta):
            extra = {"logprobs": logprobs_wire(event.logprobs)} if event.logprobs else {}
            return [self._line(content=event.text, **extra)]
        if isinstance(event, ThinkingDelta):
            return [self._line(thinking=event.text)]
        if isinstance(event, ToolCallEvent):
            return [self._line(tool_calls=[tool_call_wire(event.call)])]
        if isinstance(event, Done):
            return [self._last(event)]
        assert isinstance(event, ErrorEvent)
        return [error_body(event.error, "native")]

    def whole(self, collected: Collected) -> dict[str, Any]:
        assert collected.done is not None
        fields: dict[str, Any] = {"content": collected.text}
        if collected.thinking:
            fields["thinking"] = collected.thinking
        if collected.calls:
            fields["tool_calls"] = [tool_call_wire(call) for call in collected.calls]
        if collected.logprobs:
            fields["logprobs"] = logprobs_wire(collected.logprobs)
        return self._last(collected.done, **fields)


class ChatEncoder(_Lines):
    """Events -> ``/api/chat`` lines: text, thinking and calls go in ``message``."""

    def _line(self, **fields: Any) -> dict[str, Any]:
        message = {key: fields.pop(key) for key in MESSAGE_FIELDS if key in fields}
        return self._envelope(message={"role": "assistant", "content": "", **message}, **fields)


class GenerateEncoder(_Lines):
    """Events -> ``/api/generate`` lines: text goes in ``response`` (no tools are offered)."""

    def _line(self, **fields: Any) -> dict[str, Any]:
        fields["response"] = fields.pop("content", "")
        return self._envelope(**fields)
