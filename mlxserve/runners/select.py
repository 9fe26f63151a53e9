"""Which runner runs a model: the registry (``registry.py``) says which can, the platform which
is preferred."""

from __future__ import annotations

from mlxserve import platform
from mlxserve.errors import RunnerUnavailableError, UnsupportedFormatError
from mlxserve.runners.base import ModelRunner
from mlxserve.runners.registry import COMPLETION, EMBEDDING, VISION, RunnerPlugin, plugins
from modelstore.model import LocalModel


def required_capability(model: LocalModel) -> str:
    """An embedding model (the store recorded its pooling) needs an embedding runner, a
    vision-language model (the store recorded its processor) a vision runner."""
    if model.embedding is not None:
        return EMBEDDING
    return VISION if model.vision is not None else COMPLETION


def capable_runners(model: LocalModel) -> list[RunnerPlugin]:
    """The registered runners that can run ``model``, the platform's preferred first."""
    capability = required_capability(model)
    capable = [p for p in plugins().values() if p.runs(model, capability)]
    preferred = platform.preferred_runners()
    return sorted(
        capable, key=lambda p: preferred.index(p.name) if p.name in preferred else len(preferred)
    )


def choose_runner(model: LocalModel, requested: str | None = None) -> str:
    """The runner name for ``model``: ``requested`` if it can run it, else the preferred one."""
    capable = capable_runners(model)
    names = [p.name for p in capable]
    if requested is not None:
        registry = plugins()
        if requested not in registry:
            raise UnsupportedFormatError(
                f"unknown runner {requested!r} (choose from {', '.join(registry)})"
            )
        if requested not in names:
            raise UnsupportedFormatError(
                f"the {requested} runner cannot run {model.name} ({model.format} format; "
                f"runners that can: {', '.join(names) or 'none'})",
                runners=names,
            )
        if not registry[requested].installed():
            raise RunnerUnavailableError(
                f"the {requested} runner is not installed: {registry[requested].install_hint}"
            )
        return requested
    for plugin in capable:
        if plugin.installed():
            return plugin.name
    if not capable:
        raise UnsupportedFormatError(
            f"no registered runner can run {model.name} ({model.format} format, "
            f"{model.architecture or 'unknown'} architecture)",
            runners=[],
        )
    raise RunnerUnavailableError(
        f"no runner for {model.name} is installed: {capable[0].install_hint}", runners=names
    )


def make_runner(name: str) -> ModelRunner:
    plugin = plugins().get(name)
    if plugin is None:
        raise UnsupportedFormatError(f"unknown runner {name!r}")
    return plugin.make()
