"""LoRA adapters as layers of a model: checked against the base when the model is created,
handed to the runner at load.

An MLX model's adapter is what ``mlx_lm.lora`` writes: ``adapters.safetensors``
(``<module>.lora_a`` of shape ``(in, rank)`` and ``<module>.lora_b`` of shape ``(rank, out)``
per adapted linear layer) and ``adapter_config.json``. Both become layers of their own
(``mediatypes.ADAPTER``, ``ADAPTER_CONFIG``), so the adapter is digest-pinned, verified with the
model and packed with it; mlx-lm reads them in the folder layout of ``mlx_lm.load(...,
adapter_path=...)``. A GGUF model's adapter is a GGUF LoRA as llama.cpp's
``convert_lora_to_gguf.py`` writes it (and Ollama stores as its ``adapter`` layer): one layer,
``mediatypes.ADAPTER_GGUF``, applied by llama.cpp at load. mlx-lm applies one adapter per load,
so a model has at most one, whatever its format.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from modelstore import mediatypes
from modelstore.atomic import publish_folder
from modelstore.blobs import hash_file
from modelstore.draft import LayerSource, ModelDraft
from modelstore.errors import ImportSourceError
from modelstore.quantize import REWRITTEN_TYPES, rewrite_mlx_weights
from modelstore.sources import open_gguf, safetensors_shapes

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_TITLE = "mlxserve.adapter.safetensors"
ADAPTER_CONFIG_TITLE = "mlxserve.adapter_config.json"
GGUF_ADAPTER_TITLE = "mlxserve.adapter.gguf"
"""Prefixed titles: never a model's own file, and not ``model*.safetensors``, which
``mlx_lm.load`` would read as the base's weights (nor a second ``.gguf`` beside the weights:
the adapter is found by its media type, never by its extension)."""
FINE_TUNE_TYPES = frozenset({"lora", "dora"})
"""``fine_tune_type`` values that are adapters (``full`` fine-tuning writes whole weights)."""


def adapter_layers(path: Path, base: ModelDraft) -> list[LayerSource]:
    """The adapter at ``path`` as layers, refused unless every module it adapts exists in
    ``base`` with the shapes it was trained on."""
    if any(layer.media_type in mediatypes.ADAPTER_TYPES for layer in base.layers):
        raise ImportSourceError("the model has an adapter already; one adapter per model")
    if base.config.format == "gguf":
        return [_gguf_adapter_layer(path, base)]
    folder = path
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


def _gguf_adapter_layer(path: Path, base: ModelDraft) -> LayerSource:
    """A GGUF LoRA checked the way llama.cpp's ``llama_adapter_lora_init`` will check it at
    load (its type, architecture, and each ``<tensor>.lora_a``/``.lora_b`` pair against the
    base tensor's shape), so a mismatch is refused when the model is created, not at its first
    request. ``path`` is the ``.gguf`` or a folder holding exactly one."""
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ImportSourceError(
                f"{path.name}: a GGUF model's adapter is one GGUF LoRA file; found {len(found)}"
            )
        path = found[0]
    if not path.is_file():
        raise ImportSourceError(f"{path.name}: no such adapter file")
    weights = [layer.path for layer in base.layers if layer.media_type == mediatypes.WEIGHTS_GGUF]
    if len(weights) != 1 or weights[0] is None:
        raise ImportSourceError("a GGUF adapter needs a single-file GGUF base model")
    adapter, base_tensors = gguf_tensors(path), gguf_tensors(weights[0])
    if adapter.kind != "adapter" or adapter.adapter_type != "lora":
        raise ImportSourceError(
            f"{path.name} is not a GGUF LoRA adapter (general.type {adapter.kind!r}, "
            f"adapter.type {adapter.adapter_type!r}); convert it with llama.cpp's "
            "convert_lora_to_gguf.py"
        )
    if adapter.architecture != base_tensors.architecture:
        raise ImportSourceError(
            f"{path.name} adapts a {adapter.architecture} model; the base is "
            f"{base_tensors.architecture}"
        )
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, shape in adapter.shapes.items():
        module, _, part = name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise ImportSourceError(f"{path.name}: {name} is not a LoRA tensor")
        pairs.setdefault(module, {})[part] = shape
    if not pairs:
        raise ImportSourceError(f"{path.name} adapts no tensor")
    for module, parts in pairs.items():
        _check_gguf_pair(module, parts, base_tensors.shapes.get(module))
    return LayerSource(mediatypes.ADAPTER_GGUF, GGUF_ADAPTER_TITLE, path=path)


def _check_gguf_pair(module: str, parts: dict[str, list[int]], base: list[int] | None) -> None:
    """llama.cpp's rule, in GGML order (``ne[0]`` is the input width): ``lora_a`` is
    ``[in, rank]``, ``lora_b`` is ``[rank, out]`` for a base tensor ``[in, out]``."""
    if base is None:
        raise ImportSourceError(f"the adapter changes {module}, which the base model lacks")
    a, b = parts.get("lora_a"), parts.get("lora_b")
    if a is None or b is None or len(a) != 2 or len(b) != 2 or len(base) != 2:
        raise ImportSourceError(f"the adapter's {module} needs a 2-D lora_a and lora_b")
    if a[0] != base[0] or b[1] != base[1]:
        raise ImportSourceError(
            f"the adapter's {module} maps {a[0]} values to {b[1]}; the base's maps "
            f"{base[0]} to {base[1]}"
        )
    if a[1] != b[0]:
        raise ImportSourceError(f"the adapter's {module} has lora_a rank {a[1]}, lora_b {b[0]}")


@dataclasses.dataclass(frozen=True)
class GgufTensors:
    kind: str | None
    adapter_type: str | None
    architecture: str | None
    shapes: dict[str, list[int]]
    """Tensor name -> GGML shape (``ne``, innermost first)."""


def gguf_tensors(path: Path) -> GgufTensors:
    """A GGUF's type, architecture and tensor shapes; the header is walked with its counts
    checked against the file's size first (``gguf_header``), as for every GGUF from outside."""
    reader = open_gguf(path)

    def text(key: str) -> str | None:
        field = reader.get_field(key)
        try:
            value = field.contents() if field is not None else None
        except Exception:  # a malformed field: treated as absent
            return None
        return value if isinstance(value, str) else None

    return GgufTensors(
        kind=text("general.type"),
        adapter_type=text("adapter.type"),
        architecture=text("general.architecture"),
        shapes={t.name: [int(n) for n in t.shape] for t in reader.tensors},
    )


def runner_adapter(model_folder: Path, target: Path) -> Path | None:
    """The model's adapter as its runner opens it: the GGUF LoRA file, or a folder under
    ``target`` with the MLX adapter's layers under mlx-lm's file names (links into
    ``model_folder``); ``None`` when the model has no adapter."""
    gguf = model_folder / GGUF_ADAPTER_TITLE
    if gguf.exists():
        return gguf
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
        publish_folder(building, folder)
    return folder


def fuse_adapter(draft: ModelDraft, work: Path) -> ModelDraft:
    """``draft`` with its adapter fused into new weights (``mlx_lm fuse``'s way: each adapted
    linear layer's ``fuse()``), and the adapter layers dropped."""
    from mlx.utils import tree_unflatten

    paths = {layer.media_type: layer.path for layer in draft.layers if layer.path}
    if mediatypes.ADAPTER_GGUF in paths:
        raise ImportSourceError(
            "--fuse works on MLX adapters; llama.cpp applies a GGUF adapter at load "
            "(llama.cpp's llama-export-lora fuses one into a new GGUF)"
        )
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
