"""The chat core: a ``ChatRequest`` in, a stream of typed events out, for every API.

Everything about what a request means happens here, once: the prompt (the model's chat template
with tools and thinking switched as asked, a tool preamble for templates without tools, FIM for
``suffix``, Ollama's ``context``), the generation request (the ModelSpec's defaults under the
request's overrides, ``tool_choice`` as a constraint), and the events (answer text, reasoning,
complete tool calls, the end with its stats). The core takes a model already loaded and
leased: it never reaches back for residency, admission or metrics, which its callers hold
through ``server/scheduler.py``'s ``serve_chat`` (the daemon's routes and ``mlxctl run`` alike).
A bad request fails before the first event (a real 400); an error after the first event becomes
an ``ErrorEvent`` (the API sends it as its last message).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mlxserve.chat.events import Done, ErrorEvent, Event, TextDelta, ThinkingDelta, ToolCallEvent
from mlxserve.chat.model import LoadedModel, build_request
from mlxserve.chat.output import OutputParser
from mlxserve.chat.tooling import call_format, forced_tools, with_tool_preamble
from mlxserve.chat.types import ChatRequest, Message, ToolCall
from mlxserve.errors import InvalidRequestError, TemplateError, UnsupportedFeatureError
from mlxserve.images import check_request_images
from mlxserve.prompts import build_messages, render_chat
from mlxserve.runners.base import CancelToken, GenerateChunk, GenerateRequest, TokenLogprob
from modelstore.errors import MlxserveError

Heartbeat = Callable[[], Awaitable[None]]
log = logging.getLogger("mlxserve.prompts")
HEARTBEAT_S = 5.0


@dataclass
class Prepared:
    """What the model will be asked, and how its output will be read."""

    request: GenerateRequest
    parser: OutputParser
    prompt: str


def _template_messages(loaded: LoadedModel, chat: ChatRequest) -> list[Message]:
    messages = list(chat.messages)
    if chat.prompt is not None:
        # /api/generate's images, placed by its translator (``api_native.py``).
        placed = chat.messages[0] if len(chat.messages) == 1 else Message("user")
        messages = [Message("user", chat.prompt, images=placed.images, image_at=placed.image_at)]
        if chat.system:
            messages.insert(0, Message("system", chat.system))
    return messages


def _template_kwargs(loaded: LoadedModel, chat: ChatRequest) -> dict[str, Any]:
    """Thinking switched on or off in whichever way the model's template reads it."""
    kwargs: dict[str, Any] = {}
    if chat.think is not None and loaded.family.thinks:
        kwargs["enable_thinking"] = bool(chat.think)
        if isinstance(chat.think, str):
            kwargs["reasoning_effort"] = chat.think
    return kwargs


def render_prompt(loaded: LoadedModel, chat: ChatRequest) -> tuple[str, bool]:
    """The prompt text, and whether it must be tokenized with the tokenizer's BOS (raw text)."""
    family = loaded.family
    if chat.suffix:
        if family.fim is None:
            raise UnsupportedFeatureError(
                f"{loaded.model.name} does not support insert: it has no fill-in-the-middle tokens",
                param="suffix",
            )
        prefix, suffix, middle = family.fim
        return f"{prefix}{chat.prompt or ''}{suffix}{chat.suffix}{middle}", True
    if chat.raw:
        return chat.prompt or "", True
    messages = _template_messages(loaded, chat)
    try:
        return _render(loaded, chat, messages), False
    except TemplateError:
        folded = fold_system_messages(messages)
        if folded == messages:
            raise
        log.info("%s: the template refuses system messages there: folded", loaded.model.name)
        return _render(loaded, chat, folded), False


