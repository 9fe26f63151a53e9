"""Load benchmark: the daemon against in-process inference, and against ``mlx_lm.server``.

Prints JSON. In one run, on one MLX model (the default model converted to MLX):
(a) one client: tokens/s and time to first token through the daemon vs the runner in-process,
    taking turns ``--rounds`` times, and their ratio (``daemon_over_in_process_tokens_per_s``);
(b) aggregate tokens/s with 1, 4 and 8 concurrent streaming clients on one model, through our
    daemon and through ``mlx_lm.server`` on the same weights (both via ``/v1/chat/completions``).
And on the llama.cpp runner (the default GGUF as it is):
(c) aggregate tokens/s and median time to first token with 1, 4 and 8 clients, each with its
    own prompt, through the daemon with as many slots as clients against the same daemon with
    one slot (``--num-parallel 1``: today's one-request-at-a-time runner).

    python -m bench.load [--tokens 32] [--clients 1 4 8] [--runner all|mlx|llamacpp] [--rounds 2]
        [--threads N]

``--threads N`` runs (c) on a copy of the default model made with ``/api/create`` and
``num_thread N`` (llama.cpp's ``n_threads``): on a shared CPU one thread can beat two.

``--isolation`` measures instead what the worker process costs (docs/RUNNERS.md): the daemon
with each model in its own worker against the same daemon with ``isolate_runners`` off,
taking turns ``--rounds`` times, at each ``--clients`` count, on the runners asked.
``--variant NAME:KEY=VALUE[,KEY=VALUE]`` (repeatable) adds a worker-process daemon whose
environment (so its workers') has those settings, e.g. ``spin0:GOMP_SPINCOUNT=0``: each
variant takes its turn in every round and is compared with the in-daemon one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import MODEL, bench_store, chat_body, counting_stream, emit, median
from mlxserve import platform
from mlxserve.chat.model import LoadedModel
from mlxserve.runners.mlx.gguf_convert import convert_gguf
from mlxserve.runners.mlx.runner import derived_folder
from modelstore.importer import import_path
from modelstore.runtime import open_model
from tests.chat_helpers import chat_request
from tests.daemon import Daemon, free_port

MLX_MODEL = "bench/smollm2-mlx:f32"
QUESTION = "Write a short poem about the sea."


def mlx_copy(store: Any) -> Path:
    """The default model as an MLX folder, in the store under its own name."""
    folder = convert_gguf(
        open_model(store, MODEL).weights[0],
        derived_folder(open_model(store, MODEL), platform.mlx_dequantize_weights()),
        dequantize=platform.mlx_dequantize_weights(),
    )
    if not store.exists(MLX_MODEL):
        import_path(store, folder, MLX_MODEL)
    return folder


async def stream_chat(
    session: aiohttp.ClientSession, url: str, model: str, tokens: int, question: str = QUESTION
) -> dict[str, float]:
    body = chat_body(model, question, tokens)
    started = time.perf_counter()
    first = None
    count = 0
    usage = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                count += 1
                first = first or time.perf_counter()
    ended = time.perf_counter()
    return {
        "ttft_s": (first or ended) - started,
        "tokens": max(count, usage),
        "seconds": ended - started,
        "first_at": first or ended,
        "ended_at": ended,
    }


def client_question(index: int) -> str:
    """A prompt of its own per client, so no client rides on another's cached prefill."""
    return f"{QUESTION} Make it about sailor number {index}."


def process_tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user and system) used so far by ``pid`` and its live children (a daemon and
    its workers), read from ``/proc``; ``None`` where there is no ``/proc``. Unlike wall time,
    what a side spends per token barely moves with load from elsewhere on a shared machine."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


