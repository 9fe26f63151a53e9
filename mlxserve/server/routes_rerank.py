"""Reranking: ``POST /v1/rerank`` (also ``/rerank``, ``/v1/reranking`` and ``/v2/rerank``, the
paths clients use) in the Jina / Cohere shape llama.cpp's server answers: ``query``,
``documents`` (strings or ``{"text": ...}``), ``top_n``, ``return_documents`` -> ``results``
sorted by ``relevance_score``, with ``usage``.

Whether a model can rerank is known from its stored config (the ``rerank`` capability recorded
at import), so a model that cannot is refused before anything is loaded; the scoring itself is
the runner's ``rerank`` for a cross-encoder (``runners/rerank.py``) and a yes/no question
through ``generate`` for a causal reranker (``chat/rerank.py``), through the same queue and
budgets as any request.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from mlxserve.chat.rerank import causal_rerank
from mlxserve.errors import InvalidRequestError
from mlxserve.runners.base import RerankRequest
from mlxserve.runners.rerank import refuse_rerank
from mlxserve.server.state import MANAGER, STORE
from mlxserve.server.validate import json_body, keep_alive, model_name, optional, required_str

routes = web.RouteTableDef()
RERANK_PATHS = ("/v1/rerank", "/rerank", "/v1/reranking", "/v2/rerank")
"""Jina's and llama.cpp's paths, and Cohere's (its SDK's ``Client`` posts ``/v1/rerank``,
``ClientV2`` ``/v2/rerank``, both with the same body)."""
MAX_DOCUMENTS = 10_000
"""Documents per request: bounds the work one request can queue (a 10,000-document request
is scored in token-budgeted passes)."""
MAX_DOCUMENT_CHARS = 1_000_000
"""Characters per document or query: far beyond any reranker's context, whose tokens past the
limit are cut anyway; a larger text is refused before it is tokenized."""


def document_texts(value: Any) -> list[str]:
    """``documents`` as texts: strings, or objects with a ``text`` string (Jina, Cohere)."""
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("'documents' must be a non-empty list", param="documents")
    if len(value) > MAX_DOCUMENTS:
        raise InvalidRequestError(
            f"'documents' has {len(value)} items; at most {MAX_DOCUMENTS} per request",
            param="documents",
        )
    texts = []
    for index, item in enumerate(value):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"documents[{index}] must be a string or an object with a 'text' string",
                param="documents",
                index=index,
            )
        if len(text) > MAX_DOCUMENT_CHARS:
            raise InvalidRequestError(
                f"documents[{index}] has {len(text)} characters; at most {MAX_DOCUMENT_CHARS}",
                param="documents",
                index=index,
            )
        texts.append(text)
    return texts


def rerank_query(body: dict[str, Any]) -> str:
    query = required_str(body, "query")
    if len(query) > MAX_DOCUMENT_CHARS:
        raise InvalidRequestError(
            f"'query' has {len(query)} characters; at most {MAX_DOCUMENT_CHARS}", param="query"
        )
    return query


def top_n(body: dict[str, Any], count: int) -> int:
    value = optional(body, "top_n", int, count)
    if value < 1:
        raise InvalidRequestError("'top_n' must be at least 1", param="top_n")
    return min(value, count)


async def rerank(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = model_name(body)
    query = rerank_query(body)
    documents = document_texts(body.get("documents"))
    wanted = top_n(body, len(documents))
    return_documents = optional(body, "return_documents", bool, False)
    truncate = optional(body, "truncate", bool, True)
    store = request.app[STORE]
    if "rerank" not in store.config(store.resolve(name)).features:
        raise refuse_rerank(name)
    request["log"]["model"] = name
    started = time.perf_counter_ns()
    manager = request.app[MANAGER]
    asked = RerankRequest(query, documents, truncate)
    async with manager.use(name, keep_alive=keep_alive(body.get("keep_alive"))) as resident:
        loaded = resident.loaded
        if loaded.model.embedding is None:  # a causal model asked yes or no
            result = await causal_rerank(loaded, asked)
        else:  # a cross-encoder: its head scores the pair
            result = await loaded.runner.rerank(asked)
    order = sorted(range(len(documents)), key=lambda index: -result.scores[index])[:wanted]
    results = []
    for index in order:
        entry: dict[str, Any] = {"index": index, "relevance_score": result.scores[index]}
        if return_documents:
            entry["document"] = {"text": documents[index]}
        results.append(entry)
    return web.json_response(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "object": "list",
            "model": name,
            "results": results,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
            "meta": {"billed_units": {"search_units": 1}},
            "total_duration": time.perf_counter_ns() - started,
        }
    )


for path in RERANK_PATHS:
    routes.post(path)(rerank)
