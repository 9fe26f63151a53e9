"""The one chat request every API is translated into (the events that come back out are in
``events.py``).

Each API module (``mlxserve/server/api_*.py``) is a pair of translations: its request body ->
``ChatRequest``, and ``Event``s -> its wire format. Nothing about a request's meaning lives in
an API module; it lives here and in ``mlxserve/chat/core.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mlxserve.runners.base import LoadAsk

Role = Literal["system", "user", "assistant", "tool"]
ThinkLevel = Literal["low", "medium", "high"]
Think = bool | ThinkLevel | None
"""``None``: the request did not say (the model's template decides)."""


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""
    index: int = 0


@dataclass
class Message:
    role: Role
    content: str = ""
    thinking: str | None = None
    images: list[bytes] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    tool_name: str | None = None
    """On a ``tool`` message: which function's result it is."""
    image_at: list[int] = field(default_factory=list)
    """Where each of ``images`` sits in ``content``, in order: the character offset of the text
    before it (a content part's place in OpenAI's and Anthropic's messages). Empty: every image
    comes before the text, where Ollama puts a message's ``images``."""

    def content_with_images(self, marker: str) -> str:
        """``content`` with the runner's image ``marker`` where each image sits, so the text
        before an image renders the same in every later turn (the prompt cache's prefix)."""
        offsets = self.image_at or [0] * len(self.images)
        parts: list[str] = []
        last = 0
        for offset in offsets:
            offset = min(max(offset, last), len(self.content))
            parts += [self.content[last:offset], marker]
            last = offset
        return "".join(parts) + self.content[last:]

    def for_template(self, image_marker: str | None = None) -> dict[str, Any]:
        """The message as Hugging Face chat templates read it; with ``image_marker``, its
        images are placed in its text (``content_with_images``)."""
        content = self.content
        if image_marker and self.images:
            content = self.content_with_images(image_marker)
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.thinking:
            out["reasoning_content"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_name:
            out["name"] = self.tool_name
        return out


CUSTOM_INPUT = "input"
"""The one argument a free-form (``custom``) tool is shown with: its input text."""


@dataclass
class Tool:
    name: str
    """The name the model sees and calls (a ``namespace`` function's is flattened)."""
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    namespace: str = ""
    """The Responses API ``namespace`` this function belongs to, if any."""
    local_name: str = ""
    """Its name inside ``namespace`` (what the client calls it)."""
    custom: bool = False
    """A free-form tool (Responses ``custom``): its input is text, not JSON arguments."""
    grammar: dict[str, Any] | None = None
    """A custom tool's ``format`` as a constraint (``{"type": "grammar", "syntax": "lark" |
    "regex", "definition": ...}``), enforced when the call is forced."""

    def for_template(self) -> dict[str, Any]:
        """OpenAI's function-tool shape, which is what chat templates iterate over."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


ToolChoice = Literal["auto", "none", "required"] | str
"""``auto``, ``none``, ``required``, or the name of the one function that must be called."""


@dataclass
class ChatRequest:
    """What a client asked for, whichever API it spoke."""

    model: str
    messages: list[Message] = field(default_factory=list)
    prompt: str | None = None
    """A completion prompt (``/api/generate``, ``/v1/completions``) instead of messages."""
    raw: bool = False
    """The prompt goes to the model as is, without the chat template."""
    system: str | None = None
    suffix: str | None = None
    """Fill-in-the-middle: the text after the insertion point (editor autocomplete)."""
    context: list[int] | None = None
    """Ollama's ``context``: the token ids of an earlier exchange to continue from."""
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool | None = None
    think: Think = None
    think_budget: int | None = None
    """At most this many tokens of reasoning (Anthropic's ``budget_tokens``), then the answer."""
    think_optional: bool = False
    """Thinking is a preference, not a requirement (OpenAI's and Anthropic's APIs): a model
    without it answers without, where Ollama's API refuses."""
    format: dict[str, Any] | None = None
    """``{"type": "json"}`` or ``{"type": "json_schema", "schema": {...}}``."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``Sampling`` fields, by field name; absent means the model's default."""
    logprobs: int | None = None
    keep_alive: float | None = None
    load: LoadAsk = field(default_factory=LoadAsk)
    """``options.num_ctx`` and ``options.kv_cache_type``: how the model should be loaded."""
    stream: bool = True
    return_context: bool = False
    """Report the conversation's token ids in ``Done.context`` (Ollama's ``/api/generate``)."""
    keep_prefix: bool = False
    """A caching hint: Anthropic's ``cache_control`` or OpenAI's ``prompt_cache_key`` (what
    they do here: docs/API.md, "Prompt caching")."""
