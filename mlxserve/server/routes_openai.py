"""The OpenAI-compatible API under ``/v1``: chat completions, completions, embeddings, models.

Streams are Server-Sent Events ending with ``data: [DONE]``; a long prefill sends SSE comment
lines so clients and proxies keep the connection. Errors use OpenAI's error shape. The
``model`` field only ever names a model in the store: nothing is downloaded.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from typing import Any

from aiohttp import web

from mlxserve.errors import InvalidRequestError
from mlxserve.runners.base import GenerateChunk, TokenLogprob
from mlxserve.server.encoders import SSE, SSE_KEEPALIVE, open_stream, write_sse
from mlxserve.server.errors import error_body
from mlxserve.server.generation import Generation, generation, messages_from_body
from mlxserve.server.options import optional_integer, optional_number
from mlxserve.server.routes_native import embed_inputs, embed_texts, json_body, model_name
from mlxserve.server.state import MANAGER, METRICS, SETTINGS, STORE
from mlxserve.server.tools import parse_tool_calls
from modelstore.errors import MlxserveError

routes = web.RouteTableDef()
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}
OWNER = "mlxserve"
DEFAULT_COMPLETION_TOKENS = 16
"""``/v1/completions`` without ``max_tokens``: OpenAI's own default."""

def openai_overrides(body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    if (body.get("n") or 1) != 1:
        raise InvalidRequestError("only n=1 is supported", param="n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidRequestError("'stop' must be a string or a list of strings", param="stop")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise InvalidRequestError("'logit_bias' must map token ids to numbers",
                                      param="logit_bias")
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise InvalidRequestError("'logit_bias' must map token ids to numbers",
                                      param="logit_bias") from None
    max_tokens = optional_integer(body, "max_completion_tokens") or optional_integer(
        body, "max_tokens"
    )
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError("'max_tokens' must be at least 1", param="max_tokens")
    if chat:
        logprobs = (optional_integer(body, "top_logprobs") or 0) if body.get("logprobs") else None
    else:
        logprobs = optional_integer(body, "logprobs")
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_TOKENS
    overrides = {
        "temperature": optional_number(body, "temperature"),
        "top_p": optional_number(body, "top_p"),
        "seed": optional_integer(body, "seed"),
        "presence_penalty": optional_number(body, "presence_penalty"),
        "frequency_penalty": optional_number(body, "frequency_penalty"),
        "max_tokens": max_tokens,
        "stop": stop,
        "logit_bias": bias,
        "logprobs": logprobs,
        "response_format": response_format(body.get("response_format")),
    }
    return {k: v for k, v in overrides.items() if v is not None}


def response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json"}
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format.json_schema.schema must be an object",
                                      param="response_format")
        return {"type": "json_schema", "schema": schema}
    raise InvalidRequestError("response_format.type must be text, json_object or json_schema",
                              param="response_format")


def usage(chunk: GenerateChunk | None) -> dict[str, Any]:
    stats = chunk.stats if chunk else None
    prompt = stats.prompt_eval_count if stats else 0
    completion = stats.eval_count if stats else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens if stats else 0},
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


def tool_calls_wire(calls: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "index": index,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for index, call in enumerate(calls)
    ]


