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
PROCESSOR_FILES = frozenset({"preprocessor_config.json", "processor_config.json"})
"""A vision-language model's image processor configs: with a ``vision_config`` in
``config.json``, they make a folder a vision model."""
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
"""Framework checkpoints we cannot run and should not copy (pickles can execute code)."""
SAFETENSORS_HEADER_LIMIT = 100 << 20
SMALL_JSON_LIMIT = 1 << 20
"""sentence-transformers' config files are a few hundred bytes; anything larger is refused."""

POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "last",
}
"""sentence-transformers' ``1_Pooling/config.json`` flags, as the pooling names runners use."""
ST_MODULE = "sentence_transformers.models."
ST_SUPPORTED_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})
ENCODER_ARCHITECTURES = frozenset({"bert", "roberta", "xlm-roberta", "modernbert"})
"""HF encoders with no sentence-transformers config: embedded by mean pooling, normalised,
as sentence-transformers itself does for a bare encoder."""
GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}
"""llama.cpp's ``LLAMA_POOLING_TYPE_*`` values that make a GGUF an embedding model."""


def _classify(name: str) -> str:
    if name.endswith(".safetensors"):
        return mediatypes.WEIGHTS_SAFETENSORS
    if name.endswith(".safetensors.index.json"):
        return mediatypes.WEIGHTS_INDEX
    if name == "config.json":
        return mediatypes.HF_CONFIG
    if name in TOKENIZER_FILES:
        return mediatypes.TOKENIZER
    if name in PROCESSOR_FILES:
        return mediatypes.PROCESSOR
    return mediatypes.OTHER_FILE


def safetensors_parameter_count(path: Path) -> int:
    """Count parameters from a safetensors header (8-byte length, then JSON) without loading."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > SAFETENSORS_HEADER_LIMIT:
            raise ImportSourceError(f"{path.name}: safetensors header too large", path=str(path))
        try:
            header = json.loads(handle.read(length))
        except json.JSONDecodeError:
            raise ImportSourceError(f"{path.name}: not a safetensors file") from None
    count = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        elements = 1
        for dim in info.get("shape", []):
            elements *= dim
        count += elements
    return count


def _hf_quantization(config: dict[str, Any]) -> str | None:
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("bits"):
        return f"Q{quant['bits']}"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(str(dtype))


def _small_json(path: Path) -> Any:
    if path.stat().st_size > SMALL_JSON_LIMIT:
        raise ImportSourceError(f"{path}: too large for a config file", path=str(path))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImportSourceError(f"{path}: not valid JSON ({exc})", path=str(path)) from None


def _pooling_mode(config: Any, path: Path) -> str:
    modes = [
        mode
        for flag, mode in POOLING_MODES.items()
        if isinstance(config, dict) and config.get(flag) is True
    ]
    if len(modes) != 1:
        raise ImportSourceError(
            f"{path}: expected exactly one pooling mode of {', '.join(POOLING_MODES)}",
            path=str(path),
        )
    return modes[0]


def embedding_record(folder: Path, hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """How a sentence-transformers folder makes its vectors, from ``modules.json``,
    ``1_Pooling/config.json`` and ``sentence_bert_config.json``; ``None`` for a folder that is
    not an embedding model. Modules we cannot run (``Dense``, ...) are refused here rather than
    silently skipped, which would give vectors the model's users would not recognise."""
    modules_path = folder / "modules.json"
    hidden = hf_config.get("hidden_size")
    record: dict[str, Any] = {
        "pooling": "mean",
        "normalize": False,
        "max_tokens": hf_config.get("max_position_embeddings"),
        "dimensions": hidden if isinstance(hidden, int) else None,
    }
    if not modules_path.is_file():
        if hf_config.get("model_type") not in ENCODER_ARCHITECTURES:
            return None
        return {**record, "normalize": True}
    modules = _small_json(modules_path)
    if not isinstance(modules, list):
        raise ImportSourceError(f"{modules_path}: expected a list of modules", path=str(folder))
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        short = kind.removeprefix(ST_MODULE)
        if not kind.startswith(ST_MODULE) or short not in ST_SUPPORTED_MODULES:
            raise ImportSourceError(
                f"{modules_path}: sentence-transformers module {kind or module!r} is not "
                f"supported (only {', '.join(sorted(ST_SUPPORTED_MODULES))})",
                path=str(folder),
            )
        if short == "Normalize":
            record["normalize"] = True
        elif short == "Pooling":
            sub = str(module.get("path", ""))
            if sub and not is_safe_file_name(sub):
                raise ImportSourceError(f"{modules_path}: bad module path {sub!r}")
            pooling_path = folder / sub / "config.json"
            if not pooling_path.is_file():
                raise ImportSourceError(f"{pooling_path} is missing", path=str(folder))
            pooling = _small_json(pooling_path)
            record["pooling"] = _pooling_mode(pooling, pooling_path)
            if isinstance(pooling.get("word_embedding_dimension"), int):
                record["dimensions"] = pooling["word_embedding_dimension"]
    st_config_path = folder / "sentence_bert_config.json"
    if st_config_path.is_file():
        st_config = _small_json(st_config_path)
        if isinstance(st_config, dict) and isinstance(st_config.get("max_seq_length"), int):
            record["max_tokens"] = st_config["max_seq_length"]
    return record


def vision_record(layers: list[LayerSource], hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """A vision-language model's parts: its vision tower's type and processor files."""
    processors = [layer.title for layer in layers if layer.media_type == mediatypes.PROCESSOR]
    vision = hf_config.get("vision_config")
    if not processors or not isinstance(vision, dict):
        return None
    return {"vision_model": vision.get("model_type"), "processor_files": processors}


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
        embedding=embedding_record(folder, hf_config),
        vision=vision_record(layers, hf_config),
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
        "pooling_type": values.get(f"{architecture}.pooling_type"),
        "embedding_length": values.get(f"{architecture}.embedding_length"),
        "parameter_count": sum(int(t.n_elements) for t in reader.tensors) or None,
    }


def draft_from_gguf(path: Path) -> ModelDraft:
    if not path.is_file():
        raise ImportSourceError(f"{path} is not a file", path=str(path))
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ImportSourceError(f"{path.name} is not a GGUF file (bad magic)", path=str(path))
    meta = read_gguf_metadata(path)
    pooling = GGUF_POOLING.get(meta["pooling_type"])  # type: ignore[arg-type]
    embedding = None
    if pooling is not None:
        embedding = {
            "pooling": pooling,
            "normalize": True,
            "max_tokens": meta["context_length"],
            "dimensions": meta["embedding_length"],
        }
    config = ModelConfig(
        format="gguf",
        architecture=meta["architecture"],
        quantization=meta["quantization"],
        context_length=meta["context_length"],
        parameter_count=meta["parameter_count"],
        license=meta["license"],
        source={"kind": "gguf", "name": path.name},
        embedding=embedding,
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
