"""``/api/show`` from the kept config against re-reading the GGUF's metadata (what it did before
issue 10), on the default model. Prints JSON; compares the two within one run.

    .venv/bin/python -m bench.show_metadata --rounds 5
"""

from __future__ import annotations

import argparse
import time

from bench.common import MODEL, bench_store, emit, median
from mlxserve.server.describe import show_body
from modelstore import mediatypes
from modelstore.sources import read_gguf_metadata


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    store = bench_store()
    model = store.resolve(MODEL)
    gguf = store.blobs.path(model.manifest.layers_of(mediatypes.WEIGHTS_GGUF)[0].digest)
    kept, reparsed = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        show_body(store, model)
        kept.append(time.perf_counter() - started)
        started = time.perf_counter()
        read_gguf_metadata(gguf)
        reparsed.append(time.perf_counter() - started)
    emit(
        {
            "model": MODEL,
            "rounds": rounds,
            "show_from_config_ms": round(median(kept) * 1000, 3),
            "gguf_metadata_parse_ms": round(median(reparsed) * 1000, 1),
            "ratio": round(median(reparsed) / median(kept)),
        }
    )


if __name__ == "__main__":
    main()
