"""Shared bench helpers: a throwaway store with the default model, timing, JSON output."""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from modelstore.default_model import DEFAULT_MODEL, ensure_default_model
from modelstore.store import HOME_ENV, ModelStore


def bench_store() -> ModelStore:
    """``$MLXSERVE_HOME`` if set (reuses conversions), else a temporary store."""
    root = os.environ.get(HOME_ENV) or tempfile.mkdtemp(prefix="mlxserve-bench-")
    os.environ[HOME_ENV] = root
    store = ModelStore(Path(root))
    ensure_default_model(store)
    return store


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


Item = TypeVar("Item")


async def items_per_second(
    items: Sequence[Item], call: Callable[[list[Item]], Awaitable[object]], batched: bool
) -> float:
    """Throughput of ``call`` over ``items``: one call with all of them (the runner batches),
    or one call per item (what a client that does not batch costs). ``bench.embed`` and
    ``bench.rerank`` time both ways with this one loop."""
    started = time.perf_counter()
    if batched:
        await call(list(items))
    else:
        for item in items:
            await call([item])
    return len(items) / (time.perf_counter() - started)


def batching_speedups(
    rates: dict[str, float], runners: Sequence[str], batched: str, single: str
) -> dict[str, float]:
    """Per runner, batched items/s over one-at-a-time items/s (keys ``"<runner> <label>"``)."""
    return {
        runner: round(rates[f"{runner} {batched}"] / rates[f"{runner} {single}"], 2)
        for runner in runners
    }


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


MODEL = DEFAULT_MODEL


CONTENT = re.compile(rb'"content": ?"[^"]')
"""A non-empty ``content`` string of an OpenAI chunk."""
USAGE = re.compile(rb'"usage": ?\{')
USAGE_TAIL_BYTES = 4096
"""Enough of a stream's end to hold its usage frame."""


def chat_body(model: str, question: str, tokens: int) -> dict[str, Any]:
    """The benches' streaming OpenAI chat: one question, greedy, usage in the last frame."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def counting_stream(
    session: aiohttp.ClientSession, url: str, model: str, tokens: int, question: str
) -> dict[str, Any]:
    """One streaming chat read as raw bytes: the load generator must not be what limits the
    number on two shared cores, so it parses no frame but the last (the usage, which says how
    many tokens came; without one, the content chunks counted); the first token's time is when
    the first non-empty ``content`` arrives. ``arrivals``: each read's time and the content
    chunks in it (a chunk a token unless the server coalesced a backed-up client's)."""
    body = chat_body(model, question, tokens)
    started = time.perf_counter()
    first = None
    seen = b""
    chunks = 0
    arrivals: list[tuple[float, int]] = []
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for data in response.content.iter_any():
            found = len(CONTENT.findall(data))
            if found:
                chunks += found
                arrivals.append((time.perf_counter(), found))
            seen = seen + data if first is None else (seen + data)[-USAGE_TAIL_BYTES:]
            if first is None and CONTENT.search(seen):
                first = time.perf_counter()
    ended = time.perf_counter()
    usages = [*USAGE.finditer(seen)]
    if usages:
        usage = usages[-1].end() - 1
        count = json.JSONDecoder().raw_decode(seen[usage:].decode())[0]["completion_tokens"]
    else:  # a server that streams no usage (llama-cpp-python's): a content chunk a token
        count = chunks
    return {
        "tokens": count,
        "ttft_s": (first or ended) - started,
        "first_at": first or ended,
        "ended_at": ended,
        "arrivals": arrivals,
    }