def fold_system_messages(messages: list[Message]) -> list[Message]:
    """Every system message folded, in order, into one at the start: for templates that allow
    a system message only there (Claude Code sends them mid-conversation)."""
    system = [m.content for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    return [Message("system", "\n\n".join(system)), *rest] if system else rest


def _render(loaded: LoadedModel, chat: ChatRequest, messages: list[Message]) -> str:
    tools = chat.tools if chat.tool_choice != "none" else []
    shown_tools = None
    if tools and loaded.family.template_shows_tools:
        shown_tools = [tool.for_template() for tool in tools]
    elif tools:
        messages = with_tool_preamble(messages, tools)
    marker = loaded.runner.image_marker
    return render_chat(
        loaded.template,
        build_messages([m.for_template(marker) for m in messages], loaded.model.system),
        add_generation_prompt=True,
        tools=shown_tools,
        **_template_kwargs(loaded, chat),
        **loaded.runner.special_tokens,
    )


def _no_call_bias(loaded: LoadedModel) -> dict[int, float]:
    """``tool_choice: none``: the token that opens the family's tool call can never be drawn."""
    start = loaded.family.tool_call_start
    ids = loaded.runner.tokenize(start, add_special_tokens=False) if start else []
    return {ids[0]: float("-inf")} if len(ids) == 1 else {}


def prepare(loaded: LoadedModel, chat: ChatRequest) -> Prepared:
    """Render and tokenize (call it off the event loop: templates and tokenizers take time)."""
    family = loaded.family
    if chat.think and not family.thinks:
        if not chat.think_optional:
            raise InvalidRequestError(
                f"{loaded.model.name} does not support thinking", param="think"
            )
        log.info("%s has no thinking: the request's thinking is ignored", loaded.model.name)
        chat.think = None
    images = [image for message in chat.messages for image in message.images]
    if images and loaded.model.vision is None:
        raise InvalidRequestError(
            f"{loaded.model.name} is not a vision model: it cannot read images", param="images"
        )
    check_request_images(images)
    forced = forced_tools(chat.tools, chat.tool_choice) if chat.tools else []
    if chat.tool_choice not in ("auto", "none") and not chat.tools:
        raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
    prompt, raw = render_prompt(loaded, chat)
    tokens = loaded.runner.tokenize(prompt, add_special_tokens=raw)
    if chat.context:
        tokens = [*chat.context, *tokens]
    log.debug("%s: rendered prompt (%d tokens): %r", loaded.model.name, len(tokens), prompt)
    overrides: dict[str, Any] = dict(chat.sampling)
    if chat.tools and chat.tool_choice == "none":
        overrides["logit_bias"] = {**overrides.get("logit_bias", {}), **_no_call_bias(loaded)}
    overrides["logprobs"] = chat.logprobs
    custom = forced[0] if len(forced) == 1 and forced[0].custom else None
    if custom is not None:
        overrides["response_format"] = custom.grammar
    elif forced:
        overrides["response_format"] = call_format(forced, bool(chat.parallel_tool_calls))
    else:
        overrides["response_format"] = chat.format
    request = build_request(loaded.model, overrides, prompt=prompt, prompt_tokens=tokens)
    request.images = images
    request.keep_prefix = chat.keep_prefix
    tools = [] if chat.tool_choice == "none" or chat.raw or chat.suffix else chat.tools
    parser = OutputParser(
        family,
        tools,
        constrained=bool(forced),
        custom_call=custom.name if custom is not None else None,
        starts_in_reasoning=bool(family.thinks)
        and not raw
        and not overrides["response_format"]
        and prompt.rstrip().endswith(family.think_start or "\0"),
        parallel_tool_calls=chat.parallel_tool_calls is not False,
    )
    return Prepared(request, parser, prompt)


class ChatRun:
    """One running chat: ``first`` the first event (errors raise), then ``rest``."""

    def __init__(
        self, chat: ChatRequest, loaded: LoadedModel, prepared: Prepared, load_ns: int = 0
    ) -> None:
        self.chat = chat
        self.load_ns = load_ns
        """How long this request waited for its model to be ready (Ollama's load_duration)."""
        self.loaded = loaded
        self.prepared = prepared
        self._chunks = loaded.generate(prepared.request)
        self._events = self._produce()
        self._started = False
        self._generated: list[int] = []
        self._earlier = 0
        """Tokens generated before a restart (``_end_reasoning``)."""
        self._first_hit: int | None = None
        """The first pass's cached prompt tokens, from its first chunk (a restart's own hit is
        its first pass's prompt and reasoning, not the user's prompt)."""
        self._prompt_tokens = len(prepared.request.prompt_tokens or [])
        self.done: Done | None = None

    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens

    async def _produce(self) -> AsyncIterator[Event]:
        parser = self.prepared.parser
        budget = self.chat.think_budget if self.loaded.family.thinks else None
        reasoning = 0
        try:
            while True:
                async for chunk in self._chunks:
                    if self._first_hit is None and chunk.cached_prompt_tokens is not None:
                        self._first_hit = chunk.cached_prompt_tokens
                    for event in parser.feed(chunk.text, chunk.logprobs):
                        yield event
                    self._generated += chunk.token_ids
                    if chunk.done:
                        for event in parser.finish(cut=chunk.done_reason == "length"):
                            yield event
                        yield self._finish(chunk)
                        return
                    reasoning += len(chunk.token_ids) if parser.reasoning else 0
                    if budget is not None and parser.reasoning and reasoning >= budget:
                        break
                else:
                    return
                for event in await self._end_reasoning():
                    yield event
                budget = None
        except MlxserveError as error:
            if not (self._started and self.chat.stream):
                raise
            yield ErrorEvent(error)

    async def _end_reasoning(self) -> list[Event]:
        """``budget_tokens`` spent: the reasoning is closed with the family's think-end marker
        and generation goes on from there, to the answer (the prompt cache keeps the restart
        cheap). The marker goes through the parser, which leaves reasoning on it."""
        old = self.prepared.request
        old.cancel.cancel()
        with contextlib.suppress(Exception):
            await self._chunks.aclose()
        end = self.loaded.family.think_end or ""
        events = self.prepared.parser.feed(end)
        closing = self.loaded.runner.tokenize(end, add_special_tokens=False)
        self._earlier += len(self._generated)
        prompt = [*(old.prompt_tokens or []), *self._generated, *closing]
        self._generated = []
        left = None if old.max_tokens is None else max(1, old.max_tokens - self._earlier)
        request = dataclasses.replace(
            old,
            prompt=None,
            prompt_tokens=prompt,
            max_tokens=left,
            cancel=CancelToken(),
            arriving=0,
        )
        self.prepared.request = request
        self._chunks = self.loaded.generate(request)
        return events

    def _finish(self, chunk: GenerateChunk) -> Done:
        reason = chunk.done_reason or "stop"
        if self.prepared.parser.calls and reason == "stop":
            reason = "tool_calls"
        context = None
        if self.chat.return_context:
            context = [*(self.prepared.request.prompt_tokens or []), *self._generated]
        stats = chunk.stats
        assert stats is not None
        if self._earlier:  # generation restarted after the reasoning budget
            stats.eval_count += self._earlier
            stats.prompt_eval_count = self._prompt_tokens
            # The user's prompt was read (and its cache hit counted) by the first pass; the
            # restart's hit is that pass's own prompt and reasoning, never claimed (Anthropic's
            # input_tokens = prompt - cached must not go negative).
            stats.cached_prompt_tokens = min(self._first_hit or 0, self._prompt_tokens)
        stats.load_duration = self.load_ns
        stats.total_duration += self.load_ns
        self.done = Done(reason, stats, context, chunk.stop_sequence if reason == "stop" else None)
        return self.done

    async def first(
        self, heartbeat: Heartbeat | None = None, every_s: float = HEARTBEAT_S
    ) -> Event:
        """The first event; with ``heartbeat``, called every ``every_s`` while waiting (SSE
        keep-alive comments during a long prefill)."""
        task = asyncio.ensure_future(anext(self._events))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=every_s if heartbeat else None)
                if done:
                    event = task.result()
                    self._started = True
                    return event
                if heartbeat is not None:
                    await heartbeat()
        except BaseException:
            task.cancel()
            await self.close()
            raise

    async def rest(self) -> AsyncIterator[Event]:
        async for event in self._events:
            yield event

    async def close(self) -> None:
        self.prepared.request.cancel.cancel()
        with contextlib.suppress(Exception):
            await self._events.aclose()
        with contextlib.suppress(Exception):
            await self._chunks.aclose()


