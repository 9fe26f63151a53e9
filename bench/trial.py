"""What a trial load at create costs (``mlxserve/runners/trial.py``), on the default model and a
tiny F32 fixture (``tests/fixtures/gguf_models.py``), llama.cpp runner.

Prints JSON: per model, the median of ``--rounds`` whole trials (the throwaway process started,
its imports, the trial, its exit: what ``/api/create`` waits for) and of the trial function
alone, timed inside a fresh process with and without its one-token decode (what the decode
adds, the question of whether it belongs in the trial).

    python -m bench.trial [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MODEL, bench_store, emit, median
from mlxserve import platform
from mlxserve.runners.trial import trial_load
from modelstore.importer import import_path
from modelstore.model import LocalModel
from modelstore.runtime import open_model

TINY = "bench/tiny-llama:f32"
TIMED = """
import pickle, sys, time
from mlxserve.runners.llamacpp.library import import_llama_cpp
from mlxserve.runners.llamacpp.runner import trial_load
import_llama_cpp()
model = pickle.load(sys.stdin.buffer)
started = time.perf_counter()
trial_load(model, decode=sys.argv[1] == "decode")
print(time.perf_counter() - started)
"""
"""The trial function alone, timed inside its process (imports excluded)."""


def function_seconds(model: LocalModel, decode: bool) -> float:
    done = subprocess.run(
        [sys.executable, "-c", TIMED, "decode" if decode else "load"],
        input=pickle.dumps(model),
        capture_output=True,
        check=True,
        env=platform.worker_environment(dict(os.environ)),
    )
    return float(done.stdout.split()[-1])


def measure(rounds: int) -> dict[str, Any]:
    from tests.fixtures.gguf_models import write_f32_gguf

    store = bench_store()
    if not store.exists(TINY):
        with tempfile.TemporaryDirectory() as folder:
            import_path(store, write_f32_gguf("llama", Path(folder) / "tiny.gguf"), TINY)
    result: dict[str, Any] = {"benchmark": "trial", "rounds": rounds, "load_average": []}
    for name in (MODEL, TINY):
        model = open_model(store, name)
        whole, decoded, loaded = [], [], []
        for _ in range(rounds):
            started = time.perf_counter()
            trial_load(model)
            whole.append(time.perf_counter() - started)
            decoded.append(function_seconds(model, decode=True))
            loaded.append(function_seconds(model, decode=False))
        result[name] = {
            "size_bytes": model.size_bytes,
            "whole_trial_ms": round(median(whole) * 1000, 1),
            "trial_function_ms": round(median(decoded) * 1000, 1),
            "trial_function_without_decode_ms": round(median(loaded) * 1000, 1),
        }
        result["load_average"].append(round(os.getloadavg()[0], 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    emit(measure(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
