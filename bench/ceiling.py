"""How much of what the library can do reaches the client: the daemon's tokens/s as a fraction
of bare llama.cpp (``llama_decode`` over k sequences) and bare mlx-lm (``stream_generate``).

Prints JSON. In one process tree, interleaved round by round so that drift in this shared
machine's speed lands on both sides alike:

- llama.cpp: bare decode steps at k = 1, 4, 8 sequences (``bench.llamacpp_batch``: no sampling,
  no Python per token beyond filling the batch) against the daemon at 1, 4, 8 streaming clients
  on the same GGUF, threads and slot context. The daemon's figure is its decode rate: tokens after
  each client's first, over the time from the first first-token to the last end (prefill is not
  in the bare figure either).
- MLX: bare ``stream_generate`` on the default model converted to MLX against the daemon's one
  client on the same folder.
- A per-token profile of the llama.cpp runner in-process (cProfile over one generation), the
  microseconds per token of each stage: the library's decode, sampling, detokenizing and the
  text state machine, and the rest.

    python -m bench.ceiling [--tokens 64] [--clients 1 4 8] [--rounds 2] [--runner all|llamacpp|mlx]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import MODEL, bench_store, counting_stream, emit
from bench.llamacpp_batch import decode_steps
from bench.load import MLX_MODEL, QUESTION, client_question, mlx_copy
from mlxserve import platform
from mlxserve.chat.model import LoadedModel
from mlxserve.runners.llamacpp.library import import_llama_cpp
from modelstore.runtime import open_model
from tests.chat_helpers import chat_request
from tests.daemon import Daemon

PROFILE_STAGES = {
    "llama_decode": (("llamacpp/slots.py", "step"),),
    "sampling": (
        ("llamacpp/slots.py", "_sample"),
        ("llamacpp/slots.py", "_logprob"),
        ("decode.py", ""),
    ),
    "detokenize": (
        ("llamacpp/slots.py", "_piece"),
        ("llamacpp/slots.py", "_token_bytes"),
        ("textstream.py", "ByteDetokenizer"),
    ),
    "stop_strings": (("textstream.py", "StopStringFilter"), ("textstream.py", "TextStream")),
    "tool_and_think_parsing": (("chat/output.py", ""), ("mlx_lm/generate.py", "")),
}
"""Which functions' own time counts for which stage, by (file, a part of the function's name):
a coarse map (``step`` holds the ``llama_decode`` call and the batch it fills; ctypes calls are
not functions to a profiler, so their time lands in their caller). The rest of the wall time,
``other``, is the engine thread's loop, the chat core, asyncio and the waits between them."""


def process_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user and system) used so far by a daemon (``daemon``) and its children, its
    runner workers (``worker``), read from ``/proc``; empty where there is none. CPU time per
    token barely moves with load from elsewhere, unlike wall time."""
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    used = {"daemon": 0.0, "worker": 0.0}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        if int(stat.parent.name) == pid:
            used["daemon"] += seconds
        elif int(fields[1]) == pid:
            used["worker"] += seconds
    return used


async def daemon_decode_rate(url: str, model: str, clients: int, tokens: int) -> float:
    """Aggregate decode tokens/s of ``clients`` concurrent streams, each with its own prompt."""
    return (await daemon_decode(url, model, clients, tokens))["rate"]


async def daemon_decode(
    url: str, model: str, clients: int, tokens: int, pid: int | None = None
) -> dict[str, Any]:
    """``daemon_decode_rate``'s figure and the median time to first token; with the daemon's
    ``pid``, also the CPU milliseconds per generated token of the daemon, its worker and this
    process (the load generator), each side's own cost whatever the machine's load."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        await counting_stream(session, url, model, 2, QUESTION)
        before = process_cpu_s(pid) if pid is not None else {}
        own = time.process_time()
        runs = await asyncio.gather(
            *(
                counting_stream(session, url, model, tokens, client_question(index))
                for index in range(clients)
            )
        )
        own = time.process_time() - own
        after = process_cpu_s(pid) if pid is not None else {}
    decoded = sum(max(run["tokens"] - 1, 0) for run in runs)
    span = max(run["ended_at"] for run in runs) - min(run["first_at"] for run in runs)
    generated = max(sum(run["tokens"] for run in runs), 1)
    cpu = {side: (after[side] - before[side]) * 1000 / generated for side in after}
    cpu["load_generator"] = own * 1000 / generated
    return {
        "rate": decoded / span if span > 0 else 0.0,
        "ttft_s": statistics.median(run["ttft_s"] for run in runs),
        "cpu_ms_per_token": cpu,
    }