@dataclass
class Collected:
    """A whole answer, for the APIs' non-streamed responses."""

    text: str = ""
    thinking: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: Done | None = None


async def collect(run: ChatRun) -> Collected:
    """Every event of a non-streamed ``run``: nothing has been sent, so a failure raises."""
    collected = Collected()
    events = [await run.first()]
    events += [event async for event in run.rest()]
    for event in events:
        if isinstance(event, TextDelta):
            collected.text += event.text
            collected.logprobs += event.logprobs
        elif isinstance(event, ThinkingDelta):
            collected.thinking += event.text
        elif isinstance(event, ToolCallEvent):
            collected.calls.append(event.call)
        elif isinstance(event, Done):
            collected.done = event
    return collected


@contextlib.asynccontextmanager
async def run_chat(
    loaded: LoadedModel, chat: ChatRequest, *, load_ns: int = 0
) -> AsyncIterator[ChatRun]:
    """Prepare ``chat`` for ``loaded`` (off the event loop) and start it; the run is closed
    (cancelled if unfinished) when the ``with`` body leaves. ``load_ns``: how long the request
    waited for its model (the caller holds the model: ``server/scheduler.py``'s ``serve_chat``)."""
    loaded.preparing += 1
    try:
        prepared = await asyncio.to_thread(prepare, loaded, chat)
    finally:
        loaded.preparing -= 1
    prepared.request.arriving = loaded.preparing
    run = ChatRun(chat, loaded, prepared, load_ns=load_ns)
    try:
        yield run
    finally:
        await run.close()


async def count_tokens(loaded: LoadedModel, chat: ChatRequest) -> int:
    """How many tokens ``chat``'s prompt is, without generating (Anthropic's count_tokens)."""
    prepared = await asyncio.to_thread(prepare, loaded, chat)
    return len(prepared.request.prompt_tokens or [])
