"""Turn what a user points at (an HF-style folder, a ``.gguf`` file) into a ``ModelDraft``.

Only metadata is read here: safetensors headers and GGUF key/values, never the weights, so
``mlxctl import`` stays cheap and never imports mlx or torch.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelstore import mediatypes, metadata
from modelstore.chat_template import refuse_hostile_template
from modelstore.draft import LayerSource, ModelConfig, ModelDraft
from modelstore.errors import ImportSourceError
from modelstore.gguf_header import check_gguf_header
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
GGUF_POOLING = {1: "mean", 2: "cls", 3: "last", 4: metadata.RANK_POOLING}
CLASSIFIER_OUTPUT_TENSOR = "cls.output.weight"
"""A classification head's output layer in a GGUF. ``convert_hf_to_gguf.py`` writes an
XLM-RoBERTa or BERT ``*ForSequenceClassification`` (bge-reranker-v2-m3) with this head and its
``<arch>.classifier.output_labels`` but no pooling type (llama.cpp's server is started with
``--reranking``); either marks the GGUF as a reranker (rank pooling)."""
"""llama.cpp's ``LLAMA_POOLING_TYPE_*`` values as the store's pooling names; an embedding GGUF
that declares none of them (or no pooling type) is mean-pooled."""


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


def model_card(folder: Path) -> str | None:
    """The folder's HF model card (``README.md``), if it has a small one."""
    card = folder / "README.md"
    if not card.is_file() or card.stat().st_size > SMALL_JSON_LIMIT:
        return None
    return card.read_text(errors="replace")


def cross_encoder(hf_config: dict[str, Any]) -> bool:
    """A reranker: a ``*ForSequenceClassification`` of an architecture we run as one, with a
    single label (its one logit is the relevance score)."""
    architectures = [str(a) for a in hf_config.get("architectures") or []]
    labels = hf_config.get("id2label")
    return (
        hf_config.get("model_type") in metadata.CROSS_ENCODER_ARCHITECTURES
        and any(a.endswith("ForSequenceClassification") for a in architectures)
        and (hf_config.get("num_labels", 1) == 1 if labels is None else len(labels) == 1)
    )


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
    if cross_encoder(hf_config):
        if hf_config.get("model_type") == "xlm-roberta" and isinstance(record["max_tokens"], int):
            # RoBERTa's positions start after the padding id: 514 positions hold 512 tokens.
            record["max_tokens"] -= int(hf_config.get("pad_token_id", 1)) + 1
        return {**record, "pooling": metadata.RANK_POOLING, "dimensions": 1}
    card = model_card(folder)
    if card and metadata.card_allows_matryoshka(card):
        record["matryoshka"] = True
    if not modules_path.is_file():
        causal = any(str(a).endswith("ForCausalLM") for a in hf_config.get("architectures") or [])
        if hf_config.get("model_type") not in metadata.EMBEDDING_ARCHITECTURES or causal:
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


