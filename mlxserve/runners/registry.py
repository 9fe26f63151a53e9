"""The runner registry: every runner, built-in or from another package, is a ``RunnerPlugin``
found through the ``mlxserve.runners`` entry-point group.

A package adds a runner by declaring, in its own ``pyproject.toml``::

    [project.entry-points."mlxserve.runners"]
    myrunner = "mypackage.plugin:PLUGIN"

where ``PLUGIN`` is a ``RunnerPlugin``. The declaration is cheap to import (it names the
runner's class by string), so listing the registry never imports MLX or llama.cpp. The
built-in runners below are registered the same way, in this project's ``pyproject.toml``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from modelstore.model import LocalModel

ENTRY_POINT_GROUP = "mlxserve.runners"
COMPLETION = "completion"
EMBEDDING = "embedding"
VISION = "vision"
"""The capabilities a runner serves, named as Ollama's ``/api/show`` names them."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerPlugin:
    """What a runner declares about itself; ``choose_runner`` reads only this."""

    name: str
    factory: str
    """``module:Class`` of the runner; imported only when the runner is made."""
    formats: tuple[str, ...]
    """Model formats it runs (``mlx``, ``gguf``)."""
    capabilities: tuple[str, ...]
    """What the models it runs are for: ``completion`` (chat/generate, embeddings from hidden
    states as a bonus), ``embedding`` (embedding-only encoders, which refuse to chat) or
    ``vision`` (vision-language models: chat with images)."""
    requires: tuple[str, ...]
    """Top-level modules that must be importable for it to run."""
    install_hint: str
    accepts: dict[str, str] = field(default_factory=dict)
    """Per format, a ``module:function`` taking the ``LocalModel`` that says whether this
    runner can run it (a format absent here: every model of that format)."""
    trials: dict[str, str] = field(default_factory=dict)
    """Per format, a ``module:function`` taking the ``LocalModel``: the runner's load made
    cheap (no copy of the weights, no full context) that raises or aborts where the real load
    would, run in a throwaway process before a model is stored (``runners/trial.py``). A format
    absent here is stored untried."""

    def installed(self) -> bool:
        return all(importlib.util.find_spec(module) is not None for module in self.requires)

    def runs(self, model: LocalModel, capability: str) -> bool:
        if model.format not in self.formats or capability not in self.capabilities:
            return False
        check = self.accepts.get(model.format)
        return check is None or bool(_resolve(check)(model))

    def make(self) -> Any:
        return _resolve(self.factory)()

    def run_trial(self, model: LocalModel) -> None:
        _resolve(self.trials[model.format])(model)


def _resolve(target: str) -> Any:
    """``module:attribute``, imported when first needed."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _on_llamacpp(name: str, factory: str, *capabilities: str, trial: str) -> RunnerPlugin:
    """A built-in runner over llama-cpp-python: GGUF files, the ``llamacpp`` extra, tried at
    create by ``trial``."""
    hint = "pip install 'mlxserve[llamacpp]'"
    return RunnerPlugin(
        name, factory, ("gguf",), capabilities, ("llama_cpp",), hint, trials={"gguf": trial}
    )


def _on_mlx_folders(
    name: str, factory: str, capability: str, extra: str, *modules: str
) -> RunnerPlugin:
    """A built-in runner of HF-style MLX folders over ``mlx`` and ``modules``, installed with
    this project's ``extra``."""
    hint = f"pip install 'mlxserve[{extra}]'"
    return RunnerPlugin(name, factory, ("mlx",), (capability,), ("mlx", *modules), hint)


MLX = RunnerPlugin(
    name="mlx",
    factory="mlxserve.runners.mlx.runner:MlxRunner",
    formats=("mlx", "gguf"),
    capabilities=(COMPLETION,),
    requires=("mlx", "mlx_lm"),
    install_hint="pip install mlx mlx-lm",
    accepts={"gguf": "mlxserve.runners.mlx.gguf_convert:mlx_converts"},
    trials={"gguf": "mlxserve.runners.mlx.runner:trial_gguf"},
)
# A GGUF vision model is one with a projector (mmproj), which the runner loads with libmtmd.
LLAMACPP = _on_llamacpp(
    "llamacpp",
    "mlxserve.runners.llamacpp.runner:LlamaCppRunner",
    COMPLETION,
    VISION,
    trial="mlxserve.runners.llamacpp.runner:trial_load",
)
MLX_EMBEDDINGS = _on_mlx_folders(
    "mlx-embeddings",
    "mlxserve.runners.mlx.embeddings:MlxEmbeddingRunner",
    EMBEDDING,
    "embeddings",
    "mlx_embeddings",
)
LLAMACPP_EMBEDDINGS = _on_llamacpp(
    "llamacpp-embeddings",
    "mlxserve.runners.llamacpp.embed:LlamaCppEmbeddingRunner",
    EMBEDDING,
    trial="mlxserve.runners.llamacpp.runner:trial_load_weights",
)
MLX_VLM = _on_mlx_folders(
    "mlx-vlm", "mlxserve.runners.mlx.vision:MlxVisionRunner", VISION, "vision", "mlx_vlm", "PIL"
)


@cache
def plugins() -> dict[str, RunnerPlugin]:
    """Every registered runner by name, in entry-point order; a broken plugin is skipped
    (and logged) so that one bad package cannot take the daemon down."""
    found: dict[str, RunnerPlugin] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = entry.load()
        except Exception:  # a third-party package's import error: theirs, not ours
            log.exception("runner plugin %s could not be loaded", entry.value)
            continue
        if not isinstance(plugin, RunnerPlugin):
            log.error("runner plugin %s is not a RunnerPlugin", entry.value)
            continue
        found.setdefault(plugin.name, plugin)
    return found
