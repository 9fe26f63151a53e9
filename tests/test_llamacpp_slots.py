"""Parallel slots on the llama.cpp runner, on the real default model (SmolLM2-135M Q4_1).

Concurrent requests share one ``llama_decode`` per step; what each one gets must not depend on
what else is in the batch, and a request that leaves must free its slot at once.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from mlxserve import platform
from mlxserve.errors import OutOfMemoryError
from mlxserve.runners.base import GenerateChunk, GenerateRequest, RunnerOptions
from mlxserve.runners.llamacpp.runner import LlamaCppRunner
from mlxserve.runners.loading import DEFAULT_PARALLEL, parallel_slots
from modelstore.runtime import open_model

SLOTS = 4
SLOT_CONTEXT = 512
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The sea is"]


@pytest.fixture(scope="module")
async def runner(default_gguf, tmp_path_factory):
    from modelstore.importer import import_path
    from modelstore.store import ModelStore

    store = ModelStore(tmp_path_factory.mktemp("slots"))
    import_path(store, default_gguf, "smol:slots")
    loaded = LlamaCppRunner()
    await loaded.load(
        open_model(store, "smol:slots"),
        RunnerOptions(max_parallel=SLOTS, context_length=SLOT_CONTEXT),
    )
    yield loaded
    await loaded.unload()


def request(prompt: str, **overrides) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, **{"temperature": 0.0, "max_tokens": 16, **overrides})


async def timed(runner: LlamaCppRunner, req: GenerateRequest) -> list[tuple[float, GenerateChunk]]:
    return [(time.monotonic(), chunk) async for chunk in runner.generate(req)]


def tokens_of(chunks: list[tuple[float, GenerateChunk]]) -> list[int]:
    return [token for _, chunk in chunks for token in chunk.token_ids]


def text_of(chunks: list[tuple[float, GenerateChunk]]) -> str:
    return "".join(chunk.text for _, chunk in chunks)


def overlapped(a: list[tuple[float, GenerateChunk]], b: list[tuple[float, GenerateChunk]]) -> bool:
    """Each stream's first token came before the other's last: they decoded together."""
    return a[0][0] < b[-1][0] and b[0][0] < a[-1][0]


async def test_the_runner_serves_as_many_sequences_as_it_has_slots(runner):
    info = runner.describe()
    assert runner.max_parallel == info.max_parallel == SLOTS
    assert info.context_length == SLOT_CONTEXT
    assert info.memory_bytes > info.details["kv_cache_bytes"] > 0


async def test_concurrent_greedy_requests_get_exactly_their_tokens_alone(runner):
    alone = [tokens_of(await timed(runner, request(p))) for p in PROMPTS]
    together = await asyncio.gather(*(timed(runner, request(p)) for p in PROMPTS))
    assert [tokens_of(chunks) for chunks in together] == alone
    assert all(overlapped(together[0], other) for other in together[1:])


async def test_a_seed_gives_the_same_tokens_alone_or_in_a_batch(runner):
    def seeded(prompt: str, seed: int) -> GenerateRequest:
        return request(prompt, temperature=1.0, seed=seed, max_tokens=20)

    alone = tokens_of(await timed(runner, seeded(PROMPTS[1], 7)))
    together = await asyncio.gather(
        *(timed(runner, seeded(p, 7 if i == 1 else 100 + i)) for i, p in enumerate(PROMPTS))
    )
    assert tokens_of(together[1]) == alone


async def test_a_cancelled_sequence_frees_its_slot_while_the_others_continue(runner):
    """All four slots busy; the late request can only start in the one the cancel freed."""
    keep = [request(p, max_tokens=24) for p in PROMPTS[1:]]
    alone = [tokens_of(await timed(runner, req)) for req in keep]
    keep = [request(p, max_tokens=24) for p in PROMPTS[1:]]
    doomed = request(PROMPTS[0], max_tokens=400)
    seen = 0

    def cancel_at_fourth_token(_tokens, logits):
        nonlocal seen
        seen += 1
        if seen == 4:
            doomed.cancel.cancel()
        return logits

    doomed.logits_processors.append(cancel_at_fourth_token)
    others = [asyncio.create_task(timed(runner, req)) for req in keep]
    cancelled = await timed(runner, doomed)
    assert cancelled[-1][1].done_reason == "cancelled"
    late = await timed(runner, request(PROMPTS[0], max_tokens=2))
    results = await asyncio.gather(*others)
    assert late[-1][1].done_reason == "length"
    assert all(len(tokens) == 24 for tokens in alone)
    assert late[-1][0] < min(chunks[-1][0] for chunks in results)
    assert [tokens_of(chunks) for chunks in results] == alone


async def test_a_grammar_constrained_request_and_a_free_one_share_a_batch(runner):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    free_alone = tokens_of(await timed(runner, request(PROMPTS[1], max_tokens=24)))
    constrained = request(
        "Answer in JSON. What is the capital of France?",
        max_tokens=30,
        response_format={"type": "json_schema", "schema": schema},
    )
    shaped, free = await asyncio.gather(
        timed(runner, constrained), timed(runner, request(PROMPTS[1], max_tokens=24))
    )
    answer = json.loads(text_of(shaped))
    assert set(answer) == {"city"} and isinstance(answer["city"], str)
    assert shaped[-1][1].done_reason == "stop"
    assert tokens_of(free) == free_alone
    assert overlapped(shaped, free)


async def test_a_follow_up_lands_in_the_slot_holding_its_prefix(runner):
    stories = [f"Story {n}: in a small village by the river there lived" for n in range(SLOTS)]
    await asyncio.gather(*(timed(runner, request(story, max_tokens=4)) for story in stories))
    first = await timed(runner, request(stories[2] + " a baker who", max_tokens=2))
    prompt_tokens = len(runner.tokenize(stories[2]))
    assert first[-1][1].stats.cached_prompt_tokens >= prompt_tokens


def test_memory_admission_counts_the_kv_cache_of_every_slot():
    gib = 1 << 30
    memory = platform.total_memory_bytes()
    with pytest.raises(OutOfMemoryError):
        parallel_slots("big", 64, gib, 4 * gib, memory)
    assert parallel_slots("small", None, 1 << 20, 1 << 20, memory) == DEFAULT_PARALLEL
    quarter = memory // 4
    assert parallel_slots("wide", None, 1 << 20, quarter, memory) == 1
