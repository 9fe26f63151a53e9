"""A request's ``num_ctx`` and a ModelSpec's ``context_length`` are honoured: the model is
(re)loaded with that context, clamped to its trained maximum and bounded by memory (KV cache
included)."""

from __future__ import annotations

import json

import aiohttp

from mlxserve.runners.base import RunnerOptions
from mlxserve.runners.loading import context_length, kv_bytes_per_token
from modelstore.runtime import open_model

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


async def test_a_huge_spec_context_is_refused_with_the_numbers_before_loading(daemon):
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
        assert created.status == 200, await created.text()
    status, body = await chat(daemon, "huge:1", None)
    assert status == 507, body
    assert body["code"] == "out_of_memory"
    assert "1000000000" in body["error"] and "GB" in body["error"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.url}/api/health") as health,
    ):
        assert health.status == 200


def test_the_kv_cache_is_sized_from_the_imported_metadata(tiny_store):
    model = open_model(tiny_store, "tiny:gguf")
    # 2 (K and V) x 2 layers x 2 KV heads x 16 head dims x 2 bytes (llama.cpp's f16 cache)
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 2
    # The MLX folder's cache has the model's dtype: float32
    assert kv_bytes_per_token(open_model(tiny_store, "tiny:mlx")) == 2 * 2 * 2 * 16 * 4
    assert context_length(model, RunnerOptions()) == TRAINED
    assert context_length(model, RunnerOptions(context_length=300)) == 300
