"""OpenAI's Responses API (``POST /v1/responses``) <-> the chat core; stateless, as Ollama's.

Only translation: input items (messages, ``function_call``, ``function_call_output``,
``reasoning``) become a ``ChatRequest``; events become a ``response`` object with its output
items (reasoning, message, function calls) or the typed stream events (``response.created`` ...
``response.completed``). Nothing is stored, so ``previous_response_id`` is refused.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from typing import Any

from mlxserve.chat.core import Collected
from mlxserve.chat.events import Done, ErrorEvent, Event, TextDelta, ThinkingDelta, ToolCallEvent
from mlxserve.chat.types import CUSTOM_INPUT, ChatRequest, Message, ToolCall
from mlxserve.errors import InvalidRequestError
from mlxserve.server import validate
from mlxserve.server.encoders import Frame
from mlxserve.server.errors import error_body

log = logging.getLogger("mlxserve.validate")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _fresh(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _items(value: Any) -> list[Message]:
    if isinstance(value, str):
        return [Message("user", value)]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(
            "'input' must be a string or a non-empty list of items", param="input"
        )
    messages: list[Message] = []
    pending_thinking: str | None = None
    for position, item in enumerate(value):
        where = f"input[{position}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            if not isinstance(item.get("role"), str) or item["role"] not in ROLES:
                raise InvalidRequestError(
                    f"{where}.role must be one of {', '.join(ROLES)}", param="input"
                )
            text, images, image_at = validate.content_parts(item.get("content"), where)
            messages.append(
                Message(
                    ROLES[item["role"]],
                    text,
                    images=images,  # type: ignore[arg-type]
                    image_at=image_at,
                    thinking=pending_thinking,
                )
            )
            pending_thinking = None
        elif kind in ("function_call", "custom_tool_call"):
            name = validate.required_str(item, "name")
            namespace = validate.optional(item, "namespace", str)
            if namespace:
                name = validate.flat_name(namespace, name)
            if kind == "custom_tool_call":
                arguments = {CUSTOM_INPUT: validate.optional(item, "input", str, "")}
            else:
                arguments = validate.tool_arguments(item.get("arguments"), "input")
            call = ToolCall(name, arguments, validate.optional(item, "call_id", str) or "")
            last = messages[-1] if messages else None
            if last is None or last.role != "assistant" or last.content:
                last = Message("assistant", thinking=pending_thinking)
                messages.append(last)
            call.index = len(last.tool_calls)
            last.tool_calls.append(call)
            pending_thinking = None
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            if isinstance(output, list):
                output = validate.content_parts(output, where)[0]
            elif not isinstance(output, str):
                output = json.dumps(output)
            messages.append(
                Message("tool", output, tool_call_id=validate.optional(item, "call_id", str))
            )
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list):
                raise InvalidRequestError(f"{where}.summary must be a list", param="input")
            pending_thinking = "".join(
                validate.typed(f"{where}.summary.text", p.get("text", ""), str)
                for p in parts
                if isinstance(p, dict)
            )
        else:
            log.warning("%s: a %s item is dropped: no model here reads it", where, kind)
    return messages


def parse(body: dict[str, Any]) -> ChatRequest:
    if body.get("previous_response_id"):
        raise InvalidRequestError(
            "previous_response_id is not supported: this server stores no responses; send the "
            "whole conversation in 'input'",
            param="previous_response_id",
        )
    messages = _items(body.get("input"))
    instructions = validate.optional(body, "instructions", str)
    if instructions:
        messages.insert(0, Message("system", instructions))
    tools = validate.function_tools(body.get("tools"))
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    return ChatRequest(
        model=validate.model_name(body),
        messages=messages,
        tools=tools,
        tool_choice=validate.tool_choice(body.get("tool_choice")),
        parallel_tool_calls=validate.optional(body, "parallel_tool_calls", bool),
        think=validate.reasoning_effort(reasoning.get("effort"), "reasoning.effort"),
        think_optional=True,
        format=validate.response_format(
            (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None,
            "text.format",
        ),
        sampling=validate.sampling(body, "responses"),
        stream=validate.optional(body, "stream", bool, False),
        keep_prefix=bool(validate.optional(body, "prompt_cache_key", str)),
    )


class ResponsesEncoder:
    """Events -> the ``response`` object, or its typed stream events with sequence numbers."""

    def __init__(self, chat: ChatRequest, body: dict[str, Any]) -> None:
        self.chat = chat
        self.body = body
        self.id = _fresh("resp")
        self.created = int(time.time())
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        """The reasoning or message item being streamed."""
        self.tools = {tool.name: tool for tool in chat.tools}
        self.done: Done | None = None

    def _call_item(self, call: ToolCall) -> dict[str, Any]:
        """A call as the client named the tool: a ``custom_tool_call`` with its input text, or
        a ``function_call`` (with its ``namespace`` and its name inside it, as Codex reads)."""
        tool = self.tools.get(call.name)
        if tool is not None and tool.custom:
            return {
                "type": "custom_tool_call",
                "id": _fresh("ctc"),
                "call_id": call.id,
                "name": call.name,
                "input": str(call.arguments.get(CUSTOM_INPUT, "")),
                "status": "completed",
            }
        item = {
            "type": "function_call",
            "id": _fresh("fc"),
            "call_id": call.id,
            "name": call.name,
            "arguments": json.dumps(call.arguments),
            "status": "completed",
        }
        if tool is not None and tool.namespace:
            item.update(name=tool.local_name, namespace=tool.namespace)
        return item

    def response(self, status: str) -> dict[str, Any]:
        done = self.done
        stats = done.stats if done else None
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.chat.model,
            "output": copy.deepcopy(self.output),
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if done and done.reason == "length" else None
            ),
            "instructions": self.body.get("instructions"),
            "tools": self.body.get("tools") or [],
            "tool_choice": self.body.get("tool_choice") or "auto",
            "parallel_tool_calls": self.chat.parallel_tool_calls is not False,
            "temperature": self.body.get("temperature"),
            "top_p": self.body.get("top_p"),
            "max_output_tokens": self.body.get("max_output_tokens"),
            "text": self.body.get("text") or {"format": {"type": "text"}},
            "reasoning": self.body.get("reasoning"),
            "metadata": self.body.get("metadata") or {},
            "usage": None,
        }
        if stats is not None:
            body["usage"] = {
                "input_tokens": stats.prompt_eval_count,
                "input_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
                "output_tokens": stats.eval_count,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": stats.prompt_eval_count + stats.eval_count,
            }
        return body

    def _event(self, kind: str, **fields: Any) -> Frame:
        self.sequence += 1
        return (kind, {"type": kind, "sequence_number": self.sequence - 1, **fields})

    def _index(self) -> int:
        return len(self.output) - 1

    def _start(self, item: dict[str, Any]) -> list[Frame]:
        self.output.append(item)
        frames = [
            self._event(
                "response.output_item.added",
                output_index=self._index(),
                item={**item, "content": []} if "content" in item else item,
            )
        ]
        if item["type"] in ("message", "reasoning"):
            self.open = item
            part = item["content"][0]
            frames.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=self._index(),
                    content_index=0,
                    part={**part, "text": ""},
                )
            )
        return frames

    def _close(self) -> list[Frame]:
        item, self.open = self.open, None
        if item is None:
            return []
        part = item["content"][0]
        text_done = (
            "response.output_text.done"
            if item["type"] == "message"
            else "response.reasoning_text.done"
        )
        item["status"] = "completed"
        index = self.output.index(item)
        return [
            self._event(
                text_done,
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
            ),
            self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _text(self, kind: str, text: str) -> list[Frame]:
        frames: list[Frame] = []
        if self.open is None or self.open["type"] != kind:
            frames += self._close()
            if kind == "message":
                item = {
                    "type": "message",
                    "id": _fresh("msg"),
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [
                        {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    ],
                }
            else:
                item = {
                    "type": "reasoning",
                    "id": _fresh("rs"),
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}],
                }
            frames += self._start(item)
        item = self.open
        assert item is not None
        item["content"][0]["text"] += text
        delta = (
            "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        )
        extra = {"logprobs": []} if kind == "message" else {}
        frames.append(
            self._event(
                delta,
                item_id=item["id"],
                output_index=self._index(),
                content_index=0,
                delta=text,
                **extra,
            )
        )
        return frames

    def opening(self, prompt_tokens: int) -> list[Frame]:
        created = self.response("in_progress")
        return [
            self._event("response.created", response=created),
            self._event("response.in_progress", response=created),
        ]

    def encode(self, event: Event) -> list[Frame]:
        if isinstance(event, TextDelta):
            return self._text("message", event.text) if event.text else []
        if isinstance(event, ThinkingDelta):
            return self._text("reasoning", event.text)
        if isinstance(event, ToolCallEvent):
            item = self._call_item(event.call)
            custom = item["type"] == "custom_tool_call"
            field, events = (
                ("input", "response.custom_tool_call_input")
                if custom
                else ("arguments", "response.function_call_arguments")
            )
            frames = self._close() + self._start({**item, field: "", "status": "in_progress"})
            self.output[-1] = item
            index = self._index()
            return [
                *frames,
                self._event(
                    f"{events}.delta", item_id=item["id"], output_index=index, delta=item[field]
                ),
                self._event(
                    f"{events}.done", item_id=item["id"], output_index=index, **{field: item[field]}
                ),
                self._event("response.output_item.done", output_index=index, item=item),
            ]
        if isinstance(event, Done):
            self.done = event
            status = "incomplete" if event.reason == "length" else "completed"
            kind = "response.incomplete" if status == "incomplete" else "response.completed"
            return [*self._close(), self._event(kind, response=self.response(status))]
        assert isinstance(event, ErrorEvent)
        error = error_body(event.error, "openai")["error"]
        assert isinstance(error, dict)
        return [
            self._event("error", **{key: value for key, value in error.items() if key != "type"})
        ]

    def closing(self) -> list[Frame]:
        return []

    def whole(self, collected: Collected) -> dict[str, Any]:
        self.done = collected.done
        if collected.thinking:
            self.output.append(
                {
                    "type": "reasoning",
                    "id": _fresh("rs"),
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": collected.thinking}],
                }
            )
        if collected.text:
            self.output.append(
                {
                    "type": "message",
                    "id": _fresh("msg"),
                    "status": "completed",
                    "role": "assistant",
                    "content": [
                        {
                            "type": "output_text",
                            "text": collected.text,
                            "annotations": [],
                            "logprobs": [],
                        }
                    ],
                }
            )
        self.output += [self._call_item(call) for call in collected.calls]
        done = collected.done
        return self.response("incomplete" if done and done.reason == "length" else "completed")
