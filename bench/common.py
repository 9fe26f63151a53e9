"""Shared bench helpers: a throwaway store with the default model, timing, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from modelstore.default_model import DEFAULT_MODEL, ensure_default_model
from modelstore.store import HOME_ENV, ModelStore


def bench_store() -> ModelStore:
    """``$MLXSERVE_HOME`` if set (reuses conversions), else a temporary store."""
    root = os.environ.get(HOME_ENV) or tempfile.mkdtemp(prefix="mlxserve-bench-")
    os.environ[HOME_ENV] = root
    store = ModelStore(Path(root))
    ensure_default_model(store)
    return store


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


Item = TypeVar("Item")


async def items_per_second(
    items: Sequence[Item], call: Callable[[list[Item]], Awaitable[object]], batched: bool
) -> float:
    """Throughput of ``call`` over ``items``: one call with all of them (the runner batches),
    or one call per item (what a client that does not batch costs). ``bench.embed`` and
    ``bench.rerank`` time both ways with this one loop."""
    started = time.perf_counter()
    if batched:
        await call(list(items))
    else:
        for item in items:
            await call([item])
    return len(items) / (time.perf_counter() - started)


def batching_speedups(
    rates: dict[str, float], runners: Sequence[str], batched: str, single: str
) -> dict[str, float]:
    """Per runner, batched items/s over one-at-a-time items/s (keys ``"<runner> <label>"``)."""
    return {
        runner: round(rates[f"{runner} {batched}"] / rates[f"{runner} {single}"], 2)
        for runner in runners
    }


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


MODEL = DEFAULT_MODEL