def _folder_templates(folder: Path) -> list[str]:
    """The chat templates an HF folder ships (``chat_template.jinja``, or in
    ``tokenizer_config.json`` as one string or a list of named ones)."""
    templates = []
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates.append(jinja_file.read_text(errors="replace"))
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return templates
    found = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(found, str):
        templates.append(found)
    elif isinstance(found, list):
        templates.extend(
            item["template"]
            for item in found
            if isinstance(item, dict) and isinstance(item.get("template"), str)
        )
    return templates


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
    for template in _folder_templates(folder):
        refuse_hostile_template(template)
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
    draft = ModelDraft(config, layers)
    _describe_hf_folder(draft, folder, hf_config)
    return draft


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer file, or ``{}`` when it is absent or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(token: Any) -> str | None:
    """``tokenizer_config.json`` writes a special token as text or as ``{"content": ...}``."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _hf_adds_bos(tokenizer_config: dict[str, Any], tokenizer_json: dict[str, Any]) -> bool:
    """``add_bos_token`` when the config says; else whether the fast tokenizer's
    post-processor puts the BOS token in front of a single sequence."""
    if isinstance(tokenizer_config.get("add_bos_token"), bool):
        return tokenizer_config["add_bos_token"]
    bos = _token_text(tokenizer_config.get("bos_token"))
    processor = tokenizer_json.get("post_processor")
    return bool(bos and processor and json.dumps(bos) in json.dumps(processor))


def _hf_vocabulary(tokenizer_json: dict[str, Any]) -> list[str]:
    vocab = tokenizer_json.get("model", {}).get("vocab", {})
    tokens = (
        list(vocab)
        if isinstance(vocab, dict)
        else [entry[0] for entry in vocab if isinstance(entry, list) and entry]
    )
    tokens += [entry.get("content", "") for entry in tokenizer_json.get("added_tokens", [])]
    return [token for token in tokens if isinstance(token, str)]


def _describe_hf_folder(draft: ModelDraft, folder: Path, hf_config: dict[str, Any]) -> None:
    config = draft.config
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    tokenizer_json = _read_json(folder / "tokenizer.json")
    present = metadata.interesting_tokens(_hf_vocabulary(tokenizer_json))
    own = tokenizer_config.get("chat_template")
    has_template = bool(own) or any(
        (folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")
    )
    embedding = config.embedding is not None
    config.fim_tokens = metadata.fim_tokens(present)
    card = model_card(folder)
    causal_reranker = (
        not embedding
        and card is not None
        and metadata.card_pipeline_tag(card) == metadata.RANKING_PIPELINE_TAG
    )
    config.features = metadata.features(
        present,
        embedding=embedding,
        vision=config.vision is not None,
        fim=config.fim_tokens,
        rerank=causal_reranker
        or (embedding and config.embedding.get("pooling") == metadata.RANK_POOLING),
    )
    config.model_info = metadata.hf_model_info(hf_config, config.parameter_count)
    if not embedding:
        metadata.apply_template_inference(
            draft,
            "present" if has_template else None,
            present,
            _hf_adds_bos(tokenizer_config, tokenizer_json),
        )


GGUF_FIM_KEYS = {
    "prefix": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    "suffix": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    "middle": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
}
"""Where a GGUF names its fill-in-the-middle tokens (llama.cpp's keys, newer and older)."""
SPM_ADDS_BOS_BY_DEFAULT = frozenset({"llama"})
"""Tokenizer models for which llama.cpp adds BOS when ``add_bos_token`` is absent."""


def gguf_adds_bos(add_bos_token: Any, tokenizer_model: Any) -> bool:
    """Whether llama.cpp adds BOS to a GGUF's raw prompts: its ``tokenizer.ggml.add_bos_token``,
    else llama.cpp's default for its ``tokenizer.ggml.model``."""
    if isinstance(add_bos_token, bool):
        return add_bos_token
    return tokenizer_model in SPM_ADDS_BOS_BY_DEFAULT


def open_gguf(path: Path, unreadable: Callable[[str], Exception] = ImportSourceError) -> Any:
    """gguf-py's ``GGUFReader`` over ``path`` (memory-mapped, never loaded), once the bounded
    header walk (``gguf_header``) found its counts consistent with its size: every GGUF from
    outside (a model, an adapter, a projector, a model converted for MLX) is opened here. A file
    whose header passes but that gguf-py cannot read raises ``unreadable(message)``: the caller
    says what that means (a conversion: an architecture it cannot convert)."""
    from gguf import GGUFReader

    check_gguf_header(path)
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct.error, ... on bad files
        raise unreadable(f"{path.name} is not a valid GGUF file: {exc}") from None


PROJECTOR_TITLE = "mmproj.gguf"
"""The projector's file name in the model's folder (``LocalModel.projector``)."""


def projector_layer(path: Path, draft: ModelDraft) -> LayerSource:
    """The multimodal projector of the GGUF model in ``draft``, which becomes a vision model.

    Checked here (the header, ``general.architecture`` ``clip`` with a vision encoder) so that a
    wrong file is refused at import; whether its output fits the text model's embedding width
    libmtmd checks at load, with a clear message (``LlamaCppRunner``).
    """
    if draft.config.format != "gguf":
        raise ImportSourceError("a projector (mmproj) goes with a GGUF model")
    fields = open_gguf(path).fields
    try:
        values = {
            key: fields[key].contents()
            for key in ("general.architecture", "clip.has_vision_encoder", "clip.projector_type")
            if key in fields
        }
    except Exception as exc:  # a field this gguf version cannot decode
        raise ImportSourceError(f"{path.name} is not a valid GGUF file: {exc}") from None
    if values.get("general.architecture") != "clip" or not values.get("clip.has_vision_encoder"):
        raise ImportSourceError(
            f"{path.name} is not a vision projector (mmproj): it needs general.architecture "
            "clip and clip.has_vision_encoder"
        )
    projector_type = values.get("clip.projector_type")
    draft.config.vision = {
        "projector": PROJECTOR_TITLE,
        "projector_type": projector_type if isinstance(projector_type, str) else None,
    }
    if "vision" not in draft.config.features:
        draft.config.features = [*draft.config.features, "vision"]
    return LayerSource(mediatypes.PROJECTOR_GGUF, PROJECTOR_TITLE, path=path)


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF key/values we keep (the ``gguf`` package parses; it memory-maps, never loads).

    The token list is scanned once for the few tokens that matter (``metadata``), never kept.
    """
    from gguf import LlamaFileType

    reader = open_gguf(path)
    values: dict[str, Any] = {}
    tokens: list[str] = []
    for key, field in reader.fields.items():
        if key == "tokenizer.ggml.tokens":
            tokens = [bytes(field.parts[index]).decode("utf-8", "replace") for index in field.data]
            continue
        if key.startswith("tokenizer.ggml.") and len(field.data) > 1:
            continue  # merges, scores, token types: vocab-sized arrays nothing here needs
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
    parameter_count = sum(int(t.n_elements) for t in reader.tensors) or None
    present = metadata.interesting_tokens(tokens)
    fim: dict[str, str] = {}
    for role, keys in GGUF_FIM_KEYS.items():
        for key in keys:
            token_id = values.get(key)
            if isinstance(token_id, int) and 0 <= token_id < len(tokens):
                fim[role] = tokens[token_id]
                break
    adds_bos = gguf_adds_bos(
        values.get("tokenizer.ggml.add_bos_token"), values.get("tokenizer.ggml.model")
    )
    return {
        "type": values.get("general.type"),
        "architecture": architecture,
        "quantization": quantization,
        "context_length": values.get(f"{architecture}.context_length"),
        "name": values.get("general.name"),
        "license": values.get("general.license"),
        "chat_template": values.get("tokenizer.chat_template"),
        "pooling_type": values.get(f"{architecture}.pooling_type"),
        "embedding_length": values.get(f"{architecture}.embedding_length"),
        "parameter_count": parameter_count,
        "present_tokens": present,
        "fim_tokens": fim if len(fim) == len(GGUF_FIM_KEYS) else metadata.fim_tokens(present),
        "adds_bos": adds_bos,
        "embedding": f"{architecture}.pooling_type" in values
        or architecture in metadata.EMBEDDING_ARCHITECTURES,
        "vision": bool(values.get("clip.has_vision_encoder")),
        "reranker_name": metadata.gguf_names_a_reranker(values),
        "classifier_head": bool(values.get(f"{architecture}.classifier.output_labels"))
        or any(tensor.name == CLASSIFIER_OUTPUT_TENSOR for tensor in reader.tensors),
        "model_info": metadata.gguf_model_info(values, len(tokens) or None, parameter_count),
    }


def draft_from_gguf(path: Path) -> ModelDraft:
    if not path.is_file():
        raise ImportSourceError(f"{path} is not a file", path=str(path))
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ImportSourceError(f"{path.name} is not a GGUF file (bad magic)", path=str(path))
    meta = read_gguf_metadata(path)
    if meta["type"] == "adapter":
        raise ImportSourceError(
            f"{path.name} is a LoRA adapter, not a model: name it in a ModelSpec's adapters: "
            "over its base model",
            path=str(path),
        )
    embedding = None
    if meta["embedding"]:
        pooling = GGUF_POOLING.get(meta["pooling_type"], "mean")
        if meta["pooling_type"] is None and meta["classifier_head"]:
            pooling = metadata.RANK_POOLING
        embedding = {
            "pooling": pooling,
            "normalize": True,
            "max_tokens": meta["context_length"],
            "dimensions": meta["embedding_length"],
        }
    if isinstance(meta["chat_template"], str):
        refuse_hostile_template(meta["chat_template"])
    config = ModelConfig(
        format="gguf",
        architecture=meta["architecture"],
        quantization=meta["quantization"],
        context_length=meta["context_length"],
        parameter_count=meta["parameter_count"],
        license=meta["license"],
        source={"kind": "gguf", "name": path.name},
        embedding=embedding,
        chat_template=meta["chat_template"],
        model_info=meta["model_info"],
        fim_tokens=meta["fim_tokens"],
    )
    config.features = metadata.features(
        meta["present_tokens"],
        embedding=embedding is not None,
        vision=meta["vision"],
        fim=config.fim_tokens,
        rerank=meta["reranker_name"]
        if embedding is None
        else embedding["pooling"] == metadata.RANK_POOLING,
    )
    draft = ModelDraft(config, [LayerSource(mediatypes.WEIGHTS_GGUF, path.name, path=path)])
    if not meta["embedding"]:
        metadata.apply_template_inference(
            draft, meta["chat_template"], meta["present_tokens"], meta["adds_bos"]
        )
    return draft


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
