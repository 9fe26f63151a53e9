"""Our runners against their bare libraries, and the prompt cache's effect on a follow-up turn.

Prints JSON. Each comparison alternates the two sides in one run (the machine is shared and
noisy, so ratios from one run mean more than absolute numbers across runs).

    python -m bench.runner_overhead [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.common import MODEL, bench_store, emit, median
from mlxserve import platform
from mlxserve.chat.model import LoadedModel
from modelstore.runtime import open_model
from tests.chat_helpers import chat_prompt, chat_request, raw_request

QUESTION = "Write a short story about a robot who learns to paint."
SYSTEM = (
    "You are a careful assistant. " * 40
    + "Answer in plain English, with short sentences, and never use lists."
)


async def ours_tokens_per_second(loaded: LoadedModel, prompt: list[int], tokens: int) -> float:
    request = raw_request(loaded, "", {"temperature": 0.0, "max_tokens": tokens})
    request.prompt_tokens = prompt
    request.logit_bias = {}
    final = None
    async for chunk in loaded.generate(request):
        final = chunk
    stats = final.stats
    return (stats.eval_count - 1) / ((stats.eval_duration) / 1e9)


def bare_mlx_tokens_per_second(model: Any, tokenizer: Any, prompt: list[int], tokens: int) -> float:
    from mlx_lm import stream_generate

    first = None
    count = 0
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
        count += 1
        if first is None:
            first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - first)


def bare_llama_tokens_per_second(llama: Any, prompt: list[int], tokens: int) -> float:
    llama.reset()
    first = None
    count = 0
    for _ in llama.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count == tokens:
            break
    return (count - 1) / (time.perf_counter() - first)


async def follow_up_ttft(loaded: LoadedModel, fresh: bool) -> tuple[float, int]:
    """Time to first token of turn 2 of a conversation, with turn 1's cache or without."""
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    first = chat_request(loaded, turn1, {"temperature": 0.0, "max_tokens": 16})
    answer = "".join([c.text async for c in loaded.generate(first)])
    if fresh:
        await reset_caches(loaded)
    turn2 = [
        *turn1,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Now make it sadder."},
    ]
    request = chat_request(loaded, turn2, {"temperature": 0.0, "max_tokens": 1})
    final = [c async for c in loaded.generate(request)][-1]
    await reset_caches(loaded)
    return final.stats.time_to_first_token / 1e6, final.stats.cached_prompt_tokens


async def reset_caches(loaded: LoadedModel) -> None:
    runner: Any = loaded.runner
    if loaded.info.runner == "mlx":
        await runner._engine.call(lambda: runner._prompt_cache.trim_to(n_sequences=0))
    else:
        await runner._engine.call(runner._slots.forget_prefixes)


async def measure(runner_name: str, tokens: int, rounds: int) -> dict[str, Any]:
    store = bench_store()
    loaded = await LoadedModel.load(store, MODEL, runner_name)
    prompt = loaded.runner.tokenize(
        chat_prompt(loaded, [{"role": "user", "content": QUESTION}]), False
    )
    ours, bare = [], []
    if runner_name == "mlx":
        from mlx_lm import load

        from mlxserve.runners.mlx.runner import derived_folder

        folder = derived_folder(open_model(store, MODEL), platform.mlx_dequantize_weights())
        model, tokenizer = load(str(folder))
        if platform.mlx_dequantize_weights():
            from mlx_lm.utils import dequantize_model

            model = dequantize_model(model)
        for _ in range(rounds):
            await reset_caches(loaded)
            ours.append(await ours_tokens_per_second(loaded, prompt, tokens))
            bare.append(bare_mlx_tokens_per_second(model, tokenizer, prompt, tokens))
    else:
        from mlxserve.runners.llamacpp.library import import_llama_cpp

        local = open_model(store, MODEL)
        llama = import_llama_cpp().Llama(
            str(local.weights[0]),
            n_ctx=loaded.info.context_length,
            n_threads=platform.default_threads(),
            verbose=False,
        )
        for _ in range(rounds):
            await reset_caches(loaded)
            ours.append(await ours_tokens_per_second(loaded, prompt, tokens))
            bare.append(bare_llama_tokens_per_second(llama, prompt, tokens))
    cold, warm = [], []
    cached_tokens = 0
    for _ in range(rounds):
        cold.append((await follow_up_ttft(loaded, fresh=True))[0])
        ttft, cached_tokens = await follow_up_ttft(loaded, fresh=False)
        warm.append(ttft)
    await loaded.unload()
    ours_tps, bare_tps = median(ours), median(bare)
    return {
        "runner": runner_name,
        "model": MODEL,
        "decode_tokens": tokens,
        "ours_tokens_per_s": round(ours_tps, 2),
        "bare_library_tokens_per_s": round(bare_tps, 2),
        "overhead_percent": round(100 * (bare_tps - ours_tps) / bare_tps, 2),
        "follow_up_ttft_ms_without_cache": round(median(cold), 1),
        "follow_up_ttft_ms_with_cache": round(median(warm), 1),
        "follow_up_cached_prompt_tokens": cached_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runner", choices=["mlx", "llamacpp"], action="append")
    args = parser.parse_args()
    results = [
        asyncio.run(measure(name, args.tokens, args.rounds))
        for name in (args.runner or ["llamacpp", "mlx"])
    ]
    emit({"benchmark": "runner_overhead", "results": results})


if __name__ == "__main__":
    main()
