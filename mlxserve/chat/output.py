"""Generated text -> typed events: answer text, reasoning, and complete tool calls.

The text is split by mlx-lm's own ``TextStateMachine`` (the state machine ``mlx_lm.server``
uses): the family's think markers switch to and from ``reasoning``, its tool-call markers to and
from ``tool``, and the markers themselves never reach a client. A tool segment is parsed by the
family's mlx-lm tool parser the moment it closes, so each call streams as soon as it is complete.

Two cases have no markers to split on, so they are decided here: output constrained to a tool
call (``tool_choice`` ``required`` or a named function: the whole output is the call's JSON), and
a model whose template cannot show tools (told in a system preamble to answer with the call's
JSON): there, text that starts like JSON is held back until it is known to be a call or not.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mlxserve.chat.events import Event, TextDelta, ThinkingDelta, ToolCallEvent
from mlxserve.chat.family import ModelFamily
from mlxserve.chat.types import CUSTOM_INPUT, Tool, ToolCall
from mlxserve.runners.base import TokenLogprob

NORMAL, REASONING, TOOL = "normal", "reasoning", "tool"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_calls(parsed: Any) -> list[dict[str, Any]] | None:
    """mlx-lm parsers return one call or a list; arguments may come as a JSON string."""
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append({"name": item["name"], "arguments": arguments, "id": item.get("id")})
    return calls or None


def parse_json_calls(text: str, known: set[str] | None = None) -> list[dict[str, Any]] | None:
    """A bare JSON call (or list of calls), as constrained and preamble-prompted output is."""
    try:
        calls = _as_calls(json.loads(text))
    except json.JSONDecodeError:
        return None
    if calls is None or (known is not None and any(c["name"] not in known for c in calls)):
        return None
    return calls


class OutputParser:
    """Feed it the text of each chunk; it returns the events that text completes."""

    def __init__(
        self,
        family: ModelFamily,
        tools: list[Tool],
        *,
        constrained: bool = False,
        starts_in_reasoning: bool = False,
        parallel_tool_calls: bool = True,
        custom_call: str | None = None,
    ) -> None:
        from mlx_lm.generate import TextStateMachine

        self._family = family
        self._tools = [tool.for_template() for tool in tools]
        self._known = {tool.name for tool in tools}
        self._constrained = constrained
        self._custom_call = custom_call
        """A forced free-form call: the whole output is that tool's input text."""
        self._parallel = parallel_tool_calls
        self._json_mode = bool(tools) and not constrained and family.tool_parser is None
        transitions: dict[str, list[tuple[str, str]]] = {}
        if family.thinks:
            transitions[NORMAL] = [(family.think_start, REASONING)]
            transitions[REASONING] = [(family.think_end, NORMAL)]
        if tools and family.tool_parser is not None and not constrained:
            transitions.setdefault(NORMAL, []).append((family.tool_call_start, TOOL))
            if family.thinks:
                transitions[REASONING].append((family.tool_call_start, TOOL))
            end = family.tool_call_end
            transitions[TOOL] = [(end, NORMAL)] if end else []
        self._machine = TextStateMachine
        self._state = TextStateMachine(transitions or None).make_state(
            REASONING if starts_in_reasoning and family.thinks else NORMAL
        )
        self._tool_text = ""
        self._held = ""
        """Text not yet known to be an answer: constrained output, a maybe-JSON call, or
        whitespace between calls."""
        self._after_reasoning = False
        self.calls: list[ToolCall] = []

    @property
    def reasoning(self) -> bool:
        """Whether the text so far leaves the model reasoning."""
        return self._state[0] == REASONING

    def feed(self, text: str, logprobs: list[TokenLogprob] | None = None) -> list[Event]:
        if not text:
            return [TextDelta("", logprobs)] if logprobs else []
        self._state, segments = self._machine.split(self._state, text)
        events: list[Event] = []
        last = len(segments) - 1
        for position, (state, piece) in enumerate(segments):
            if state == TOOL:
                self._tool_text += piece
                if position < last:
                    events += self._close_tool_segment()
            elif state == REASONING:
                if piece:
                    events.append(ThinkingDelta(piece))
                if position < last:
                    self._after_reasoning = True
            else:
                events += self._answer(piece)
        if logprobs:
            events = self._attach(events, logprobs)
        return events

    def finish(self, cut: bool = False) -> list[Event]:
        """What was held back when the output ended (``cut``: by the token limit)."""
        self._state, pending, state = self._machine.flush(self._state)
        events: list[Event] = []
        if state == TOOL:
            self._tool_text += pending
            events += self._close_tool_segment()
        elif state == REASONING:
            if pending:
                events.append(ThinkingDelta(pending))
        else:
            events += self._answer(pending)
        held, self._held = self._held, ""
        if self._custom_call is not None and not cut:
            return events + self._emit(
                [{"name": self._custom_call, "arguments": {CUSTOM_INPUT: held}}]
            )
        if self._constrained or self._json_mode:
            calls = parse_json_calls(held, None if self._constrained else self._known)
            if calls:
                return events + self._emit(calls)
        if self._constrained or self._custom_call is not None:
            # A forced call cut short (max tokens) is never an answer: no call, and the
            # finish reason (length) says why.
            return events
        if held and (held.strip() or not self.calls):
            events.append(TextDelta(held))
        return events

    def _answer(self, piece: str) -> list[Event]:
        if not piece:
            return []
        if self._after_reasoning:
            piece = piece.lstrip()
            if not piece:
                return []
            self._after_reasoning = False
        if self._constrained:
            self._held += piece
            return []
        if self._json_mode and self._maybe_json(self._held + piece):
            self._held += piece
            return []
        if self.calls and not (self._held + piece).strip():
            self._held += piece
            return []
        text, self._held = self._held + piece, ""
        return [TextDelta(text)]

    def _maybe_json(self, text: str) -> bool:
        """Still possibly a bare JSON call: nothing yet, or it starts with ``{`` or ``[``."""
        stripped = text.lstrip()
        return not stripped or stripped[0] in "{["

    def _close_tool_segment(self) -> list[Event]:
        text, self._tool_text = self._tool_text, ""
        try:
            calls = _as_calls(self._family.tool_parser(text, self._tools))
        except Exception:
            calls = None
        if not calls:
            start = self._family.tool_call_start or ""
            return [TextDelta(start + text + (self._family.tool_call_end or ""))]
        return self._emit(calls)

    def _emit(self, calls: list[dict[str, Any]]) -> list[Event]:
        events: list[Event] = []
        for call in calls:
            if self.calls and not self._parallel:
                break
            made = ToolCall(
                name=call["name"],
                arguments=call["arguments"],
                id=call.get("id") or new_call_id(),
                index=len(self.calls),
            )
            self.calls.append(made)
            events.append(ToolCallEvent(made))
        return events

    @staticmethod
    def _attach(events: list[Event], logprobs: list[TokenLogprob]) -> list[Event]:
        """Logprobs travel with the chunk's answer text (or alone when none was released)."""
        for event in events:
            if isinstance(event, TextDelta):
                event.logprobs = logprobs
                return events
        return [*events, TextDelta("", logprobs)]