async def concurrent(
    url: str,
    model: str,
    clients: int,
    tokens: int,
    distinct: bool = False,
    cpu_of: int | None = None,
) -> dict[str, float]:
    """``clients`` streams at once; with ``cpu_of`` (a daemon's pid) also the CPU time it and
    its workers spent per token generated."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        await stream_chat(session, url, model, 2)
        cpu_before = process_tree_cpu_s(cpu_of) if cpu_of is not None else None
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                counting_stream(
                    session, url, model, tokens, client_question(index) if distinct else QUESTION
                )
                for index in range(clients)
            )
        )
        wall = time.perf_counter() - started
        cpu_after = process_tree_cpu_s(cpu_of) if cpu_of is not None else None
    total = sum(r["tokens"] for r in results)
    measured = {
        "clients": clients,
        "aggregate_tokens_per_s": round(total / wall, 2),
        "median_ttft_s": round(median([r["ttft_s"] for r in results]), 3),
        "tokens": total,
    }
    if cpu_before is not None and cpu_after is not None and total:
        measured["cpu_ms_per_token"] = round((cpu_after - cpu_before) / total * 1000, 3)
    return measured


async def in_process(loaded: LoadedModel, tokens: int) -> dict[str, float]:
    """The runner alone in this process: the chat core's request for the same question, no
    daemon, no HTTP (the baseline of the daemon's cost)."""
    messages = [{"role": "user", "content": QUESTION}]
    await anext_all(loaded, chat_request(loaded, messages, {"max_tokens": 2}))
    request = chat_request(loaded, messages, {"temperature": 0.0, "max_tokens": tokens})
    started = time.perf_counter()
    final = await anext_all(loaded, request)
    seconds = time.perf_counter() - started
    stats = final.stats
    return {
        "ttft_s": stats.time_to_first_token / 1e9,
        "tokens_per_s": stats.eval_count / seconds,
        "tokens": stats.eval_count,
    }


async def anext_all(loaded: LoadedModel, request: Any) -> Any:
    final = None
    async for chunk in loaded.generate(request):
        final = chunk
    return final


def start_mlx_lm_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            import urllib.request

            urllib.request.urlopen(f"{url}/v1/models", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("mlx_lm.server did not start")


async def with_threads(store: Any, threads: int) -> str:
    """The default model under a name of its own whose parameters fix llama.cpp's threads,
    made through the daemon's ``/api/create`` (the way a user would)."""
    name = f"bench/smollm2-threads{threads}:latest"
    daemon = Daemon(store.root, []).start()
    try:
        async with aiohttp.ClientSession() as session:
            body = {
                "model": name,
                "from": MODEL,
                "parameters": {"num_thread": threads},
                "stream": False,
            }
            async with session.post(f"{daemon.url}/api/create", json=body) as response:
                response.raise_for_status()
    finally:
        daemon.stop()
    return name


async def daemons_in_turn(
    store: Any,
    configs: dict[str, tuple[list[str], dict[str, str]]],
    model: str,
    tokens: int,
    client_counts: list[int],
    rounds: int,
) -> dict[str, dict[int, list[dict[str, float]]]]:
    """Each labelled daemon (its flags and environment) in turn, ``rounds`` times, measured at
    every client count with a prompt of its own per client: a burst of load from elsewhere on
    this shared machine lands on every side alike."""
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        label: {n: [] for n in client_counts} for label in configs
    }
    for _ in range(rounds):
        for label, (flags, env) in configs.items():
            daemon = Daemon(store.root, flags, env).start()
            assert daemon.process is not None
            try:
                for n in client_counts:
                    measured = await concurrent(
                        daemon.url, model, n, tokens, distinct=True, cpu_of=daemon.process.pid
                    )
                    runs[label][n].append(measured)
                    # Each run as it ends, on stderr: a run cut short by its time limit on a
                    # busy machine still leaves what it measured.
                    print(json.dumps({"daemon": label, **measured}), file=sys.stderr, flush=True)
            finally:
                daemon.stop()
    return runs


async def llamacpp_slots(
    store: Any, tokens: int, client_counts: list[int], rounds: int, threads: int | None = None
) -> dict[str, Any]:
    """The default GGUF on the llama.cpp runner: N slots against one, same clients. The two
    daemons take turns, ``rounds`` times, and each figure is the median of its rounds, so a
    burst of load from elsewhere on this shared machine lands on both sides alike."""
    model = await with_threads(store, threads) if threads else MODEL
    configs = {"slots": max(client_counts), "one_slot": 1}
    runs = await daemons_in_turn(
        store,
        {
            label: (["--num-parallel", str(slots), "--max-queue", "64"], {})
            for label, slots in configs.items()
        },
        model,
        tokens,
        client_counts,
        rounds,
    )
    result: dict[str, Any] = {"model": model, "rounds": rounds}
    for label in configs:
        result[label] = [
            {
                "clients": n,
                "aggregate_tokens_per_s": round(
                    median([r["aggregate_tokens_per_s"] for r in runs[label][n]]), 2
                ),
                "median_ttft_s": round(median([r["median_ttft_s"] for r in runs[label][n]]), 3),
            }
            for n in client_counts
        ]
    rate = {
        (label, r["clients"]): r["aggregate_tokens_per_s"]
        for label in configs
        for r in result[label]
    }
    best = max(client_counts)
    result[f"slots_{best}_clients_over_1_client"] = round(
        rate["slots", best] / rate["slots", min(client_counts)], 2
    )
    result[f"slots_over_one_slot_at_{best}_clients"] = round(
        rate["slots", best] / rate["one_slot", best], 2
    )
    return result


async def isolation_cost(
    store: Any,
    model: str,
    tokens: int,
    client_counts: list[int],
    rounds: int,
    variants: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Tokens/s and median time to first token with the runner in a worker process (and in
    each variant's) and in the daemon's own, the daemons taking turns so that load from
    elsewhere hits all; each worker side's ratios are against the in-daemon one of the same
    rounds (per round, then the median, so a burst that hits one round does not decide)."""
    configs = {
        "worker_process": {"MLXSERVE_ISOLATE_RUNNERS": "1"},
        **{
            name: {"MLXSERVE_ISOLATE_RUNNERS": "1", **env} for name, env in (variants or {}).items()
        },
        "in_daemon": {"MLXSERVE_ISOLATE_RUNNERS": "0"},
    }
    flags = ["--num-parallel", str(max(client_counts)), "--max-queue", "64"]
    runs = await daemons_in_turn(
        store,
        {label: (flags, env) for label, env in configs.items()},
        model,
        tokens,
        client_counts,
        rounds,
    )
    result: dict[str, Any] = {"model": model, "rounds": rounds, "variants": variants or {}}
    for n in client_counts:
        rate = {
            label: median([r["aggregate_tokens_per_s"] for r in runs[label][n]])
            for label in configs
        }
        ttft = {label: median([r["median_ttft_s"] for r in runs[label][n]]) for label in configs}
        cpu = {
            label: median([r.get("cpu_ms_per_token", 0.0) for r in runs[label][n]])
            for label in configs
        }
        entry: dict[str, Any] = {
            "tokens_per_s": {label: round(value, 2) for label, value in rate.items()},
            "median_ttft_s": {label: round(value, 3) for label, value in ttft.items()},
            "cpu_ms_per_token": {label: round(value, 3) for label, value in cpu.items()},
        }
        baseline = runs["in_daemon"][n]
        for label in configs:
            if label == "in_daemon":
                continue
            ratios = [
                worker["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
                for worker, base in zip(runs[label][n], baseline, strict=True)
            ]
            deltas = [
                (worker["median_ttft_s"] - base["median_ttft_s"]) * 1000
                for worker, base in zip(runs[label][n], baseline, strict=True)
            ]
            entry[f"{label}_over_in_daemon_per_round"] = [round(r, 3) for r in ratios]
            entry[f"{label}_over_in_daemon"] = round(median(ratios), 3)
            entry[f"{label}_ttft_minus_in_daemon_ms"] = round(median(deltas), 1)
        result[f"{n}_clients"] = entry
    result["boundary"] = boundary_cost(result, client_counts)
    return result


BOUNDARY_GOAL = {"tokens_per_s_cost_pct": 2.0, "ttft_cost_ms": 5.0}
"""What the worker process may cost against the runner in the daemon's own (issue 21)."""


def boundary_cost(result: dict[str, Any], client_counts: list[int]) -> dict[str, Any]:
    """Issue 21's figures, per client count: the tokens/s the worker process loses (per cent of
    the in-daemon figure; negative: it gained) and the time to first token it adds."""
    costs: dict[str, Any] = {}
    for n in client_counts:
        entry = result[f"{n}_clients"]
        cost = {
            "tokens_per_s_cost_pct": round((1 - entry["worker_process_over_in_daemon"]) * 100, 1),
            "ttft_cost_ms": entry["worker_process_ttft_minus_in_daemon_ms"],
        }
        cost["within_goal"] = all(cost[key] <= limit for key, limit in BOUNDARY_GOAL.items())
        costs[f"{n}_clients"] = cost
    return costs


async def channel_cost(chunks: int = 20000, per_write: int = 8) -> dict[str, Any]:
    """The boundary alone: ``GenerateChunk``s framed ``per_write`` to a frame (a batch step of
    that many sequences) and written from a thread, as a worker's engine thread does
    (``worker.FrameWriter``), through a socket pair and parsed as the daemon does
    (``worker.FrameProtocol``); microseconds per chunk, free of the model's speed."""
    import socket

    from mlxserve.runners.base import GenerateChunk
    from mlxserve.runners.worker import FrameProtocol, FrameWriter

    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    frames = chunks // per_write
    received = 0
    all_read: asyncio.Future[None] = loop.create_future()

    def receive(_: Any) -> None:
        nonlocal received
        received += 1
        if received == frames:
            all_read.set_result(None)

    transport, _ = await loop.create_connection(
        lambda: FrameProtocol(receive, lambda: None), sock=left
    )
    writer = FrameWriter(right)
    chunk = GenerateChunk(text=" sea", token_ids=[7001])

    def write() -> None:
        for _ in range(frames):
            writer.write([("item", index, chunk) for index in range(per_write)])

    started = time.perf_counter()
    await asyncio.gather(asyncio.to_thread(write), all_read)
    seconds = time.perf_counter() - started
    transport.close()
    right.close()
    return {
        "chunks": chunks,
        "per_write": per_write,
        "us_per_chunk": round(seconds / chunks * 1e6, 2),
    }


async def measure_isolation(
    tokens: int,
    client_counts: list[int],
    runner: str,
    rounds: int,
    threads: int | None,
    variants: dict[str, dict[str, str]],
) -> dict[str, Any]:
    store = bench_store()
    result: dict[str, Any] = {"benchmark": "isolation", "tokens": tokens}
    result["channel"] = [await channel_cost(per_write=n) for n in (1, 8)]
    if runner in ("all", "llamacpp"):
        model = await with_threads(store, threads) if threads else MODEL
        result["llamacpp"] = await isolation_cost(
            store, model, tokens, client_counts, rounds, variants
        )
    if runner in ("all", "mlx"):
        mlx_copy(store)
        result["mlx"] = await isolation_cost(
            store, MLX_MODEL, tokens, client_counts, rounds, variants
        )
    return result


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:KEY=VALUE[,KEY=VALUE]`` as (name, environment)."""
    name, _, settings = text.partition(":")
    env = dict(setting.split("=", 1) for setting in settings.split(",") if setting)
    if not name or not env:
        raise argparse.ArgumentTypeError(f"a variant is NAME:KEY=VALUE[,KEY=VALUE], not {text!r}")
    return name, env


async def measure(
    tokens: int, client_counts: list[int], runner: str, rounds: int, threads: int | None
) -> dict[str, Any]:
    store = bench_store()
    result: dict[str, Any] = {"benchmark": "load", "tokens": tokens}
    if runner in ("all", "llamacpp"):
        result["llamacpp"] = await llamacpp_slots(store, tokens, client_counts, rounds, threads)
    if runner in ("all", "mlx"):
        result.update(await mlx_load(store, tokens, client_counts, rounds))
    return result


async def through_daemon(session: aiohttp.ClientSession, url: str, tokens: int) -> dict[str, float]:
    single = await stream_chat(session, url, MLX_MODEL, tokens)
    return {
        "ttft_s": single["ttft_s"],
        "tokens_per_s": single["tokens"] / single["seconds"],
        "tokens": single["tokens"],
    }


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "ttft_s": round(median([r["ttft_s"] for r in runs]), 3),
        "tokens_per_s": round(median([r["tokens_per_s"] for r in runs]), 2),
        "tokens": runs[0]["tokens"],
    }


async def mlx_load(
    store: Any, tokens: int, client_counts: list[int], rounds: int
) -> dict[str, Any]:
    """One client in this process against one through the daemon, taking turns ``rounds``
    times (each figure the median of its rounds, so a burst of load from elsewhere lands on
    both sides alike); then the daemon and ``mlx_lm.server`` at each client count."""
    folder = mlx_copy(store)
    result: dict[str, Any] = {"model": MLX_MODEL, "rounds": rounds}
    loaded = await LoadedModel.load(store, MLX_MODEL, "mlx")
    daemon = Daemon(
        store.root, ["--num-parallel", str(max(client_counts)), "--max-queue", "64"]
    ).start()
    alone: list[dict[str, float]] = []
    served: list[dict[str, float]] = []
    try:
        try:
            async with aiohttp.ClientSession() as session:
                await stream_chat(session, daemon.url, MLX_MODEL, 2)
                for _ in range(rounds):
                    alone.append(await in_process(loaded, tokens))
                    served.append(await through_daemon(session, daemon.url, tokens))
        finally:
            await loaded.unload()
        result["in_process"] = medians(alone)
        result["through_daemon"] = medians(served)
        result["daemon_over_in_process_tokens_per_s"] = round(
            median(
                [s["tokens_per_s"] / a["tokens_per_s"] for a, s in zip(alone, served, strict=True)]
            ),
            3,
        )
        result["daemon_concurrency"] = [
            await concurrent(daemon.url, MLX_MODEL, n, tokens) for n in client_counts
        ]
    finally:
        daemon.stop()
    process, url = start_mlx_lm_server(folder)
    try:
        result["mlx_lm_server_concurrency"] = [
            await concurrent(url, str(folder), n, tokens) for n in client_counts
        ]
    finally:
        process.kill()
        process.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--runner", choices=["all", "mlx", "llamacpp"], default="all")
    parser.add_argument(
        "--rounds", type=int, default=2, help="turns per daemon (MLX: daemon vs in-process)"
    )
    parser.add_argument("--threads", type=int, help="llama.cpp: n_threads (num_thread)")
    parser.add_argument("--isolation", action="store_true", help="worker process vs in-daemon")
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        help="--isolation: a worker-process daemon with this environment, NAME:KEY=VALUE,...",
    )
    args = parser.parse_args()
    if args.isolation:
        emit(
            asyncio.run(
                measure_isolation(
                    args.tokens,
                    args.clients,
                    args.runner,
                    args.rounds,
                    args.threads,
                    dict(args.variant),
                )
            )
        )
        return
    emit(asyncio.run(measure(args.tokens, args.clients, args.runner, args.rounds, args.threads)))


if __name__ == "__main__":
    main()
