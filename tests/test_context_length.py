"""A request's ``num_ctx`` and a ModelSpec's ``context_length`` are honoured: the model is
(re)loaded with that context, clamped to its trained maximum and bounded by memory (KV cache
included)."""

from __future__ import annotations

import json

import aiohttp
import pytest

from mlxserve import platform
from mlxserve.errors import OutOfMemoryError
from mlxserve.runners.base import RunnerOptions
from mlxserve.runners.loading import context_length, kv_bytes_per_token
from mlxserve.server import limits
from modelstore.runtime import open_model
from modelstore.store import ModelStore

TRAINED = 2048
"""The tiny fixture model's ``context_length``."""


async def chat(daemon, model: str, num_ctx: int | None, content: str = "Hi") -> tuple[int, dict]:
    options = {"num_predict": 2, "temperature": 0}
    if num_ctx is not None:
        options["num_ctx"] = num_ctx
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{daemon.url}/api/chat",
            json={
                "model": model,
                "stream": False,
                "options": options,
                "messages": [{"role": "user", "content": content}],
            },
        ) as response,
    ):
        return response.status, json.loads(await response.text())


async def loaded_context(daemon, model: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.url}/api/ps") as response:
        running = {m["name"]: m for m in (await response.json())["models"]}
    return running[model]["context_length"]


async def test_num_ctx_smaller_then_larger_than_loaded_takes_effect(daemon):
    status, _ = await chat(daemon, "tiny:gguf", None)
    assert status == 200
    assert await loaded_context(daemon, "tiny:gguf") == TRAINED
    status, _ = await chat(daemon, "tiny:gguf", 256)
    assert status == 200
    assert await loaded_context(daemon, "tiny:gguf") == 256
    status, body = await chat(daemon, "tiny:gguf", 256, "word " * 400)
    assert status == 400 and body["code"] == "context_overflow", body
    status, body = await chat(daemon, "tiny:gguf", 1536, "word " * 400)
    assert status == 200, body
    assert await loaded_context(daemon, "tiny:gguf") == 1536


async def test_num_ctx_beyond_the_trained_maximum_is_clamped_to_it(daemon):
    """As Ollama: aider sizes num_ctx to its prompt, above the model's trained 8192."""
    status, _ = await chat(daemon, "tiny:gguf", 512)
    assert status == 200
    status, body = await chat(daemon, "tiny:gguf", TRAINED * 2)
    assert status == 200, body
    assert await loaded_context(daemon, "tiny:gguf") == TRAINED
    assert "larger than tiny:gguf's trained context" in daemon.log()
    reloads = daemon.log().count("reloading tiny:gguf")
    assert reloads >= 1
    status, body = await chat(daemon, "tiny:gguf", TRAINED + 1)
    assert status == 200, body
    assert daemon.log().count("reloading tiny:gguf") == reloads  # the same context: no reload


async def test_a_spec_context_beyond_the_request_limit_is_refused_at_create(daemon):
    """Issue 21: a context no machine can hold is a client error at create (it was a 500 at
    2^32-1), with the limit in the message, and the daemon keeps serving."""
    async with aiohttp.ClientSession() as session:
        created = await session.post(
            f"{daemon.url}/api/create",
            json={
                "model": "huge:1",
                "from": "tiny:gguf",
                "stream": False,
                "parameters": {"num_ctx": 1_000_000_000},
            },
        )
        body = await created.json()
        assert created.status == 400, body
        assert "1000000000" in body["error"] and str(limits.MAX_CONTEXT_LENGTH) in body["error"]
        async with session.get(f"{daemon.url}/api/health") as health:
            assert health.status == 200


async def test_a_huge_spec_context_is_refused_with_the_numbers_before_loading(daemon):
    """A context within the limit whose KV cache outgrows this machine's memory: 507 with the
    numbers, before anything is loaded."""
    async with aiohttp.ClientSession() as session:
        created = await session.post(
            f"{daemon.url}/api/create",
            json={
                "model": "huge:2",
                "from": "tiny:gguf",
                "stream": False,
                "parameters": {"num_ctx": limits.MAX_CONTEXT_LENGTH},
            },
        )
        assert created.status == 200, await created.text()
    model = open_model(ModelStore(daemon.home), "huge:2")
    slots = 1 + int(
        platform.total_memory_bytes() // (kv_bytes_per_token(model) * limits.MAX_CONTEXT_LENGTH)
    )
    with pytest.raises(OutOfMemoryError) as refused:
        context_length(model, RunnerOptions(context_length=limits.MAX_CONTEXT_LENGTH), slots)
    assert str(limits.MAX_CONTEXT_LENGTH) in refused.value.message and "GB" in refused.value.message


def test_the_kv_cache_is_sized_from_the_imported_metadata(tiny_store):
    model = open_model(tiny_store, "tiny:gguf")
    # 2 (K and V) x 2 layers x 2 KV heads x 16 head dims x 2 bytes (llama.cpp's f16 cache)
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 2
    # The MLX folder's cache has the model's dtype: float32
    assert kv_bytes_per_token(open_model(tiny_store, "tiny:mlx")) == 2 * 2 * 2 * 16 * 4
    assert context_length(model, RunnerOptions()) == TRAINED
    assert context_length(model, RunnerOptions(context_length=300)) == 300
