"""Every media type the store writes or reads, in one place.

Manifests and indexes are plain OCI types so that any distribution registry accepts them; the
model's own layers use ``application/vnd.mlxserve.*`` types so that a reader can tell weights
from tokenizer files without opening them.
"""

from __future__ import annotations

from typing import Final

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_LAYOUT_FILE: Final = "oci-layout"

MODEL_CONFIG: Final = "application/vnd.mlxserve.model.config.v1+json"
"""The manifest's config blob: format, architecture, parameters, provenance (see ``config.py``)."""

WEIGHTS_SAFETENSORS: Final = "application/vnd.mlxserve.model.weights.safetensors"
WEIGHTS_GGUF: Final = "application/vnd.mlxserve.model.weights.gguf"
WEIGHTS_INDEX: Final = "application/vnd.mlxserve.model.weights.index.v1+json"
TOKENIZER: Final = "application/vnd.mlxserve.model.tokenizer"
HF_CONFIG: Final = "application/vnd.mlxserve.model.hfconfig.v1+json"
PROCESSOR: Final = "application/vnd.mlxserve.model.processor.v1+json"
"""A vision model's image processor config (``preprocessor_config.json``, ...)."""
CHAT_TEMPLATE: Final = "application/vnd.mlxserve.model.template.jinja"
PARAMS: Final = "application/vnd.mlxserve.model.params.v1+json"
SYSTEM_PROMPT: Final = "application/vnd.mlxserve.model.system.v1+text"
LICENSE: Final = "application/vnd.mlxserve.model.license.v1+text"
OTHER_FILE: Final = "application/vnd.mlxserve.model.file"
ADAPTER: Final = "application/vnd.mlxserve.model.adapter.safetensors"
"""LoRA/DoRA weights as ``mlx_lm.lora`` writes them (``adapters.safetensors``)."""
ADAPTER_GGUF: Final = "application/vnd.mlxserve.model.adapter.gguf"
"""A GGUF LoRA for a GGUF model (llama.cpp's ``convert_lora_to_gguf.py``; Ollama's ``adapter``
layer), applied by llama.cpp at load."""
PROJECTOR_GGUF: Final = "application/vnd.mlxserve.model.projector.gguf"
"""A GGUF model's multimodal projector (llama.cpp's ``mmproj``; Ollama's ``projector`` layer):
the vision tower libmtmd loads next to the text model, which makes the model a vision model."""
ADAPTER_CONFIG: Final = "application/vnd.mlxserve.model.adapter.config.v1+json"
"""The adapter's ``adapter_config.json`` (rank, scale, layers it touches)."""

ANNOTATION_TITLE: Final = "org.opencontainers.image.title"
"""The file name a layer had in its source folder; runners see the layer under this name."""
ANNOTATION_REF_NAME: Final = "org.opencontainers.image.ref.name"
ANNOTATION_CREATED: Final = "org.opencontainers.image.created"
ANNOTATION_DESCRIPTION: Final = "org.opencontainers.image.description"
ANNOTATION_LICENSES: Final = "org.opencontainers.image.licenses"

ADAPTER_TYPES: Final = frozenset({ADAPTER, ADAPTER_GGUF})
"""The layers that hold an adapter's weights, one per model whatever its format."""
WEIGHT_TYPES: Final = frozenset({WEIGHTS_SAFETENSORS, WEIGHTS_GGUF})