class SseWriter:
    """Prepares the SSE response lazily: on the first heartbeat or the first chunk."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def ensure(self) -> web.StreamResponse:
        if self.response is None:
            self.response = await open_stream(self.request, SSE)
        return self.response

    async def heartbeat(self) -> None:
        await (await self.ensure()).write(SSE_KEEPALIVE)

    async def send(self, body: dict[str, Any] | str) -> None:
        await write_sse(await self.ensure(), body)

    async def close(self) -> web.StreamResponse:
        response = await self.ensure()
        await write_sse(response, "[DONE]")
        await response.write_eof()
        return response


async def stream_sse(
    request: web.Request, running: Generation, shape: Any, closing: Any
) -> web.StreamResponse:
    writer = SseWriter(request)
    first = await running.first(writer.heartbeat, request.app[SETTINGS].sse_keepalive_s)
    try:
        await writer.send(shape(first, True))
        if not first.done:
            async for chunk in running.rest():
                await writer.send(shape(chunk, False))
        for extra in closing():
            await writer.send(extra)
    except MlxserveError as error:
        await writer.send(error_body(error, openai=True))
    return await writer.close()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    name = model_name(body)
    messages = messages_from_body(body.get("messages"))
    if not messages:
        raise InvalidRequestError("'messages' must not be empty", param="messages")
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    raise InvalidRequestError("tool call arguments must be JSON",
                                              param="messages") from None
    tools = body.get("tools") or None
    if body.get("tool_choice") == "none":
        tools = None
    overrides = openai_overrides(body, chat=True)
    stream = bool(body.get("stream"))
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    held: list[str] = []

    def envelope(choices: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        return {"id": completion_id, "object": kind, "created": created, "model": name,
                "system_fingerprint": OWNER, "choices": choices}

    def shape(chunk: GenerateChunk, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        finish = None
        if tools:
            held.append(chunk.text)
        elif chunk.text or first:
            delta["content"] = chunk.text
        if chunk.done:
            finish = FINISH_REASONS.get(chunk.done_reason or "stop", "stop")
            if tools:
                text, calls = parse_tool_calls("".join(held), tools)
                if calls:
                    delta["tool_calls"] = tool_calls_wire(calls)
                    finish = "tool_calls"
                if text:
                    delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish,
                                  "logprobs": None}
        if chunk.logprobs:
            choice["logprobs"] = chat_logprobs(chunk.logprobs)
        return envelope([choice], "chat.completion.chunk")

    def closing() -> list[dict[str, Any]]:
        if not include_usage:
            return []
        return [{**envelope([], "chat.completion.chunk"), "usage": usage(running.final)}]

    def build(loaded: Any) -> Any:
        return loaded.chat_request(messages, overrides, tools)

    async with generation(request.app[MANAGER], request, name, build, keep_alive=None,
                          metrics=request.app[METRICS]) as running:
        if stream:
            return await stream_sse(request, running, shape, closing)
        chunks = [await running.first()] + [c async for c in running.rest()]
        text = "".join(c.text for c in chunks)
        final = chunks[-1]
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = FINISH_REASONS.get(final.done_reason or "stop", "stop")
        if tools:
            text, calls = parse_tool_calls(text, tools)
            message["content"] = text or None
            if calls:
                message["tool_calls"] = tool_calls_wire(calls)
                finish = "tool_calls"
        entries = [e for c in chunks for e in c.logprobs]
        choice = {"index": 0, "message": message, "finish_reason": finish,
                  "logprobs": chat_logprobs(entries) if entries else None}
        return web.json_response({**envelope([choice], "chat.completion"),
                                  "usage": usage(final)})


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    name = model_name(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("'prompt' must be a string", param="prompt")
    if body.get("echo") or body.get("suffix") or (body.get("best_of") or 1) != 1:
        raise InvalidRequestError("echo, suffix and best_of are not supported")
    overrides = openai_overrides(body, chat=False)
    stream = bool(body.get("stream"))
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def envelope(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": completion_id, "object": "text_completion", "created": created,
                "model": name, "system_fingerprint": OWNER, "choices": choices}

    def logprobs_of(entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if overrides.get("logprobs") is None:
            return None
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: lp for _, t, lp in e.top} for e in entries],
            "text_offset": [],
        }

    def shape(chunk: GenerateChunk, _first: bool) -> dict[str, Any]:
        finish = FINISH_REASONS.get(chunk.done_reason or "stop") if chunk.done else None
        return envelope([{"index": 0, "text": chunk.text, "finish_reason": finish,
                          "logprobs": logprobs_of(chunk.logprobs)}])

    def closing() -> list[dict[str, Any]]:
        return [{**envelope([]), "usage": usage(running.final)}] if include_usage else []

    def build(loaded: Any) -> Any:
        return loaded.raw_request(prompt, overrides)

    async with generation(request.app[MANAGER], request, name, build, keep_alive=None,
                          metrics=request.app[METRICS]) as running:
        if stream:
            return await stream_sse(request, running, shape, closing)
        chunks = [await running.first()] + [c async for c in running.rest()]
        final = chunks[-1]
        choice = {"index": 0, "text": "".join(c.text for c in chunks),
                  "finish_reason": FINISH_REASONS.get(final.done_reason or "stop"),
                  "logprobs": logprobs_of([e for c in chunks for e in c.logprobs])}
        return web.json_response({**envelope([choice]), "usage": usage(final)})


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = model_name(body)
    texts = embed_inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if not isinstance(encoding, str) or encoding not in {"float", "base64"}:
        raise InvalidRequestError("encoding_format must be float or base64",
                                  param="encoding_format")
    vectors, tokens, _ = await embed_texts(request, name, texts, None)

    def encode(vector: list[float]) -> list[float] | str:
        if encoding == "float":
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    return web.json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                 for i, v in enumerate(vectors)],
        "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


def model_entry(model: Any) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": int(model.modified),
            "owned_by": OWNER}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    models = request.app[STORE].list()
    return web.json_response({"object": "list", "data": [model_entry(m) for m in models]})


@routes.get("/v1/models/{model:.+}")
async def get_model(request: web.Request) -> web.Response:
    model = request.app[STORE].resolve(request.match_info["model"])
    return web.json_response(model_entry(model))


