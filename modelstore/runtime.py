"""From a name in the store to a ``LocalModel`` a runner can open."""

from __future__ import annotations

import json

from modelstore import mediatypes
from modelstore.adapters import adapter_folder
from modelstore.model import LocalModel
from modelstore.store import ModelStore


def open_model(store: ModelStore, name: str) -> LocalModel:
    model = store.resolve(name)
    config = store.config(model)
    folder = store.materialize(model)
    weight_type = (
        mediatypes.WEIGHTS_GGUF if config.format == "gguf" else mediatypes.WEIGHTS_SAFETENSORS
    )
    params = store.text_layer(model, mediatypes.PARAMS)
    return LocalModel(
        name=model.name,
        manifest_digest=model.manifest_digest,
        path=folder,
        format=config.format,
        weights=[folder / layer.title for layer in model.manifest.layers_of(weight_type)],
        architecture=config.architecture,
        quantization=config.quantization,
        context_length=config.context_length,
        parameters=json.loads(params) if params else {},
        chat_template=store.text_layer(model, mediatypes.CHAT_TEMPLATE),
        system=store.text_layer(model, mediatypes.SYSTEM_PROMPT),
        license=store.text_layer(model, mediatypes.LICENSE),
        description=config.description,
        size_bytes=model.size,
        blob_digests=model.manifest.blob_digests(),
        derived_dir=store.root / "derived",
        draft=open_model(store, config.draft_model) if config.draft_model else None,
        adapter=adapter_folder(folder, store.root / "derived" / "adapters"),
    )
