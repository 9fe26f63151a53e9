"""LoRA adapters as layers of a model: checked against the base when the model is created,
handed to mlx-lm at load in the folder layout ``mlx_lm.load(..., adapter_path=...)`` reads.

An adapter is what ``mlx_lm.lora`` writes: ``adapters.safetensors`` (``<module>.lora_a`` of
shape ``(in, rank)`` and ``<module>.lora_b`` of shape ``(rank, out)`` per adapted linear
layer) and ``adapter_config.json``. Both become layers of their own (``mediatypes.ADAPTER``,
``ADAPTER_CONFIG``), so the adapter is digest-pinned, verified with the model and packed with
it. mlx-lm applies one adapter per load, so a model has at most one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from modelstore import mediatypes
from modelstore.blobs import hash_file
from modelstore.draft import LayerSource, ModelDraft
from modelstore.errors import ImportSourceError
from modelstore.quantize import REWRITTEN_TYPES, rewrite_mlx_weights
from modelstore.sources import safetensors_shapes

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_TITLE = "mlxserve.adapter.safetensors"
ADAPTER_CONFIG_TITLE = "mlxserve.adapter_config.json"
"""Prefixed titles: never a model's own file, and not ``model*.safetensors``, which
``mlx_lm.load`` would read as the base's weights."""
FINE_TUNE_TYPES = frozenset({"lora", "dora"})
"""``fine_tune_type`` values that are adapters (``full`` fine-tuning writes whole weights)."""


def adapter_layers(folder: Path, base: ModelDraft) -> list[LayerSource]:
    """The adapter in ``folder`` as layers, refused unless every module it adapts exists in
    ``base`` with the shapes it was trained on."""
    weights, config_path = folder / ADAPTER_FILE, folder / ADAPTER_CONFIG_FILE
    if not weights.is_file() or not config_path.is_file():
        raise ImportSourceError(
            f"{folder} is not an mlx_lm.lora adapter: it needs {ADAPTER_FILE} and "
            f"{ADAPTER_CONFIG_FILE}"
        )
    if base.config.format != "mlx":
        raise ImportSourceError("adapters apply to MLX models (mlx_lm.lora's format)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ImportSourceError(f"{config_path}: not valid JSON") from None
    kind = config.get("fine_tune_type", "lora") if isinstance(config, dict) else None
    if kind not in FINE_TUNE_TYPES:
        raise ImportSourceError(f"{config_path}: fine_tune_type {kind!r} is not an adapter")
    base_shapes: dict[str, list[int]] = {}
    for layer in base.layers:
        if layer.media_type == mediatypes.WEIGHTS_SAFETENSORS and layer.path:
            base_shapes.update(safetensors_shapes(layer.path))
    for name, shape in safetensors_shapes(weights).items():
        module, _, part = name.rpartition(".")
        _check_module(module, part, shape, base_shapes)
    return [
        LayerSource(mediatypes.ADAPTER, ADAPTER_TITLE, path=weights),
        LayerSource(mediatypes.ADAPTER_CONFIG, ADAPTER_CONFIG_TITLE, path=config_path),
    ]


def _check_module(
    module: str, part: str, shape: list[int], base_shapes: dict[str, list[int]]
) -> None:
    base = base_shapes.get(f"{module}.weight")
    if base is None:
        raise ImportSourceError(f"the adapter changes {module}, which the base model lacks")
    if len(shape) != 2 or part not in ("lora_a", "lora_b", "m"):
        return
    out_features = base[0]
    quantized = f"{module}.scales" in base_shapes
    if part == "lora_b" and shape[1] != out_features:
        raise ImportSourceError(
            f"the adapter's {module} outputs {shape[1]} values; the base's outputs {out_features}"
        )
    if part == "lora_a" and not quantized and shape[0] != base[1]:
        raise ImportSourceError(
            f"the adapter's {module} takes {shape[0]} values; the base's takes {base[1]}"
        )


def adapter_folder(model_folder: Path, target: Path) -> Path | None:
    """A folder under ``target`` with the model's adapter layers under mlx-lm's file names
    (links into ``model_folder``), or ``None`` when the model has no adapter."""
    weights = model_folder / ADAPTER_TITLE
    if not weights.exists():
        return None
    folder = target / weights.resolve().name[:16]
    if not folder.is_dir():
        building = target / f".{folder.name}.{os.getpid()}.partial"
        building.mkdir(parents=True, exist_ok=True)
        for title, name in (
            (ADAPTER_TITLE, ADAPTER_FILE),
            (ADAPTER_CONFIG_TITLE, ADAPTER_CONFIG_FILE),
        ):
            link = building / name
            if not link.is_symlink():
                link.symlink_to((model_folder / title).resolve())
        with contextlib.suppress(OSError):  # another process built it first
            os.replace(building, folder)
    return folder


def fuse_adapter(draft: ModelDraft, work: Path) -> ModelDraft:
    """``draft`` with its adapter fused into new weights (``mlx_lm fuse``'s way: each adapted
    linear layer's ``fuse()``), and the adapter layers dropped."""
    from mlx.utils import tree_unflatten

    paths = {layer.media_type: layer.path for layer in draft.layers if layer.path}
    if mediatypes.ADAPTER not in paths:
        raise ImportSourceError("--fuse needs a model with an adapter (adapters: in the spec)")
    adapter = work / "adapter"
    adapter.mkdir(parents=True)
    (adapter / ADAPTER_FILE).symlink_to(paths[mediatypes.ADAPTER].resolve())
    (adapter / ADAPTER_CONFIG_FILE).symlink_to(paths[mediatypes.ADAPTER_CONFIG].resolve())

    def fuse(model: Any, config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(fused))
        return model, config

    new = rewrite_mlx_weights(draft, work, fuse, adapter)
    replaced = {mediatypes.ADAPTER, mediatypes.ADAPTER_CONFIG, *REWRITTEN_TYPES}
    kept = [layer for layer in draft.layers if layer.media_type not in replaced]
    config = dataclasses.replace(
        draft.config,
        source={**draft.config.source, "fused_adapter": hash_file(paths[mediatypes.ADAPTER])[0]},
    )
    return ModelDraft(config, new + kept)
