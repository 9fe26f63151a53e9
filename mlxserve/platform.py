"""Every difference between Apple Silicon and other machines, in one place.

On a Mac MLX runs on Metal, quantized weights are the fast path and llama.cpp offloads to
Metal; elsewhere MLX runs on the CPU, where quantized matmuls are slow (measured on this
project's Linux machines: 4-bit SmolLM2 decodes ~0.2 tokens/s, fp32 ~9 on the reference BLAS
MLX's Linux wheel links and ~20 on oneMKL), so the MLX runner holds weights unquantized there,
and its matmuls get an optimized BLAS (``use_cpu_blas``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from functools import cache
from pathlib import Path
from typing import Any

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


CPU_BLAS_ENV = "MLXSERVE_CPU_BLAS"
"""``auto`` (the default), ``off``, or the path of a library with the CBLAS and LAPACK
interface to give MLX's CPU backend instead of the one its Linux wheel carries."""

CPU_BLAS_LIBRARIES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libopenblas.so.0")
"""What ``auto`` looks for, in order: Intel's oneMKL from this Python environment (the ``mkl``
wheel: mlxserve's ``cpu-blas`` extra, Linux x86-64), then a system OpenBLAS (``apt install
libopenblas0``)."""

_cpu_blas: str | None = None


def use_cpu_blas() -> str | None:
    """Give MLX's CPU backend an optimized BLAS in this process, before MLX loads; the library
    loaded, or ``None`` when none was (on a Mac, with ``MLXSERVE_CPU_BLAS=off``, when none is
    found, or when ``mlx.core`` is already loaded). Called by ``BlasBeforeMlx`` as ``mlx.core``
    is first imported.

    MLX's Linux CPU wheel (``mlx-cpu``) links the reference BLAS (netlib's, unoptimized), and
    every matmul of the MLX runner on a Linux CPU goes through its ``cblas_sgemm``: measured on
    this project's 2-core Linux machines, a 1024x1024 float32 matmul took 410 ms there and 7 ms
    with oneMKL, and a SmolLM2-135M burst of eight clients decoded 4.4 tokens/s against 53
    (docs/PERFORMANCE.md, issue 26). A library loaded with ``RTLD_GLOBAL`` before ``libmlx.so``
    is searched first for the symbols ``libmlx.so`` needs, so MLX calls it with no change to
    MLX; it must happen before ``mlx.core``'s first import. oneMKL is told to use GNU OpenMP,
    the runtime llama.cpp's threads use, so a process holding both runs one OpenMP runtime (a
    setting the user made wins). On a Mac MLX runs on Metal and its CPU side uses Accelerate:
    nothing to do."""
    global _cpu_blas
    if _cpu_blas is not None or sys.platform != "linux" or "mlx.core" in sys.modules:
        return _cpu_blas
    choice = os.environ.get(CPU_BLAS_ENV, "auto")
    if choice.lower() in {"0", "off", "false", "no", "none"}:
        return None
    import ctypes

    for path in [choice] if choice != "auto" else _cpu_blas_candidates():
        if "mkl" in Path(path).name:
            with contextlib.suppress(OSError):
                ctypes.CDLL("libgomp.so.1")
                os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
        except OSError:
            continue
        if not hasattr(library, "cblas_sgemm"):  # loaded, but MLX would not call it
            continue
        _cpu_blas = path
        return path
    return None


class BlasBeforeMlx:
    """An import hook (``sys.meta_path``) that calls ``use_cpu_blas`` when ``mlx.core`` is
    about to be imported for the first time, then removes itself; it finds nothing itself.

    Installed when ``mlxserve`` is imported, so that whichever of its modules first imports MLX
    (a runner in a worker, ``mlxctl run --local``, the chat core's family detection, a bench)
    does so on the optimized BLAS, while a process that never computes with MLX (``mlxctl list``,
    a llama.cpp worker) loads no BLAS at all. Written by hand because the BLAS must be loaded
    in the gap between "MLX is wanted" and "``libmlx.so`` is loaded", which only an import hook
    sees."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "mlx.core":
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            use_cpu_blas()

    @classmethod
    def install(cls) -> None:
        if sys.platform == "linux" and not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls())


def cpu_blas() -> str:
    """The BLAS MLX's CPU backend uses in this process, by name, for ``/api/ps``."""
    if is_apple_silicon():
        return "accelerate"
    return Path(_cpu_blas).name if _cpu_blas else "reference"


