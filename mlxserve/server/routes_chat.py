"""The chat routes of every API: each is its translator pair, run by one handler.

A route only names its API's parse function and encoder; the handler reads the body, runs the
chat core through ``scheduler.serve_chat`` (admission, the model's lease, the metrics and the
access-log fields), and sends the events streamed (NDJSON or SSE) or as one object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from mlxserve.api.types import utc_timestamp
from mlxserve.chat.core import collect, count_tokens
from mlxserve.chat.events import Done
from mlxserve.chat.types import ChatRequest
from mlxserve.runners.base import LoadedModelInfo
from mlxserve.server import api_anthropic, api_native, api_openai, api_responses
from mlxserve.server.encoders import NDJSON, SSE, SSE_KEEPALIVE, frame_bytes, stream_events
from mlxserve.server.middleware import CONTEXT
from mlxserve.server.scheduler import Account, serve_chat
from mlxserve.server.state import MANAGER, METRICS, SETTINGS
from mlxserve.server.validate import json_body

routes = web.RouteTableDef()
Parse = Callable[[dict[str, Any]], ChatRequest]
Encoder = Callable[[ChatRequest, dict[str, Any]], Any]


def _say_context(request: web.Request, chat: ChatRequest, info: LoadedModelInfo) -> None:
    """The context the answer is made in, for ``X-Mlxserve-Context`` on every API, and the
    ``num_ctx`` asked when it was clamped to that (docs/API.md, "Context length")."""
    said = str(info.context_length)
    asked = chat.load.context_length
    if asked is not None and asked != info.context_length:
        said += f"; requested={asked}"
    request[CONTEXT] = said


async def _serve(
    request: web.Request,
    chat: ChatRequest,
    encoder: Any,
    *,
    content_type: str,
    keepalive: bytes | None,
) -> web.StreamResponse:
    app = request.app
    request["log"]["model"] = chat.model
    async with serve_chat(app[MANAGER], chat, _account(request)) as run:
        _say_context(request, chat, run.loaded.info)
        if not chat.stream:
            return web.json_response(encoder.whole(await collect(run)))
        return await stream_events(
            request,
            run,
            encoder,
            content_type=content_type,
            keepalive=keepalive,
            keepalive_s=app[SETTINGS].sse_keepalive_s,
        )


def _account(request: web.Request) -> Account:
    """A finished generation in the daemon's metrics and in its access-log line."""
    metrics, http_log = request.app[METRICS], request["log"]

    def account(model: str, done: Done) -> None:
        metrics.generation(model, done)
        stats = done.stats
        http_log.update(
            tokens_in=stats.prompt_eval_count,
            tokens_out=stats.eval_count,
            cached_tokens=stats.cached_prompt_tokens,
            draft_tokens=stats.draft_tokens,
            ttft_ms=round(stats.time_to_first_token / 1e6, 1),
            done_reason=done.reason,
        )

    return account


def _sse_route(parse: Parse, make_encoder: Encoder, keepalive: bytes) -> Callable:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        chat = parse(body)
        return await _serve(
            request, chat, make_encoder(chat, body), content_type=SSE, keepalive=keepalive
        )

    return handler


async def _load_or_unload(request: web.Request, chat: ChatRequest) -> web.Response:
    """An empty prompt loads the model; with ``keep_alive: 0`` it unloads it (Ollama)."""
    manager = request.app[MANAGER]
    if chat.keep_alive == 0:
        await manager.unload(chat.model)
        reason = "unload"
    else:
        resident = await manager.ensure_loaded(
            chat.model, keep_alive=chat.keep_alive, load=chat.load
        )
        _say_context(request, chat, resident.loaded.info)
        reason = "load"
    body: dict[str, Any] = {
        "model": chat.model,
        "created_at": utc_timestamp(),
        "done": True,
        "done_reason": reason,
    }
    if chat.prompt is None:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return web.json_response(body)


def _native_route(parse: Parse, make_encoder: Encoder) -> Callable:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        chat = parse(body)
        if api_native.is_load_request(chat):
            return await _load_or_unload(request, chat)
        return await _serve(
            request, chat, make_encoder(chat, body), content_type=NDJSON, keepalive=None
        )

    return handler


routes.post("/api/chat")(_native_route(api_native.parse_chat, api_native.ChatEncoder))
routes.post("/api/generate")(_native_route(api_native.parse_generate, api_native.GenerateEncoder))
routes.post("/v1/chat/completions")(
    _sse_route(api_openai.parse_chat, api_openai.ChatEncoder, SSE_KEEPALIVE)
)
routes.post("/v1/completions")(
    _sse_route(api_openai.parse_completion, api_openai.CompletionEncoder, SSE_KEEPALIVE)
)
routes.post("/v1/responses")(
    _sse_route(api_responses.parse, api_responses.ResponsesEncoder, SSE_KEEPALIVE)
)
routes.post("/v1/messages")(
    _sse_route(
        api_anthropic.parse, api_anthropic.MessagesEncoder, frame_bytes(api_anthropic.PING, SSE)
    )
)


@routes.post("/v1/messages/count_tokens")
async def messages_count_tokens(request: web.Request) -> web.Response:
    chat = api_anthropic.parse_count(await json_body(request))
    request["log"]["model"] = chat.model
    resident = await request.app[MANAGER].ensure_loaded(chat.model, keep_alive=chat.keep_alive)
    return web.json_response({"input_tokens": await count_tokens(resident.loaded, chat)})
