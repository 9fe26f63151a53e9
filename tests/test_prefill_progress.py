"""A long prefill is not a hang: the worker sends a progress frame as its prefill goes on
(``runners/worker.py``), so the daemon's stall deadline (``runner_stall_timeout_s``) measures
silence, not how long a prompt takes. With a deadline shorter than a cold prefill of the default
model (sized from how long a chunk takes on this machine now), the prompt still gets its answer;
a worker stopped in the middle of that prefill (SIGSTOP: alive, silent) is still killed at its
deadline."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass

import aiohttp
import pytest

from modelstore.importer import import_path
from modelstore.store import ModelStore
from tests.daemon import Daemon
from tests.test_isolation import new_worker, workers

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers in /proc"),
]

CHUNK_TOKENS = 512
"""The slot engine's prefill chunk (``slots.PREFILL_TOKENS``): one progress frame each."""
CHUNKS = 12
"""The long prompt's length in chunks: its cold prefill lasts about three deadlines."""
DEADLINE_CHUNKS = 4
"""The stall deadline, in first chunks' time: a later chunk (its attention over more context)
costs up to about twice the first on this CPU, so a chunk never outlasts it."""
MIN_STALL_S = 2.0
"""Never below this: several of the worker's progress throttle (``worker.PROGRESS_EVERY_S``)
and the daemon's watch ticks."""
CONTEXT = 8192
KILL_SLACK_S = 6.0
"""How late after its deadline a stopped worker may be killed (the watch's tick, a busy CPU)."""


WORDS = (  # noqa: SIM905
    "the a house river stone light green small old new water field city road tree morning "
    "night story friend window garden market bread music paper table chair summer winter"
).split()


def long_prompt(seed: int, chunks: int) -> str:
    """Common words (a token each), shuffled by ``seed``: no two prompts share a prefix."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(chunks * CHUNK_TOKENS - 8))


def body(seed: int, chunks: int = CHUNKS) -> dict:
    options = {"num_ctx": CONTEXT, "num_predict": 2, "temperature": 0}
    return {"model": "slow:gguf", "prompt": long_prompt(seed, chunks), "raw": True,
            "stream": False, "options": options}  # fmt: skip


def generate(daemon: Daemon, request: dict) -> dict:
    data = json.dumps(request).encode()
    headers = {"Content-Type": "application/json"}
    post = urllib.request.Request(f"{daemon.url}/api/generate", data, headers)
    with urllib.request.urlopen(post, timeout=3600) as response:
        return json.loads(response.read())


@dataclass
class Slow:
    daemon: Daemon
    chunk_s: float
    """How long the first prefill chunk took on this machine, now."""
    stall_s: float


@pytest.fixture(scope="module")
def slow(default_gguf, tmp_path_factory):
    """The default model, and a stall deadline sized from how long one prefill chunk takes
    here (a busy machine is many times slower than a quiet one): the daemon that measures it
    has the default deadline, the one the tests use this shorter one."""
    store = ModelStore(tmp_path_factory.mktemp("prefill-progress") / "home")
    import_path(store, default_gguf, "slow:gguf")
    env = {"MLXSERVE_PROMPT_CACHE_DISK_BYTES": "0"}
    measuring = Daemon(store.root, env=env).start()
    try:
        chunk_s = generate(measuring, body(0, chunks=1))["prompt_eval_duration"] / 1e9
    finally:
        measuring.stop()
    stall_s = round(max(MIN_STALL_S, DEADLINE_CHUNKS * chunk_s), 1)
    env["MLXSERVE_RUNNER_STALL_TIMEOUT_S"] = str(stall_s)
    running = Daemon(store.root, env=env).start()
    yield Slow(running, chunk_s, stall_s)
    running.stop()


def test_a_prefill_longer_than_the_stall_deadline_still_answers(slow):
    answer = generate(slow.daemon, body(1))
    assert answer["done"] is True
    assert answer["cached_prompt_tokens"] == 0
    assert answer["prompt_eval_duration"] > slow.stall_s * 1e9  # it did outlast the deadline


async def test_a_worker_stopped_mid_prefill_is_still_killed_at_its_deadline(slow):
    daemon = slow.daemon
    before = workers(daemon)
    async with aiohttp.ClientSession() as session:

        async def ask() -> tuple[int, dict]:
            # Not streamed: the answer (here the crash) comes whole, after the prefill.
            url = f"{daemon.url}/api/generate"
            async with session.post(url, json=body(2)) as response:
                return response.status, await response.json()

        asking = asyncio.create_task(ask())
        worker = min(before) if before else await new_worker(daemon, before)
        await asyncio.sleep(2 * slow.chunk_s)  # inside the prefill, past its first chunks
        os.kill(worker, signal.SIGSTOP)
        stopped_at = time.monotonic()
        status, answer = await asking
    after = time.monotonic() - stopped_at
    assert status == 500, answer
    assert answer["code"] == "model_crashed"
    assert f"no progress for {slow.stall_s:g} s" in answer["error"]
    # Silence began at the last progress frame, up to a chunk (late ones cost about two first
    # ones) before the stop.
    assert slow.stall_s - 2 * slow.chunk_s - 0.5 < after < slow.stall_s + KILL_SLACK_S
    assert workers(daemon) == set()