def _cpu_blas_candidates() -> list[str]:
    import site

    folders = [Path(sys.prefix) / "lib", Path(site.getuserbase()) / "lib"]
    found = [  # os.path.isfile: a folder this user cannot enter is no error (Path's raises)
        str(folder / name)
        for name in CPU_BLAS_LIBRARIES[:2]
        for folder in folders
        if os.path.isfile(folder / name)
    ]
    return [*found, CPU_BLAS_LIBRARIES[2]]


def default_gpu_layers() -> int:
    """llama.cpp: all layers on Metal on a Mac; none elsewhere (no GPU build here)."""
    return -1 if is_apple_silicon() else 0


def default_threads() -> int:
    """Physical-ish cores: llama.cpp slows down when hyper-threads fight over one core.

    None is left to the daemon's own threads: through the daemon they spend well under a core
    (about 0.6 ms of CPU per token at eight clients against ~10 ms of llama.cpp's; the HTTP
    side, the worker's loop and the channel), and on a quiet 2-core CPU two llama.cpp threads
    gave ~1.5x one thread's tokens/s at one and four clients. One thread wins only when other
    processes keep both cores busy (3x at one client, 1.4x at eight, at load average 12): that
    is the machine's load, not ours, and it changes after a model is loaded, so it is left to
    the user (``num_thread``). Measured with ``bench.ceiling --threads-compare`` and
    ``bench.load --threads`` (docs/PERFORMANCE.md, issue 26)."""
    count = os.cpu_count() or 1
    return max(1, count if count <= 4 else count // 2)


def llama_cpp_flash_attention(*, drafts: bool = False, quantized_v: bool = False) -> bool:
    """Whether the llama.cpp slot engine asks for flash attention, for a model that verifies
    prompt-lookup ``drafts`` or not and a KV cache whose V is quantized or not.

    On: on Metal (llama.cpp's own choice there, with kernels of its own: not measured by this
    project); for a quantized V cache (llama.cpp keeps one only with flash attention); and where
    drafts are verified: without it, ggml's CPU attention over several tokens of one sequence in
    one ``llama_decode`` (a verify step) rounds differently from one token at a time, so greedy
    prompt lookup drifts from plain decoding (``tests/test_speculative.py`` failed at the 15th
    token of the default model with it off). Off otherwise, on the CPU: with llama-cpp-python
    0.3.36 on this project's 2-core Linux machines a 45-token chunk after 1,500 cached tokens
    costs 4.25x, and a decode step at 1,500 tokens of context 2.3x, more with it on
    (docs/PERFORMANCE.md, issue 26), and every other exact-output promise holds with it off
    (batched = solo, a prefill resumed from a cached prefix = a cold one: each sequence's
    decode step is one query row, and a prompt's chunks are the same whatever shares the
    batch). ``MLXSERVE_LLAMACPP_FLASH_ATTENTION`` (``1``/``0``) overrides the choice, for
    measuring it; a quantized V cache keeps it on regardless.
    """
    if quantized_v:
        return True
    override = os.environ.get("MLXSERVE_LLAMACPP_FLASH_ATTENTION")
    if override is not None:
        return override not in {"0", "false", "no", "off"}
    return is_apple_silicon() or drafts


LLAMA_CPP_UNSAFE_FEATURES = ("AMX_INT8 = 1",)
"""CPU features (as ``llama_print_system_info`` reports them) under which llama.cpp's "extra"
CPU buffer types crash: with the AMX buffer type that a native build enables on Xeons with AMX,
``llama_decode`` dies with SIGSEGV for AMX-eligible weights (Q4_0, Q4_1, Q8_0, K-quants: the
default model's Q4_1 included), measured with llama-cpp-python 0.3.36 on this project's Linux
machines; F32/F16 weights never use it."""


GGML_NO_BACKTRACE = "GGML_NO_BACKTRACE"
"""When set, ggml's abort (a failed ``GGML_ASSERT``) prints its message and aborts at once;
unset, it first runs gdb on the process for a backtrace where gdb is installed, which took
seconds per crash on this project's Linux machines and fills the log with gdb's output. A
worker's or a trial's crash is reported with the assertion's line; the backtrace helps no user."""


def worker_environment(environment: dict[str, str]) -> dict[str, str]:
    """The environment of a runner's worker process (or its trial): the daemon's, plus ggml's
    abort without a debugger (``GGML_NO_BACKTRACE``).

    OpenMP is left as the libraries run it by themselves: libgomp's default spin before its
    threads sleep (``GOMP_SPINCOUNT``, 300,000 pauses, ~3 ms on this project's Linux machines)
    outlasts the gap between two ``llama_decode`` calls (0.3-0.8 ms of Python), so llama.cpp's
    second thread is awake when the next token's graph starts, and oneMKL's threads stay awake
    between a token's few hundred matmuls. A shorter spin (20,000, set here before) cost one
    llama.cpp client 2.5-5 % of its tokens/s on a quiet machine (each decode 0.4-0.7 ms longer:
    a futex wake and sleeps at barriers) and an MLX client 11 %; it gained 1.25x on a machine
    whose cores are busy with other processes (docs/PERFORMANCE.md). A user's own setting
    reaches the worker unchanged."""
    worker = dict(environment)
    worker.setdefault(GGML_NO_BACKTRACE, "1")
    return worker


def make_llama_cpp_safe(llama_cpp: Any) -> Any:
    """``llama_cpp``, with every model it loads from now on kept out of llama.cpp's extra CPU
    buffer types (AMX tiles, repacked layouts) on a CPU where they crash the process.

    Done by wrapping llama-cpp-python's ``llama_model_default_params``, because both our own
    loader and its ``Llama`` class (the embedding context, tests, benches) start from it and
    ``Llama`` has no parameter for ``use_extra_bufts``. Elsewhere (every Mac) nothing changes;
    where it applies, weights are not repacked, which only costs prompt speed on such Xeons.
    Idempotent."""
    low = llama_cpp.llama_cpp
    if getattr(low, "_mlxserve_checked", False):
        return llama_cpp
    info = low.llama_print_system_info().decode("utf-8", "replace")
    if any(feature in info for feature in LLAMA_CPP_UNSAFE_FEATURES):
        defaults = low.llama_model_default_params

        def without_extra_buffers() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = without_extra_buffers
        llama_cpp.llama_model_default_params = without_extra_buffers
    low._mlxserve_checked = True
    return llama_cpp


PR_SET_PDEATHSIG = 1
"""Linux's ``prctl`` option: a signal this process gets when its parent dies."""


def die_with_parent() -> None:
    """A worker (or a trial) killed when the daemon that started it dies, however it dies.

    A worker hung inside a library (two llama.cpp threads asserting at once) never reads its
    socket again, so it cannot notice the daemon's exit on its own; without this it lives on,
    holding its model's memory. Linux has ``PR_SET_PDEATHSIG`` for exactly this; macOS has no
    such call, and there the daemon's SIGTERM path stops its workers itself. A parent gone
    before the call is caught by the parent pid check after it.
    """
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


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


def hold_mlx_cache(mx: Any) -> None:
    """Make ``mx.clear_cache`` a no-op for the rest of this process, off Metal. Called once a
    process joins a distributed group, before its first collective.

    Off Metal, mlx's allocator (``backend/no_gpu/allocator.cpp``) clears its cache only after
    ``synchronize_cpu_streams()``, which waits for every CPU stream, and holds the GIL while
    it waits. When a rank dies mid-step, the group's stream can keep a collective pending for
    good (mlx cannot cancel one, and ``BatchGenerator`` dispatches the next step's before it is
    asked for), so any later ``clear_cache`` (mlx-lm calls it during every prefill, on every
    model's thread) would stall every MLX model and the event loop with it. Patched on the
    module because mlx-lm's calls must be covered too. Little is lost: that allocator caches at
    most 32 MiB. Metal's ``clear_cache`` only empties its pool and is left alone.
    """
    if is_apple_silicon() or getattr(mx.clear_cache, "_mlxserve_held", False):
        return

    def held() -> None:
        """``mx.clear_cache``, held by ``platform.hold_mlx_cache``: a no-op."""

    held._mlxserve_held = True  # type: ignore[attr-defined]
    mx.clear_cache = held


def total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def process_memory_bytes(pid: int) -> int | None:
    """The resident memory of process ``pid`` (a runner's worker), ``None`` if unknown."""
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None
    try:
        import subprocess

        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
        return int(out.stdout.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def service_manager() -> str | None:
    """What starts user daemons at login here: ``launchd`` (macOS) or ``systemd`` (Linux)."""
    if sys.platform == "darwin":
        return "launchd"
    if sys.platform.startswith("linux"):
        return "systemd"
    return None
