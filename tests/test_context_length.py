"""A request's ``num_ctx`` and a ModelSpec's ``context_length`` are honoured: the model is
(re)loaded with that context; a request's is clamped to the trained maximum and to what the
memory holds (KV cache included), and the answer says so; a ModelSpec's is bounded by memory."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from mlxserve import platform
from mlxserve.errors import OutOfMemoryError
from mlxserve.runners.base import RunnerOptions
from mlxserve.runners.loading import (
    CONTEXT_STEP,
    MEMORY_HEADROOM,
    context_length,
    kv_bytes_per_token,
)
from mlxserve.server import limits
from mlxserve.server.middleware import CONTEXT_HEADER
from modelstore.runtime import open_model
from modelstore.store import ModelStore
from tests.conftest import populated_store
from tests.daemon import Daemon

TRAINED = 2048
"""The tiny fixture model's ``context_length``."""


async def chat(daemon, model: str, num_ctx: int | None, content: str = "Hi") -> tuple[int, dict]:
    status, body, _ = await chat_said(daemon, model, num_ctx, content)
    return status, body


async def chat_said(
    daemon, model: str, num_ctx: int | None, content: str = "Hi"
) -> tuple[int, dict, str | None]:
    """The status, the body and what the answer says of its context (``CONTEXT_HEADER``)."""
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
        body = json.loads(await response.text())
        return response.status, body, response.headers.get(CONTEXT_HEADER)


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
    asked = RunnerOptions(context_length=limits.MAX_CONTEXT_LENGTH, max_parallel=slots)
    with pytest.raises(OutOfMemoryError) as refused:
        context_length(model, asked)
    assert str(limits.MAX_CONTEXT_LENGTH) in refused.value.message and "GB" in refused.value.message


def test_the_kv_cache_is_sized_from_the_imported_metadata(tiny_store):
    model = open_model(tiny_store, "tiny:gguf")
    # 2 (K and V) x 2 layers x 2 KV heads x 16 head dims x 2 bytes (llama.cpp's f16 cache)
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 2
    # The MLX folder's cache has the model's dtype: float32
    assert kv_bytes_per_token(open_model(tiny_store, "tiny:mlx")) == 2 * 2 * 2 * 16 * 4
    assert context_length(model, RunnerOptions()) == TRAINED
    assert context_length(model, RunnerOptions(context_length=300)) == 300


def budget_for(model, context: int) -> int:
    """A memory budget that holds ``model``'s weights and the KV cache of one ``context``."""
    return int((model.size_bytes + kv_bytes_per_token(model) * context) * MEMORY_HEADROOM) + 1


def test_a_requested_context_over_the_memory_budget_is_clamped_to_what_fits(tiny_store):
    model = open_model(tiny_store, "tiny:gguf")
    budget = budget_for(model, 1000)
    asked = RunnerOptions(context_length=1536, memory_budget_bytes=budget)
    assert context_length(model, asked) == 1000 // CONTEXT_STEP * CONTEXT_STEP
    two_slots = RunnerOptions(context_length=1536, memory_budget_bytes=budget, max_parallel=2)
    assert context_length(model, two_slots) == 500 // CONTEXT_STEP * CONTEXT_STEP
    fits = RunnerOptions(context_length=512, memory_budget_bytes=budget)
    assert context_length(model, fits) == 512


def test_weights_that_leave_no_room_for_a_short_context_are_refused(tiny_store):
    model = open_model(tiny_store, "tiny:gguf")
    asked = RunnerOptions(
        context_length=1536, memory_budget_bytes=budget_for(model, CONTEXT_STEP - 1)
    )
    with pytest.raises(OutOfMemoryError) as refused:
        context_length(model, asked)
    assert "1536" in refused.value.message and "GB" in refused.value.message


LOADED_CONTEXT = 1024
"""What ``memory_daemon``'s budget holds of ``tiny:gguf``'s KV cache beside its weights."""


@pytest.fixture(scope="module")
def memory_daemon(tiny_models, tmp_path_factory: pytest.TempPathFactory):
    """A daemon whose memory budget holds ``tiny:gguf`` with ``LOADED_CONTEXT`` tokens, less
    than its trained context."""
    store = populated_store(tmp_path_factory.mktemp("budget") / "home", tiny_models)
    budget = budget_for(open_model(store, "tiny:gguf"), LOADED_CONTEXT + CONTEXT_STEP // 2)
    running = Daemon(store.root, env={"MLXSERVE_MEMORY_BUDGET_BYTES": str(budget)}).start()
    yield running
    running.stop()


def loads(daemon, model: str) -> int:
    return len(re.findall(rf"started worker \d+ for {re.escape(model)} ", daemon.log()))


async def test_num_ctx_over_the_memory_is_clamped_and_said_and_loaded_once(memory_daemon):
    """aider asks the same too-large ``num_ctx`` on every request: the model is loaded once,
    with what fits, and each answer says so."""
    for _ in range(2):
        status, body, said = await chat_said(memory_daemon, "tiny:gguf", 1536)
        assert status == 200, body
        assert said == f"{LOADED_CONTEXT}; requested=1536"
    status, body, said = await chat_said(memory_daemon, "tiny:gguf", TRAINED * 4)
    assert status == 200, body
    assert said == f"{LOADED_CONTEXT}; requested={TRAINED * 4}"
    assert await loaded_context(memory_daemon, "tiny:gguf") == LOADED_CONTEXT
    assert loads(memory_daemon, "tiny:gguf") == 1, memory_daemon.log()
    assert "the memory budget is" in memory_daemon.log()


async def test_a_prompt_over_the_clamped_context_is_refused_as_an_overflow(memory_daemon):
    status, body, _ = await chat_said(memory_daemon, "tiny:gguf", 1536, "word " * 1200)
    assert status == 400 and body["code"] == "context_overflow", body
    assert str(LOADED_CONTEXT) in body["error"]


async def test_a_num_ctx_that_fits_is_said_without_a_request(daemon):
    status, body, said = await chat_said(daemon, "tiny:gguf", 512)
    assert status == 200, body
    assert said == "512"


async def test_a_load_request_says_the_context_it_loaded(memory_daemon):
    """Ollama's load request (no messages) with a too-large ``num_ctx``: loaded with what
    fits, and said so."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{memory_daemon.url}/api/chat",
            json={"model": "tiny:gguf", "messages": [], "options": {"num_ctx": 1536}},
        ) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers[CONTEXT_HEADER] == f"{LOADED_CONTEXT}; requested=1536"
