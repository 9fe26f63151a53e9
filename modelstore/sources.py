"""Turn what a user points at (an HF-style folder, a ``.gguf`` file) into a ``ModelDraft``.

Only metadata is read here: safetensors headers and GGUF key/values, never the weights, so
``mlxctl import`` stays cheap and never imports mlx or torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from modelstore import mediatypes
from modelstore.draft import LayerSource, ModelConfig, ModelDraft
from modelstore.errors import ImportSourceError
from modelstore.manifest import is_safe_file_name

TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
    }
)
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
"""Framework checkpoints we cannot run and should not copy (pickles can execute code)."""
SAFETENSORS_HEADER_LIMIT = 100 << 20


def _classify(name: str) -> str:
    if name.endswith(".safetensors"):
        return mediatypes.WEIGHTS_SAFETENSORS
    if name.endswith(".safetensors.index.json"):
        return mediatypes.WEIGHTS_INDEX
    if name == "config.json":
        return mediatypes.HF_CONFIG
    if name in TOKENIZER_FILES:
        return mediatypes.TOKENIZER
    return mediatypes.OTHER_FILE


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from a safetensors header (8-byte length, then JSON), unloaded."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > SAFETENSORS_HEADER_LIMIT:
            raise ImportSourceError(f"{path.name}: safetensors header too large", path=str(path))
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ImportSourceError(f"{path.name}: not a safetensors file") from None
    if not isinstance(header, dict):
        raise ImportSourceError(f"{path.name}: not a safetensors file")
    return {
        name: list(info.get("shape", []))
        for name, info in header.items()
        if name != "__metadata__" and isinstance(info, dict)
    }


def safetensors_parameter_count(path: Path) -> int:
    count = 0
    for shape in safetensors_shapes(path).values():
        elements = 1
        for dim in shape:
            elements *= dim
        count += elements
    return count


def _hf_quantization(config: dict[str, Any]) -> str | None:
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("bits"):
        return f"Q{quant['bits']}"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(str(dtype))


def draft_from_hf_folder(folder: Path) -> ModelDraft:
    """An MLX model: an HF-style folder with ``config.json`` and ``*.safetensors``."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ImportSourceError(
            f"{folder} is not a model folder: it has no config.json", path=str(folder)
        )
    try:
        hf_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImportSourceError(f"{config_path}: not valid JSON ({exc})") from None
    layers: list[LayerSource] = []
    parameter_count = 0
    for path in sorted(folder.iterdir()):
        name = path.name
        if not path.is_file() or not is_safe_file_name(name) or name.endswith(SKIPPED_SUFFIXES):
            continue
        media_type = _classify(name)
        if media_type == mediatypes.WEIGHTS_SAFETENSORS:
            parameter_count += safetensors_parameter_count(path)
        layers.append(LayerSource(media_type, name, path=path))
    if not any(layer.media_type == mediatypes.WEIGHTS_SAFETENSORS for layer in layers):
        raise ImportSourceError(f"{folder} has no *.safetensors weights", path=str(folder))
    if not any(layer.media_type == mediatypes.TOKENIZER for layer in layers):
        raise ImportSourceError(f"{folder} has no tokenizer files", path=str(folder))
    config = ModelConfig(
        format="mlx",
        architecture=hf_config.get("model_type"),
        quantization=_hf_quantization(hf_config),
        context_length=hf_config.get("max_position_embeddings"),
        parameter_count=parameter_count or None,
        source={"kind": "folder", "name": folder.name},
    )
    return ModelDraft(config, layers)


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF key/values we need (the ``gguf`` package parses; it memory-maps, never loads)."""
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct.error, ... on bad files
        raise ImportSourceError(f"{path.name} is not a valid GGUF file: {exc}") from None
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in {"tokenizer.ggml.model"}:
            continue
        try:
            values[key] = field.contents()
        except Exception:  # a field type this gguf version cannot decode: not one we need
            continue
    architecture = values.get("general.architecture")
    file_type = values.get("general.file_type")
    quantization = None
    if isinstance(file_type, int):
        try:
            quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quantization = None
    return {
        "architecture": architecture,
        "quantization": quantization,
        "context_length": values.get(f"{architecture}.context_length"),
        "name": values.get("general.name"),
        "license": values.get("general.license"),
        "chat_template": values.get("tokenizer.chat_template"),
        "parameter_count": sum(int(t.n_elements) for t in reader.tensors) or None,
    }


def draft_from_gguf(path: Path) -> ModelDraft:
    if not path.is_file():
        raise ImportSourceError(f"{path} is not a file", path=str(path))
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ImportSourceError(f"{path.name} is not a GGUF file (bad magic)", path=str(path))
    meta = read_gguf_metadata(path)
    config = ModelConfig(
        format="gguf",
        architecture=meta["architecture"],
        quantization=meta["quantization"],
        context_length=meta["context_length"],
        parameter_count=meta["parameter_count"],
        license=meta["license"],
        source={"kind": "gguf", "name": path.name},
    )
    return ModelDraft(config, [LayerSource(mediatypes.WEIGHTS_GGUF, path.name, path=path)])


def draft_from_path(path: Path) -> ModelDraft:
    """Dispatch on what ``path`` is; archives are handled by ``ocilayout`` (they carry blobs)."""
    if path.is_dir():
        return draft_from_hf_folder(path)
    if path.suffix == ".gguf":
        return draft_from_gguf(path)
    raise ImportSourceError(
        f"{path}: expected an HF-style model folder, a .gguf file or a packed .tar archive",
        path=str(path),
    )
