"""How much of what the library can do reaches the client: the daemon's tokens/s as a fraction
of bare llama.cpp (``llama_decode`` over k sequences) and bare mlx-lm (``stream_generate``).

Prints JSON. In one process tree, interleaved round by round so that drift in this shared
machine's speed lands on both sides alike:

- llama.cpp: bare decode steps at k = 1, 4, 8 sequences (``bench.llamacpp_batch``: no sampling,
  no Python per token beyond filling the batch) against the daemon at 1, 4, 8 streaming clients
  on the same GGUF, threads and slot context. The daemon's figure is its decode rate while
  every client decodes (``decode_window_rate``: from the last first token to the first end;
  prefill is not in the bare figure either); ``burst_fraction`` is the older reading, every
  token after each client's first over the burst's whole span, which also holds the prefill
  of the clients that join while others decode.
- MLX: bare ``stream_generate`` on the default model converted to MLX against the daemon's one
  client on the same folder, and bare ``BatchGenerator`` over k sequences against the daemon at
  k clients; the CPU time per token at one client (bare process, daemon and worker).
- A per-token profile of the MLX runner in-process (``mlx_per_token_profile``, its own stages:
  mlx-lm's step, the batch's bookkeeping, sampling, detokenizing, stop strings, the runner and
  ``DecodeState``, the engine thread's hand-over, tool/think parsing) with its CPU per token
  against bare ``stream_generate``.
- A per-token profile of the llama.cpp runner in-process (cProfile over one generation), the
  microseconds per token of each stage: the library's decode, sampling, detokenizing and the
  text state machine, and the rest.
- The peers (``--phases ... peers``): the same streaming load (1, 4, 8 clients, a prompt of
  its own per client, greedy, the same max tokens, ``/v1/chat/completions``) against the
  peers on the same weights, interleaved with the daemon round by round: llama-cpp-python's
  server (``llama_cpp.server``, the same GGUF, threads and context as the daemon's slot; it
  serves one request at a time, so its clients queue) and ``mlx_lm.server`` (the same MLX
  folder, its decode and prompt concurrency set to the daemon's slots; it batches with
  ``BatchGenerator``). Per peer and client count: aggregate tokens/s (every client's tokens
  over the wall time of the burst), median time to first token, and the daemon / peer ratios.

    python -m bench.ceiling [--tokens 64] [--clients 1 4 8] [--rounds 2] [--runner all|llamacpp|mlx]
        [--phases ceiling profile peers]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.agent import LlamaCppServer, MlxLmServer, Server
from bench.common import MODEL, bench_store, counting_stream, emit
from bench.llamacpp_batch import decode_steps
from bench.load import (
    MLX_MODEL,
    QUESTION,
    client_question,
    concurrent,
    mlx_copy,
    process_tree_cpu_s,
    stream_chat,
)
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
        "rate": decode_window_rate(runs),
        "span_rate": decoded / span if span > 0 else 0.0,
        "ttft_s": statistics.median(run["ttft_s"] for run in runs),
        "cpu_ms_per_token": cpu,
    }


def decode_window_rate(runs: list[dict[str, Any]]) -> float:
    """Aggregate tokens/s while every client decodes: the tokens that arrive between the last
    client's first token and the first client's end, over that window. This is what the bare
    figure measures (decode steps over k sequences, their prompts already in); a burst's span
    from the first first token to the last end also holds the prefill of clients that join
    while others decode (one step over their prompts, during which no one decodes), which the
    bare loop never does (``span_rate``)."""
    start = max(run["first_at"] for run in runs)
    end = min(run["ended_at"] for run in runs)
    if end <= start:
        return 0.0
    tokens = sum(n for run in runs for at, n in run["arrivals"] if start < at <= end)
    return tokens / (end - start)


def bare_llama_rates(
    llama_cpp: Any, path: str, counts: list[int], steps: int, threads: int, slot_context: int
) -> dict[int, float]:
    from llama_cpp import _internals

    model = _internals.LlamaModel(
        path_model=path, params=_internals.LlamaModel.default_params(), verbose=False
    )
    try:
        return {
            k: k / decode_steps(llama_cpp, model, k, steps, threads, slot_context) for k in counts
        }
    finally:
        model.close()


async def daemon_slot_context(store: Any, flags: list[str]) -> int:
    """The context of each of the daemon's slots for the default model (a daemon started with
    ``flags`` loads it and says): the bare loop allocates as much per sequence."""
    daemon = Daemon(store.root, flags).start()
    try:
        await stream_chat_once(daemon.url, MODEL)
        return await daemon_context(daemon.url)
    finally:
        daemon.stop()


async def llamacpp_ceiling(
    store: Any, tokens: int, counts: list[int], rounds: int
) -> dict[str, Any]:
    llama_cpp = platform.make_llama_cpp_safe(import_llama_cpp())
    path = str(open_model(store, MODEL).weights[0])
    threads = platform.default_threads()
    bare: dict[int, list[float]] = {k: [] for k in counts}
    ours: dict[int, list[dict[str, Any]]] = {k: [] for k in counts}
    flags = ["--num-parallel", str(max(counts)), "--max-queue", "64"]
    context = await daemon_slot_context(store, flags)
    for _ in range(rounds):
        for k, rate in bare_llama_rates(llama_cpp, path, counts, tokens, threads, context).items():
            bare[k].append(rate)
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
        span_rate = statistics.median(run["span_rate"] for run in ours[k])
        clients.append(
            {
                "k": k,
                "bare_tokens_per_s": round(statistics.median(bare[k]), 1),
                "daemon_tokens_per_s": round(rate, 1),
                "fraction": round(rate / statistics.median(bare[k]), 3),
                "daemon_burst_tokens_per_s": round(span_rate, 1),
                "burst_fraction": round(span_rate / statistics.median(bare[k]), 3),
                "daemon_ttft_s": round(statistics.median(run["ttft_s"] for run in ours[k]), 3),
                "cpu_ms_per_token": cpu_medians(ours[k]),
            }
        )
    return {
        "threads": threads,
        "slot_context": context,
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


def bare_mlx_rates(folder: str, tokens: int, counts: list[int]) -> dict[str, Any]:
    """Bare mlx-lm on the daemon's prompts (``client_question``): ``stream_generate`` on one
    (its decode rate and the process's CPU seconds per token, prefill included) and
    ``BatchGenerator`` at every count (its aggregate decode rate)."""
    from mlx_lm import load, stream_generate

    model, tokenizer = load(folder)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": client_question(index)}], add_generation_prompt=True
        )
        for index in range(max(counts))
    ]
    first = None
    count = 0
    cpu = time.process_time()
    for _ in stream_generate(model, tokenizer, prompts[0], max_tokens=tokens):
        count += 1
        first = first or time.perf_counter()
    return {
        "stream_generate": (count - 1) / (time.perf_counter() - (first or 0.0)),
        "cpu_s_per_token": (time.process_time() - cpu) / max(count, 1),
        "batch_generator": {
            k: bare_batch_rate(model, prompts[:k], tokenizer.eos_token_ids, tokens) for k in counts
        },
    }


def bare_batch_rate(model: Any, prompts: list[list[int]], eos: Any, tokens: int) -> float:
    """``BatchGenerator`` over ``prompts`` together, greedy, stopping at EOS as the daemon
    does: tokens after each sequence's first over the time from the first first token to the
    last end. ``BatchGenerator`` prefills every prompt before the first token, so that span is
    the window in which all decode, which is what ``daemon_decode_rate`` reads of the daemon."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(
        model,
        stop_tokens=[[token] for token in eos],
        completion_batch_size=len(prompts),
        prefill_batch_size=len(prompts),
    )
    try:
        generator.insert(prompts, max_tokens=[tokens] * len(prompts))
        counts: dict[int, int] = {}
        first = None
        left = len(prompts)
        while left:
            for response in generator.next()[1]:
                first = first or time.perf_counter()
                counts[response.uid] = counts.get(response.uid, 0) + 1
                left -= response.finish_reason is not None
        span = time.perf_counter() - (first or 0.0)
    finally:
        generator.close()
    return sum(max(n - 1, 0) for n in counts.values()) / span


