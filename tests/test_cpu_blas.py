"""MLX's CPU backend on an optimized BLAS (``platform.use_cpu_blas``): the library loaded as
``mlx.core`` is first imported in a process that imported ``mlxserve``, and never in one that
does not use MLX; MLX's matmuls through it equal numpy's; the off switch, a
library that does not load and an MLX loaded first all leave MLX on its own BLAS and say so; a
model served by the daemon's worker reports the one it computes with in ``/api/ps``."""

from __future__ import annotations

import json
import subprocess
import sys

import aiohttp
import pytest

from mlxserve import platform

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="only MLX's Linux wheel links the reference BLAS"
)

PROBE = """
import json, sys
{first}
from mlxserve import platform
import mlx.core as mx
import numpy as np
a = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((96, 80)).astype(np.float32)
product = np.array(mx.array(a) @ mx.array(b))
print(json.dumps({{"blas": platform.cpu_blas(), "error": float(np.abs(product - a @ b).max())}}))
"""


def probe(environment: dict[str, str] | None = None, first: str = "") -> dict:
    """A fresh process's BLAS and its largest matmul error against numpy's."""
    import os

    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(environment or {})},
        check=True,
    )
    return json.loads(result.stdout)


def optimized_blas() -> str:
    """The library ``auto`` must find here: the ``cpu-blas`` extra's oneMKL, when installed (read
    from the package's metadata, not from what ``auto`` found)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the cpu-blas extra (mkl) is not installed")
    return "libmkl_rt.so"


def test_auto_gives_mlx_an_optimized_blas_whose_matmuls_equal_numpys():
    expected = optimized_blas()
    measured = probe()
    assert measured["blas"].startswith(expected), measured
    assert measured["error"] < 1e-3, measured


def test_a_process_that_never_imports_mlx_loads_no_blas():
    """``mlxctl list`` and a llama.cpp worker import ``mlxserve`` but never MLX."""
    optimized_blas()
    script = (
        "import mlxserve.platform, mlxctl.cli, sys; "
        "maps = open('/proc/self/maps').read(); "
        "print('mlx.core' in sys.modules, 'libmkl' in maps, 'libopenblas' in maps)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "False", "False"], done.stdout


@pytest.mark.parametrize(
    ("environment", "first"),
    [
        ({platform.CPU_BLAS_ENV: "off"}, ""),
        ({platform.CPU_BLAS_ENV: "/nonexistent/libblas.so"}, ""),
        ({platform.CPU_BLAS_ENV: "libz.so.1"}, ""),  # loads, but is no BLAS
        ({}, "import mlx.core"),  # too late: MLX already resolved its BLAS
    ],
    ids=["off", "a-library-that-does-not-load", "a-library-that-is-no-blas", "mlx-loaded-first"],
)
def test_otherwise_mlx_keeps_its_own_blas_and_says_so(environment, first):
    optimized_blas()
    measured = probe(environment, first)
    assert measured["blas"] == "reference"
    assert measured["error"] < 1e-3, measured


async def test_a_model_served_by_a_worker_reports_the_blas_it_computes_with(daemon):
    expected = optimized_blas()
    async with aiohttp.ClientSession() as session:
        body = {"model": "tiny:mlx", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
        async with session.post(f"{daemon.url}/api/generate", json=body) as response:
            assert response.status == 200, await response.text()
        async with session.get(f"{daemon.url}/api/ps") as response:
            running = {m["name"]: m for m in (await response.json())["models"]}
    assert running["tiny:mlx"]["cpu_blas"].startswith(expected), running["tiny:mlx"]


def test_workers_keep_libgomps_default_spin_unless_the_user_sets_one():
    """llama.cpp's threads (between two decodes) and oneMKL's (between a token's matmuls) run on
    libgomp; with a spin shorter than those gaps they sleep and are woken for each, which cost
    one llama.cpp client 2.5-5 % and one MLX client 11 % (docs/PERFORMANCE.md)."""
    assert "GOMP_SPINCOUNT" not in platform.worker_environment({})
    assert platform.worker_environment({"GOMP_SPINCOUNT": "1"})["GOMP_SPINCOUNT"] == "1"
    assert platform.worker_environment({})[platform.GGML_NO_BACKTRACE] == "1"
