"""The events a chat yields, whatever the API: text, reasoning, complete tool calls, the end
with its statistics, or an error once the response has started. Each API module
(``mlxserve/server/api_*.py``) turns them into its own wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mlxserve.chat.types import ToolCall
from mlxserve.runners.base import GenerationStats, TokenLogprob
from modelstore.errors import MlxserveError


@dataclass
class TextDelta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ThinkingDelta:
    text: str


@dataclass
class ToolCallEvent:
    """One complete call: emitted as soon as the model finished writing it."""

    call: ToolCall


DoneReason = Literal["stop", "length", "cancelled", "tool_calls"]


@dataclass
class Done:
    reason: DoneReason
    stats: GenerationStats
    context: list[int] | None = None
    stop_sequence: str | None = None
    """The stop string that ended the answer (``reason`` is then ``stop``)."""


@dataclass
class ErrorEvent:
    """A failure after the response started: the API sends it as its last message."""

    error: MlxserveError


Event = TextDelta | ThinkingDelta | ToolCallEvent | Done | ErrorEvent
