"""What the MLX runners share: importing MLX, the one engine thread every MLX model runs on
(``engine.py``), loading a model on it, what they measure of it, and letting its arrays go."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from mlxserve import platform
from mlxserve.errors import UnsupportedArchitectureError
from mlxserve.runners.engine import EngineThread, shared_engine
from mlxserve.runners.skeleton import RunnerBase, import_library
from modelstore.model import LocalModel

logger = logging.getLogger(__name__)


def backend_details() -> dict[str, Any]:
    """Where MLX computes in this process, for a load's details: on Metal or not, and the BLAS
    its CPU backend calls (``platform.use_cpu_blas``)."""
    import mlx.core as mx

    blas = platform.cpu_blas()
    if blas == "reference" and mx.default_device().type == mx.DeviceType.cpu:
        logger.warning(
            "MLX computes on the CPU with the reference BLAS here, about a tenth of the speed"
            " of an optimized one: install mlxserve's cpu-blas extra (oneMKL) or a system"
            " OpenBLAS, or name one with %s",
            platform.CPU_BLAS_ENV,
        )
    return {"metal": platform.is_apple_silicon(), "cpu_blas": blas}


def import_mlx(runner: str, *modules: str) -> list[ModuleType]:
    """``mlx.core`` and the runner's other modules (``import_library``); every model comes
    from the store, so the Hugging Face hub is never asked."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return import_library(runner, "mlx.core", *modules)


class MlxRunnerBase(RunnerBase):
    """A runner whose model lives on MLX's engine thread (an embedding runner mixes in
    ``skeleton.EncoderRunnerBase`` too)."""

    def __init__(self, engine: EngineThread | None = None) -> None:
        super().__init__()
        self._model: Any = None
        self._engine = engine or shared_engine()

    async def _build(self, model: LocalModel, build: Callable[[], None]) -> None:
        """``build()`` on the engine thread, where a ``ValueError`` or a missing file from the
        library (named as the runner is: ``mlx-vlm``, ``mlx-embeddings``) means an architecture
        it cannot load."""

        def guarded() -> None:
            try:
                build()
            except (ValueError, FileNotFoundError) as exc:
                raise UnsupportedArchitectureError(
                    f"{self.name} cannot load {model.name}: {exc}"
                ) from exc

        await self._engine.call(guarded)

    def _measured(self) -> dict[str, Any]:
        """The loaded model's parameters, counted, and MLX's active memory."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        return {
            "parameter_count": sum(v.size for _, v in tree_flatten(self._model.parameters())),
            "memory_bytes": int(mx.get_active_memory()),
        }

    async def _release(self) -> None:
        def release() -> None:
            import mlx.core as mx

            self._drop()
            mx.clear_cache()

        await self._engine.call(release)

    def _drop(self) -> None:
        """On the engine thread: forget the model's arrays, so ``clear_cache`` frees them."""
        self._model = None
