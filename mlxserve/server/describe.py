"""How a stored model is described on the wire: Ollama's ``details`` and friends."""

from __future__ import annotations

import json
from typing import Any

from mlxserve.api.types import utc_timestamp
from modelstore import mediatypes
from modelstore.draft import ModelConfig
from modelstore.store import ModelStore, StoredModel


def parameter_size(count: int | None) -> str:
    if not count:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def details(store: ModelStore, model: StoredModel) -> dict[str, Any]:
    config = store.config(model)
    family = config.architecture or ""
    return {
        "parent_model": "",
        "format": config.format,
        "family": family,
        "families": [family] if family else [],
        "parameter_size": parameter_size(config.parameter_count),
        "quantization_level": config.quantization or "",
    }


def tag_entry(store: ModelStore, model: StoredModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": utc_timestamp(model.modified),
        "size": model.size,
        "digest": model.manifest_digest.removeprefix("sha256:"),
        "details": details(store, model),
    }


def parameters_text(parameters: dict[str, Any]) -> str:
    """Ollama's ``parameters`` string: one ``name value`` per line (lists repeat the name)."""
    lines = []
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<20} {item}")
    return "\n".join(lines)


def capabilities(config: ModelConfig) -> list[str]:
    """What the model is for, in Ollama's words; the store's records at import decide."""
    if config.embedding is not None:
        return ["embedding"]
    return ["completion", "vision"] if config.vision is not None else ["completion"]


def show_body(store: ModelStore, model: StoredModel, template: str | None) -> dict[str, Any]:
    config = store.config(model)
    params_text = store.text_layer(model, mediatypes.PARAMS)
    parameters = json.loads(params_text) if params_text else {}
    return {
        "license": store.text_layer(model, mediatypes.LICENSE) or config.license or "",
        "modelfile": "",
        "parameters": parameters_text(parameters),
        "template": template or "",
        "system": store.text_layer(model, mediatypes.SYSTEM_PROMPT) or "",
        "details": details(store, model),
        "model_info": {
            "general.architecture": config.architecture,
            "general.parameter_count": config.parameter_count,
            f"{config.architecture}.context_length": config.context_length,
        },
        "capabilities": capabilities(config),
        "modified_at": utc_timestamp(model.modified),
    }
