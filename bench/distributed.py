"""One model sharded over 2 local ranks (ring backend over loopback) against 1 process.

Prints JSON. On the tiny llama fixture (``tests/fixtures/tiny_models.py``: 4 heads, 2 KV heads,
so tensor parallelism splits it evenly), greedy, streaming ``/api/generate``: per-token latency
(the median gap between streamed tokens), tokens/s of one client, and aggregate tokens/s of
concurrent clients (one batch). The two sides alternate within the run.

On one machine the group can only be slower: both ranks share the same cores, and every step
adds collectives (two all-sums per layer for tensor parallelism, one for the sampled token, one
for rank 0's batch changes). What a group buys is memory: each rank holds half the weights.

    python -m bench.distributed [--tokens 128] [--clients 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import emit, median
from modelstore.importer import import_path
from modelstore.store import ModelStore
from tests.daemon import MLXSERVE, Daemon, free_ring_port
from tests.fixtures.tiny_models import build_fixture_models

MODEL = "tiny:mlx"
PROMPT = "Once upon a time there was a small model that"


async def stream_once(session: aiohttp.ClientSession, url: str, tokens: int) -> dict[str, float]:
    body = {"model": MODEL, "prompt": PROMPT, "options": {"temperature": 0, "num_predict": tokens}}
    arrivals: list[float] = []
    final: dict[str, Any] = {}
    async with session.post(f"{url}/api/generate", json=body) as response:
        async for line in response.content:
            chunk = json.loads(line)
            if chunk.get("done"):
                final = chunk
            elif chunk.get("response"):
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {
        "per_token_ms": median(gaps) * 1e3,
        "tokens_per_s": (final["eval_count"] - 1) / (final["eval_duration"] / 1e9),
    }


async def measure(url: str, tokens: int, clients: int) -> dict[str, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await stream_once(session, url, 8)  # warm-up: compile, caches
        one = await stream_once(session, url, tokens)
        started = time.perf_counter()
        await asyncio.gather(*[stream_once(session, url, tokens) for _ in range(clients)])
        aggregate = clients * tokens / (time.perf_counter() - started)
    return {**one, f"aggregate_tokens_per_s_{clients}_clients": aggregate}


def start_group(root: Path, folder: Path) -> tuple[Daemon, subprocess.Popen]:
    homes = []
    for rank in (0, 1):
        store = ModelStore(root / f"home{rank}")
        import_path(store, folder, MODEL)
        homes.append(store.root)
    hosts = [{"ssh": f"rank{r}", "ips": ["127.0.0.1"]} for r in (0, 1)]
    hostfile = root / "hosts.json"
    hostfile.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    ring = str(free_ring_port())
    flags = ["--distributed", str(hostfile), "--model", MODEL, "--ring-port", ring]
    follower = subprocess.Popen(
        [MLXSERVE, *flags, "--rank", "1"],
        env={**os.environ, "MLXSERVE_HOME": str(homes[1])},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Daemon(homes[0], [*flags, "--rank", "0"]).start(), follower


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlxserve-bench-distributed-"))
    folder = build_fixture_models(root / "fixture").hf_folder
    single_store = ModelStore(root / "single")
    import_path(single_store, folder, MODEL)
    single = Daemon(single_store.root).start()
    group, follower = start_group(root, folder)
    try:
        runs: dict[str, list[dict[str, float]]] = {"one_process": [], "two_ranks": []}
        for _ in range(args.rounds):
            runs["one_process"].append(asyncio.run(measure(single.url, args.tokens, args.clients)))
            runs["two_ranks"].append(asyncio.run(measure(group.url, args.tokens, args.clients)))
        summary = {
            side: {key: round(median([r[key] for r in results]), 2) for key in results[0]}
            for side, results in runs.items()
        }
        emit(
            {
                "model": "tiny llama fixture (fp32, 2 layers, hidden 64)",
                "tokens": args.tokens,
                "clients": args.clients,
                "rounds": args.rounds,
                "median": summary,
                "two_ranks_over_one_process_tokens_per_s": round(
                    summary["two_ranks"]["tokens_per_s"] / summary["one_process"]["tokens_per_s"], 2
                ),
            }
        )
    finally:
        group.stop()
        single.stop()
        follower.wait(timeout=30)


if __name__ == "__main__":
    main()
