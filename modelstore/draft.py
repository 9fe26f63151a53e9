"""A model before it is stored: its config and the files or texts that become its layers.

Every way a model comes in (an HF folder, a GGUF file, a ModelSpec) produces a ``ModelDraft``;
``ModelStore.commit`` writes one into the store and ``ocilayout.pack`` writes one into an
archive, so both give the same manifest for the same inputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelstore import mediatypes
from modelstore.blobs import sha256_digest
from modelstore.manifest import Descriptor, Manifest

ModelFormat = Literal["mlx", "gguf"]


@dataclass
class ModelConfig:
    """The manifest's config blob. No timestamps: the same model must hash the same."""

    format: ModelFormat
    architecture: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    parameter_count: int | None = None
    description: str | None = None
    license: str | None = None
    source: dict[str, str] = field(default_factory=dict)
    template_source: str | None = None
    """Where the chat-template layer came from when the model itself gave none:
    ``inferred:<family>`` (``modelstore.templates``), or ``none`` when nothing could be
    inferred. Absent when the model ships its template or a ModelSpec set one."""
    model_info: dict[str, Any] = field(default_factory=dict)
    """Ollama's ``model_info`` (``general.architecture``, ``<arch>.context_length``, head
    counts, vocabulary size...), read once at import so ``/api/show`` never re-parses weights."""
    features: list[str] = field(default_factory=list)
    """What the vocabulary and config say the model can do beyond completion: ``thinking``,
    ``insert`` (fill-in-the-middle), ``embedding``, ``vision`` (``/api/show`` capabilities)."""
    fim_tokens: dict[str, str] = field(default_factory=dict)
    """Fill-in-the-middle tokens (``prefix``, ``suffix``, ``middle``) when the model has them."""
    chat_template: str | None = None
    """The template a GGUF ships in its metadata, copied here so that showing it never
    re-parses the file (HF folders keep theirs in ``tokenizer_config.json``, a small layer)."""
    parent_model: str | None = None
    """The model this one was created ``from`` (``/api/create``, ModelSpec ``model://``)."""
    embedding: dict[str, Any] | None = None
    """Set for an embedding model (an encoder that only embeds): how its vectors are made
    (``pooling``, ``normalize``, ``max_tokens``, ``dimensions``; see ``sources.py``)."""
    vision: dict[str, Any] | None = None
    """Set for a vision-language model: its vision tower and processor files."""
    draft_model: str | None = None
    """The draft model for speculative decoding, pinned: ``NAME:TAG@sha256:...`` in the store."""

    def to_bytes(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if v not in (None, {}, "", [])}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelConfig:
        body = json.loads(data)
        known = {name: body[name] for name in cls.__dataclass_fields__ if name in body}
        return cls(**known)


@dataclass(frozen=True)
class LayerSource:
    """One layer: a file on disk (``path``) or a small text we generated (``data``)."""

    media_type: str
    title: str
    path: Path | None = None
    data: bytes | None = None
    digest: str | None = None
    """The digest the source claims for ``path`` (Ollama's blobs): refused if it differs."""


@dataclass
class ModelDraft:
    config: ModelConfig
    layers: list[LayerSource] = field(default_factory=list)

    def replace_layer(self, media_type: str, title: str, data: bytes) -> None:
        """Set a generated layer (template, params, ...), replacing one of the same type."""
        self.layers = [layer for layer in self.layers if layer.media_type != media_type]
        self.layers.append(LayerSource(media_type, title, data=data))

    def total_source_bytes(self) -> int:
        return sum(
            layer.path.stat().st_size if layer.path else len(layer.data or b"")
            for layer in self.layers
        )


TEMPLATE_TITLE = "mlxserve.template.jinja"
PARAMS_TITLE = "mlxserve.params.json"
SYSTEM_TITLE = "mlxserve.system.txt"
LICENSE_TITLE = "mlxserve.license.txt"
"""Titles of generated layers; prefixed so they never collide with a model's own files."""

GENERATED_LAYERS = {
    mediatypes.CHAT_TEMPLATE: TEMPLATE_TITLE,
    mediatypes.PARAMS: PARAMS_TITLE,
    mediatypes.SYSTEM_PROMPT: SYSTEM_TITLE,
    mediatypes.LICENSE: LICENSE_TITLE,
}


def params_bytes(parameters: dict[str, Any]) -> bytes:
    return json.dumps(parameters, sort_keys=True, separators=(",", ":")).encode()


def draft_manifest(draft: ModelDraft, stored: list[tuple[str, int]]) -> Manifest:
    """The manifest of ``draft`` once each layer is a blob (``stored``: digest and size per
    layer, in order). The store and packed archives both build it here, so the same inputs
    give the same manifest digest in both."""
    layers = [
        Descriptor(layer.media_type, digest, size, {mediatypes.ANNOTATION_TITLE: layer.title})
        for layer, (digest, size) in zip(draft.layers, stored, strict=True)
    ]
    config = draft.config.to_bytes()
    config_descriptor = Descriptor(mediatypes.MODEL_CONFIG, sha256_digest(config), len(config))
    return Manifest(config_descriptor, layers)
