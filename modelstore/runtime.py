"""From a name in the store to a ``LocalModel`` a runner can open."""

from __future__ import annotations

import json

from modelstore import mediatypes
from modelstore.adapters import runner_adapter
from modelstore.draft import ModelConfig
from modelstore.model import LocalModel
from modelstore.sources import PROJECTOR_TITLE
from modelstore.store import ModelStore, StoredModel

HF_TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json")


def template_in_use(store: ModelStore, model: StoredModel, config: ModelConfig) -> str | None:
    """The chat template a chat with this model renders: the template layer (a ModelSpec's,
    or one inferred at import), else the model's own (GGUF metadata kept in the config, or the
    HF tokenizer files). Reads only small layers: never the weights."""
    layer = store.text_layer(model, mediatypes.CHAT_TEMPLATE)
    if layer:
        return layer
    if config.chat_template:
        return config.chat_template
    titles = {layer.title: layer.digest for layer in model.manifest.layers}
    for title in HF_TEMPLATE_FILES:
        if title not in titles:
            continue
        text = store.blobs.read_bytes(titles[title]).decode("utf-8", "replace")
        if title.endswith(".jinja"):
            return text
        try:
            template = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(template, list):  # named templates: the default one
            template = next(
                (
                    t.get("template")
                    for t in template
                    if isinstance(t, dict) and t.get("name") == "default"
                ),
                None,
            )
        return template if isinstance(template, str) else None
    return None


def open_model(store: ModelStore, name: str) -> LocalModel:
    return open_stored(store, store.resolve(name))


def open_stored(store: ModelStore, model: StoredModel) -> LocalModel:
    """``model`` ready for a runner; also one whose name does not point at it yet (a trial
    load before ``ModelStore.commit`` tags it)."""
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
        model_info=dict(config.model_info),
        parameters=json.loads(params) if params else {},
        chat_template=store.text_layer(model, mediatypes.CHAT_TEMPLATE),
        system=store.text_layer(model, mediatypes.SYSTEM_PROMPT),
        license=store.text_layer(model, mediatypes.LICENSE),
        description=config.description,
        size_bytes=model.size,
        blob_digests=model.manifest.blob_digests(),
        derived_dir=store.root / "derived",
        embedding=config.embedding,
        vision=config.vision,
        projector=folder / PROJECTOR_TITLE if (folder / PROJECTOR_TITLE).is_file() else None,
        draft=open_model(store, config.draft_model) if config.draft_model else None,
        adapter=runner_adapter(folder, store.root / "derived" / "adapters"),
    )