async def daemon_one_client(url: str, pid: int, tokens: int) -> tuple[float, float]:
    """One client's decode rate (as ``daemon_decode_rate``) and the CPU seconds per token the
    daemon and its worker spent on its request, prefill included (as the bare figure)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        await stream_chat(session, url, MLX_MODEL, 2)
        before = process_tree_cpu_s(pid) or 0.0
        run = await stream_chat(session, url, MLX_MODEL, tokens, client_question(0))
        after = process_tree_cpu_s(pid) or 0.0
    span = run["ended_at"] - run["first_at"]
    rate = (run["tokens"] - 1) / span if span > 0 else 0.0
    return rate, (after - before) / max(run["tokens"], 1)


async def mlx_ceiling(store: Any, tokens: int, counts: list[int], rounds: int) -> dict[str, Any]:
    """The MLX runner through the daemon against bare mlx-lm, interleaved by round: one client
    against ``stream_generate`` (the issue's goal: >= 0.9), k clients against
    ``BatchGenerator`` over k sequences; and the CPU per token at one client."""
    folder = str(mlx_copy(store))
    bare: dict[str, list[float]] = {"stream_generate": [], "cpu": []}
    batch: dict[int, list[float]] = {k: [] for k in counts}
    ours: dict[int, list[float]] = {k: [] for k in counts}
    ours_cpu: list[float] = []
    for _ in range(rounds):
        rates = bare_mlx_rates(folder, tokens, counts)
        bare["stream_generate"].append(rates["stream_generate"])
        bare["cpu"].append(rates["cpu_s_per_token"])
        for k, rate in rates["batch_generator"].items():
            batch[k].append(rate)
        daemon = Daemon(store.root, ["--num-parallel", str(max(counts))]).start()
        assert daemon.process is not None
        try:
            rate, cpu = await daemon_one_client(daemon.url, daemon.process.pid, tokens)
            ours_cpu.append(cpu)
            for k in counts:
                ours[k].append(
                    rate if k == 1 else await daemon_decode_rate(daemon.url, MLX_MODEL, k, tokens)
                )
        finally:
            daemon.stop()
    single = statistics.median(bare["stream_generate"])
    return {
        "bare_stream_generate_tokens_per_s": round(single, 2),
        "fraction_of_stream_generate_at_one_client": round(statistics.median(ours[1]) / single, 3)
        if 1 in ours
        else None,
        "fraction_per_round": [
            round(ours_rate / bare_rate, 3)
            for ours_rate, bare_rate in zip(ours.get(1, []), bare["stream_generate"], strict=False)
        ],
        "clients": [
            {
                "k": k,
                "bare_batch_generator_tokens_per_s": round(statistics.median(batch[k]), 2),
                "daemon_tokens_per_s": round(statistics.median(ours[k]), 2),
                "fraction_of_batch_generator": round(
                    statistics.median(ours[k]) / statistics.median(batch[k]), 3
                ),
            }
            for k in counts
        ],
        "cpu_ms_per_token_one_client": {
            "bare_stream_generate": round(statistics.median(bare["cpu"]) * 1e3, 2),
            "daemon_and_worker": round(statistics.median(ours_cpu) * 1e3, 2),
        },
    }


PEER_NAMES = {"llamacpp": "llama_cpp.server", "mlx": "mlx_lm.server"}
PEER_CONCURRENCY = {
    "llamacpp": "one request at a time (interrupt_requests off: the others wait)",
    "mlx": "continuous batching (BatchGenerator), decode and prompt concurrency = the slots",
}


async def daemon_context(url: str) -> int:
    """The context of the daemon's one loaded model (its slot's, on llama.cpp)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/api/ps") as response:
        models = (await response.json())["models"]
    return int(models[0]["context_length"])


