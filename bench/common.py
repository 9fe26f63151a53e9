"""Shared bench helpers: a throwaway store with the default model, timing, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

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


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


MODEL = DEFAULT_MODEL
