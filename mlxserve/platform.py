"""Every difference between Apple Silicon and other machines, in one place.

On a Mac MLX runs on Metal, quantized weights are the fast path and llama.cpp offloads to
Metal; elsewhere MLX runs on the CPU, where quantized matmuls are slow (``FACTS.md``: 4-bit
SmolLM2 decodes ~0.2 tokens/s, fp32 ~9), so the MLX runner holds weights unquantized there.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from functools import cache

PREFERRED_RUNNERS_ON_METAL = ("mlx", "llamacpp")
PREFERRED_RUNNERS_ELSEWHERE = ("llamacpp", "mlx")


@cache
def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def preferred_runners() -> tuple[str, ...]:
    return PREFERRED_RUNNERS_ON_METAL if is_apple_silicon() else PREFERRED_RUNNERS_ELSEWHERE


def mlx_dequantize_weights() -> bool:
    """Whether the MLX runner should hold quantized weights as floats (CPU only)."""
    override = os.environ.get("MLXSERVE_MLX_DEQUANTIZE")
    if override is not None:
        return override not in {"0", "false", "no"}
    return not is_apple_silicon()


def default_gpu_layers() -> int:
    """llama.cpp: all layers on Metal on a Mac; none elsewhere (no GPU build here)."""
    return -1 if is_apple_silicon() else 0


def default_threads() -> int:
    """Physical-ish cores: llama.cpp slows down when hyper-threads fight over one core."""
    count = os.cpu_count() or 1
    return max(1, count if count <= 4 else count // 2)


def exit_process(code: int) -> None:
    """Exit, skipping native teardown once MLX has run in this process.

    MLX's stream threads keep a thread-local compile cache whose destructor calls back into
    Python; when those threads are torn down after the interpreter has begun finalising, the
    process aborts ("terminate called without an active exception", exit 134) even though all
    work finished. Once stdio is flushed there is nothing left worth tearing down.
    """
    if "mlx.core" not in sys.modules:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def service_manager() -> str | None:
    """What starts user daemons at login here: ``launchd`` (macOS) or ``systemd`` (Linux)."""
    if sys.platform == "darwin":
        return "launchd"
    if sys.platform.startswith("linux"):
        return "systemd"
    return None