async def burst(url: str, model: str, counts: list[int], tokens: int) -> dict[int, dict]:
    """The load at every client count on one server: aggregate tokens/s and median TTFT."""
    return {k: await concurrent(url, model, k, tokens, distinct=True) for k in counts}


async def peers_comparison(
    store: Any, runner: str, tokens: int, counts: list[int], rounds: int
) -> dict[str, Any]:
    """The daemon and the runner's peer in turn (which goes first alternates by round), each
    started fresh per round and measured at every client count."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-ceiling-"))
    parallel = max(counts)
    flags = ["--num-parallel", str(parallel), "--max-queue", "64"]
    peers: dict[str, Server]
    if runner == "mlx":
        folder = mlx_copy(store)
        model = MLX_MODEL
        peers = {"peer": MlxLmServer(folder, folder, parallel)}
        if platform.use_cpu_blas():  # the daemon's BLAS, given to the peer too
            peers["peer_same_blas"] = MlxLmServer(folder, folder, parallel, platform.use_cpu_blas())
        context = None
    else:
        model = MODEL
        context = await daemon_slot_context(store, flags)
        peers = {
            "peer": LlamaCppServer(
                open_model(store, MODEL).weights[0], scratch, sys.executable, context
            )
        }
    sides = ("daemon", *peers)
    runs: dict[str, dict[int, list[dict]]] = {side: {k: [] for k in counts} for side in sides}
    try:
        for number in range(rounds):
            for side in sides if number % 2 == 0 else sides[::-1]:
                if side == "daemon":
                    daemon = Daemon(store.root, flags).start()
                    try:
                        measured = await burst(daemon.url, model, counts, tokens)
                    finally:
                        daemon.stop()
                else:
                    peer = peers[side]
                    peer.start()
                    try:
                        measured = await burst(peer.url, peer.agent, counts, tokens)
                    finally:
                        peer.stop()
                for k, result in measured.items():
                    runs[side][k].append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "peer": PEER_NAMES[runner],
        "concurrency": PEER_CONCURRENCY[runner],
        "context": context,
        "cpu_blas": platform.cpu_blas() if runner == "mlx" else None,
        "clients": [peer_row(k, runs["daemon"][k], runs["peer"][k]) for k in counts],
        **{
            f"clients_against_{side}": [
                peer_row(k, runs["daemon"][k], runs[side][k]) for k in counts
            ]
            for side in peers
            if side != "peer"
        },
    }


async def stream_chat_once(url: str, model: str) -> None:
    """One short request: the daemon loads the model (and reports its context after)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        await stream_chat(session, url, model, 2)


