"""The chat core's requests for plain ``{"role", "content"}`` messages, for tests and benches
that drive a ``LoadedModel`` in-process (the product's callers go through ``chat.core``)."""

from __future__ import annotations

from typing import Any

from mlxserve.chat.core import prepare, render_prompt
from mlxserve.chat.model import LoadedModel
from mlxserve.chat.types import ChatRequest, Message
from mlxserve.runners.base import GenerateRequest


def plain_chat(
    loaded: LoadedModel, messages: list[dict[str, Any]], overrides: dict[str, Any] | None = None
) -> ChatRequest:
    return ChatRequest(
        loaded.model.name,
        messages=[Message(m["role"], m.get("content") or "") for m in messages],
        sampling=dict(overrides or {}),
    )


def chat_prompt(loaded: LoadedModel, messages: list[dict[str, Any]]) -> str:
    """The prompt the chat core renders for plain messages."""
    return render_prompt(loaded, plain_chat(loaded, messages))[0]


def chat_request(
    loaded: LoadedModel, messages: list[dict[str, Any]], overrides: dict[str, Any]
) -> GenerateRequest:
    """The generation request the chat core makes of plain messages."""
    return prepare(loaded, plain_chat(loaded, messages, overrides)).request


def raw_request(loaded: LoadedModel, prompt: str, overrides: dict[str, Any]) -> GenerateRequest:
    chat = ChatRequest(loaded.model.name, prompt=prompt, raw=True, sampling=dict(overrides))
    return prepare(loaded, chat).request