def bare_llama_rates(
    llama_cpp: Any, path: str, counts: list[int], steps: int, threads: int
) -> dict[int, float]:
    from llama_cpp import _internals

    model = _internals.LlamaModel(
        path_model=path, params=_internals.LlamaModel.default_params(), verbose=False
    )
    try:
        return {k: k / decode_steps(llama_cpp, model, k, steps, threads) for k in counts}
    finally:
        model.close()


async def llamacpp_ceiling(
    store: Any, tokens: int, counts: list[int], rounds: int
) -> dict[str, Any]:
    llama_cpp = platform.make_llama_cpp_safe(import_llama_cpp())
    path = str(open_model(store, MODEL).weights[0])
    threads = platform.default_threads()
    bare: dict[int, list[float]] = {k: [] for k in counts}
    ours: dict[int, list[dict[str, Any]]] = {k: [] for k in counts}
    for _ in range(rounds):
        for k, rate in bare_llama_rates(llama_cpp, path, counts, tokens, threads).items():
            bare[k].append(rate)
        flags = ["--num-parallel", str(max(counts)), "--max-queue", "64"]
        daemon = Daemon(store.root, flags).start()
        assert daemon.process is not None
        try:
            for k in counts:
                ours[k].append(
                    await daemon_decode(daemon.url, MODEL, k, tokens, daemon.process.pid)
                )
        finally:
            daemon.stop()
    clients = []
    for k in counts:
        rate = statistics.median(run["rate"] for run in ours[k])
        clients.append(
            {
                "k": k,
                "bare_tokens_per_s": round(statistics.median(bare[k]), 1),
                "daemon_tokens_per_s": round(rate, 1),
                "fraction": round(rate / statistics.median(bare[k]), 3),
                "daemon_ttft_s": round(statistics.median(run["ttft_s"] for run in ours[k]), 3),
                "cpu_ms_per_token": cpu_medians(ours[k]),
            }
        )
    return {
        "threads": threads,
        "flash_attention": platform.llama_cpp_flash_attention(),
        "clients": clients,
    }


def cpu_medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each process's CPU milliseconds per token, the median over rounds."""
    sides = runs[0]["cpu_ms_per_token"]
    return {
        side: round(statistics.median(run["cpu_ms_per_token"][side] for run in runs), 3)
        for side in sides
    }


async def daemon_threads(
    store: Any, tokens: int, counts: list[int], rounds: int, thread_counts: list[int]
) -> dict[str, Any]:
    """The daemon's decode rate with llama.cpp on each of ``thread_counts`` threads
    (``num_thread``, a model made with ``/api/create`` per count), interleaved round by round
    in one daemon: whether leaving a core to the daemon's own threads pays at k clients."""
    from bench.load import with_threads

    models = {n: await with_threads(store, n) for n in thread_counts}
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {
        (n, k): [] for n in thread_counts for k in counts
    }
    flags = ["--num-parallel", str(max(counts)), "--max-queue", "64"]
    daemon = Daemon(store.root, flags).start()
    assert daemon.process is not None
    try:
        for _ in range(rounds):
            for n, model in models.items():
                for k in counts:
                    measured = await daemon_decode(daemon.url, model, k, tokens, daemon.process.pid)
                    runs[n, k].append(measured)
    finally:
        daemon.stop()
    result: dict[str, Any] = {}
    for k in counts:
        rates = {n: statistics.median(r["rate"] for r in runs[n, k]) for n in thread_counts}
        result[f"{k}_clients"] = {
            "tokens_per_s": {str(n): round(rate, 1) for n, rate in rates.items()},
            "ttft_s": {
                str(n): round(statistics.median(r["ttft_s"] for r in runs[n, k]), 3)
                for n in thread_counts
            },
            "cpu_ms_per_token": {str(n): cpu_medians(runs[n, k]) for n in thread_counts},
            f"over_{thread_counts[0]}_threads": {
                str(n): round(rate / rates[thread_counts[0]], 3) for n, rate in rates.items()
            },
        }
    return result