def peer_row(k: int, ours: list[dict], theirs: list[dict]) -> dict[str, Any]:
    """Medians over the rounds of one client count, and the daemon / peer ratios."""
    rate = statistics.median(r["aggregate_tokens_per_s"] for r in ours)
    peer_rate = statistics.median(r["aggregate_tokens_per_s"] for r in theirs)
    ttft = statistics.median(r["median_ttft_s"] for r in ours)
    peer_ttft = statistics.median(r["median_ttft_s"] for r in theirs)
    return {
        "k": k,
        "daemon_tokens_per_s": round(rate, 2),
        "peer_tokens_per_s": round(peer_rate, 2),
        "daemon_over_peer_tokens_per_s": round(rate / peer_rate, 3) if peer_rate else None,
        "daemon_ttft_s": round(ttft, 3),
        "peer_ttft_s": round(peer_ttft, 3),
        "daemon_over_peer_ttft": round(ttft / peer_ttft, 3) if peer_ttft else None,
    }


async def profiled(
    loaded: LoadedModel, messages: list[dict[str, Any]], options: dict[str, Any]
) -> tuple[Any, float]:
    """One generation under yappi (wall clock, every thread): its last chunk and its seconds."""
    import yappi

    yappi.set_clock_type("wall")
    final = None
    started = time.perf_counter()
    yappi.start()
    async for chunk in loaded.generate(chat_request(loaded, messages, options)):
        final = chunk
    yappi.stop()
    assert final is not None
    return final, time.perf_counter() - started


def stage_profile(
    table: dict[str, tuple[tuple[str, str], ...]], wall: float, count: int
) -> dict[str, Any]:
    """yappi's collected stats as microseconds per token of each stage of ``table`` (a function
    goes to the first stage one of whose (module, name) parts it matches), the rest "other"."""
    import yappi

    stages = dict.fromkeys(table, 0.0)
    for entry in yappi.get_func_stats():
        for stage, places in table.items():
            if any(place in entry.module and part in entry.name for place, part in places):
                stages[stage] += entry.tsub
                break
    yappi.clear_stats()
    per_token = {s: round(v / count * 1e6, 1) for s, v in stages.items()}
    per_token["other"] = round(wall / count * 1e6 - sum(per_token.values()), 1)
    return {
        "tokens": count,
        "wall_us_per_token": round(wall / count * 1e6, 1),
        "stage_us_per_token": per_token,
    }


async def per_token_profile(store: Any, tokens: int) -> dict[str, Any]:
    """Microseconds per generated token of each stage, the llama.cpp runner in-process, every
    thread profiled (the slot engine decodes on a thread of its own) by wall clock."""

    loaded = await LoadedModel.load(store, MODEL, "llamacpp")
    try:
        messages = [{"role": "user", "content": QUESTION}]
        options = {"temperature": 0.0, "max_tokens": tokens}
        async for _ in loaded.generate(chat_request(loaded, messages, {"max_tokens": 2})):
            pass
        final, wall = await profiled(loaded, messages, options)
    finally:
        await loaded.unload()
    return stage_profile(PROFILE_STAGES, wall, max(final.stats.eval_count, 1))


