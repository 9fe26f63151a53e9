"""OpenAI's Chat Completions and Completions APIs <-> the chat core.

Only translation: bodies become ``ChatRequest``s; events become ``chat.completion.chunk`` /
``text_completion`` SSE messages ending with ``data: [DONE]``, or one object. Reasoning goes out
as ``reasoning_content`` (the field DeepSeek, vLLM and llama.cpp's server use), tool calls as
``tool_calls`` deltas with their arguments as JSON text, as OpenAI sends them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from mlxserve.chat.core import Collected
from mlxserve.chat.events import Done, ErrorEvent, Event, TextDelta, ThinkingDelta, ToolCallEvent
from mlxserve.chat.types import ChatRequest, Message, ToolCall
from mlxserve.errors import InvalidRequestError
from mlxserve.runners.base import TokenLogprob
from mlxserve.server import validate
from mlxserve.server.encoders import SSE_DONE, Frame
from mlxserve.server.errors import error_body

OWNER = "mlxserve"
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "cancelled": "stop",
    "tool_calls": "tool_calls",
}
DEFAULT_COMPLETION_TOKENS = 16
"""``/v1/completions`` without ``max_tokens``: OpenAI's own default."""
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _message(position: int, value: Any) -> Message:
    where = f"messages[{position}]"
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("role"), str)
        or (value["role"] not in ROLES)
    ):
        raise InvalidRequestError(
            f"{where} must be an object with a role of {', '.join(ROLES)}", param="messages"
        )
    text, images, image_at = validate.content_parts(value.get("content"), where)
    return Message(
        role=ROLES[value["role"]],  # type: ignore[arg-type]
        content=text,
        thinking=validate.optional(value, "reasoning_content", str),
        images=images,
        image_at=image_at,
        tool_calls=validate.tool_calls(value.get("tool_calls"), where),
        tool_call_id=validate.optional(value, "tool_call_id", str),
        tool_name=validate.optional(value, "name", str),
    )


def _common(body: dict[str, Any]) -> ChatRequest:
    if validate.optional(body, "n", int, 1) != 1:
        raise InvalidRequestError("only n=1 is supported", param="n")
    return ChatRequest(
        model=validate.model_name(body),
        sampling=validate.sampling(body, "openai"),
        stream=validate.optional(body, "stream", bool, False),
        keep_prefix=bool(validate.optional(body, "prompt_cache_key", str)),
    )


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    chat = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list", param="messages")
    chat.messages = [_message(i, m) for i, m in enumerate(messages)]
    chat.tools = validate.function_tools(body.get("tools"))
    chat.tool_choice = validate.tool_choice(body.get("tool_choice"))
    chat.parallel_tool_calls = validate.optional(body, "parallel_tool_calls", bool)
    chat.format = validate.response_format(body.get("response_format"), "response_format")
    chat.think = validate.reasoning_effort(body.get("reasoning_effort"), "reasoning_effort")
    chat.think_optional = True
    if validate.optional(body, "logprobs", bool, False):
        chat.logprobs = validate.top_logprobs(body)
    return chat


def parse_completion(body: dict[str, Any]) -> ChatRequest:
    chat = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("'prompt' must be a string", param="prompt")
    if body.get("echo") or validate.optional(body, "best_of", int, 1) != 1:
        raise InvalidRequestError("echo and best_of are not supported")
    chat.prompt, chat.raw = prompt, True
    chat.suffix = validate.optional(body, "suffix", str)
    chat.sampling.setdefault("max_tokens", DEFAULT_COMPLETION_TOKENS)
    chat.logprobs = validate.optional(body, "logprobs", int)
    return chat


def usage(done: Done | None) -> dict[str, Any]:
    stats = done.stats if done else None
    prompt = stats.prompt_eval_count if stats else 0
    completion = stats.eval_count if stats else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens if stats else 0},
        # OpenAI's name for predicted tokens the model accepted: here, the draft model's.
        "completion_tokens_details": {
            "accepted_prediction_tokens": stats.draft_tokens if stats else 0
        },
    }


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for _, t, lp in e.top]}
            for e in entries
        ]
    }


