"""Pull throughput from a loopback registry against ``curl``, and import hashing against
``sha256sum``, each pair measured in the same run on the same bytes (ratios, not absolutes,
are what carry across this shared machine).

    python -m bench.pull_throughput [--size-mb 256] [--rounds 3]

(a) ``pull``: ``modelstore.registry.pull_model`` into an empty store (download, hash while
    streaming, fsync, rename) vs ``curl -o FILE`` of the same blob URL (download only), and vs
    ``curl -o FILE && sync FILE`` (the same durability as the store's).
(b) ``hash``: ``modelstore.blobs.hash_file`` (what ``import`` runs on every file) vs
    ``sha256sum`` on the same file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import emit, median
from modelstore import mediatypes
from modelstore.blobs import hash_file
from modelstore.draft import LayerSource, ModelConfig, ModelDraft
from modelstore.registry import pull_model, push_model
from modelstore.store import ModelStore
from tests.registry import Registry, registry_binary


def make_weights(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = min(left, 16 << 20)
            handle.write(rng.bytes(chunk))
            left -= chunk


def timed(action: Any) -> float:
    os.sync()  # start each run with no dirty pages left by the one before
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def mb_per_s(size: int, seconds: float) -> float:
    return round(size / 1e6 / seconds, 1) if seconds else 0.0


def bench_pull(work: Path, weights: Path, size: int, rounds: int) -> dict[str, Any]:
    registry = Registry(work / "registry").start()
    try:
        source = ModelStore(work / "source")
        draft = ModelDraft(
            ModelConfig("gguf"), [LayerSource(mediatypes.WEIGHTS_GGUF, weights.name, path=weights)]
        )
        source.commit(draft, "bench:1")
        target = f"{registry.host}/bench/pull:1"
        asyncio.run(push_model(source, "bench:1", target, insecure=True))
        digest = source.resolve("bench:1").manifest.layers_of(mediatypes.WEIGHTS_GGUF)[0].digest
        url = f"http://{registry.host}/v2/bench/pull/blobs/{digest}"
        ours, curl, curl_synced = [], [], []
        for index in range(rounds):  # interleaved, so drift on the machine hits all alike
            out = work / f"curl-{index}.bin"
            curl.append(
                timed(
                    lambda out=out: subprocess.run(
                        ["curl", "-sS", "-f", "-o", str(out), url], check=True
                    )
                )
            )
            out.unlink()
            # The same download made durable (fsync), as the store makes every blob.
            curl_synced.append(
                timed(
                    lambda out=out: subprocess.run(
                        f"curl -sS -f -o {out} {url} && sync {out}", shell=True, check=True
                    )
                )
            )
            out.unlink()
            home = work / f"pull-{index}"
            ours.append(
                timed(
                    lambda home=home: asyncio.run(
                        pull_model(ModelStore(home), target, insecure=True)
                    )
                )
            )
            shutil.rmtree(home)
    finally:
        registry.stop()
    return {
        "blob_bytes": size,
        "mlxctl_pull_s": round(median(ours), 3),
        "curl_s": round(median(curl), 3),
        "mlxctl_pull_mb_s": mb_per_s(size, median(ours)),
        "curl_mb_s": mb_per_s(size, median(curl)),
        "curl_then_fsync_s": round(median(curl_synced), 3),
        "ratio_pull_over_curl": round(median(ours) / median(curl), 2),
        "ratio_pull_over_curl_then_fsync": round(median(ours) / median(curl_synced), 2),
    }


def bench_hash(weights: Path, size: int, rounds: int) -> dict[str, Any]:
    ours, reference = [], []
    for _ in range(rounds):
        reference.append(
            timed(
                lambda: subprocess.run(["sha256sum", str(weights)], check=True, capture_output=True)
            )
        )
        ours.append(timed(lambda: hash_file(weights)))
    return {
        "file_bytes": size,
        "hash_file_s": round(median(ours), 3),
        "sha256sum_s": round(median(reference), 3),
        "hash_file_mb_s": mb_per_s(size, median(ours)),
        "sha256sum_mb_s": mb_per_s(size, median(reference)),
        "ratio_hash_over_sha256sum": round(median(ours) / median(reference), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = args.size_mb << 20
    with tempfile.TemporaryDirectory(prefix="mlxserve-bench-pull-") as folder:
        work = Path(folder)
        weights = work / "weights.gguf"
        make_weights(weights, size)
        result: dict[str, Any] = {"benchmark": "pull_throughput", "rounds": args.rounds}
        result["hash"] = bench_hash(weights, size, args.rounds)
        if registry_binary() and shutil.which("curl"):
            result["pull"] = bench_pull(work, weights, size, args.rounds)
        else:
            result["pull"] = {"skipped": "needs docker-registry and curl"}
        emit(result)


if __name__ == "__main__":
    main()