MLX_PROFILE_STAGES = {
    "mlx_lm_step": (("mlx_lm/generate.py", "_step"), ("mlx_lm/models/", "")),
    "batch_bookkeeping": (("mlx_lm/generate.py", ""),),
    "sampling_and_processors": (("mlx_lm/sample_utils.py", ""), ("runners/mlx/constraint.py", "")),
    "detokenize": (("mlx_lm/tokenizer_utils.py", ""), ("textstream.py", "MlxDetokenizer")),
    "stop_strings": (("textstream.py", "StopStringFilter"), ("textstream.py", "TextStream")),
    "runner_and_decode_state": (("runners/mlx/runner.py", ""), ("runners/decode.py", "")),
    "engine_bridge": (("runners/engine.py", ""),),
    "tool_and_think_parsing": (("chat/output.py", ""),),
}
"""The MLX runner's stages, as ``PROFILE_STAGES`` (first match wins): ``mlx_lm_step`` is
``GenerationBatch._step`` (it waits on the step's evaluation, so MLX's compute lands there) and
the model's graph building; ``batch_bookkeeping`` the rest of ``BatchGenerator``;
``engine_bridge`` the engine thread's loop and the hand-over of chunks to the event loop."""


async def mlx_per_token_profile(store: Any, tokens: int) -> dict[str, Any]:
    """Microseconds per generated token of each stage of the MLX runner in-process (yappi, wall
    clock, every thread), and without the profiler the process's CPU time per token of the
    runner against bare ``stream_generate`` on the same weights (CPU time moves less than wall
    time with load from elsewhere on a shared machine)."""

    folder = str(mlx_copy(store))
    loaded = await LoadedModel.load(store, MLX_MODEL, "mlx")
    messages = [{"role": "user", "content": QUESTION}]
    options = {"temperature": 0.0, "max_tokens": tokens}
    try:
        async for _ in loaded.generate(chat_request(loaded, messages, {"max_tokens": 2})):
            pass
        cpu = time.process_time()
        async for chunk in loaded.generate(chat_request(loaded, messages, options)):
            final = chunk
        runner_cpu = (time.process_time() - cpu) / max(final.stats.eval_count, 1)
        final, wall = await profiled(loaded, messages, options)
    finally:
        await loaded.unload()
    return {
        **stage_profile(MLX_PROFILE_STAGES, wall, max(final.stats.eval_count, 1)),
        "cpu_us_per_token": {
            "runner": round(runner_cpu * 1e6, 1),
            "bare_stream_generate": round(
                bare_mlx_rates(folder, tokens, [1])["cpu_s_per_token"] * 1e6, 1
            ),
        },
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    store = bench_store()
    result: dict[str, Any] = {
        "bench": "ceiling",
        "tokens": args.tokens,
        "load_average": os.getloadavg(),
    }
    runners = ["llamacpp", "mlx"] if args.runner == "all" else [args.runner]
    if "llamacpp" in runners and "ceiling" in args.phases:
        result["llamacpp"] = await llamacpp_ceiling(store, args.tokens, args.clients, args.rounds)
    if "llamacpp" in runners and "profile" in args.phases:
        result["llamacpp_profile"] = await per_token_profile(store, args.tokens)
    if args.threads_compare:
        result["llamacpp_threads"] = await daemon_threads(
            store, args.tokens, args.clients, args.rounds, args.threads_compare
        )
    if "mlx" in runners and "ceiling" in args.phases:
        result["mlx"] = await mlx_ceiling(store, args.tokens, args.clients, args.rounds)
    if "mlx" in runners and "profile" in args.phases:
        result["mlx_profile"] = await mlx_per_token_profile(store, args.tokens)
    if "peers" in args.phases:
        result["peers"] = {
            runner: await peers_comparison(store, runner, args.tokens, args.clients, args.rounds)
            for runner in runners
            if runner != "none"
        }
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
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=["ceiling", "profile", "peers"],
        default=["ceiling", "profile"],
        help="peers: the same load against llama_cpp.server and mlx_lm.server",
    )
    emit(asyncio.run(measure(parser.parse_args())))


if __name__ == "__main__":
    main()
