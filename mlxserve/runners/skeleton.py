"""What every runner does the same way, written once: the runners subclass ``RunnerBase``.

The protocol (``base.py``) says what a runner offers; this is how the built-in runners offer
the parts that do not depend on their library: refusing a call before a model is loaded,
loading with the model's load options and reporting the ``LoadedModelInfo``, ``describe``
(with the prompt cache's counters), unloading (the library's part, then the prompt cache's
spill to disk), and importing the runner's library with a clear error when its extra is not
installed. A runner that does not embed refuses to; one that serves embedding models only has
no chat template and no special tokens (the defaults), and refuses to generate
(``EncoderRunnerBase``).
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any, TypeVar

from mlxserve.errors import ModelNotLoadedError, RunnerUnavailableError, UnsupportedFeatureError
from mlxserve.runners.base import (
    EmbedRequest,
    EmbedResult,
    GenerateChunk,
    GenerateRequest,
    LoadedModelInfo,
    RerankRequest,
    RerankResult,
    RunnerOptions,
)
from mlxserve.runners.loading import load_options
from mlxserve.runners.pooling import refuse_generation
from mlxserve.runners.promptcache import PromptCache
from mlxserve.runners.registry import plugins
from mlxserve.runners.rerank import refuse_rerank, reranker_only
from modelstore.model import LocalModel

T = TypeVar("T")


def import_library(runner: str, *modules: str) -> list[ModuleType]:
    """The modules a runner's library needs, imported; a missing one is
    ``RunnerUnavailableError`` with the install hint the runner's registry entry declares."""
    try:
        return [importlib.import_module(module) for module in modules]
    except ImportError as exc:
        plugin = plugins().get(runner)
        hint = f": {plugin.install_hint}" if plugin is not None else ""
        raise RunnerUnavailableError(f"the {runner} runner is not installed{hint}") from exc


class RunnerBase:
    """The library-independent half of a ``ModelRunner``."""

    name = ""
    """The runner's registry name (``registry.py``), also how its errors name it."""

    def __init__(self) -> None:
        self._info: LoadedModelInfo | None = None
        self._disk: PromptCache | None = None
        """The prompt cache's disk tier (``promptcache.py``), if the runner keeps one."""

    @property
    def max_parallel(self) -> int:
        return 1

    def _loaded(self, value: T | None) -> T:
        """``value`` (a model, a tokenizer, a context), or ``ModelNotLoadedError`` if unset."""
        if value is None:
            raise ModelNotLoadedError(f"no model is loaded in the {self.name} runner")
        return value

    def _require(self) -> Any:
        """What a call needs of the loaded model; ``ModelNotLoadedError`` before a load."""
        raise NotImplementedError

    async def load(self, model: LocalModel, options: RunnerOptions) -> LoadedModelInfo:
        """Load ``model`` with its load options (``loading.load_options``). What the runner
        reports: the model's own format, architecture and quantization, one sequence at a
        time, and the time the load took; ``_load`` adds the rest or overrides."""
        started = time.perf_counter_ns()
        fields = await self._load(model, load_options(model, options))
        reported = {
            "runner": self.name,
            "format": model.format,
            "architecture": model.architecture,
            "quantization": model.quantization,
            "max_parallel": 1,
            "load_duration_ns": time.perf_counter_ns() - started,
        }
        self._info = LoadedModelInfo(**(reported | fields))
        return self._info

    async def _load(self, model: LocalModel, options: RunnerOptions) -> dict[str, Any]:
        """Load the model; the ``LoadedModelInfo`` fields only the runner knows (at least
        ``parameter_count``, ``context_length`` and ``memory_bytes``)."""
        raise NotImplementedError

    def describe(self) -> LoadedModelInfo:
        info = self._loaded(self._info)
        if self._disk is not None:
            info.details["prompt_cache"] = self._disk.stats()
        return info

    async def unload(self) -> None:
        disk, self._disk = self._disk, None
        try:
            await self._release()
        finally:
            if disk is not None:
                await asyncio.to_thread(disk.close)  # the spill: pending writes reach the disk

    async def _release(self) -> None:
        """Let go of the library's model (on the thread that owns it)."""
        raise NotImplementedError

    async def spill(self) -> None:
        """Wait until every cached prompt is on disk (the model may be unloaded next)."""
        if self._disk is not None:
            await asyncio.to_thread(self._disk.spill)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        raise UnsupportedFeatureError(f"models do not embed on the {self.name} runner")

    @property
    def chat_template(self) -> str | None:
        return None

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"bos_token": "", "eos_token": ""}

    @property
    def image_marker(self) -> str | None:
        return None


class EncoderRunnerBase(RunnerBase):
    """A runner of embedding-only models: it embeds, or, for a reranker (rank pooling), scores
    query-document pairs; it never generates."""

    def __init__(self) -> None:
        super().__init__()
        self._model_name = ""

    @property
    def _ranks(self) -> bool:
        """Whether the loaded model is a reranker (``False`` before a load)."""
        raise NotImplementedError

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self._require()
        if self._ranks:
            raise reranker_only(self._model_name)
        return await self._embed(request)

    async def rerank(self, request: RerankRequest) -> RerankResult:
        self._require()
        if not self._ranks:
            raise refuse_rerank(self._model_name)
        return await self._rank(request)

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if self._ranks:
            raise reranker_only(self._model_name)
        raise refuse_generation(self._model_name)

    async def _embed(self, request: EmbedRequest) -> EmbedResult:
        raise NotImplementedError

    async def _rank(self, request: RerankRequest) -> RerankResult:
        raise NotImplementedError