def bare_mlx_rate(folder: str, tokens: int) -> float:
    from mlx_lm import load, stream_generate

    model, tokenizer = load(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )
    first = None
    count = 0
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
        count += 1
        first = first or time.perf_counter()
    return (count - 1) / (time.perf_counter() - first)


async def mlx_ceiling(store: Any, tokens: int, rounds: int) -> dict[str, Any]:
    folder = str(mlx_copy(store))
    bare: list[float] = []
    ours: list[float] = []
    for _ in range(rounds):
        bare.append(bare_mlx_rate(folder, tokens))
        daemon = Daemon(store.root, []).start()
        try:
            ours.append(await daemon_decode_rate(daemon.url, MLX_MODEL, 1, tokens))
        finally:
            daemon.stop()
    return {
        "bare_tokens_per_s": round(statistics.median(bare), 2),
        "daemon_tokens_per_s": round(statistics.median(ours), 2),
        "fraction": round(statistics.median(ours) / statistics.median(bare), 3),
    }


def stage_of(module: str, name: str) -> str | None:
    for stage, places in PROFILE_STAGES.items():
        if any(module.endswith(file) and part in name for file, part in places):
            return stage
    return None


async def per_token_profile(store: Any, tokens: int) -> dict[str, Any]:
    """Microseconds per generated token of each stage, the llama.cpp runner in-process, every
    thread profiled (the slot engine decodes on a thread of its own) by wall clock."""
    import yappi

    loaded = await LoadedModel.load(store, MODEL, "llamacpp")
    try:
        messages = [{"role": "user", "content": QUESTION}]
        options = {"temperature": 0.0, "max_tokens": tokens}
        async for _ in loaded.generate(chat_request(loaded, messages, {"max_tokens": 2})):
            pass
        yappi.set_clock_type("wall")
        final = None
        started = time.perf_counter()
        yappi.start()
        async for chunk in loaded.generate(chat_request(loaded, messages, options)):
            final = chunk
        yappi.stop()
        wall = time.perf_counter() - started
    finally:
        await loaded.unload()
    count = max(final.stats.eval_count, 1) if final is not None else 1
    stages = dict.fromkeys(PROFILE_STAGES, 0.0)
    for entry in yappi.get_func_stats():
        stage = stage_of(entry.module, entry.name)
        if stage is not None:
            stages[stage] += entry.tsub
    yappi.clear_stats()
    per_token = {s: round(v / count * 1e6, 1) for s, v in stages.items()}
    per_token["other"] = round(wall / count * 1e6 - sum(per_token.values()), 1)
    return {
        "tokens": count,
        "wall_us_per_token": round(wall / count * 1e6, 1),
        "stage_us_per_token": per_token,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    store = bench_store()
    result: dict[str, Any] = {
        "bench": "ceiling",
        "tokens": args.tokens,
        "load_average": os.getloadavg(),
    }
    if args.runner in ("all", "llamacpp"):
        result["llamacpp"] = await llamacpp_ceiling(store, args.tokens, args.clients, args.rounds)
        result["llamacpp_profile"] = await per_token_profile(store, args.tokens)
    if args.threads_compare:
        result["llamacpp_threads"] = await daemon_threads(
            store, args.tokens, args.clients, args.rounds, args.threads_compare
        )
    if args.runner in ("all", "mlx"):
        result["mlx"] = await mlx_ceiling(store, args.tokens, args.rounds)
    result["load_average_after"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runner", choices=["all", "llamacpp", "mlx", "none"], default="all")
    parser.add_argument(
        "--threads-compare",
        type=int,
        nargs="+",
        help="also the daemon alone with llama.cpp on each of these thread counts",
    )
    emit(asyncio.run(measure(parser.parse_args())))


if __name__ == "__main__":
    main()
