"""The prompt cache's disk tier on the MLX runner (mlx-lm's saved prompt caches), on the tiny
random-weight fixture: a reloaded model reuses a prompt with the answer of a cold run, a prompt
diverging inside block N reuses the whole blocks before it, and a damaged entry is a miss."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from mlxserve.runners.base import GenerateChunk, GenerateRequest, RunnerOptions
from mlxserve.runners.mlx.runner import MlxRunner
from mlxserve.runners.promptcache import BLOCK_TOKENS, read_header
from modelstore.runtime import open_model
from modelstore.store import ModelStore

ANSWER_TOKENS = 8
FIRST_ID = 10
"""Ids below are the fixture tokenizer's special tokens."""


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory) -> ModelStore:
    from modelstore.importer import import_path

    store = ModelStore(tmp_path_factory.mktemp("prompt-cache-mlx") / "home")
    import_path(store, tiny_models.hf_folder, "tiny:mlx")
    return store


@pytest.fixture(scope="module")
def prompt(tiny_models) -> list[int]:
    vocab = json.loads((tiny_models.hf_folder / "config.json").read_text())["vocab_size"]
    rng = random.Random(7)
    return [rng.randrange(FIRST_ID, vocab) for _ in range(3 * BLOCK_TOKENS + 20)]


async def answer(store: ModelStore, prompt: list[int]) -> tuple[list[int], int, dict]:
    """A fresh runner's greedy tokens, its cached prompt tokens and its cache stats."""
    runner = MlxRunner()
    await runner.load(
        open_model(store, "tiny:mlx"),
        RunnerOptions(
            max_parallel=2,
            context_length=512,
            prompt_cache_dir=str(store.prompt_cache_dir),
            prompt_cache_disk_bytes=1 << 30,
        ),
    )
    tokens: list[int] = []
    last = GenerateChunk()
    try:
        request = GenerateRequest(prompt_tokens=prompt, temperature=0.0, max_tokens=ANSWER_TOKENS)
        async for chunk in runner.generate(request):
            tokens += chunk.token_ids
            last = chunk
        stats = runner.describe().details["prompt_cache"]
    finally:
        await runner.unload()
    assert last.stats is not None
    return tokens, last.stats.cached_prompt_tokens, stats


@pytest.fixture(scope="module")
async def cold(store, prompt) -> list[int]:
    shutil.rmtree(store.prompt_cache_dir, ignore_errors=True)
    tokens, cached, _ = await answer(store, prompt)
    assert cached == 0
    return tokens


async def test_a_reloaded_mlx_model_reuses_the_prompt_from_disk_with_the_same_answer(
    store, prompt, cold
):
    tokens, cached, stats = await answer(store, prompt)
    assert (tokens, cached) == (cold, len(prompt) - 1)
    assert stats["disk"]["hits"] == 1


async def test_an_mlx_prompt_diverging_inside_block_3_reuses_up_to_the_change(store, prompt, cold):
    changed = list(prompt)
    position = 2 * BLOCK_TOKENS + 5
    changed[position] = FIRST_ID if changed[position] != FIRST_ID else FIRST_ID + 1
    _, cached, _ = await answer(store, changed)
    assert cached == position


async def test_a_flipped_mlx_entry_is_a_miss_that_is_removed(store, prompt, cold):
    await answer(store, prompt)  # its entry is on disk
    others = [p for p in store.prompt_cache_dir.glob("*/*/*.kv") if not holds(p, prompt)]
    for other in others:  # an entry sharing blocks with the prompt would be found next
        other.unlink()
    [path] = list(store.prompt_cache_dir.glob("*/*/*.kv"))
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    path.write_bytes(bytes(data))
    tokens, cached, stats = await answer(store, prompt)
    assert (tokens, cached) == (cold, 0)
    assert stats["rejected"] == 1


def holds(path: Path, prompt: list[int]) -> bool:
    with path.open("rb") as handle:
        return read_header(handle, path.stat().st_size)["tokens"][: len(prompt)] == prompt
