"""Wire shapes of the native (Ollama-compatible) API, shared by the daemon and ``mlxctl``.

Field names and meanings follow Ollama's ``docs/api.md``: durations in nanoseconds, the last
chunk of a stream has ``done: true``, ``done_reason`` and the stats. Fields that are ``None`` are
left out of the JSON, as Ollama does with ``omitempty``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlxserve.runners.base import GenerateChunk, GenerationStats


def utc_timestamp(at: float | None = None) -> str:
    """RFC 3339 in UTC, like Ollama's ``created_at``: now, or ``at`` (seconds since the epoch)."""
    moment = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


@dataclass
class WireStats:
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None

    @classmethod
    def from_stats(cls, stats: GenerationStats) -> WireStats:
        return cls(
            total_duration=stats.total_duration,
            load_duration=stats.load_duration,
            prompt_eval_count=stats.prompt_eval_count,
            prompt_eval_duration=stats.prompt_eval_duration,
            eval_count=stats.eval_count,
            eval_duration=stats.eval_duration,
        )


@dataclass
class ToolCallFunction:
    name: str
    arguments: dict[str, Any]
    index: int | None = None


@dataclass
class ToolCall:
    function: ToolCallFunction


@dataclass
class ChatMessage:
    role: str
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class _StreamLine:
    """A stream line: dataclass fields, with the stats flattened in as Ollama sends them."""

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)  # type: ignore[call-overload]
        stats = body.pop("stats") or {}
        body.update(stats)
        return _without_none(body)

    def to_json_line(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False).encode() + b"\n"


@dataclass
class GenerateResponse(_StreamLine):
    """One line of a ``/api/generate`` stream (or the whole answer with ``stream: false``)."""

    model: str
    created_at: str = field(default_factory=utc_timestamp)
    response: str = ""
    done: bool = False
    done_reason: str | None = None
    context: list[int] | None = None
    stats: WireStats | None = None

    @classmethod
    def from_chunk(cls, model: str, chunk: GenerateChunk) -> GenerateResponse:
        return cls(
            model=model,
            response=chunk.text,
            done=chunk.done,
            done_reason=chunk.done_reason if chunk.done else None,
            stats=WireStats.from_stats(chunk.stats) if chunk.done and chunk.stats else None,
        )


@dataclass
class ChatResponse(_StreamLine):
    """One line of a ``/api/chat`` stream."""

    model: str
    message: ChatMessage
    created_at: str = field(default_factory=utc_timestamp)
    done: bool = False
    done_reason: str | None = None
    stats: WireStats | None = None