def tool_call_wire(call: ToolCall) -> dict[str, Any]:
    return {
        "index": call.index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
    }


class _Envelope:
    def __init__(self, chat: ChatRequest, body: dict[str, Any], prefix: str, kind: str) -> None:
        options = body.get("stream_options")
        self.model = chat.model
        self.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.kind = kind
        self.done: Done | None = None

    def envelope(self, choices: list[dict[str, Any]], kind: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind or self.kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": OWNER,
            "choices": choices,
        }

    def opening(self, prompt_tokens: int) -> list[Frame]:
        return []

    def closing(self) -> list[Frame]:
        frames: list[Frame] = []
        if self.include_usage:
            frames.append({**self.envelope([]), "usage": usage(self.done)})
        return [*frames, SSE_DONE]


class ChatEncoder(_Envelope):
    def __init__(self, chat: ChatRequest, body: dict[str, Any]) -> None:
        super().__init__(chat, body, "chatcmpl", "chat.completion.chunk")
        self.first = True

    def _chunk(
        self,
        delta: dict[str, Any],
        finish: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        if self.first:
            delta = {"role": "assistant", **delta}
            self.first = False
        return self.envelope(
            [
                {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": finish,
                    "logprobs": chat_logprobs(logprobs) if logprobs else None,
                }
            ]
        )

    def encode(self, event: Event) -> list[Frame]:
        if isinstance(event, TextDelta):
            return [self._chunk({"content": event.text}, logprobs=event.logprobs)]
        if isinstance(event, ThinkingDelta):
            return [self._chunk({"reasoning_content": event.text})]
        if isinstance(event, ToolCallEvent):
            return [self._chunk({"tool_calls": [tool_call_wire(event.call)]})]
        if isinstance(event, Done):
            self.done = event
            return [self._chunk({}, FINISH_REASONS[event.reason])]
        assert isinstance(event, ErrorEvent)
        return [error_body(event.error, "openai")]

    def whole(self, collected: Collected) -> dict[str, Any]:
        assert collected.done is not None
        message: dict[str, Any] = {"role": "assistant", "content": collected.text or None}
        if collected.thinking:
            message["reasoning_content"] = collected.thinking
        if collected.calls:
            message["tool_calls"] = [tool_call_wire(call) for call in collected.calls]
        elif message["content"] is None:
            message["content"] = ""
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": FINISH_REASONS[collected.done.reason],
            "logprobs": chat_logprobs(collected.logprobs) if collected.logprobs else None,
        }
        return {**self.envelope([choice], "chat.completion"), "usage": usage(collected.done)}


class CompletionEncoder(_Envelope):
    def __init__(self, chat: ChatRequest, body: dict[str, Any]) -> None:
        super().__init__(chat, body, "cmpl", "text_completion")
        self.logprobs = chat.logprobs is not None

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: lp for _, t, lp in e.top} for e in entries],
            "text_offset": [],
        }

    def _choice(self, text: str, finish: str | None, entries: list[TokenLogprob]) -> dict[str, Any]:
        return {
            "index": 0,
            "text": text,
            "finish_reason": finish,
            "logprobs": self._logprobs(entries),
        }

    def encode(self, event: Event) -> list[Frame]:
        if isinstance(event, TextDelta):
            return [self.envelope([self._choice(event.text, None, event.logprobs)])]
        if isinstance(event, Done):
            self.done = event
            return [self.envelope([self._choice("", FINISH_REASONS[event.reason], [])])]
        if isinstance(event, ErrorEvent):
            return [error_body(event.error, "openai")]
        return []

    def whole(self, collected: Collected) -> dict[str, Any]:
        assert collected.done is not None
        choice = self._choice(
            collected.text, FINISH_REASONS[collected.done.reason], collected.logprobs
        )
        return {**self.envelope([choice]), "usage": usage(collected.done)}
