"""Shaping a model at load: KV cache bytes per 1k tokens per ``kv_cache_type`` (both runners),
and MLX tokens/s with and without a draft model (speculative decoding).

MLX uses the tiny fixture family (``tests/fixtures/tiny_models.py``): its wide-head variant
(heads of 32 values can be quantized) for the KV cache, and its one-layer draft for speculative
decoding; llama.cpp uses the embedded default model, for the KV cache and for prompt-lookup
decoding on a prompt whose answer repeats it. Prints one JSON document.

    .venv/bin/python -m bench.shape --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MODEL, bench_store, emit
from mlxserve.runners.base import GenerateRequest, RunnerOptions
from modelstore.importer import import_path
from modelstore.model import KV_CACHE_TYPES
from modelstore.runtime import open_model
from modelstore.spec import build_draft, load_spec
from modelstore.store import ModelStore
from tests.fixtures.tiny_models import (
    WIDE_HEADS,
    make_tiny_draft,
    make_tiny_hf_model,
    make_tiny_variant,
)

KV_PROMPT = "The capital of France is Paris. The capital of Italy is Rome. " * 8
PROMPTS = ["The capital of France is", "Once upon a time there was", "The cat sat on"]
PER = 1000


async def answer(runner: Any, prompt: str, tokens: int) -> tuple[int, int, float]:
    """(generated tokens, accepted draft tokens, seconds) for one greedy answer."""
    request = GenerateRequest(prompt=prompt, temperature=0.0, max_tokens=tokens)
    started = time.perf_counter()
    count = drafted = 0
    async for chunk in runner.generate(request):
        count += len(chunk.token_ids)
        if chunk.stats:
            drafted = chunk.stats.draft_tokens
    return count, drafted, time.perf_counter() - started


async def mlx_kv(store: ModelStore, tokens: int) -> dict[str, Any]:
    from mlxserve.runners.mlx.runner import MlxRunner

    result = {}
    for cache_type in KV_CACHE_TYPES:
        runner = MlxRunner()
        info = await runner.load(
            open_model(store, "wide:mlx"),
            RunnerOptions(kv_cache_type=cache_type, max_parallel=1),
        )
        held = len(runner.tokenize(KV_PROMPT)) + (await answer(runner, KV_PROMPT, tokens))[0]
        result[cache_type] = {
            "measured_bytes_per_1k_tokens": round(runner._prompt_cache.nbytes / held * PER),
            "estimated_bytes_per_1k_tokens": round(
                info.details["kv_cache_bytes"] / info.context_length * PER
            ),
        }
        await runner.unload()
    return result


async def llamacpp_kv(store: ModelStore, tokens: int) -> dict[str, Any]:
    import llama_cpp

    from mlxserve.runners.llamacpp.runner import LlamaCppRunner

    result = {}
    for cache_type in KV_CACHE_TYPES:
        runner = LlamaCppRunner()
        info = await runner.load(
            open_model(store, MODEL),
            RunnerOptions(kv_cache_type=cache_type, max_parallel=1, context_length=1024),
        )
        held = len(runner.tokenize(KV_PROMPT)) + (await answer(runner, KV_PROMPT, tokens))[0]
        measured = llama_cpp.llama_state_seq_get_size(runner._slots._context.ctx, 0)
        result[cache_type] = {
            "measured_bytes_per_1k_tokens": round(measured / held * PER),
            "estimated_bytes_per_1k_tokens": round(
                info.details["kv_cache_bytes"] / info.context_length * PER
            ),
        }
        await runner.unload()
    return result


async def speculative(store: ModelStore, tokens: int) -> dict[str, Any]:
    from mlxserve.runners.mlx.runner import MlxRunner

    result = {}
    for name in ("tiny:mlx", "tiny:drafted"):
        runner = MlxRunner()
        await runner.load(open_model(store, name), RunnerOptions())
        await answer(runner, PROMPTS[0], 4)  # warm-up: compile, allocate
        runs = [await answer(runner, prompt, tokens) for prompt in PROMPTS]
        await runner.unload()
        generated = sum(count for count, _, _ in runs)
        result[name] = {
            "tokens_per_second": round(generated / sum(seconds for _, _, seconds in runs), 1),
            "accepted_draft_fraction": round(sum(d for _, d, _ in runs) / generated, 3),
        }
    result["speedup"] = round(
        result["tiny:drafted"]["tokens_per_second"] / result["tiny:mlx"]["tokens_per_second"], 2
    )
    return result


LOOKUP_PROMPT = (
    "Copy the list exactly.\nList: red apple, green pear, yellow banana, purple plum, "
    "orange peach, white grape, black cherry, blue berry.\nCopy: red apple,"
)
"""Editing and RAG answers repeat their prompt: where prompt lookup pays."""


async def prompt_lookup(store: ModelStore, tokens: int) -> dict[str, Any]:
    from mlxserve.runners.llamacpp.runner import LlamaCppRunner

    result = {}
    for lookup in (None, 4):
        runner = LlamaCppRunner()
        await runner.load(
            open_model(store, MODEL),
            RunnerOptions(max_parallel=1, context_length=1024, num_draft_tokens=lookup),
        )
        await answer(runner, "Hello", 4)  # warm-up
        runs = [await answer(runner, LOOKUP_PROMPT, tokens) for _ in range(3)]
        await runner.unload()
        generated = sum(count for count, _, _ in runs)
        result[f"num_draft_tokens={lookup}"] = {
            "tokens_per_second": round(generated / sum(seconds for _, _, seconds in runs), 1),
            "accepted_draft_fraction": round(sum(d for _, d, _ in runs) / generated, 3),
        }
    values = list(result.values())
    result["speedup"] = round(values[1]["tokens_per_second"] / values[0]["tokens_per_second"], 2)
    return result


def tiny_store(root: Path) -> ModelStore:
    store = ModelStore(root / "store")
    base = make_tiny_hf_model(root / "tiny")
    import_path(store, base, "tiny:mlx")
    import_path(store, make_tiny_variant(root / "wide", base, WIDE_HEADS), "wide:mlx")
    import_path(store, make_tiny_draft(root / "draft", base), "tiny-draft:mlx")
    spec = root / "drafted.modelspec.json"
    spec.write_text(json.dumps({"from": "model://tiny:mlx", "draft": "tiny-draft:mlx"}))
    store.commit(build_draft(load_spec(spec), store), "tiny:drafted")
    return store


async def run(tokens: int) -> dict[str, Any]:
    tiny = tiny_store(Path(tempfile.mkdtemp(prefix="mlxserve-bench-shape-")))
    return {
        "bench": "shape",
        "tokens": tokens,
        "kv_cache": {
            "mlx (tiny, heads of 32)": await mlx_kv(tiny, tokens),
            f"llamacpp ({MODEL})": await llamacpp_kv(bench_store(), tokens),
        },
        "speculative_mlx": await speculative(tiny, tokens),
        "prompt_lookup_llamacpp": await prompt_lookup(bench_store(), tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    emit(asyncio.run(run(parser.parse_args().tokens)))


if __name__ == "__main__":
    main()
