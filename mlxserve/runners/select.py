"""Which runner runs a model: its format decides what can, the platform what is preferred."""

from __future__ import annotations

import importlib.util

from mlxserve import platform
from mlxserve.errors import RunnerUnavailableError, UnsupportedFormatError
from mlxserve.runners.base import ModelRunner
from mlxserve.runners.gguf_convert import mlx_can_convert
from modelstore.model import LocalModel

RUNNERS_FOR_FORMAT = {
    "mlx": ("mlx",),
    "gguf": ("mlx", "llamacpp"),
}
"""A GGUF runs on llama.cpp natively and on MLX after conversion (``gguf_convert``)."""
RUNNER_MODULES = {"mlx": "mlx_lm", "llamacpp": "llama_cpp"}
RUNNER_EXTRAS = {"mlx": "pip install mlx mlx-lm", "llamacpp": "pip install 'mlxserve[llamacpp]'"}


def runner_installed(name: str) -> bool:
    return importlib.util.find_spec(RUNNER_MODULES[name]) is not None


def choose_runner(model: LocalModel, requested: str | None = None) -> str:
    """The runner name for ``model``: ``requested`` if it can run it, else the preferred one."""
    capable = RUNNERS_FOR_FORMAT.get(model.format, ())
    if requested is not None:
        if requested not in RUNNER_MODULES:
            raise UnsupportedFormatError(
                f"unknown runner {requested!r} (choose from {', '.join(RUNNER_MODULES)})"
            )
        if requested not in capable:
            raise UnsupportedFormatError(
                f"the {requested} runner cannot run {model.name} ({model.format} format; "
                f"runners that can: {', '.join(capable)})",
                runners=list(capable),
            )
        if not runner_installed(requested):
            raise RunnerUnavailableError(
                f"the {requested} runner is not installed: {RUNNER_EXTRAS[requested]}"
            )
        return requested
    if model.format == "gguf" and not mlx_can_convert(model.architecture, model.quantization):
        capable = ("llamacpp",)
    ordered = [name for name in platform.preferred_runners() if name in capable]
    for name in ordered:
        if runner_installed(name):
            return name
    raise RunnerUnavailableError(
        f"no runner for {model.name} is installed: {RUNNER_EXTRAS[ordered[0]]}",
        runners=ordered,
    )


def make_runner(name: str) -> ModelRunner:
    if name == "mlx":
        from mlxserve.runners.mlx import MlxRunner

        return MlxRunner()
    if name == "llamacpp":
        from mlxserve.runners.llamacpp import LlamaCppRunner

        return LlamaCppRunner()
    raise UnsupportedFormatError(f"unknown runner {name!r}")
